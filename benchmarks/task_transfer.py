"""GPT-1's comparison on the built-in task sets: pretrained decoder vs the same architecture from random
initialisation vs a bag-of-words logistic regression (scikit-learn), same data, same steps.

    python benchmarks/task_transfer.py --base runs/base --out runs/task_transfer [--steps 300] [--sets ...]

Prints one row per set (accuracy of each, and pretrained minus random in points) and writes
OUT/results.json. The two fine-tunes run `chatstack finetune-task` in-process with identical flags except
--random-init; the bag-of-words model sees the same training examples as word counts (binary), with the
pair features GPT-1's transformations give the transformer (see bow_features).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from chatstack.data.task_sets import BUILTIN_SETS, builtin_task_set
from chatstack.stages.eval_task import evaluate
from chatstack.stages.finetune_task import FinetuneTaskConfig, run


def bow_accuracy(kind: str, train: list[dict], test: list[dict]) -> float:
    """Logistic regression on binary word counts. Pairs: [a, b, a*b] (entail), [a+b, a*b] (similar, symmetric);
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
        return float((clf.predict(Xte) == np.array(yte)).mean())
    p = clf.predict_proba(Xte)[:, 1]
    right, i = 0, 0
    for r in test:
        k = len(r["options"])
        right += int(int(np.argmax(p[i : i + k])) == r["label"])
        i += k
    return right / len(test)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="pretrained checkpoint")
    ap.add_argument("--out", required=True, help="directory for the fine-tuned checkpoints and results.json")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--sets", nargs="*", default=list(BUILTIN_SETS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    results = {}
    for name in args.sets:
        kind = BUILTIN_SETS[name]
        row = {"kind": kind}
        train, test = builtin_task_set(name, args.seed)
        t0 = time.perf_counter()
        row["bag_of_words"] = bow_accuracy(kind, train, test)
        row["bow_s"] = round(time.perf_counter() - t0, 1)
        for variant, random_init in (("pretrained", False), ("random_init", True)):
            cfg = FinetuneTaskConfig(
                base=args.base,
                task=kind,
                builtin=name,
                out=str(out / name / variant),
                max_steps=args.steps,
                batch_size=args.batch_size,
                max_len=args.max_len,
                random_init=random_init,
                seed=args.seed,
                progress=False,
                eval_every=0,
            )
            t0 = time.perf_counter()
            run(cfg)
            res = evaluate(cfg.out)
            row[variant] = res["accuracy"]
            row[f"{variant}_s"] = round(time.perf_counter() - t0, 1)
            row["n_test"], row["majority"] = res["n"], res["majority_baseline"]
        row["gain_points"] = round(100 * (row["pretrained"] - row["random_init"]), 1)
        results[name] = row
        print(
            f"{name:22s} pretrained {row['pretrained']:.1%}  random init {row['random_init']:.1%}  "
            f"bag of words {row['bag_of_words']:.1%}  majority {row['majority']:.1%}  "
            f"(+{row['gain_points']} points, n={row['n_test']})",
            flush=True,
        )
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(
            json.dumps(
                {"base": args.base, "steps": args.steps, "batch_size": args.batch_size, "results": results}, indent=1
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
