"""The shared training loop: schedule, decay groups, accumulation equivalence, exact resume after a crash,
time budget, mixed precision, checkpoint contents. A 2-layer 32-wide GPT on synthetic tokens.

    python -m pytest tests/test_loop.py -q
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from chatstack.checkpoint import load_checkpoint, read_config
from chatstack.model import GPT
from chatstack.presets import get_preset
from chatstack.train import loop as L
from chatstack.train.loop import TrainConfig, has_checkpoint, train
from chatstack.train.optim import build_adamw, lr_at, param_groups

T = 16


class FakeClock:
    """The loop's clock for the time-budget tests: each training batch costs `step_s` (more for the slow first
    steps), so the tests check the budget's planning, not how fast this machine is."""

    def __init__(self):
        self.t = 0.0

    def perf_counter(self) -> float:
        return self.t

    def time(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(L, "time", c)
    return c


class ToyTask:
    """Rows of a fixed periodic token stream (learnable), drawn per step like the pretraining task:
    the whole global batch from (seed, step), each (micro, rank) taking its slice."""

    def __init__(self, batch_size, grad_accum, world=1, crash_at=None, slow_steps=0, delay=0.0, clock=None, step_s=0.0):
        self.B, self.accum, self.world, self.crash_at = batch_size, grad_accum, world, crash_at
        self.slow_steps, self.delay = slow_steps, delay  # the first steps cost `delay` more: a slow start
        self.clock, self.step_s = clock, step_s
        self.stream = torch.tensor([(i * 7 + (i // 13)) % 97 for i in range(4000)])
        self.flops_per_token = 1e6

    def train_batch(self, step, micro, rank, world):
        if self.crash_at is not None and step == self.crash_at:
            raise RuntimeError("simulated crash")
        if self.clock is not None:
            self.clock.t += self.step_s + (self.delay if step < self.slow_steps else 0.0)
        g = torch.Generator().manual_seed(1000 + step)
        offs = torch.randint(0, len(self.stream) - T - 1, (self.B * self.accum * world,), generator=g)
        start = (micro * world + rank) * self.B
        rows = torch.stack([self.stream[o : o + T + 1] for o in offs[start : start + self.B]])
        return {"idx": rows[:, :-1], "targets": rows[:, 1:]}

    def loss(self, model, batch):
        _, loss = model(batch["idx"], batch["targets"])
        return loss, {"ppl": float(loss.detach().exp())}

    def evaluate(self, model):
        b = self.train_batch(0, 0, 0, 1)
        return {"val_loss": float(model(b["idx"], b["targets"])[1])}


def nano(dropout=0.0):
    torch.manual_seed(0)
    return GPT(get_preset("nano", vocab_size=128, block_size=T, dropout=dropout))


def run(tmp, name, steps=12, bs=4, accum=1, crash_at=None, resume=False, log_every=1, clock=None, **kw):
    cfg = TrainConfig(
        out=str(tmp / name),
        max_steps=steps,
        batch_size=bs,
        grad_accum=accum,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=3,
        log_every=log_every,
        eval_every=5,
        progress=False,
        resume=resume,
        **kw,
    )
    model = nano(kw.get("dropout_model", 0.0)) if "dropout_model" in kw else nano()
    task = ToyTask(bs, accum, crash_at=crash_at, clock=clock, step_s=0.01)
    return train(model, task, cfg, {"stage": "toy", "model": model.config.to_dict()}, None)


def losses(path):
    rows = [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r], rows


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 1.0, 0.1, 10, 110) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # rising
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:110]))  # falling
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == lrs[119] == 0.1


def test_weight_decay_only_on_matrices():
    m = nano()
    decay, no_decay = param_groups(m, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) > 0
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == m.num_params()  # the tied embedding counted once
    for impl in ("fused", "foreach", "for"):
        build_adamw(m, 1e-3, 0.1, impl=impl)


def test_lr_scale_makes_its_own_groups_and_scales_the_schedule(tmp_path):
    m = nano()
    for p in m.blocks[0].parameters():
        p.lr_scale = 0.1
    groups = param_groups(m, 0.1)
    assert [g.get("lr_scale", 1.0) for g in groups] == [1.0, 1.0, 0.1, 0.1]
    scaled = {id(p) for g in groups[2:] for p in g["params"]}
    assert scaled == {id(p) for p in m.blocks[0].parameters()}
    assert sum(p.numel() for g in groups for p in g["params"]) == m.num_params()
    # the loop gives each group the schedule's lr times its scale: the scaled block moves ~10x less
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    cfg = TrainConfig(
        out=str(tmp_path / "s"), max_steps=1, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=0, progress=False
    )
    train(m, ToyTask(4, 1), cfg, {"stage": "toy", "model": m.config.to_dict()}, None)
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in m.named_parameters()}
    # Adam's first step moves every weight by ~lr (the sign of its gradient)
    assert moved["blocks.0.attn.qkv.weight"] == pytest.approx(1e-3, rel=0.05)
    assert moved["blocks.1.attn.qkv.weight"] == pytest.approx(1e-2, rel=0.05)


