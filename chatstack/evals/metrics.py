"""Metrics for sampled answers: avg@k, maj@k, pass@k (the unbiased estimator), bootstrap intervals, win rates.

Pure functions over per-question results, no models. `chatstack eval --samples K` and `chatstack compare`
(chatstack/stages/eval.py, chatstack/stages/compare.py) are built on them.

    from chatstack.evals.metrics import pass_at_k, majority, bootstrap_ci
    pass_at_k(n=8, c=2, k=4)                    # 1 - C(6,4)/C(8,4) = 0.7857...
    majority(["12", "13", "12"])                # "12" (ties: the answer seen first)
    bootstrap_ci([0, 1, 1, 0, 1], seed=0)       # (low, high) of the mean, 95% percentile interval

Definitions (per question with n sampled answers, c of them correct):
  avg@n   c / n: the expected accuracy of one sampled answer;
  maj@n   1 if the most frequent extracted answer is correct (self-consistency, Wang et al. 2022);
  pass@k  1 - C(n-c, k) / C(n, k): the probability that at least one of k answers drawn without
          replacement from the n is correct (Chen et al. 2021, "Evaluating Large Language Models Trained
          on Code"); with k = n it is 1 if any answer is correct.
A task's number is the mean over its questions; the headline is the mean over tasks (every task weighs the
same). Intervals: percentile bootstrap over questions, resampled within each task (stratified), so the
interval on the mean over tasks keeps each task's size; paired differences resample the same questions
for both models.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples with c correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i) (numerically stable for large n)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority(answers: Sequence[str]) -> str | None:
    """The most frequent answer; on a tie the one that appeared first. None for no answers."""
    if not answers:
        return None
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


def question_metrics(correct: Sequence[bool], finals: Sequence[str], reference: str, k: int | None = None) -> dict:
    """avg@n, maj@n and pass@k of one question's sampled answers (`finals`: their extracted answers)."""
    n = len(correct)
    if n == 0:
        raise ValueError("no samples")
    c = int(sum(bool(x) for x in correct))
    k = n if k is None else k
    return {"avg": c / n, "maj": float(majority(list(finals)) == reference), "pass": pass_at_k(n, c, k)}


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`."""
    return stratified_bootstrap_ci([values], n_boot, seed, level)


def _resampled_means(groups: Sequence[Sequence[float]], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot,) bootstrap replicates of the mean over groups of each group's mean (resampled within groups)."""
    reps = np.zeros(n_boot)
    for g in groups:
        a = np.asarray(g, dtype=np.float64)
        idx = rng.integers(0, len(a), size=(n_boot, len(a)))
        reps += a[idx].mean(1)
    return reps / len(groups)


def stratified_bootstrap_ci(
    groups: Sequence[Sequence[float]], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Interval of the mean over groups (tasks) of each group's mean, resampling within every group."""
    groups = [g for g in groups if len(g)]
    if not groups:
        raise ValueError("no values")
    reps = _resampled_means(groups, n_boot, np.random.default_rng(seed))
    a = (1.0 - level) / 2
    lo, hi = np.quantile(reps, [a, 1 - a])
    return float(lo), float(hi)


def paired_difference(
    a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict:
    """Mean over groups of (a - b) on the same questions, with a paired bootstrap interval.

    a[g][i] and b[g][i] are two models' scores on question i of group g."""
    diffs = []
    for ga, gb in zip(a, b, strict=True):
        if len(ga) != len(gb):
            raise ValueError("paired groups must hold the same questions")
        diffs.append([x - y for x, y in zip(ga, gb)])
    diffs = [d for d in diffs if d]
    mean = float(np.mean([np.mean(d) for d in diffs]))
    lo, hi = stratified_bootstrap_ci(diffs, n_boot, seed, level)
    return {"diff": mean, "ci_low": lo, "ci_high": hi}


def win_scores(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per comparison: 1 if a's score is higher, 0.5 on a tie, 0 if lower."""
    return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)]


def win_rate(per_prompt: Sequence[Sequence[float]], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Win rate over prompts (each prompt: its comparisons' win scores), with a bootstrap interval that
    resamples prompts (a prompt's comparisons are not independent of each other)."""
    per_prompt = [p for p in per_prompt if len(p)]
    if not per_prompt:
        raise ValueError("no comparisons")
    means = np.array([np.mean(p) for p in per_prompt])
    flat = [x for p in per_prompt for x in p]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(means), size=(n_boot, len(means)))
    reps = means[idx].mean(1)
    a = (1.0 - level) / 2
    lo, hi = np.quantile(reps, [a, 1 - a])
    return {
        "win_rate": float(means.mean()),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "n": len(per_prompt),
        "comparisons": len(flat),
        "wins": sum(1 for x in flat if x == 1.0),
        "ties": sum(1 for x in flat if x == 0.5),
        "losses": sum(1 for x in flat if x == 0.0),
    }
