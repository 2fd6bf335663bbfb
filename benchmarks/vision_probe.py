"""Linear probes of an image encoder's tokens: is what a scene question needs (which shape and colour sits
where) in the encoder's output, and is it local to the token where the object is?

    python benchmarks/vision_probe.py runs/clip_mix                 # a clip-train checkpoint
    python benchmarks/vision_probe.py runs/vision                   # the encoder inside a vision chat checkpoint
    python benchmarks/vision_probe.py runs/clip_mix --train 3000 --test 600

Logistic regressions (scikit-learn) fitted on encoder outputs of training scenes, scored on held-out scenes:
  band shape / band colour   each column band's shape (none, circle, square, triangle) / colour (none + 4) from
                             all grid tokens concatenated (what is where: colour, shape and position together)
  cell shape / cell colour   an object's shape / colour from the one token at its centre (the local
                             representation a GPT's attention reads when it looks an object up)
  column of colour c         which band the object of colour c is in (absent, 0, 1, 2), from all tokens
  a left of b                for each pair of colours, on scenes holding both: is the one left of the other
Peers in the same run: the raw pixels (3x32x32 = 3,072 numbers), and the mean of the grid tokens (position
pooled away), for the same probes.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch

from chatstack.checkpoint import read_config
from chatstack.vision import data as D
from chatstack.vision.projection import VisionAdapter
from chatstack.vision.vlm import load_clip, load_vision


def encoder_of(path: str) -> torch.nn.Module:
    if read_config(path).get("kind") == "clip":
        return load_clip(path)[0].image
    adapter: VisionAdapter | None = load_vision(path)
    if adapter is None:
        raise SystemExit(f"{path}: neither a CLIP nor a vision chat checkpoint")
    return adapter.encoder


def train_scenes(n: int, seed: int) -> list[D.Scene]:
    rng, out = random.Random(f"probe-{seed}"), []
    while len(out) < n:
        s = D.random_scene(rng)
        if not s.held_out():
            out.append(s)
    return out


def band_of(o: D.Obj) -> int:
    return min(range(3), key=lambda b: abs((5, 16, 26)[b] - o.x))


def labels(scenes: list[D.Scene]) -> dict[str, np.ndarray]:
    out = {}
    for b in range(3):
        sh, co = [], []
        for s in scenes:
            o = next((o for o in s.objects if band_of(o) == b), None)
            sh.append(0 if o is None else 1 + D.SHAPES.index(o.shape))
            co.append(0 if o is None else 1 + list(D.COLOURS).index(o.colour))
        out[f"band{b}_shape"], out[f"band{b}_colour"] = np.array(sh), np.array(co)
    for c in D.COLOURS:
        out[f"column_{c}"] = np.array([next((1 + band_of(o) for o in s.objects if o.colour == c), 0) for s in scenes])
    return out


def cell_rows(scenes: list[D.Scene], cells: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features of the token at each object's centre, its shape, its colour)."""
    feats, sh, co = [], [], []
    step = D.SIZE / grid
    for s, c in zip(scenes, cells):
        for o in s.objects:
            k = int(min(o.y // step, grid - 1)) * grid + int(min(o.x // step, grid - 1))
            feats.append(c[k])
            sh.append(D.SHAPES.index(o.shape))
            co.append(list(D.COLOURS).index(o.colour))
    return np.stack(feats), np.array(sh), np.array(co)


def fit_score(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415 (optional: only the probes need it)
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415 (optional: only the probes need it)

    sc = StandardScaler().fit(xtr)
    clf = LogisticRegression(max_iter=3000, C=1.0).fit(sc.transform(xtr), ytr)
    return float((clf.predict(sc.transform(xte)) == yte).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--train", type=int, default=3000, help="training scenes for the probes")
    ap.add_argument("--test", type=int, default=600, help="held-out scenes to score them on")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t0 = time.perf_counter()
    enc = encoder_of(a.checkpoint).eval()
    tr, te = train_scenes(a.train, a.seed), D.scenes("test", a.test, a.seed)
    xs = {k: torch.stack([s.draw() for s in v]) for k, v in (("train", tr), ("test", te))}
    with torch.no_grad():
        cells = {k: enc.tokens(v).numpy() for k, v in xs.items()}  # (N, g*g, C)
    grid = int(round(cells["train"].shape[1] ** 0.5))
    reps = {
        "encoder tokens": {k: v.reshape(len(v), -1) for k, v in cells.items()},
        "mean token": {k: v.mean(1) for k, v in cells.items()},
        "raw pixels": {k: v.reshape(len(v), -1).numpy() for k, v in xs.items()},
    }
    ltr, lte = labels(tr), labels(te)
    probes = {
        "band shape": [f"band{b}_shape" for b in range(3)],
        "band colour": [f"band{b}_colour" for b in range(3)],
        "column of colour c": [f"column_{c}" for c in D.COLOURS],
    }
    print(
        f"{a.checkpoint}: {grid}x{grid} tokens of {cells['train'].shape[2]}; {a.train} train / {a.test} held-out scenes"
    )
    print(f"{'probe':22s}" + "".join(f"{r:>16s}" for r in reps))
    for name, keys in probes.items():
        accs = [np.mean([fit_score(r["train"], ltr[k], r["test"], lte[k]) for k in keys]) for r in reps.values()]
        print(f"{name:22s}" + "".join(f"{x:16.3f}" for x in accs))
    pairs = [k for k in ltr if k.startswith("order_")]
    accs = []
    for r in reps.values():
        per = []
        for k in pairs:
            mtr, mte = ltr[k] >= 0, lte[k] >= 0
            per.append(fit_score(r["train"][mtr], ltr[k][mtr], r["test"][mte], lte[k][mte]))
        accs.append(np.mean(per))
    print(f"{'a left of b':22s}" + "".join(f"{x:16.3f}" for x in accs))
    ftr, str_, ctr = cell_rows(tr, cells["train"], grid)
    fte, ste, cte = cell_rows(te, cells["test"], grid)
    print(f"{'cell shape':22s}{fit_score(ftr, str_, fte, ste):16.3f}")
    print(f"{'cell colour':22s}{fit_score(ftr, ctr, fte, cte):16.3f}")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
