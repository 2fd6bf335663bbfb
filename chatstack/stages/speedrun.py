"""The whole pipeline in one command, with a report card.

    chatstack speedrun --out runs/speedrun            # ~15-20 minutes on a 2-core CPU
    chatstack speedrun --out runs/smoke --smoke       # the same stages with tiny settings (about a minute)
    chatstack speedrun --out runs/gpu --scale gpu --nproc 8    # bigger model, training stages under torchrun
    chatstack speedrun --out runs/speedrun --vision   # then image input too (docs/vision.md)

Stages (each writes its own checkpoint folder under --out, in the common format):

    tokenizer -> data -> pretrain -> eval-base -> sft -> eval-sft -> label -> reward -> rl -> eval-rl -> compare -> report

The run is defined by work, not time: every stage has a fixed number of steps (pretraining 2,800, SFT 600,
the reward model 400, RL iterations), seeded, so the same command gives the same numbers (within noise) on
an idle laptop or a busy server; only the wall time differs (about 20 min in total on an idle 2-core CPU,
EXPECTED_IDLE_S). `--time-budget SECONDS` instead shares a wall-clock budget among the training stages, which
then cut their schedules to fit. Either way the console and the report say, per stage, the planned and the
completed steps, and warn when a stage was cut or ran far below its idle speed.

The alignment stage (`rl/`) is `chatstack ppo --reward judge --logit-scale-lr 2e-2`, measured in
docs/rlhf.md (`chatstack align-bench` compares them all): the report leads with its result,
avg@8 and greedy accuracy against the SFT model with paired 95% intervals, its win rate over the SFT
model's answers, and the KL it paid.

`--vision` adds image input on the chat model: clip-train -> sft-vision -> eval-vision (held-out digits and
scenes, with the zero-image-token ablation), and the report card gets a grid of held-out images with answers.

Each stage runs as its own process through the `chatstack` CLI — exactly the commands the README shows, so
what the speedrun does a user can redo by hand. `DIR/speedrun.json` records finished stages and their wall
time: re-running skips them and resumes an interrupted training stage from its last checkpoint (`--resume`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from chatstack import estimate as E
from chatstack.args import CLIError
from chatstack.checkpoint import CheckpointError, load_checkpoint, read_config
from chatstack.data.tasks import TASKS
from chatstack.evals.vision import answer_questions
from chatstack.infer.engine import Engine, SamplingParams
from chatstack.model import GPTConfig
from chatstack.stages import report as R
from chatstack.vision.chat_data import TASKS as VISION_TASKS
from chatstack.vision.chat_data import eval_examples, question_of
from chatstack.vision.vlm import load_vision

SAMPLE_PROMPTS = ["Hi! How are you today?", "Who are you?", "What do you like to do for fun?"]


@dataclass
class Stage:
    name: str
    argv: Callable[[Run], list[str]]  # chatstack CLI arguments
    output: str  # path under the run dir that the stage produces
    resumable: bool = False  # accepts --resume to continue an interrupted run
    key: Optional[Callable[[Run], str]] = None  # the number printed when it finishes
    torchrun: bool = False  # launched with torchrun when --nproc > 1
    planned_key: Optional[str] = None  # config.json train field holding the planned steps (max_steps | iterations)


# Wall seconds of each stage of the default (work-defined) run on an idle 2-core CPU: what the warnings compare
# against, and what the report states as the expected wall time (docs/benchmarks.md has the measurements).
EXPECTED_IDLE_S = {
    "tokenizer": 9,
    "data": 6,
    "pretrain": 643,
    "eval-base": 22,
    "sft": 240,
    "eval-sft": 29,
    "label": 79,
    "reward": 80,
    "rl": 93,
    "eval-rl": 29,
    "compare": 10,
}
# How `--time-budget SECONDS` is shared among the training stages (proportional to their idle wall time)
BUDGET_SHARE = {"pretrain": 643, "sft": 240, "reward": 80, "rl": 93}
SLOW_FACTOR = 2.0  # a stage slower than this multiple of its idle wall time gets a warning


class Run:
    def __init__(
        self,
        out: Path,
        smoke: bool,
        scale: str,
        nproc: int,
        time_budget: float = 0.0,
        expected: Optional[dict[str, float]] = None,
    ):
        self.out, self.smoke, self.scale, self.nproc = out, smoke, scale, nproc
        self.time_budget = time_budget
        # idle wall seconds per stage of this pipeline (the speedrun's by default): the slow-stage warnings
        self.expected = EXPECTED_IDLE_S if expected is None else expected

    def budget(self, stage: str) -> list[str]:
        """--time-budget for a training stage: 0 (the work decides) unless the speedrun has a --time-budget."""
        if self.smoke or self.scale == "gpu":
            return []
        share = self.time_budget * BUDGET_SHARE[stage] / sum(BUDGET_SHARE.values()) if self.time_budget > 0 else 0.0
        return ["--time-budget", f"{share:.0f}"]

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


def SAMPLED_EVAL(r: Run) -> list[str]:  # noqa: N802 (a constant-like argument list)
    return ["--samples", "8", "--temperature", "1", "--no-progress", *(r.pick(["--n", "8"]) or ["--n", "100"])]


def _compare_key(run: Run) -> str:
    try:
        d = json.loads(Path(run.p("compare_rl_sft.json")).read_text())
        return f"win rate vs SFT {d['win_rate']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"
    except (OSError, json.JSONDecodeError, KeyError):
        return ""


def stage_check(run: Run, stage: Stage, wall: float) -> dict:
    """Planned vs completed work of a stage and the warnings a reader must see (cut short, far too slow)."""
    rec: dict = {}
    warnings = []
    if stage.planned_key:
        try:
            planned = int(read_config(run.p(stage.output.split("/")[0]))["train"][stage.planned_key])
        except (OSError, KeyError, ValueError, TypeError, CheckpointError):
            planned = None
        rows = [r for r in R.read_metrics(Path(run.p(stage.output.split("/")[0]))) if not r.get("eval")]
        done = max((int(r.get("step", r.get("iter", 0)) or 0) for r in rows), default=0)
        rec.update(planned=planned, completed=done)
        if planned and done < planned:
            warnings.append(f"{stage.name} completed {done:,} of {planned:,} planned steps (its time budget ran out)")
    exp = run.expected.get(stage.name)
    if exp and not run.smoke and run.scale == "cpu" and wall > SLOW_FACTOR * exp:
        warnings.append(
            f"{stage.name} took {wall:.0f} s, {wall / exp:.1f}x the ~{exp} s it takes on an idle 2-core CPU "
            "(a busy machine: the same work, only slower)"
        )
    rec["warnings"] = warnings
    return rec


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
            *r.budget("pretrain"),
        ],
        "base/config.json",
        resumable=True,
        key=lambda r: _metric(r, "base", "val_bpb"),
        torchrun=True,
        planned_key="max_steps",
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
            *r.budget("sft"),
        ],
        "sft/config.json",
        resumable=True,
        key=lambda r: _metric(r, "sft", "val_loss"),
        torchrun=True,
        planned_key="max_steps",
    ),
    Stage(
        "eval-sft",
        # greedy accuracy plus avg@8 / maj@8 / pass@8 at temperature 1: the numbers alignment is judged by
        lambda r: ["eval", r.p("sft"), "--out", r.p("eval_sft.json"), *SAMPLED_EVAL(r)],
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
            *r.budget("reward"),
        ],
        "rm/config.json",
        resumable=True,
        key=lambda r: _metric(r, "rm", "val_accuracy"),
        torchrun=True,
        planned_key="max_steps",
    ),
    Stage(
        "rl",
        # the alignment stage: PPO against the built-in judge at lr 2e-5 for 60 iterations with a learned logit
        # scale (docs/rlhf.md: avg@8 +5.4 points against +1.1 without it, in the same ~100 s); RLOO, DPO, LMSI and
        # the reward-model variants are compared by `chatstack align-bench`
        lambda r: [
            "ppo",
            "--policy",
            r.p("sft"),
            "--reward",
            "judge",
            "--out",
            r.p("rl"),
            "--seed",
            "0",
            "--logit-scale-lr",
            "2e-2",
            *(r.pick(["--iterations", "2", "--rollout-batch", "4", "--eval-n", "2"]) or ["--iterations", "60"]),
            *(r.budget("rl") or ["--time-budget", "0"]),
        ],
        "rl/config.json",
        resumable=True,
        key=lambda r: _metric(r, "rl", "reward"),
        planned_key="iterations",
    ),
    Stage(
        "eval-rl",
        lambda r: [
            "eval",
            r.p("rl"),
            "--out",
            r.p("eval_rl.json"),
            "--reference",
            r.p("sft"),
            "--baseline",
            r.p("eval_sft.json"),
            *SAMPLED_EVAL(r),
        ],
        "eval_rl.json",
        key=lambda r: _eval_key(r, "rl"),
    ),
    Stage(
        "compare",
        lambda r: [
            "compare",
            r.p("rl"),
            r.p("sft"),
            "--judge",
            "builtin",
            "--samples",
            "2",
            "--out",
            r.p("compare_rl_sft.json"),
            "--no-progress",
            *(r.pick(["--n", "4"]) or ["--n", "100"]),
        ],
        "compare_rl_sft.json",
        key=lambda r: _compare_key(r),
    ),
]


def _vision_key(run: Run) -> str:
    try:
        d = json.loads(Path(run.p("eval_vision.json")).read_text())
        return f"digits {d['tasks']['digits']['accuracy']:.3f}, scenes {d.get('scenes_mean', 0):.3f}"
    except (OSError, KeyError, json.JSONDecodeError):
        return ""


# `--vision`: image input on top of the chat model (docs/vision.md)
VISION_STAGES = [
    Stage(
        "clip-train",
        lambda r: [
            "clip-train",
            "--builtin",
            "digits,scenes",
            "--out",
            r.p("clip"),
            *(
                r.pick(["--max-steps", "4", "--batch-size", "16", "--eval-every", "0", "--time-budget", "0"])
                or ["--max-steps", "400", "--time-budget", "0"]
            ),
        ],
        "clip/config.json",
        resumable=True,
        key=lambda r: _metric(r, "clip", "zero_shot_accuracy"),
        planned_key="max_steps",
    ),
    Stage(
        "sft-vision",
        lambda r: [
            "sft-vision",
            "--base",
            r.p("sft"),
            "--clip",
            r.p("clip"),
            "--out",
            r.p("vision"),
            *(
                r.pick(
                    [
                        "--max-steps",
                        "3",
                        "--batch-size",
                        "8",
                        "--eval-every",
                        "0",
                        "--eval-n",
                        "2",
                        "--time-budget",
                        "0",
                    ]
                )
                or ["--time-budget", "0"]
            ),
        ],
        "vision/config.json",
        resumable=True,
        key=lambda r: _metric(r, "vision", "acc_scenes_mean"),
        planned_key="max_steps",
    ),
    Stage(
        "eval-vision",
        lambda r: ["eval-vision", r.p("vision"), "--ablation", "--out", r.p("eval_vision.json"), *r.pick(["--n", "4"])],
        "eval_vision.json",
        key=_vision_key,
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


def _run_child(cmd: list[str]) -> tuple[int, Optional[float]]:
    """Run one stage's command; return its exit code and its peak resident memory in GB (the kernel's
    ru_maxrss of that process, or None where os.wait4 is missing; on Linux at least this process's own RSS,
    which the child inherits across the exec)."""
    proc = subprocess.Popen(cmd)
    if not hasattr(os, "wait4"):
        return proc.wait(), None
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait for it again
    return proc.returncode, usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9


def run_pipeline(
    out: Path,
    smoke: bool = False,
    scale: str = "cpu",
    nproc: int = 1,
    only: Optional[list[str]] = None,
    stages: Optional[list[Stage]] = None,
    command: str = "speedrun",
    time_budget: float = 0.0,
    vision: bool = False,
    expected: Optional[dict[str, float]] = None,
) -> dict:
    """Run `stages` (default: the speedrun's) in order, skipping finished ones; `command` is the `chatstack`
    subcommand that re-runs this pipeline (named in the message when a stage fails); `expected`: idle wall
    seconds per stage (default: the speedrun's EXPECTED_IDLE_S)."""
    pipeline = stages if stages is not None else STAGES
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, smoke, scale, nproc, time_budget, expected)
    state = _load_state(out)
    if state.get("smoke", smoke) != smoke:
        raise SystemExit(f"{out} holds a {'smoke' if state['smoke'] else 'full'} run; use another --out")
    state["smoke"] = smoke
    state["time_budget"] = time_budget
    if vision:
        pipeline = pipeline + VISION_STAGES
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
        returncode, rss_gb = _run_child(cmd)
        rec["wall_s"] += time.time() - t0
        if rss_gb is not None:
            rec["peak_rss_gb"] = round(max(rec.get("peak_rss_gb", 0.0), rss_gb), 3)
        _save_state(out, state)
        if returncode != 0:
            raise SystemExit(
                f"speedrun: stage {stage.name!r} failed (exit {returncode}); fix it and re-run "
                f"`chatstack {command} --out {out}{' --smoke' if smoke else ''}` to continue from there"
            )
        rec["done"] = True
        rec["key"] = stage.key(run) if stage.key else ""
        rec.update(stage_check(run, stage, rec["wall_s"]))
        for w in rec["warnings"]:
            print(f"WARNING: {w}", flush=True)
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
        # the attention term at the length the stage trained on (--seq-len), not the model's full context
        seq = (read_config(run_dir / ckpt).get("train") or {}).get("seq_len") or cfg.block_size
        flops = E.flops_per_token(cfg, min(int(seq), cfg.block_size)) * tokens
        d.update(flops=flops, flops_per_s=flops / max(wall, 1e-9), mfu=flops / max(wall, 1e-9) / peak)
    return d


def _window(rows: list[dict]) -> int:
    iters = sum(1 for r in rows if not r.get("eval") and "reward" in r)
    return max(1, min(10, iters // 5)) if iters else 10


def _alignment(out: Path, evals: dict) -> dict:
    """The alignment result the report leads with: avg@8 / greedy of SFT and RL with paired intervals, the
    win rate of RL's answers over SFT's, the KL to SFT."""
    rl, sft = evals.get("rl", {}), evals.get("sft", {})
    if not rl or not sft:
        return {}
    vs = rl.get("vs_baseline", {})
    a = {
        "samples": rl.get("samples"),
        "n_per_task": rl.get("n_per_task"),
        "sft": sft.get("mean", {}),
        "rl": rl.get("mean", {}),
        "kl": rl.get("answers", {}).get("kl_to_reference"),
    }
    for m in ("avg_at_k", "accuracy", "maj_at_k", "pass_at_k"):
        if m in vs:
            a[f"{m}_delta"], a[f"{m}_delta_ci"] = vs[m]["diff_points"], vs[m]["ci_points"]
    sft_tasks, rl_tasks = sft.get("tasks", {}), rl.get("tasks", {})
    drops = {
        t: round(100 * (rl_tasks[t]["accuracy"] - sft_tasks[t]["accuracy"]), 1) for t in rl_tasks if t in sft_tasks
    }
    a["worst_task_greedy_delta"] = min(drops.values()) if drops else None
    try:  # which method and reward made rl/ (the report names them)
        rc = json.loads((out / "rl" / "config.json").read_text())
        algo, reward = rc.get("algo") or rc.get("stage", "ppo"), rc.get("reward_model", "")
        a["method"] = f"{algo.upper()}, " + ("built-in judge reward" if reward == "judge" else "reward-model reward")
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    try:
        cmp = json.loads((out / "compare_rl_sft.json").read_text())
        a.update(win_rate=cmp["win_rate"], win_ci=[cmp["ci_low"], cmp["ci_high"]])
    except (OSError, json.JSONDecodeError, KeyError):
        pass
    return a


def build_report(out: Path, state: Optional[dict] = None, expected: Optional[dict[str, float]] = None) -> dict:
    out = Path(out)
    expected = EXPECTED_IDLE_S if expected is None else expected
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
        ("import", None),
        ("tokenizer", None),
        ("data", None),
        ("pretrain", "base"),
        ("eval-base", None),
        ("sft", "sft"),
        ("eval-sft", None),
        ("label", None),
        ("reward", "rm"),
        ("rl", "rl"),
        ("eval-rl", None),
        ("compare", None),
        ("clip-train", "clip"),
        ("sft-vision", "vision"),
        ("eval-vision", None),
        ("export", None),
    ):
        if name not in stages_rec:
            continue
        s = _stage_numbers(out, name, ckpt, walls.get(name, 0.0), peak) if ckpt else {"wall_s": walls.get(name, 0.0)}
        s["key"] = stages_rec[name].get("key", "")
        for k in ("planned", "completed", "warnings", "peak_rss_gb"):
            if k in stages_rec[name]:
                s[k] = stages_rec[name][k]
        s["expected_idle_s"] = expected.get(name)
        stages[name] = s
    evals = {}
    for name in ("base", "sft", "rl"):
        p = out / f"eval_{name}.json"
        if p.exists():
            evals[name] = json.loads(p.read_text())
    base_m, sft_m, rm_m, rl_m = (R.read_metrics(out / d) for d in ("base", "sft", "rm", "rl"))
    alignment = _alignment(out, evals)
    acc = {k: v.get("mean_accuracy") for k, v in evals.items()}
    headline = {
        "val_bpb": R.last(base_m, "val_bpb"),
        "bits_per_char": R.last(base_m, "val_bpc") or R.last(base_m, "val_bits_per_char"),
        "base_accuracy": acc.get("base"),
        "sft_accuracy": acc.get("sft"),
        "rl_accuracy": acc.get("rl"),
        "sft_lift_points": 100 * (acc["sft"] - acc["base"])
        if acc.get("sft") is not None and acc.get("base") is not None
        else None,
        "rl_greedy_lift_points": 100 * (acc["rl"] - acc["sft"])
        if acc.get("rl") is not None and acc.get("sft") is not None
        else None,
        "rl_avg8_lift_points": alignment.get("avg_at_k_delta"),
        "rl_win_rate": alignment.get("win_rate"),
        "rm_val_accuracy": R.last(rm_m, "val_accuracy"),
        # means over the first / last 10 iterations (or a fifth of the run, when shorter): the two windows never
        # overlap, and a single rollout batch is too noisy
        "rl_reward_first": R.window_mean(rl_m, "reward", _window(rl_m), "first"),
        "rl_reward_last": R.window_mean(rl_m, "reward", _window(rl_m), "last"),
        "rl_kl": R.window_mean(rl_m, "kl", _window(rl_m), "last"),
        "rl_logit_scale": R.last(rl_m, "logit_scale"),
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
        "rl_avg8_lift_points": ("≥ 8", lambda v: v >= 8),
        "rl_win_rate": ("≥ 0.55", lambda v: v >= 0.55),
        "rl_kl": ("stated", None),
    }
    targets = {
        k: {"goal": g, "met": (f(headline[k]) if f and headline.get(k) is not None else None)}
        for k, (g, f) in goals.items()
    }
    r0, r1 = headline["rl_reward_first"], headline["rl_reward_last"]
    targets["rl_reward_last"] = {"goal": "> first 10", "met": (r1 > r0) if r0 is not None and r1 is not None else None}
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
        ("RL mean judge score", "rl_reward.png", _with_trend("reward", *R.series(rl_m, "reward", "iter")), "score"),
        ("RL KL to the reference", "rl_kl.png", _with_trend("kl", *R.series(rl_m, "kl", "iter")), "nats per answer"),
        ("RL response length", "rl_length.png", [("tokens", *R.series(rl_m, "response_length", "iter"))], "tokens"),
        ("RL logit scale", "rl_logit_scale.png", [("e^s", *R.series(rl_m, "logit_scale", "iter"))], "e^s"),
    ):
        f = R.plot(out / fname, title, curves, ylabel=ylabel, xlabel="iteration" if "RL" in title else "step")
        if f:
            plots[title] = f
    samples = {}
    for name in ("sft", "rl"):
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
        "Peak RSS: the largest resident memory of each stage's process as the kernel counts it (ru_maxrss, read by "
        "the runner through os.wait4); never below the runner's own ~0.3 GB, which Linux carries over the exec.",
    ]
    warnings = [w for st in stages.values() for w in st.get("warnings", [])]
    vision = None
    if (out / "eval_vision.json").exists():
        vision = {"eval": json.loads((out / "eval_vision.json").read_text()), "grid": None}
        try:
            vision["grid"] = _vision_grid(out)
        except Exception as e:  # a report must not die on a sampling problem
            vision["grid_error"] = f"{type(e).__name__}: {e}"
    return {
        "name": out.name,
        "alignment": alignment,
        "warnings": warnings,
        "expected_idle_wall_s": sum(expected.values()),
        "time_budget": state.get("time_budget", 0.0),
        "smoke": state.get("smoke", False),
        "vision": vision,
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


def _vision_grid(out: Path) -> str:
    """vision_examples.png: held-out images (two digits, one per scene question type) with the vision model's
    greedy answers (and the expected ones)."""
    ck = load_checkpoint(out / "vision")
    adapter = load_vision(out / "vision")
    engine = Engine(ck.model.eval(), ck.tokenizer, max_batch_size=8)
    exs = eval_examples(["digits"], 2) + [
        eval_examples([t], 1, seed=i)[0] for i, t in enumerate(VISION_TASKS) if t != "digits"
    ]
    answers = answer_questions(engine, adapter, exs)
    items = [(ex["images"][0], question_of(ex["messages"][0]), a.strip(), ex["answer"]) for ex, a in zip(exs, answers)]
    return R.image_grid(out / "vision_examples.png", items)


# ---------------------------------------------------------------------------------------------- CLI
def _cmd(args) -> int:
    out = Path(args.out)
    t0 = time.time()
    if args.time_budget < 0:
        raise CLIError(f"--time-budget must be >= 0 seconds, got {args.time_budget}")
    state = run_pipeline(
        out,
        smoke=args.smoke,
        scale=args.scale,
        nproc=args.nproc,
        time_budget=args.time_budget,
        vision=args.vision,
    )
    print("\nbuilding the report card ...", flush=True)
    rep = build_report(out, state)
    R.write_report(out, rep)
    h = rep["headline"]
    print(
        f"\nspeedrun finished: {rep['wall_time_s'] / 60:.1f} min of stage time "
        f"({(time.time() - t0) / 60:.1f} min this invocation; ~{rep['expected_idle_wall_s'] / 60:.0f} min on an idle "
        "2-core CPU)"
    )
    a = rep.get("alignment") or {}
    if a.get("avg_at_k_delta") is not None:
        lo, hi = a["avg_at_k_delta_ci"]
        print(
            f"  alignment (rl vs sft): avg@{a['samples']} {100 * a['sft'].get('avg_at_k', 0):.1f} -> "
            f"{100 * a['rl'].get('avg_at_k', 0):.1f} ({a['avg_at_k_delta']:+.1f} points [{lo:+.1f}, {hi:+.1f}]), "
            f"win rate {a.get('win_rate', float('nan')):.3f}, KL {a.get('kl') or 0:.2f} nats/answer"
        )
    for k in ("bits_per_char", "base_accuracy", "sft_accuracy", "rm_val_accuracy", "rl_accuracy", "rl_kl"):
        if h.get(k) is not None:
            print(f"  {k:18s} {h[k]:.3f}")
    for w in rep.get("warnings", []):
        print(f"WARNING: {w}")
    print(f"\nreport: {out / 'report.md'} (numbers in {out / 'report.json'})")
    print(f"chat with it:   chatstack chat {out / 'rl'}")
    print(f"serve it:       chatstack serve {out / 'rl'} --port 8000   # then open http://127.0.0.1:8000/")
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
    p.add_argument(
        "--time-budget",
        type=float,
        default=0.0,
        help="seconds shared among the training stages, which cut their schedules to fit (default 0: the run is "
        "defined by its steps and only the wall time depends on the machine)",
    )
    p.add_argument(
        "--vision",
        action="store_true",
        help="then image input: clip-train, sft-vision on the chat model, eval-vision (+ about 10 min on 2 cores)",
    )
    p.set_defaults(func=_cmd)
