"""`chatstack compare`: InstructGPT's headline metric, the win rate of one checkpoint's answers against another's.

    chatstack compare runs/x/rl runs/x/sft --judge builtin --n 100 --samples 2        # by the built-in judge
    chatstack compare runs/x/ppo runs/x/sft --judge runs/x/rm --json                  # by a reward model
    chatstack compare A B --data my_qa.jsonl --samples 4                              # on your own questions

Both models answer the same held-out questions (`--n` per built-in task, or every question of `--data`
{"messages", "answer"} files) `--samples` times with the same seeds; answer i of A meets answer i of B, a
win counts 1, a tie 1/2. The JSON holds win_rate, ci_low, ci_high (95% bootstrap over questions), n, wins, ties,
losses and each side's mean score; with a reward model as the judge the same answers are also judged by
the built-in judge (`builtin_judge`): the gap between the two is reward over-optimisation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from chatstack.args import CLIError
from chatstack.checkpoint import CheckpointError, load_checkpoint
from chatstack.data.tasks import TASKS
from chatstack.evals.compare import compare_models
from chatstack.evals.sampled import qa_questions, task_questions
from chatstack.rlhf.reward_model import load_reward_model


def run_compare(
    a: str,
    b: str,
    judge: str = "builtin",
    n: int = 50,
    samples: int = 2,
    temperature: float = 1.0,
    seed: int = 0,
    qa: list[str] | None = None,
    task_names=None,
    device: str = "cpu",
    progress: bool = False,
) -> dict:

    cks = []
    for flag, path in (("A", a), ("B", b)):
        ck = load_checkpoint(path, device=device)
        if ck.config.get("kind", "lm") != "lm":
            raise ValueError(f"{flag} {path}: a {ck.config.get('kind')!r} checkpoint; compare needs language models")
        cks.append(ck)
    tok = cks[0].tokenizer
    if tok is None or cks[1].tokenizer is None or tok.vocab_size != cks[1].tokenizer.vocab_size:
        raise ValueError(f"{a} and {b} must carry the same tokenizer")
    rm = "builtin"
    if judge != "builtin":
        try:
            rm, _ = load_reward_model(judge, device=device)
        except Exception as e:
            raise ValueError(f"--judge {judge}: not 'builtin' or a reward-model checkpoint ({e})") from e
        rm.eval()
    questions = [q for f in qa for q in qa_questions(f, n)] if qa else task_questions(task_names, n, seed)
    res = compare_models(
        cks[0].model, cks[1].model, tok, questions, samples, temperature, rm, seed=seed, progress=progress
    )
    return {"a": str(a), "b": str(b), "judge_path": judge, **res}


def _cmd_compare(args) -> int:

    if args.samples < 1:
        raise CLIError(f"--samples must be >= 1, got {args.samples}")
    if args.n < 1:
        raise CLIError(f"--n must be >= 1, got {args.n}")
    try:
        res = run_compare(
            args.a,
            args.b,
            args.judge,
            args.n,
            args.samples,
            args.temperature,
            args.seed,
            args.data,
            args.task or None,
            args.device,
            args.progress and sys.stderr.isatty(),
        )
    except (CheckpointError, ValueError, KeyError, FileNotFoundError) as e:
        raise CLIError(str(e).strip("'\"")) from e
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    if args.json:
        print(json.dumps(res))
    else:
        print(
            f"{res['a']} vs {res['b']} ({res['judge']} judge, {res['n']} prompts x {res['samples']} samples at "
            f"T={res['temperature']}): win rate {res['win_rate']:.3f} [{res['ci_low']:.3f}, {res['ci_high']:.3f}] "
            f"({res['wins']} wins, {res['ties']} ties, {res['losses']} losses)"
        )
        if "builtin_judge" in res:
            bj = res["builtin_judge"]
            print(
                f"  same answers by the built-in judge: {bj['win_rate']:.3f} [{bj['ci_low']:.3f}, {bj['ci_high']:.3f}]"
            )
    return 0


def register(sub) -> None:
    p = sub.add_parser("compare", help="win rate of checkpoint A's sampled answers against B's (judge or reward model)")
    p.add_argument("a", help="checkpoint A")
    p.add_argument("b", help="checkpoint B (usually the SFT model)")
    p.add_argument("--judge", default="builtin", help="builtin | a reward-model checkpoint directory")
    p.add_argument("--n", type=int, default=100, help="held-out questions per task (default 100)")
    p.add_argument("--samples", type=int, default=2, help="answers per question and model (default 2)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", nargs="*", choices=list(TASKS), default=[], help="tasks (default: all)")
    p.add_argument("--data", nargs="*", default=[], help="checkable questions JSONL {'messages', 'answer'} instead")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default="", help="also write the JSON here")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.set_defaults(func=_cmd_compare)
