"""A weighted mixture of prepared datasets, GPT-3 style: each source is sampled by its weight, not its size.

    --data runs/data/shakespeare                              one source
    --data runs/data/shakespeare:0.7,runs/data/bible:0.3      weights on the command line
    --data mix.json      {"sources": [{"path": "runs/data/shakespeare", "weight": 0.7}, ...]}
    --data mix.txt       one "path weight" per line (# comments allowed; paths relative to the file)

Batches are a pure function of (seed, step): for step s the generator seeded from (seed, s) draws every
row of the global batch (which source, which offset), and a (micro, rank) pair takes its slice. So one
process with 4 micro-batches and 2 processes with 2 each train on exactly the same rows, and a resumed
run needs no data-loader state.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from chatstack.data.shards import DataError, TokenDataset


def parse_spec(spec: str) -> list[tuple[str, float]]:
    """'a:0.7,b:0.3' | 'a' | a .json / .txt mixture file -> [(path, weight)]."""
    p = Path(spec)
    if p.is_file() and p.suffix == ".json":
        try:
            cfg = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: invalid JSON ({e})") from None
        out = []
        for i, s in enumerate(cfg.get("sources", []) if isinstance(cfg, dict) else []):
            if not isinstance(s, dict) or "path" not in s:
                raise DataError(f"{p}: sources[{i}] needs a 'path' (and optional 'weight')")
            out.append(
                (
                    str((p.parent / s["path"]) if not Path(s["path"]).is_absolute() else s["path"]),
                    float(s.get("weight", 1.0)),
                )
            )
        if not out:
            raise DataError(f"{p}: no 'sources' listed")
        return out
    if p.is_file():
        out = []
        for lineno, line in enumerate(p.read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            try:
                w = float(parts[1]) if len(parts) > 1 else 1.0
            except ValueError:
                raise DataError(f"{p}:{lineno}: weight must be a number, got {parts[1]!r}") from None
            path = Path(parts[0])
            out.append((str(path if path.is_absolute() else p.parent / path), w))
        if not out:
            raise DataError(f"{p}: no sources listed")
        return out
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        path, _, w = item.rpartition(":") if ":" in item else (item, "", "1")
        try:
            out.append((path, float(w)))
        except ValueError:
            out.append((item, 1.0))  # a ':' that is part of the path
    return out


class Mixture:
    def __init__(self, sources: list[tuple[str, float]]) -> None:
        if not sources:
            raise DataError("no data sources given")
        self.datasets = [TokenDataset(p) for p, _ in sources]
        weights = [w for _, w in sources]
        for p, w in sources:
            if not w > 0:
                raise DataError(f"{p}: mixture weight must be positive, got {w}")
        first = self.datasets[0]
        for ds in self.datasets[1:]:
            if ds.fingerprint != first.fingerprint:
                raise DataError(
                    f"{ds.path}: made with tokenizer {ds.fingerprint}, but {first.path} with "
                    f"{first.fingerprint}; all mixed sources must share one tokenizer"
                )
        self.weights = torch.tensor(weights, dtype=torch.float64) / sum(weights)

    @classmethod
    def from_spec(cls, spec: str) -> Mixture:
        return cls(parse_spec(spec))

    @property
    def primary(self) -> TokenDataset:
        return self.datasets[0]

    def describe(self) -> list[dict]:
        return [
            {"path": str(d.path), "weight": round(float(w), 6), "train_tokens": len(d.split("train"))}
            for d, w in zip(self.datasets, self.weights)
        ]

    def draw(self, seed: int, step: int, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: the source index (by weight) and a uniform [0, 1) position inside it."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        src = torch.multinomial(self.weights, n_rows, replacement=True, generator=g)
        u = torch.rand(n_rows, generator=g, dtype=torch.float64)
        return src, u

    def sample_rows(self, seed: int, step: int, n_rows: int, block_size: int) -> torch.Tensor:
        """(n_rows, block_size + 1) int64 windows for step `step`: a pure function of (seed, step)."""
        src, u = self.draw(seed, step, n_rows)
        rows = np.empty((n_rows, block_size + 1), dtype=np.int64)
        for r in range(n_rows):
            toks = self.datasets[int(src[r])].split("train").tokens
            span = len(toks) - block_size - 1
            if span <= 0:
                raise DataError(
                    f"{self.datasets[int(src[r])].path}: train split has {len(toks)} tokens, "
                    f"fewer than one window of {block_size + 1}"
                )
            off = int(u[r] * span)
            rows[r] = toks[off : off + block_size + 1]
        return torch.from_numpy(rows)
