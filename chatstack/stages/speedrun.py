"""The whole pipeline in one command, with a report card.

    chatstack speedrun --out runs/speedrun            # ~15-20 minutes on a 2-core CPU
    chatstack speedrun --out runs/smoke --smoke       # the same stages with tiny settings (about a minute)
    chatstack speedrun --out runs/gpu --scale gpu --nproc 8    # bigger model, training stages under torchrun

Stages (each writes its own checkpoint folder under --out, in the common format):

    tokenizer -> data -> pretrain -> eval-base -> sft -> eval-sft -> label -> reward -> ppo -> eval-ppo -> report

Each stage runs as its own process through the `chatstack` CLI — exactly the commands the README shows, so
what the speedrun does a user can redo by hand. `DIR/speedrun.json` records finished stages and their wall
time: re-running skips them and resumes an interrupted training stage from its last checkpoint (`--resume`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from chatstack import estimate as E
from chatstack.checkpoint import load_checkpoint, read_config
from chatstack.data.tasks import TASKS
from chatstack.infer.engine import Engine, SamplingParams
from chatstack.model import GPTConfig
from chatstack.stages import report as R

SAMPLE_PROMPTS = ["Hi! How are you today?", "Who are you?", "What do you like to do for fun?"]


@dataclass
class Stage:
    name: str
    argv: Callable[[Run], list[str]]  # chatstack CLI arguments
    output: str  # path under the run dir that the stage produces
    resumable: bool = False  # accepts --resume to continue an interrupted run
    key: Optional[Callable[[Run], str]] = None  # the number printed when it finishes
    torchrun: bool = False  # launched with torchrun when --nproc > 1


class Run:
    def __init__(self, out: Path, smoke: bool, scale: str, nproc: int):
        self.out, self.smoke, self.scale, self.nproc = out, smoke, scale, nproc

    def p(self, *parts) -> str:
        return str(self.out.joinpath(*parts))

    # per-stage settings: the defaults of each command are the CPU speedrun's; smoke/gpu override them
    def pick(self, smoke: list[str], gpu: list[str] | None = None) -> list[str]:
        if self.smoke:
            return smoke
        if self.scale == "gpu" and gpu is not None:
            return gpu
        return []


def _with_trend(name: str, xs: list, ys: list) -> list:
    """A per-iteration curve plus its 10-iteration trailing mean (one rollout batch is noisy)."""
    return [(name, xs, ys), (f"{name}, 10-iteration mean", xs, R.rolling(ys, 10))] if ys else [(name, xs, ys)]


def _metric(run: Run, stage: str, key: str, fmt: str = "{:.3f}") -> str:
    v = R.last(R.read_metrics(Path(run.p(stage))), key)
    return f"{key} {fmt.format(v)}" if v is not None else ""


def _eval_key(run: Run, name: str) -> str:
    try:
        d = json.loads(Path(run.p(f"eval_{name}.json")).read_text())
        return f"mean accuracy {d.get('mean_accuracy', 0):.3f}"
    except (OSError, json.JSONDecodeError):
        return ""


STAGES = [
    Stage(
        "tokenizer",
        lambda r: [
            "tokenizer",
            "train",
            "--builtin",
            "shakespeare",
            "--out",
            r.p("tokenizer"),
            "--vocab-size",
            "512" if r.smoke else "4096",
        ],
        "tokenizer/tokenizer.json",
    ),
    Stage(
        "data",
        lambda r: [
            "data",
            "prepare",
            "--builtin",
            "shakespeare",
            "--tokenizer",
            r.p("tokenizer"),
            "--out",
            r.p("data"),
        ],
        "data",
    ),
    Stage(
        "pretrain",
        lambda r: [
            "pretrain",
            "--data",
            r.p("data"),
            "--out",
            r.p("base"),
            *r.pick(
                [
                    "--preset",
                    "nano",
                    "--block-size",
                    "256",
                    "--max-steps",
                    "30",
                    "--eval-every",
                    "15",
                    "--batch-size",
                    "8",
                    "--warmup-steps",
                    "5",
                    "--time-budget",
                    "0",
                    "--save-every",
                    "10",
                ],
                ["--preset", "gpt2", "--max-steps", "5000", "--batch-size", "32", "--time-budget", "0"],
            ),
        ],
        "base/config.json",
        resumable=True,
        key=lambda r: _metric(r, "base", "val_bpb"),
        torchrun=True,
    ),
    Stage(
        "eval-base",
        lambda r: ["eval", r.p("base"), "--out", r.p("eval_base.json"), *r.pick(["--n", "8"])],
        "eval_base.json",
        key=lambda r: _eval_key(r, "base"),
    ),
    Stage(
        "sft",
        lambda r: [
            "sft",
            "--base",
            r.p("base"),
            "--out",
            r.p("sft"),
            *r.pick(["--max-steps", "20", "--eval-every", "10", "--warmup-steps", "2", "--time-budget", "0"]),
        ],
        "sft/config.json",
        resumable=True,
        key=lambda r: _metric(r, "sft", "val_loss"),
        torchrun=True,
    ),
    Stage(
        "eval-sft",
        lambda r: ["eval", r.p("sft"), "--out", r.p("eval_sft.json"), *r.pick(["--n", "8"])],
        "eval_sft.json",
        key=lambda r: _eval_key(r, "sft"),
    ),
    Stage(
        "label",
        # K = 8 answers per prompt: C(8,2) = 28 comparisons each; the reward model's held-out accuracy rose
        # with the number of pairs (docs/rlhf.md), and sampling them costs well under a minute here
        lambda r: [
            "label",
            r.p("sft"),
            "--judge",
            "builtin",
            "--out",
            r.p("rankings.jsonl"),
            *(
                r.pick(["--k", "4", "--prompts", "16", "--max-new-tokens", "16", "--ties", "shorter"])
                or ["--k", "8", "--prompts", "1200"]
            ),
        ],
        "rankings.jsonl",
    ),
    Stage(
        "reward",
        lambda r: [
            "reward",
            "--sft",
            r.p("sft"),
            "--data",
            r.p("rankings.jsonl"),
            "--out",
            r.p("rm"),
            *r.pick(["--max-steps", "10", "--eval-every", "5", "--warmup-steps", "2", "--time-budget", "0"]),
        ],
        "rm/config.json",
        resumable=True,
        key=lambda r: _metric(r, "rm", "val_accuracy"),
        torchrun=True,
    ),
    Stage(
        "ppo",
        lambda r: [
            "ppo",
            "--policy",
            r.p("sft"),
            "--reward",
            r.p("rm"),
            "--out",
            r.p("ppo"),
            *r.pick(["--iterations", "2", "--time-budget", "0"]),
        ],
        "ppo/config.json",
        resumable=True,
        key=lambda r: _metric(r, "ppo", "reward"),
    ),
    Stage(
        "eval-ppo",
        lambda r: ["eval", r.p("ppo"), "--out", r.p("eval_ppo.json"), *r.pick(["--n", "8"])],
        "eval_ppo.json",
        key=lambda r: _eval_key(r, "ppo"),
    ),
]


# ---------------------------------------------------------------------------------------------- running
def _load_state(out: Path) -> dict:
    path = out / "speedrun.json"
    if path.exists():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            pass
    return {"stages": {}}


def _save_state(out: Path, state: dict) -> None:
    tmp = out / "speedrun.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(out / "speedrun.json")


def _command(run: Run, stage: Stage, resume: bool) -> list[str]:
    argv = stage.argv(run) + (["--resume"] if resume else [])
    if stage.torchrun and run.nproc > 1:
        return ["torchrun", "--standalone", f"--nproc_per_node={run.nproc}", "-m", "chatstack.cli", *argv]
    return [sys.executable, "-m", "chatstack.cli", *argv]


def run_pipeline(
    out: Path,
    smoke: bool = False,
    scale: str = "cpu",
    nproc: int = 1,
    only: Optional[list[str]] = None,
    stages: Optional[list[Stage]] = None,
    command: str = "speedrun",
) -> dict:
    """Run `stages` (default: the speedrun's) in order, skipping finished ones; `command` is the `chatstack`
    subcommand that re-runs this pipeline (named in the message when a stage fails)."""
    pipeline = stages if stages is not None else STAGES
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, smoke, scale, nproc)
    state = _load_state(out)
    if state.get("smoke", smoke) != smoke:
        raise SystemExit(f"{out} holds a {'smoke' if state['smoke'] else 'full'} run; use another --out")
    state["smoke"] = smoke
    total = len(pipeline)
    t_all = time.time()
    for i, stage in enumerate(pipeline, 1):
        if only and stage.name not in only:
            continue
        rec = state["stages"].setdefault(stage.name, {"done": False, "wall_s": 0.0})
        if rec["done"] and (out / stage.output).exists():
            print(
                f"[{i}/{total}] {stage.name:10s} done already ({rec['wall_s']:.0f} s) {rec.get('key', '')}", flush=True
            )
            continue
        # an interrupted training stage left a checkpoint (its config.json): continue it exactly
        resume = stage.resumable and (out / stage.output).exists()
        cmd = _command(run, stage, resume)
        print(
            f"\n[{i}/{total}] {stage.name:10s} {'resuming' if resume else 'running'}: "
            f"chatstack {' '.join(shlex.quote(c) for c in cmd[cmd.index('chatstack.cli') + 1 :])}",
            flush=True,
        )
        t0 = time.time()
        proc = subprocess.run(cmd)
        rec["wall_s"] += time.time() - t0
        _save_state(out, state)
        if proc.returncode != 0:
            raise SystemExit(
                f"speedrun: stage {stage.name!r} failed (exit {proc.returncode}); fix it and re-run "
                f"`chatstack {command} --out {out}{' --smoke' if smoke else ''}` to continue from there"
            )
        rec["done"] = True
        rec["key"] = stage.key(run) if stage.key else ""
        _save_state(out, state)
        print(f"[{i}/{total}] {stage.name:10s} finished in {rec['wall_s']:.0f} s  {rec['key']}", flush=True)
    state["wall_time_s"] = sum(r["wall_s"] for r in state["stages"].values())
    state["elapsed_this_invocation_s"] = time.time() - t_all
    _save_state(out, state)
    return state


# ---------------------------------------------------------------------------------------------- the report
def _samples(ckpt: Path, n_tasks: int = 2) -> list[dict]:
    """A few greedy conversations: chit-chat prompts plus held-out task questions."""
    ck = load_checkpoint(ckpt)
    ck.model.eval()
    eng = Engine(ck.model, ck.tokenizer)
    prompts = list(SAMPLE_PROMPTS)
    try:
        for name in list(TASKS)[:n_tasks]:
            ex = TASKS[name].examples("test", 1, seed=0)[0]
            prompts.append(ex.prompt[-1]["content"] if isinstance(ex.prompt, list) else str(ex.prompt))
    except Exception:
        pass
    convs = []
    params = SamplingParams(max_new_tokens=64, temperature=0.0)
    for p in prompts:
        c = eng.chat([{"role": "user", "content": p}], params)
        convs.append({"user": p, "assistant": c.text})
    return convs


def _stage_numbers(run_dir: Path, name: str, ckpt: str, wall: float, peak: float) -> dict:
    d: dict = {"wall_s": wall}
    try:
        cfg = GPTConfig.from_dict(read_config(run_dir / ckpt)["model"])
    except Exception:
        return d
    params = E.count_params_meta(cfg)
    rows = R.read_metrics(run_dir / ckpt)
    tokens = R.last(rows, "tokens")
    d.update(params=params, tokens=int(tokens) if tokens else None)
    if tokens:
        flops = E.flops_per_token(cfg, cfg.block_size) * tokens
        d.update(flops=flops, flops_per_s=flops / max(wall, 1e-9), mfu=flops / max(wall, 1e-9) / peak)
    return d


def build_report(out: Path, state: Optional[dict] = None) -> dict:
    out = Path(out)
    state = state or _load_state(out)
    # measured once, at the first report, and kept: a report rebuilt later on a busy machine must not
    # change every MFU figure of a run that trained on an idle one
    peak, env = state.get("peak_flops"), state.get("environment")
    if not peak or not env:
        peak = state["peak_flops"] = peak or R.measure_peak_flops()
        env = state["environment"] = env or R.environment()  # the commit and machine of the run
        if (out / "speedrun.json").exists():
            _save_state(out, state)
    stages_rec = state.get("stages", {})
    walls = {k: v.get("wall_s", 0.0) for k, v in stages_rec.items()}
    stages = {}
    for name, ckpt in (
        ("tokenizer", None),
        ("data", None),
        ("pretrain", "base"),
        ("eval-base", None),
        ("sft", "sft"),
        ("eval-sft", None),
        ("label", None),
        ("reward", "rm"),
        ("ppo", "ppo"),
        ("eval-ppo", None),
    ):
        if name not in stages_rec:
            continue
        s = _stage_numbers(out, name, ckpt, walls.get(name, 0.0), peak) if ckpt else {"wall_s": walls.get(name, 0.0)}
        s["key"] = stages_rec[name].get("key", "")
        stages[name] = s
    evals = {}
    for name in ("base", "sft", "ppo"):
        p = out / f"eval_{name}.json"
        if p.exists():
            evals[name] = json.loads(p.read_text())
    base_m, sft_m, rm_m, ppo_m = (R.read_metrics(out / d) for d in ("base", "sft", "rm", "ppo"))
    acc = {k: v.get("mean_accuracy") for k, v in evals.items()}
    headline = {
        "val_bpb": R.last(base_m, "val_bpb"),
        "bits_per_char": R.last(base_m, "val_bpc") or R.last(base_m, "val_bits_per_char"),
        "base_accuracy": acc.get("base"),
        "sft_accuracy": acc.get("sft"),
        "ppo_accuracy": acc.get("ppo"),
        "sft_lift_points": 100 * (acc["sft"] - acc["base"])
        if acc.get("sft") is not None and acc.get("base") is not None
        else None,
        "ppo_lift_points": 100 * (acc["ppo"] - acc["sft"])
        if acc.get("ppo") is not None and acc.get("sft") is not None
        else None,
        "rm_val_accuracy": R.last(rm_m, "val_accuracy"),
        # means over the first / last 10 iterations: a single rollout batch of 64 answers is too noisy
        "ppo_reward_first": R.window_mean(ppo_m, "reward", 10, "first"),
        "ppo_reward_last": R.window_mean(ppo_m, "reward", 10, "last"),
        "ppo_kl": R.window_mean(ppo_m, "kl", 10, "last"),
    }
    rm_last = next((r for r in reversed(rm_m) if "val_accuracy" in r), {})
    reward_model = {
        "val_accuracy_by_task": {
            k[len("val_accuracy_") :]: v for k, v in rm_last.items() if k.startswith("val_accuracy_")
        },
        "val_pairs_by_task": {k[len("val_pairs_") :]: v for k, v in rm_last.items() if k.startswith("val_pairs_")},
    }
    goals = {
        "bits_per_char": ("≤ 2.2", lambda v: v <= 2.2),
        "sft_lift_points": ("≥ 30", lambda v: v >= 30),
        "rm_val_accuracy": ("≥ 0.85", lambda v: v >= 0.85),
        "ppo_lift_points": ("≥ 10", lambda v: v >= 10),
        "ppo_kl": ("stated", None),
    }
    targets = {
        k: {"goal": g, "met": (f(headline[k]) if f and headline.get(k) is not None else None)}
        for k, (g, f) in goals.items()
    }
    r0, r1 = headline["ppo_reward_first"], headline["ppo_reward_last"]
    targets["ppo_reward_last"] = {"goal": "> first 10", "met": (r1 > r0) if r0 is not None and r1 is not None else None}
    plots = {}
    for title, fname, curves, ylabel in (
        (
            "Pretraining loss",
            "pretrain_loss.png",
            [("train", *R.series(base_m, "loss")), ("val", *R.series(base_m, "val_loss"))],
            "nats/token",
        ),
        (
            "SFT loss",
            "sft_loss.png",
            [("train", *R.series(sft_m, "loss")), ("val", *R.series(sft_m, "val_loss"))],
            "nats/token",
        ),
        (
            "Reward model held-out accuracy",
            "rm_accuracy.png",
            [("val", *R.series(rm_m, "val_accuracy"))],
            "pairwise accuracy",
        ),
        ("PPO mean RM score", "ppo_reward.png", _with_trend("reward", *R.series(ppo_m, "reward", "iter")), "RM score"),
        ("PPO KL to the reference", "ppo_kl.png", _with_trend("kl", *R.series(ppo_m, "kl", "iter")), "nats per answer"),
        ("PPO response length", "ppo_length.png", [("tokens", *R.series(ppo_m, "response_length", "iter"))], "tokens"),
    ):
        f = R.plot(out / fname, title, curves, ylabel=ylabel, xlabel="iteration" if "PPO" in title else "step")
        if f:
            plots[title] = f
    samples = {}
    for name in ("sft", "ppo"):
        if (out / name / "config.json").exists():
            try:
                samples[name] = _samples(out / name)
            except Exception as e:  # a report must not die on a sampling problem
                samples[name] = [{"user": "(sampling failed)", "assistant": f"{type(e).__name__}: {e}"}]
    notes = [
        "Preferences come from the built-in programmatic judge (correct answer first, then well-formed, then "
        "shorter): it stands in for human labellers only because these tasks' answers can be checked.",
        "FLOPs are the estimator's 6ND-style training FLOPs (with the attention term); MFU divides the achieved "
        "FLOP/s by the measured peak matmul rate above.",
    ]
    return {
        "name": out.name,
        "smoke": state.get("smoke", False),
        "environment": env,
        "wall_time_s": sum(walls.values()),
        "peak_flops": peak,
        "headline": headline,
        "targets": targets,
        "stages": stages,
        "evals": evals,
        "reward_model": reward_model,
        "plots": plots,
        "samples": samples,
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------------- CLI
def _cmd(args) -> int:
    out = Path(args.out)
    t0 = time.time()
    state = run_pipeline(out, smoke=args.smoke, scale=args.scale, nproc=args.nproc)
    print("\nbuilding the report card ...", flush=True)
    rep = build_report(out, state)
    R.write_report(out, rep)
    h = rep["headline"]
    print(
        f"\nspeedrun finished: {rep['wall_time_s'] / 60:.1f} min of stage time "
        f"({(time.time() - t0) / 60:.1f} min this invocation)"
    )
    for k in ("bits_per_char", "base_accuracy", "sft_accuracy", "rm_val_accuracy", "ppo_accuracy", "ppo_kl"):
        if h.get(k) is not None:
            print(f"  {k:18s} {h[k]:.3f}")
    print(f"\nreport: {out / 'report.md'} (numbers in {out / 'report.json'})")
    print(f"chat with it:   chatstack chat {out / 'ppo'}")
    print(f"serve it:       chatstack serve {out / 'ppo'} --port 8000   # then open http://127.0.0.1:8000/")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "speedrun",
        help="the whole pipeline on built-in data, with a report card",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/speedrun", help="run directory (default: runs/speedrun)")
    p.add_argument("--smoke", action="store_true", help="tiny settings: same stages and report layout, about a minute")
    p.add_argument(
        "--scale",
        choices=["cpu", "gpu"],
        default="cpu",
        help="cpu: the tiny model in ~15-20 min on 2 cores; gpu: GPT-2-small-sized pretraining",
    )
    p.add_argument("--nproc", type=int, default=1, help="processes per node for the training stages (torchrun)")
    p.set_defaults(func=_cmd)
