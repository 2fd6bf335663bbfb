"""`chatstack eval-task`: accuracy of a `finetune-task` checkpoint.

    chatstack eval-task runs/task/entail --json              # its built-in test split (or its held-out 10%)
    chatstack eval-task runs/task/topics --data test.jsonl    # your own examples (same fields as training)

Output (--json): {"task", "accuracy", "ci95", "n", "checkpoint", "data", "labels", "majority_baseline"};
ci95 is the 95% percentile-bootstrap interval of the accuracy over the examples; the majority baseline is the
accuracy of always answering the commonest test label (or 1/options for choice).
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter

from chatstack.args import CLIError
from chatstack.checkpoint import CheckpointError, load_tokenizer
from chatstack.data.shards import DataError
from chatstack.data.task_sets import builtin_task_set, read_task_file
from chatstack.evals.metrics import bootstrap_ci
from chatstack.heads import encode_examples, load_task_model, predict


def evaluate(path: str, data: str = "", device: str = "cpu", per_example: bool = False) -> dict:
    """Accuracy (+ its 95% bootstrap interval over the examples) of a task checkpoint; per_example adds
    "correct", one 0/1 per example in file order (for paired comparisons of two checkpoints)."""
    try:
        model, cfg = load_task_model(path, device)
        tok = load_tokenizer(path)
    except CheckpointError as e:
        raise CLIError(str(e)) from None
    t = cfg["task"]
    try:
        if data:
            rows, source = read_task_file(data, t["kind"]), data
        elif t.get("builtin"):
            rows, source = builtin_task_set(t["builtin"], cfg["train"].get("seed", 0))[1], t["builtin"] + " (test)"
        else:
            tr = cfg["train"]
            if tr.get("eval_data"):
                rows, source = read_task_file(tr["eval_data"], t["kind"]), tr["eval_data"]
            else:  # the same 10% finetune-task held out
                all_rows = read_task_file(tr["data"], t["kind"])
                order = list(range(len(all_rows)))
                random.Random(tr.get("seed", 0)).shuffle(order)
                rows = [all_rows[i] for i in order[: max(1, len(all_rows) // 10)]]
                source = f"{tr['data']} (held-out 10%)"
        enc = encode_examples(t["kind"], tok.encode, rows, t["base_vocab"], t["max_len"], t["labels"])
    except DataError as e:
        raise CLIError(str(e)) from None
    except ValueError as e:
        raise CLIError(f"{data or source}: {e}") from None
    if t["kind"] == "choice":
        majority = sum(1 / len(r["options"]) for r in rows) / len(rows)
    else:
        majority = Counter(r["label"] for r in rows).most_common(1)[0][1] / len(rows)
    correct = [int(p == y) for p, (_, y) in zip(predict(model, enc), enc)]
    out = {
        "task": t["kind"],
        "accuracy": sum(correct) / len(correct),
        "ci95": list(bootstrap_ci(correct, seed=0)),
        "n": len(enc),
        "checkpoint": str(path),
        "data": source,
        "labels": t["labels"],
        "majority_baseline": majority,
        "random_init": t.get("random_init", False),
    }
    if per_example:
        out["correct"] = correct
    return out


def _cmd(args) -> int:
    res = evaluate(args.checkpoint, args.data, args.device)
    if args.json:
        print(json.dumps(res))
    else:
        print(
            f"{res['task']} on {res['data']}: accuracy {res['accuracy']:.1%} "
            f"(95% interval {res['ci95'][0]:.1%}-{res['ci95'][1]:.1%}, n={res['n']}; "
            f"majority baseline {res['majority_baseline']:.1%})"
        )
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "eval-task",
        help="accuracy of a finetune-task checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="a checkpoint written by finetune-task")
    p.add_argument("--data", default="", help="examples JSONL (default: the set the checkpoint was evaluated on)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd)
