"""chatstack.kernels: the fused tanh-GELU equals aten's (forward and backward, fp32 and bf16), is used only in
CPU training steps on large tensors, and falls back to aten when compilation fails."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import chatstack.kernels as K
from chatstack.model import GPT, GPTConfig


def _ref(x, g):
    x = x.detach().clone().requires_grad_()
    y = F.gelu(x, approximate="tanh")
    y.backward(g)
    return y.detach(), x.grad


@pytest.mark.skipif(not K.fused_available(), reason="fused kernels disabled (CHATSTACK_FUSED_KERNELS=0)")
def test_fused_gelu_matches_aten_fp32():
    torch.manual_seed(0)
    x = (torch.randn(64, 1024) * 3).requires_grad_()  # covers the tails, where tanh saturates
    g = torch.randn(64, 1024)
    y = K.gelu_tanh(x)
    assert y.grad_fn is not None and "GeluTanh" in type(y.grad_fn).__name__  # the kernel ran, not aten
    y.backward(g)
    y_ref, dx_ref = _ref(x, g)
    torch.testing.assert_close(y.detach(), y_ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad, dx_ref, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not K.fused_available(), reason="fused kernels disabled (CHATSTACK_FUSED_KERNELS=0)")
def test_fused_gelu_bf16_in_bf16_out(monkeypatch):
    monkeypatch.setattr(K, "MIN_NUMEL", 0)  # a small tensor takes the kernel too
    torch.manual_seed(1)
    x32 = torch.randn(32, 512) * 2
    x = x32.bfloat16().requires_grad_()
    g = torch.randn(32, 512).bfloat16()
    y = K.gelu_tanh(x)
    assert y.dtype == torch.bfloat16
    y.backward(g)
    assert x.grad.dtype == torch.bfloat16
    # against the fp32 function of the same bf16 inputs, rounded once: within bf16's resolution
    y_ref, dx_ref = _ref(x.detach().float(), g.float())
    torch.testing.assert_close(y.float(), y_ref, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(x.grad.float(), dx_ref, atol=1e-2, rtol=1e-2)


def test_gating_keeps_aten_outside_training_steps():
    big = torch.randn(256, 512, requires_grad=True)  # 131k elements
    assert K.use_fused(big) == K.fused_available()
    assert not K.use_fused(torch.randn(8, 512, requires_grad=True))  # small: a decode step, a tiny model
    assert not K.use_fused(big.detach())  # no autograd: evals, generation
    with torch.no_grad():
        assert not K.use_fused(big)


def test_compile_failure_falls_back_to_aten(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no C++ compiler\nmore detail")

    monkeypatch.setattr(K, "_compiled", {})
    monkeypatch.setattr(K, "_enabled", True)
    monkeypatch.setattr(K, "MIN_NUMEL", 0)
    monkeypatch.setattr(K.torch, "compile", broken)
    x = torch.randn(16, 64, requires_grad=True)
    g = torch.randn(16, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = K.gelu_tanh(x)
        y.backward(g)
    assert any("no C++ compiler" in str(w.message) for w in caught)
    assert not K.fused_available()  # aten from now on (monkeypatch restores the flag after the test)
    y_ref, dx_ref = _ref(x, g)
    torch.testing.assert_close(y.detach(), y_ref)
    torch.testing.assert_close(x.grad, dx_ref)


@pytest.mark.skipif(not K.fused_available(), reason="fused kernels disabled (CHATSTACK_FUSED_KERNELS=0)")
def test_model_training_step_same_with_and_without_kernel(monkeypatch):
    # a batch big enough that the MLP's activation (2 x 64 x 512 = 65,536 elements) takes the fused path
    cfg = GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=128)
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, 97, (2, 64))
    calls = []
    run = K._run
    monkeypatch.setattr(K, "_run", lambda name, *a: calls.append(name) or run(name, *a))
    grads = []
    for enabled in (True, False):
        monkeypatch.setattr(K, "_enabled", enabled)
        model.zero_grad(set_to_none=True)
        _, loss = model(idx, idx)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert calls == ["gelu_fwd"] * 2 + ["gelu_bwd"] * 2  # both blocks, on the fused run only
    (l1, g1), (l2, g2) = grads
    torch.testing.assert_close(l1, l2, atol=1e-6, rtol=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.skipif(not K.fused_available(), reason="fused kernels disabled (CHATSTACK_FUSED_KERNELS=0)")
def test_first_compile_says_why_the_step_stalls(monkeypatch, capsys):
    monkeypatch.setattr(K, "_compiled", {})
    monkeypatch.setattr(K, "MIN_NUMEL", 0)
    monkeypatch.delenv("RANK", raising=False)
    x = torch.randn(8, 64, requires_grad=True)
    K.gelu_tanh(x).sum().backward()
    K.gelu_tanh(x).sum().backward()
    err = capsys.readouterr().err
    assert err.count("compiling fused GELU kernels") == 1  # once, not per kernel or per call
