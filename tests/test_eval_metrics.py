"""chatstack.evals.metrics: pass@k against brute force over subsets, majority vote, bootstrap intervals and
win rates against hand computations."""

import itertools
import math

import numpy as np
import pytest

from chatstack.evals import metrics as M


@pytest.mark.parametrize("n,c,k", [(8, 0, 1), (8, 1, 1), (8, 3, 2), (8, 3, 8), (6, 5, 3), (5, 2, 4), (10, 7, 1)])
def test_pass_at_k_equals_the_share_of_k_subsets_with_a_correct_answer(n, c, k):
    answers = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(any(answers[i] for i in s) for s in subsets) / len(subsets)
    assert M.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
    assert M.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_bad_input():
    with pytest.raises(ValueError):
        M.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        M.pass_at_k(4, 1, 5)


def test_majority_ties_go_to_the_first_seen():
    assert M.majority(["3", "4", "4", "3"]) == "3"
    assert M.majority(["5", "4", "4"]) == "4"
    assert M.majority([]) is None
    q = M.question_metrics([False, True, True, False], ["1", "2", "2", "3"], "2")
    assert q == {"avg": 0.5, "maj": 1.0, "pass": 1.0}
    q = M.question_metrics([True, False, False], ["2", "1", "1"], "2", k=1)
    assert q["maj"] == 0.0 and q["pass"] == pytest.approx(1 / 3)


def test_bootstrap_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    x = (rng.random(2000) < 0.3).astype(float)
    lo, hi = M.bootstrap_ci(x, n_boot=4000, seed=1)
    se = x.std(ddof=0) / math.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.004)
    assert hi == pytest.approx(x.mean() + 1.96 * se, abs=0.004)
    assert M.bootstrap_ci([1.0] * 10) == (1.0, 1.0)


def test_stratified_interval_is_the_mean_of_the_task_means():
    a, b = [1.0] * 50, [0.0] * 5 + [1.0] * 5  # task means 1.0 and 0.5: the mean over tasks is 0.75
    lo, hi = M.stratified_bootstrap_ci([a, b], seed=0)
    assert lo < 0.75 < hi and hi - lo < 0.5
    d = M.paired_difference([[1, 1, 0, 1]], [[0, 1, 0, 0]])
    assert d["diff"] == pytest.approx(0.5) and d["ci_low"] <= 0.5 <= d["ci_high"]


def test_win_rate_counts_ties_as_half():
    assert M.win_scores([2, 0, 1], [1, 0, 2]) == [1.0, 0.5, 0.0]
    wr = M.win_rate([[1.0, 0.5], [0.0, 0.0], [1.0, 1.0]], seed=0)
    assert wr["win_rate"] == pytest.approx((0.75 + 0.0 + 1.0) / 3)
    assert (wr["wins"], wr["ties"], wr["losses"], wr["n"], wr["comparisons"]) == (3, 1, 2, 3, 6)
    assert 0.0 <= wr["ci_low"] <= wr["win_rate"] <= wr["ci_high"] <= 1.0
