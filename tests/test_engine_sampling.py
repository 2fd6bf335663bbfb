"""Sampling filters against Hugging Face's logits warpers (an independent reference), and the inverse-CDF
draw against the distribution it should follow.

    python -m pytest tests/test_engine_sampling.py -q
"""

import pytest
import torch

from chatstack.infer.sampling import filtered_probs, sample

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper  # noqa: E402


def _hf_probs(logits, temperature, top_k, top_p):
    x = logits.clone()
    x = TemperatureLogitsWarper(temperature)(None, x)
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1:
        x = TopPLogitsWarper(top_p)(None, x)
    return x.softmax(-1)


def _dense(probs, idx, V):
    return torch.zeros(probs.size(0), V).scatter(1, idx, probs)


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.8), (0.5, 20, 0.6), (1.0, 3, 0.95)]
)
def test_filters_match_hf_warpers(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 100, generator=g) * 3
    B = logits.size(0)
    t = torch.full((B,), temperature)
    k = torch.full((B,), top_k, dtype=torch.long)
    p = torch.full((B,), top_p)
    for k_limit in (0, top_k):
        probs, idx = filtered_probs(logits, t, k, p, k_limit)
        ours = _dense(probs, idx, 100)
        assert torch.allclose(ours, _hf_probs(logits, temperature, top_k, top_p), atol=1e-6)


def test_per_row_settings_in_one_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=g) * 2
    settings = [(0.8, 5, 1.0), (1.2, 0, 0.7), (1.0, 0, 1.0)]
    t = torch.tensor([s[0] for s in settings])
    k = torch.tensor([s[1] for s in settings])
    p = torch.tensor([s[2] for s in settings])
    probs, idx = filtered_probs(logits, t, k, p)
    ours = _dense(probs, idx, 50)
    for i, (tt, kk, pp) in enumerate(settings):
        assert torch.allclose(ours[i], _hf_probs(logits[i : i + 1], tt, kk, pp)[0], atol=1e-6)


def test_inverse_cdf_draw_follows_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0, 0.0]])
    n = 20000
    u = torch.rand(n, generator=torch.Generator().manual_seed(2))
    rows = logits.expand(n, -1)
    ones = torch.ones(n)
    draws = sample(rows, ones * 0.9, torch.full((n,), 4), ones * 0.9, u)
    freq = torch.bincount(draws, minlength=6).float() / n
    want = _hf_probs(logits, 0.9, 4, 0.9)[0]
    assert torch.allclose(freq, want, atol=0.015)
    assert freq[want == 0].sum() == 0  # filtered tokens are never drawn


def test_greedy_rows_take_argmax():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.0, 1.0, 0.0])
    out = sample(logits, t, torch.zeros(3, dtype=torch.long), torch.ones(3), torch.tensor([0.99, 0.5, 0.01]))
    am = logits.argmax(-1)
    assert out[0] == am[0] and out[2] == am[2]


# the first four take max(dim); the rest (B * V >= 2**19) the block path, with a short last block or without
@pytest.mark.parametrize(
    "B,V", [(1, 320), (16, 4096), (1, 50257), (3, 30011), (16, 50257), (11, 50304), (2000, 300), (9000, 64)]
)
def test_greedy_is_first_argmax(B, V):
    """greedy() takes a vectorised path for large inputs: it must still give max(dim)'s first index on
    ties, follow a NaN as max(dim) does, and accept a sliced (padded-vocab) view."""
    from chatstack.infer.sampling import greedy

    g = torch.Generator().manual_seed(B * V)
    x = torch.randn(B, V + 3, generator=g)[:, :V]
    assert torch.equal(greedy(x), x.max(dim=-1).indices)
    x = x.clone()
    x[:, V // 2] = 9.0
    x[:, V // 3] = 9.0
    x[:, V - 1] = 9.0
    assert (greedy(x) == V // 3).all()
    x[0, 5] = float("nan")
    assert torch.equal(greedy(x), x.max(dim=-1).indices)
    x = torch.full((B, V), float("-inf"))
    assert (greedy(x) == 0).all()
    # the maximum in the last, possibly short, block (V not a multiple of 64: GPT-2's 50,257)
    x = torch.randn(B, V, generator=g)
    x[:, V - 1] = 50.0
    assert (greedy(x) == V - 1).all()
    x[:, V - 2] = 50.0
    assert (greedy(x) == V - 2).all()
