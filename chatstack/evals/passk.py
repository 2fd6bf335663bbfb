"""pass@k: the probability that at least one of k samples solves a problem, estimated without bias.

    from chatstack.evals.passk import pass_at_k, mean_pass_at_k
    pass_at_k(n=10, c=3, k=1)        # 0.3
    mean_pass_at_k([(10, 3), (10, 0)], ks=(1, 10))   # {"pass@1": 0.15, "pass@10": 0.5}

Codex (Chen et al. 2021) draws n >= k samples per problem, counts the c correct ones and estimates
pass@k = E[1 - C(n-c, k) / C(n, k)]: the chance that a random k-subset of the n samples holds a correct
one. Computed as a product, 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials.
The one estimator for every eval that reports pass@k (eval-code, and the sampled task metrics).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c are correct."""
    if not (0 <= c <= n) or k < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and k >= 1, got n={n} c={c} k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(counts: Iterable[tuple[int, int]], ks: Sequence[int]) -> dict[str, float]:
    """{"pass@k": mean over problems} from (n, c) per problem; a k larger than some problem's n is left out."""
    counts = list(counts)
    out = {}
    for k in ks:
        if not counts or any(n < k for n, _ in counts):
            continue
        out[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for n, c in counts]))
    return out
