"""The fused output-layer + cross-entropy equals the plain path (loss and gradients), ignored targets included,
and the pretraining model (PretrainGPT) trains exactly like GPT.

    python -m pytest tests/test_pretrain_fused_loss.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chatstack.model import GPT
from chatstack.presets import get_preset
from chatstack.stages.pretrain import PretrainGPT
from chatstack.train.fused_loss import linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 64, 1000])
def test_matches_plain_cross_entropy_in_float64(chunk):
    torch.manual_seed(0)
    h = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (300,))
    t[::7] = -1
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-1)
    g_ref = torch.autograd.grad(ref * 3.0, (h, w))
    out = linear_cross_entropy(h, w, t, chunk)
    g_out = torch.autograd.grad(out * 3.0, (h, w))
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_out, g_ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_all_targets_ignored_gives_zero_loss_and_grads():
    h = torch.randn(8, 4, requires_grad=True)
    w = torch.randn(10, 4, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.full((8,), -1))
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0


@pytest.mark.parametrize("preset", ["nano", "nano-llama"])
def test_pretrain_gpt_trains_like_gpt(preset):
    cfg = get_preset(preset)
    torch.manual_seed(0)
    a = GPT(cfg)
    b = PretrainGPT(cfg)
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (3, 20))
    tgt = torch.randint(0, cfg.vocab_size, (3, 20))
    _, la = a(idx, tgt)
    logits_b, lb = b(idx, tgt)
    assert logits_b is None and torch.allclose(la, lb, atol=1e-5)
    la.backward()
    lb.backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), n  # tied embedding included
    assert torch.equal(a(idx), b(idx))  # inference path untouched
    assert set(a.state_dict()) == set(b.state_dict())
