"""GPT-1's comparison on the built-in task sets: pretrained decoder vs the same architecture from random
initialisation vs a bag-of-words logistic regression (scikit-learn), same data, same steps.

    python benchmarks/task_transfer.py --base runs/base --out runs/task_transfer [--epochs 3] [--lr ...] [--sets ...]

Prints one row per set (accuracy of each with its 95% bootstrap interval over the test examples, and
pretrained minus random in points with a paired bootstrap interval) and writes OUT/results.json. The
zero-shot column is the base LM itself, no fine-tuning, scoring the next line by its likelihood (choice,
entail): how much of the task the pretraining already knows. The two fine-tunes run `chatstack finetune-task` in-process with identical flags except
--random-init; the bag-of-words model sees the same training examples as word counts (binary), with the
pair features GPT-1's transformations give the transformer (see bow_features).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from chatstack.checkpoint import load_checkpoint
from chatstack.data.task_sets import BUILTIN_SETS, builtin_task_set
from chatstack.evals.metrics import bootstrap_ci, paired_difference
from chatstack.stages.eval_task import evaluate
from chatstack.stages.finetune_task import FinetuneTaskConfig, run


def bow_correct(kind: str, train: list[dict], test: list[dict]) -> list[int]:
    """Per test example 1/0: logistic regression on binary word counts. Pairs: [a, b, a*b] (entail), [a+b, a*b] (similar, symmetric);
    multiple choice: a binary true/false model on [option, context*option], the highest-scoring option wins."""
    import numpy as np
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    def texts(rows):
        if kind == "classify":
            return [r["text"] for r in rows]
        if kind == "entail":
            return [r["premise"] for r in rows] + [r["hypothesis"] for r in rows]
        if kind == "similar":
            return [r["a"] for r in rows] + [r["b"] for r in rows]
        return [r["context"] for r in rows] + [o for r in rows for o in r["options"]]

    vec = CountVectorizer(binary=True, lowercase=True, token_pattern=r"(?u)\b\w+\b").fit(texts(train))
    V = lambda xs: vec.transform(xs).astype(np.float64)  # noqa: E731

    def feats(rows):
        if kind == "classify":
            return V([r["text"] for r in rows]), [r["label"] for r in rows]
        if kind == "entail":
            a, b = V([r["premise"] for r in rows]), V([r["hypothesis"] for r in rows])
            return sp.hstack([a, b, a.multiply(b)]).tocsr(), [r["label"] for r in rows]
        if kind == "similar":
            a, b = V([r["a"] for r in rows]), V([r["b"] for r in rows])
            return sp.hstack([a + b, a.multiply(b)]).tocsr(), [r["label"] for r in rows]
        ctx = V([r["context"] for r in rows for _ in r["options"]])
        opt = V([o for r in rows for o in r["options"]])
        y = [int(i == r["label"]) for r in rows for i in range(len(r["options"]))]
        return sp.hstack([opt, ctx.multiply(opt)]).tocsr(), y

    Xtr, ytr = feats(train)
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(Xtr, ytr)
    Xte, yte = feats(test)
    if kind != "choice":
        return [int(x) for x in clf.predict(Xte) == np.array(yte)]
    p = clf.predict_proba(Xte)[:, 1]
    right, i = [], 0
    for r in test:
        k = len(r["options"])
        right.append(int(int(np.argmax(p[i : i + k])) == r["label"]))
        i += k
    return right


@torch.no_grad()
def _continuation_logp(model, tok, pairs: list[tuple[str, str]], batch: int = 64) -> list[float]:
    """Sum of log p(continuation tokens | prefix) under the base LM, for (prefix, continuation) strings."""
    out = []
    for i in range(0, len(pairs), batch):
        seqs = []
        for prefix, cont in pairs[i : i + batch]:
            p, c = tok.encode(prefix), tok.encode(cont)
            seqs.append((p[max(0, len(p) + len(c) - model.config.block_size) :], c))
        T = max(len(p) + len(c) for p, c in seqs)
        idx = torch.zeros(len(seqs), T, dtype=torch.long)
        tgt = torch.full((len(seqs), T), -1, dtype=torch.long)
        for j, (p, c) in enumerate(seqs):
            idx[j, : len(p) + len(c)] = torch.tensor(p + c)
            tgt[j, len(p) - 1 : len(p) + len(c) - 1] = torch.tensor(c)
        logp = torch.log_softmax(model(idx).float(), -1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
        out += (logp * (tgt >= 0)).sum(1).tolist()
    return out


def zero_shot_correct(base: str, kind: str, train: list[dict], test: list[dict]) -> list[int] | None:
    """The base LM with no fine-tuning, where its next-line likelihood answers the task (GPT-1's zero-shot
    heuristics), scored by pointwise mutual information log p(line | previous text) - log p(line | newline),
    so short or common lines get no edge: choice = the option with the highest PMI given the context;
    entail = PMI of the hypothesis given the premise above a threshold chosen on the training examples;
    similar = the PMI of b given a plus that of a given b (symmetric), thresholded the same way.
    None for classification."""
    if kind not in ("choice", "entail", "similar"):
        return None
    ck = load_checkpoint(base)
    model, tok = ck.model.eval(), ck.tokenizer

    def pmi(pairs: list[tuple[str, str]]) -> list[float]:
        cond = _continuation_logp(model, tok, [(p + "\n", c) for p, c in pairs])
        prior = _continuation_logp(model, tok, [("\n", c) for _, c in pairs])
        return [a - b for a, b in zip(cond, prior)]

    if kind == "choice":
        lp = pmi([(r["context"], o) for r in test for o in r["options"]])
        right, i = [], 0
        for r in test:
            k = len(r["options"])
            right.append(int(max(range(k), key=lambda j: lp[i + j]) == r["label"]))
            i += k
        return right

    def score(rows: list[dict]) -> list[float]:
        if kind == "entail":
            return pmi([(r["premise"], r["hypothesis"]) for r in rows])
        ab, ba = pmi([(r["a"], r["b"]) for r in rows]), pmi([(r["b"], r["a"]) for r in rows])
        return [x + y for x, y in zip(ab, ba)]

    s_tr, s_te = score(train), score(test)
    # the threshold with the best training accuracy: predict 1 above it (one pass over the sorted scores)
    pairs = sorted(zip(s_tr, (bool(r["label"]) for r in train)))
    right = sum(y for _, y in pairs)  # threshold below every score: all predicted 1
    best, best_right = pairs[0][0] - 1.0, right
    for s, y in pairs:
        right += -1 if y else 1
        if right > best_right:
            best, best_right = s, right
    return [int((s > best) == bool(r["label"])) for s, r in zip(s_te, test)]


def _acc(correct: list[int]) -> dict:
    lo, hi = bootstrap_ci(correct, seed=0)
    return {"accuracy": sum(correct) / len(correct), "ci95": [lo, hi]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="pretrained checkpoint")
    ap.add_argument("--out", required=True, help="directory for the fine-tuned checkpoints and results.json")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: finetune-task's)")
    ap.add_argument("--epochs", type=float, default=None, help="passes over the training set (instead of --steps)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: finetune-task's)")
    ap.add_argument("--lm-coef", type=float, default=None, help="auxiliary LM weight (default: finetune-task's)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--max-len", type=int, default=None)
    ap.add_argument("--sets", nargs="*", default=list(BUILTIN_SETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-zero-shot", action="store_true", help="skip the base LM's zero-shot column")
    args = ap.parse_args(argv)
    out = Path(args.out)
    flags = {
        k: v
        for k, v in {
            "max_steps": args.steps,
            "epochs": args.epochs,
            "lr": args.lr,
            "lm_coef": args.lm_coef,
            "batch_size": args.batch_size,
            "max_len": args.max_len,
        }.items()
        if v is not None
    }
    if "lr" in flags:
        flags["min_lr"] = flags["lr"] / 10
    results = {}
    for name in args.sets:
        kind = BUILTIN_SETS[name]
        row: dict = {"kind": kind}
        train, test = builtin_task_set(name, args.seed)
        t0 = time.perf_counter()
        row["bag_of_words"] = _acc(bow_correct(kind, train, test))
        row["bow_s"] = round(time.perf_counter() - t0, 1)
        zs = None if args.no_zero_shot else zero_shot_correct(args.base, kind, train, test)
        if zs is not None:
            row["zero_shot"] = _acc(zs)
        correct = {}
        for variant, random_init in (("pretrained", False), ("random_init", True)):
            cfg = FinetuneTaskConfig(
                base=args.base,
                task=kind,
                builtin=name,
                out=str(out / name / variant),
                random_init=random_init,
                seed=args.seed,
                progress=False,
                eval_every=0,
                **flags,
            )
            t0 = time.perf_counter()
            path = run(cfg)
            res = evaluate(cfg.out, per_example=True)
            correct[variant] = res["correct"]
            row[variant] = _acc(res["correct"])
            row[f"{variant}_s"] = round(time.perf_counter() - t0, 1)
            row["steps"] = json.loads((path / "config.json").read_text())["train"]["max_steps"]
            row["n_test"], row["majority"] = res["n"], res["majority_baseline"]
        d = paired_difference([correct["pretrained"]], [correct["random_init"]], seed=0)
        row["gain_points"] = {k: round(100 * v, 1) for k, v in d.items()}
        results[name] = row
        g = row["gain_points"]
        print(
            f"{name:22s} pretrained {row['pretrained']['accuracy']:.1%}  random init {row['random_init']['accuracy']:.1%}"
            f"  bag of words {row['bag_of_words']['accuracy']:.1%}"
            + (f"  zero-shot {row['zero_shot']['accuracy']:.1%}" if "zero_shot" in row else "")
            + f"  majority {row['majority']:.1%}  ({g['diff']:+.1f} points [{g['ci_low']:+.1f}, {g['ci_high']:+.1f}],"
            f" n={row['n_test']}, {row['steps']} steps)",
            flush=True,
        )
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(
            json.dumps({"base": args.base, "flags": flags, "seed": args.seed, "results": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