def test_trains_and_writes_metrics_and_checkpoint(tmp_path):
    path = run(tmp_path, "a", steps=30)
    curve, rows = losses(path)
    assert [s for s, _ in curve] == list(range(1, 31))
    assert curve[-1][1] < curve[0][1] - 0.5  # it learns the periodic stream
    r = rows[0]
    for key in ("lr", "grad_norm", "tokens_per_s", "mfu", "ppl", "tokens"):
        assert key in r
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [5, 10, 15, 20, 25, 30] and evals[-1].get("final")
    cfg = read_config(path)
    assert cfg["stage"] == "toy" and cfg["train"]["max_steps"] == 30 and cfg["kind"] == "lm"
    ck = load_checkpoint(path, with_state=True, with_tokenizer=False)
    assert ck.state["train"]["step"] == 30 and "optimizer" in ck.state["train"]


@pytest.mark.parametrize("dtype,rel", [("fp32", 1e-5), ("bf16", 2e-3)])
def test_grad_accumulation_matches_one_big_batch(tmp_path, dtype, rel):
    # bf16 on CPU (bf16 matmuls): each micro-batch's weight gradient is rounded to bf16 before the fp32 sum,
    # so the two schedules agree to bf16's precision instead of fp32's
    big, _ = losses(run(tmp_path, "big", steps=6, bs=8, accum=1, dtype=dtype))
    acc, _ = losses(run(tmp_path, "acc", steps=6, bs=2, accum=4, dtype=dtype))
    for (s1, l1), (s2, l2) in zip(big, acc):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=rel)


@pytest.mark.parametrize("log_every,dtype", [(1, "fp32"), (3, "fp32"), (1, "bf16")])
def test_resume_after_crash_gives_the_same_curve(tmp_path, log_every, dtype):
    ref, ref_rows = losses(run(tmp_path, "ref", steps=12, log_every=log_every, dtype=dtype))
    with pytest.raises(RuntimeError, match="simulated crash"):
        # logged steps 9 (and 10) are past the save at 8: the resumed run must drop and redo them
        run(tmp_path, "crash", steps=12, save_every=4, crash_at=10, log_every=log_every, dtype=dtype)
    assert has_checkpoint(tmp_path / "crash")
    resumed, rows = losses(
        run(tmp_path, "crash", steps=12, save_every=4, resume=True, log_every=log_every, dtype=dtype)
    )
    assert resumed == ref  # bit-for-bit: same steps, same losses
    assert [r["step"] for r in rows if "val_loss" in r] == [r["step"] for r in ref_rows if "val_loss" in r]


