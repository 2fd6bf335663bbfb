"""pass@k: the probability that at least one of k samples solves a problem, estimated without bias.

    from chatstack.evals.passk import pass_at_k, mean_pass_at_k
    pass_at_k(n=10, c=3, k=1)        # 0.3
    mean_pass_at_k([(10, 3), (10, 0)], ks=(1, 10))   # {"pass@1": 0.15, "pass@10": 0.5}

Codex (Chen et al. 2021) draws n >= k samples per problem, counts the c correct ones and estimates
pass@k = E[1 - C(n-c, k) / C(n, k)]: the chance that a random k-subset of the n samples holds a correct
one. Computed as a product, 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials.
The estimator itself is chatstack.evals.metrics.pass_at_k (re-exported here), the one implementation every
eval that reports pass@k uses (eval-code, and eval's sampled task metrics); this module adds the mean over
problems.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from chatstack.evals.metrics import pass_at_k  # the one estimator (also used by eval --samples)


def mean_pass_at_k(counts: Iterable[tuple[int, int]], ks: Sequence[int]) -> dict[str, float]:
    """{"pass@k": mean over problems} from (n, c) per problem; a k larger than some problem's n is left out."""
    counts = list(counts)
    out = {}
    for k in ks:
        if not counts or any(n < k for n, _ in counts):
            continue
        out[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for n, c in counts]))
    return out
