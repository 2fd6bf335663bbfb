"""SFT stage: data loading, deterministic batches, a short run through the shared loop, the CLI, resume."""

import json

import pytest
import torch

from chatstack.checkpoint import load_checkpoint, read_config, save_checkpoint
from chatstack.cli import main
from chatstack.data.chat_builtin import builtin_mix, chatterbot, identity
from chatstack.data.conversations import encode_conversations, pack
from chatstack.data.tasks import task_conversations
from chatstack.model import GPT
from chatstack.presets import get_preset
from chatstack.stages.sft import SFTConfig, SFTTask, parse_mix, run_sft
from chatstack.tokenizer import Tokenizer

TEXT = "Hello there, how are you? What is 12 + 30? Which is larger, 417 or 392? It is 42. Answer: 7. " * 20


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    tok = Tokenizer.train([TEXT], vocab_size=300, show_progress=False)
    torch.manual_seed(0)
    m = GPT(get_preset("nano", vocab_size=tok.vocab_size, block_size=128))
    save_checkpoint(
        d / "base", m, {"stage": "base", "parent": None, "model": m.config.to_dict(), "tokenizer": tok.info()}, tok
    )
    data = d / "data.jsonl"
    with open(data, "w") as f:
        for c in task_conversations("train", 40, names=["add", "compare"]):
            f.write(json.dumps({"messages": c["messages"]}) + "\n")
    return d, tok


def cfg(d, **kw):
    c = dict(
        base=str(d / "base"),
        out=str(d / "sft"),
        data=[str(d / "data.jsonl")],
        max_steps=20,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        eval_every=0,
        log_every=1,
        time_budget=0,
        progress=False,
    )
    c.update(kw)
    return SFTConfig(**c)


def test_short_run_learns_and_writes_an_sft_checkpoint(base):
    d, tok = base
    path = run_sft(cfg(d), log=lambda s: None)
    conf = read_config(path)
    assert conf["stage"] == "sft" and conf["parent"] == str(d / "base") and conf["base_stage"] == "base"
    assert conf["train"]["lr"] == 3e-3 and conf["data"]["train"]["conversations"] == 76  # 80 - 5% held out
    rows = [json.loads(l) for l in open(path / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses
    assert any("val_loss" in r for r in rows)
    ck = load_checkpoint(path)
    assert ck.tokenizer.vocab_size == tok.vocab_size  # the base's tokenizer travels on


def test_epochs_set_the_step_count(base):
    d, _ = base
    c = cfg(d, out=str(d / "sft_ep"), epochs=2.0, batch_size=8)
    run_sft(c, log=lambda s: None)
    conf = read_config(d / "sft_ep")
    n_rows = conf["data"]["rows"]
    assert conf["train"]["max_steps"] == -(-2 * n_rows // 8)


def test_batches_are_a_pure_function_and_cover_each_epoch(base):
    d, tok = base
    enc, _ = encode_conversations(tok, [c["messages"] for c in task_conversations("train", 30)], 129)
    rows = pack(enc, 129, tok.eot_id)
    a = SFTTask(rows, rows, batch_size=3, grad_accum=2, seed=5)
    b = SFTTask(rows, rows, batch_size=3, grad_accum=2, seed=5)
    N = len(rows)
    seen = torch.cat([a.rows_for(s, m, 0, 1) for s in range(N) for m in range(2)])[:N]
    assert sorted(seen.tolist()) == list(range(N))  # first epoch: every row exactly once
    for s, m in [(7, 1), (0, 0), (3, 0)]:
        assert torch.equal(a.rows_for(s, m, 0, 1), b.rows_for(s, m, 0, 1))
        assert torch.equal(a.train_batch(s, m, 0, 1)["idx"], b.train_batch(s, m, 0, 1)["idx"])
    r0, r1 = a.rows_for(2, 0, 0, 2), a.rows_for(2, 0, 1, 2)  # two ranks see different rows
    assert not torch.equal(r0, r1)


def test_resume_continues_to_the_same_weights(base, monkeypatch):
    d, _ = base
    full = run_sft(cfg(d, out=str(d / "full"), max_steps=8), log=lambda s: None)
    # interrupt the same run after its step-4 checkpoint, then --resume it
    real = SFTTask.train_batch

    def crash_at_5(self, step, micro, rank, world):
        if step == 5:
            raise KeyboardInterrupt
        return real(self, step, micro, rank, world)

    monkeypatch.setattr(SFTTask, "train_batch", crash_at_5)
    with pytest.raises(KeyboardInterrupt):
        run_sft(cfg(d, out=str(d / "part"), max_steps=8, save_every=4), log=lambda s: None)
    monkeypatch.setattr(SFTTask, "train_batch", real)
    run_sft(cfg(d, out=str(d / "part"), max_steps=8, save_every=4, resume=True), log=lambda s: None)
    a, b = load_checkpoint(full).model.state_dict(), load_checkpoint(d / "part").model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_cli_errors_name_file_and_line(base, tmp_path, capsys):
    d, _ = base
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        '{"messages": [{"role": "wizard", "content": "hi"}]}\n'
    )
    rc = main(["sft", "--base", str(d / "base"), "--out", str(tmp_path / "o"), "--data", str(bad), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{bad}:2:" in err and "unknown role 'wizard'" in err
    rc = main(["sft", "--base", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "nope" in capsys.readouterr().err


def test_cli_runs_with_system_prompt(base, capsys):
    d, _ = base
    rc = main(
        [
            "sft",
            "--base",
            str(d / "base"),
            "--out",
            str(d / "cli"),
            "--data",
            str(d / "data.jsonl"),
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--system",
            "Be brief.",
            "--no-progress",
            "--time-budget",
            "0",
        ]
    )
    assert rc == 0
    conf = read_config(d / "cli")
    assert conf["train"]["system"] == "Be brief."


def test_builtin_sources_split_and_mix():
    ids = lambda convs: {json.dumps(c) for c in convs}  # noqa: E731
    assert not ids(chatterbot("train")) & ids(chatterbot("test"))
    assert len(chatterbot("train")) > 700
    ident = identity("train") + identity("test")
    assert 24 <= len(ident) <= 100
    assert sum("chatstack" in c[1]["content"] for c in ident) > len(ident) / 2
    mix = builtin_mix("train", sizes={"chitchat": 50, "tasks_per_task": 5}, mix={"identity": 2.0, "chitchat": 1.0})
    srcs = {m["source"] for m in mix}
    assert srcs == {"chitchat", "chatterbot", "identity", "tasks"}
    n_id = sum(m["source"] == "identity" for m in mix)
    assert n_id == 2 * len(identity("train"))
    chit = [m["messages"] for m in mix if m["source"] == "chitchat"]
    assert len(chit) == 50 and all(c[0]["role"] == "user" and c[-1]["role"] == "assistant" for c in chit)
    assert parse_mix("tasks=2, chitchat=0.5") == {"tasks": 2.0, "chitchat": 0.5}
    with pytest.raises(ValueError, match="unknown built-in source"):
        builtin_mix("train", mix={"wiki": 1.0})
