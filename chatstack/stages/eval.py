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
from chatstack.data.tasks import TASKS
from chatstack.evals.tasks_eval import conversation_loss, default_mode, evaluate_tasks, mean_accuracy


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


def _cmd_eval(args) -> int:
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
    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval.json"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
    except OSError as e:
        print(f"warning: could not write {out}: {e}", file=sys.stderr)
    if args.json:
        print(json.dumps(res))
    else:
        print(format_table(res))
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
    p.add_argument("--n", type=int, default=100, help="held-out examples per task (default 100)")
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
        help="held-out conversation JSONL for the loss (default: the built-in held-out split)",
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
        choices=["int8"],
        help="generate with int8 weights (CPU; chatstack.infer.quantize): what they cost on the tasks "
        "(the conversation loss stays fp32)",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--out", default="", help="write the JSON here (default CKPT/eval.json)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar on stderr")
    p.set_defaults(func=_cmd_eval)
