"""`chatstack eval`: evaluate a checkpoint on the held-out verifiable tasks and held-out conversations.

    chatstack eval runs/sft                       # table: accuracy per task, mean, held-out conversation loss
    chatstack eval runs/base                      # a base model is asked few-shot (3 solved train examples)
    chatstack eval runs/sft --json                # {"tasks": {NAME: {"accuracy", "n", ...}}, "mean_accuracy", ...}
    chatstack eval runs/sft --task add count --n 200 --mode fewshot --shots 5

The JSON (printed with --json, always written to --out, default CKPT/eval.json) holds
`tasks` (accuracy, n, well_formed and a few samples per task), `mean_accuracy`, `conversation_loss`
(nats per assistant token on held-out conversations: the built-in held-out split, or --data FILE.jsonl)
and what was evaluated (checkpoint, stage, mode, shots, seed). The same seed gives the same questions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from chatstack.args import CLIError
from chatstack.checkpoint import CheckpointError, load_checkpoint
from chatstack.data.chat_builtin import builtin_mix
from chatstack.data.conversations import ConversationError, encode_conversations, pack, read_jsonl
from chatstack.data.jsonl import iter_jsonl
from chatstack.data.tasks import TASKS
from chatstack.evals.sampled import compare_evals, evaluate_questions, qa_questions, task_questions
from chatstack.evals.tasks_eval import conversation_loss, default_mode, evaluate_tasks, mean_accuracy
from chatstack.infer.quantize import QUANTIZE_KINDS


def evaluate_checkpoint(
    path: str,
    task_names=None,
    n: int = 100,
    mode: str = "auto",
    shots: int = 3,
    seed: int = 0,
    loss: bool = True,
    data=None,
    device: str = "cpu",
    progress: bool = False,
    log=lambda s: None,
    quantize=None,
) -> dict:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ck = load_checkpoint(path, device=device)
    if ck.tokenizer is None:
        raise ValueError(f"{path}: no tokenizer.json in the checkpoint")
    model, tok = ck.model.eval(), ck.tokenizer
    mode = default_mode(ck.config) if mode == "auto" else mode
    t0 = time.perf_counter()
    tasks = evaluate_tasks(
        model, tok, task_names, n=n, seed=seed, mode=mode, shots=shots, progress=progress, quantize=quantize
    )
    res = {
        "checkpoint": str(path),
        "stage": ck.config.get("stage"),
        "mode": mode,
        **({"quantize": quantize} if quantize else {}),
        "shots": shots if mode == "fewshot" else 0,
        "seed": seed,
        "n_per_task": n,
        "tasks": tasks,
        "mean_accuracy": mean_accuracy(tasks),
    }
    log(f"tasks: {time.perf_counter() - t0:.1f}s")
    if loss:
        t0 = time.perf_counter()
        row_len = model.config.block_size + 1
        if data:
            convs = [c for p in data for c in read_jsonl(p)]
        else:
            convs = [c["messages"] for c in builtin_mix("test", seed=0)]
        enc, summ = encode_conversations(tok, convs, row_len)
        rows = pack(enc, row_len, tok.eot_id)
        res["conversation_loss"], res["conversation_tokens"] = conversation_loss(model, rows)
        res["conversation_loss"] = round(res["conversation_loss"], 4)
        res["conversations"] = summ.conversations
        log(f"conversation loss: {time.perf_counter() - t0:.1f}s")
    return res


def format_table(res: dict) -> str:
    lines = [
        f"{res['checkpoint']}  (stage {res['stage']}, mode {res['mode']}"
        + (f", {res['quantize']} decoding" if res.get("quantize") else "")
        + (f", {res['shots']}-shot" if res["mode"] == "fewshot" else "")
        + ")",
        f"{'task':14s} {'accuracy':>9s} {'well-formed':>12s} {'n':>5s}",
    ]
    for name, r in res["tasks"].items():
        lines.append(f"{name:14s} {r['accuracy']:>9.1%} {r['well_formed']:>12.1%} {r['n']:>5d}")
    lines.append(f"{'mean':14s} {res['mean_accuracy']:>9.1%}")
    if "conversation_loss" in res:
        lines.append(
            f"held-out conversation loss: {res['conversation_loss']:.4f} nats/token "
            f"({res['conversation_tokens']:,} assistant tokens, {res['conversations']:,} conversations)"
        )
    for name, r in res["tasks"].items():
        s = r["samples"][0] if r["samples"] else None
        if s:
            lines.append(
                f"  [{name}] {s['prompt']!r} -> {s['reply']!r} ({'ok' if s['correct'] else 'expected ' + s['expected']})"
            )
    return "\n".join(lines)


def is_qa_file(path: str) -> bool:
    """A `--data` file whose first record has an "answer" field holds checkable questions (not conversations)."""

    for _, obj in iter_jsonl(path):
        return isinstance(obj, dict) and "answer" in obj
    return False


def evaluate_sampled(
    path: str,
    task_names=None,
    n: int = 300,
    samples: int = 8,
    temperature: float = 1.0,
    seed: int = 0,
    qa: list[str] | None = None,
    reference: str = "",
    device: str = "cpu",
    max_new_tokens: int = 48,
    n_boot: int = 2000,
    progress: bool = False,
) -> dict:
    """Greedy accuracy plus avg@K / maj@K / pass@K with bootstrap intervals (chatstack.evals.sampled)."""

    ck = load_checkpoint(path, device=device)
    if ck.config.get("kind", "lm") != "lm":
        raise ValueError(f"{path}: a {ck.config.get('kind')!r} checkpoint; eval needs a language model")
    if ck.tokenizer is None:
        raise ValueError(f"{path}: no tokenizer.json in the checkpoint")
    if qa:
        questions = [q for f in qa for q in qa_questions(f, n)]
    else:
        questions = task_questions(task_names, n, seed)
    ref = load_checkpoint(reference, device=device).model.eval() if reference else None
    res = evaluate_questions(
        ck.model, ck.tokenizer, questions, samples, temperature, max_new_tokens, seed, ref, n_boot, progress=progress
    )
    return {
        "checkpoint": str(path),
        "stage": ck.config.get("stage"),
        "mode": "chat",
        "seed": seed,
        "n_per_task": n,
        "samples": samples,
        "temperature": temperature,
        **({"data": qa} if qa else {}),
        **({"reference": reference} if reference else {}),
        "tasks": res["tasks"],
        "mean_accuracy": res["mean"].get("accuracy", 0.0),
        "mean": res["mean"],
        **({"answers": res["answers"]} if "answers" in res else {}),
        "scores": res["scores"],
    }


def format_sampled(res: dict) -> str:
    k = res["samples"]
    cols = ["accuracy"] + (["avg_at_k", "maj_at_k", "pass_at_k"] if k else [])
    names = ["greedy"] + ([f"avg@{k}", f"maj@{k}", f"pass@{k}"] if k else [])
    lines = [
        f"{res['checkpoint']}  (stage {res['stage']}, {k} samples at T={res['temperature']}, 95% bootstrap intervals)",
        f"{'task':14s}" + "".join(f"{n:>22s}" for n in names) + f"{'n':>6s}",
    ]

    def cell(d, c):
        lo, hi = d.get(f"{c}_ci", (0, 0))
        return f"{d.get(c, 0):>8.1%} [{lo:.1%},{hi:.1%}]".rjust(22)

    for name, r in res["tasks"].items():
        lines.append(f"{name:14s}" + "".join(cell(r, c) for c in cols) + f"{r.get('n', 0):>6d}")
    lines.append(f"{'mean':14s}" + "".join(cell(res["mean"], c) for c in cols))
    if "answers" in res:
        lines.append("sampled answers: " + ", ".join(f"{k} {v}" for k, v in res["answers"].items()))
    for m, d in res.get("vs_baseline", {}).items():
        if m != "baseline":
            lines.append(
                f"vs {res['vs_baseline']['baseline']}: {m} {d['diff_points']:+.1f} points "
                f"[{d['ci_points'][0]:+.1f}, {d['ci_points'][1]:+.1f}] (paired)"
            )
    return "\n".join(lines)


def _cmd_eval(args) -> int:
    qa = [f for f in args.data if is_qa_file(f)] if args.data else []
    if args.samples < 0:
        raise CLIError(f"--samples must be >= 0, got {args.samples}")
    if args.samples or qa:
        if args.mode == "fewshot":
            raise CLIError("--samples / --data QA.jsonl evaluate chat models (--mode chat)")
        n = args.n if args.n is not None else 300
        try:
            res = evaluate_sampled(
                args.checkpoint,
                args.task or None,
                n,
                args.samples,
                args.temperature,
                args.seed,
                qa,
                args.reference,
                args.device,
                n_boot=args.boot,
                progress=args.progress and sys.stderr.isatty(),
            )
        except (CheckpointError, ValueError, KeyError, FileNotFoundError) as e:
            raise CLIError(str(e).strip("'\"")) from e
        if args.baseline:
            try:
                base = json.loads(Path(args.baseline).read_text())
                res["vs_baseline"] = {
                    "baseline": args.baseline,
                    **{
                        m: compare_evals(res, base, m)
                        for m in ("accuracy", "avg_at_k", "maj_at_k", "pass_at_k")
                        if m in res["scores"] and m in base.get("scores", {})
                    },
                }
            except (OSError, json.JSONDecodeError, ValueError) as e:
                raise CLIError(f"--baseline {args.baseline}: {e}") from e
        return _write(args, res, format_sampled)
    if args.n is None:
        args.n = 100
    try:
        res = evaluate_checkpoint(
            args.checkpoint,
            args.task or None,
            n=args.n,
            mode=args.mode,
            shots=args.shots,
            seed=args.seed,
            loss=args.loss,
            data=args.data,
            device=args.device,
            progress=args.progress and sys.stderr.isatty(),
            quantize=args.quantize,
            log=lambda s: print(s, file=sys.stderr),
        )
    except (CheckpointError, ConversationError, ValueError, KeyError, FileNotFoundError) as e:
        raise CLIError(str(e).strip("'\"")) from e
    return _write(args, res, format_table)


def _write(args, res: dict, fmt) -> int:
    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval.json"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
    except OSError as e:
        print(f"warning: could not write {out}: {e}", file=sys.stderr)
    if args.json:
        print(json.dumps(res))
    else:
        print(fmt(res))
        print(f"wrote {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="held-out task accuracy (few-shot for base models) and conversation loss",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("--task", nargs="*", choices=list(TASKS), default=[], help="tasks to run (default: all)")
    p.add_argument(
        "--n",
        type=int,
        default=None,
        help="held-out examples per task (default 100; 300 with --samples: "
        "the 95%% interval on the mean then spans about +-2 points)",
    )
    p.add_argument("--samples", type=int, default=0, help="also sample K answers per question: avg@K, maj@K, pass@K")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for --samples (default 1)")
    p.add_argument("--reference", default="", help="with --samples: KL of the sampled answers to this checkpoint")
    p.add_argument(
        "--baseline",
        default="",
        help="with --samples: an earlier eval JSON of the same questions (e.g. "
        "the SFT model's); adds the paired differences in points with 95%% intervals",
    )
    p.add_argument("--boot", type=int, default=2000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument(
        "--mode",
        choices=["auto", "chat", "fewshot"],
        default="auto",
        help="auto: few-shot for base models, the chat template otherwise",
    )
    p.add_argument("--shots", type=int, default=3, help="solved examples in a few-shot prompt (default 3)")
    p.add_argument("--seed", type=int, default=0, help="which held-out examples (default 0)")
    p.add_argument(
        "--data",
        nargs="*",
        default=[],
        help="held-out conversation JSONL for the loss (default: the "
        "built-in held-out split); a file of checkable questions "
        "{'messages', 'answer'} replaces the built-in tasks",
    )
    p.add_argument(
        "--loss",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure held-out conversation loss (default on)",
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    p.add_argument(
        "--quantize",
        default=None,
        choices=list(QUANTIZE_KINDS),
        help="generate with int8 or bf16 weights (CPU; chatstack.infer.quantize): what they cost on the tasks "
        "(the conversation loss stays fp32)",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--out", default="", help="write the JSON here (default CKPT/eval.json)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar on stderr")
    p.set_defaults(func=_cmd_eval)