def test_resume_with_dropout_is_exact(tmp_path):
    def go(name, **kw):
        cfg = TrainConfig(
            out=str(tmp_path / name),
            max_steps=8,
            batch_size=4,
            lr=3e-3,
            warmup_steps=2,
            log_every=1,
            eval_every=0,
            progress=False,
            **kw,
        )
        model = nano(dropout=0.2)
        return train(model, ToyTask(4, 1, crash_at=kw.pop("crash", None)), cfg, {"model": {}}, None)

    ref, _ = losses(go("ref"))
    cfg = TrainConfig(
        out=str(tmp_path / "x"),
        max_steps=8,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        log_every=1,
        eval_every=0,
        save_every=3,
        progress=False,
    )
    with pytest.raises(RuntimeError):
        train(nano(dropout=0.2), ToyTask(4, 1, crash_at=5), cfg, {"model": {}}, None)
    cfg.resume = True
    resumed, _ = losses(train(nano(dropout=0.2), ToyTask(4, 1), cfg, {"model": {}}, None))
    assert resumed == ref


def test_resume_of_a_finished_run_does_nothing(tmp_path):
    path = run(tmp_path, "done", steps=4)
    before = (path / "metrics.jsonl").read_text()
    run(tmp_path, "done", steps=4, resume=True)
    assert (path / "metrics.jsonl").read_text() == before


def test_resume_with_more_steps_continues(tmp_path):
    run(tmp_path, "more", steps=4)
    curve, _ = losses(run(tmp_path, "more", steps=7, resume=True))
    assert [s for s, _ in curve] == list(range(1, 8))


def test_time_budget_stops_cleanly_and_saves(tmp_path, clock):
    path = run(tmp_path, "tb", steps=100000, time_budget=1.0, clock=clock)  # 10 ms a step on the fake clock
    curve, rows = losses(path)
    assert 50 <= curve[-1][0] <= 100
    state = load_checkpoint(path, with_state=True, with_tokenizer=False).state["train"]
    assert state["step"] == curve[-1][0] == state["max_steps"]
    assert rows[-1].get("final") and "val_loss" in rows[-1]


def test_time_budget_replans_after_a_slow_start(tmp_path, clock):
    """Steps 1-20 are slow (30 ms on the fake clock), the rest fast (10 ms): the plan made after 20 steps (~160
    steps in 5 s) is re-made from the pace of steps 21-100 and the run goes on, still ending on its cosine
    within the budget."""
    cfg = TrainConfig(
        out=str(tmp_path / "slow"),
        max_steps=100000,
        batch_size=4,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=100,
        log_every=1,
        eval_every=0,
        save_every=0,
        progress=False,
        time_budget=5.0,
        dtype="fp32",
    )  # the planning under test, at fp32's pace (bf16 casts slow a toy model down)
    model = nano()
    path = train(
        model,
        ToyTask(4, 1, slow_steps=20, delay=0.02, clock=clock, step_s=0.01),
        cfg,
        {"stage": "toy", "model": model.config.to_dict()},
        None,
    )
    curve, rows = losses(path)
    state = load_checkpoint(path, with_state=True, with_tokenizer=False).state["train"]
    assert state["step"] == curve[-1][0] == state["max_steps"]
    assert curve[-1][0] > 300  # far beyond the ~160 the first 20 steps' pace allowed
    assert max(r.get("elapsed_s", 0) for r in rows) <= 5.0 + 0.01  # within the budget, to one step
    last = [r for r in rows if "lr" in r][-1]
    assert last["lr"] == pytest.approx(3e-4, rel=0.05) or not last.get("final")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_runs(tmp_path, dtype):
    curve, _ = losses(run(tmp_path, dtype, steps=4, dtype=dtype))
    assert all(math.isfinite(l) for _, l in curve)


def test_progress_bar_shows_the_tasks_held_out_number():
    from chatstack.train.loop import _val_postfix

    assert _val_postfix({"step": 4, "val_loss": 1.25, "val_ppl": 3.5}) == {"val": "1.250"}
    # a reward model has no held-out loss: its accuracy is shown, not a made-up 0.000
    assert _val_postfix({"step": 4, "val_accuracy": 0.8}) == {"accuracy": "0.800"}
    assert _val_postfix({}) == {}
