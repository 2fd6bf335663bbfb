"""bf16 matmuls on CPU (chatstack.model.cpu_bf16_matmuls): what --dtype bf16 (and auto, on a CPU with AMX) trains with."""

import pytest
import torch

from chatstack.model import GPT, GPTConfig, Linear, cpu_bf16_active, cpu_bf16_matmuls
from chatstack.stages.pretrain import PretrainGPT
from chatstack.train.fused_loss import linear_cross_entropy
from chatstack.train.loop import autocast, resolve_dtype


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("bf16_out", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_fp32_to_bf16_precision(bf16_out, bias):
    torch.manual_seed(0)
    lin = Linear(64, 96, bias=bias)
    if bias:
        torch.nn.init.normal_(lin.bias)
    lin.bf16_out = bf16_out
    x = torch.randn(3, 5, 64, requires_grad=True)
    g = torch.randn(3, 5, 96)
    y32 = lin(x)
    y32.backward(g)
    ref = [x.grad.clone(), lin.weight.grad.clone()] + ([lin.bias.grad.clone()] if bias else [])
    x.grad = None
    lin.zero_grad()
    with cpu_bf16_matmuls():
        assert cpu_bf16_active()
        y16 = lin(x)
    assert not cpu_bf16_active()
    assert y16.dtype == (torch.bfloat16 if bf16_out else torch.float32) and y16.shape == y32.shape
    y16.backward(g.to(y16.dtype))
    got = [x.grad, lin.weight.grad] + ([lin.bias.grad] if bias else [])
    assert all(t.dtype == torch.float32 for t in got)  # parameters and their gradients stay fp32
    assert rel(y16.float(), y32.detach()) < 1e-2  # bf16 operands: ~3 significant digits
    for a, b in zip(got, ref):
        assert rel(a, b) < 2e-2
    assert rel(got[1], ref[1]) > 0  # the weight gradient did come from bf16 products


def test_fused_loss_with_bf16_matmuls_matches_fp32():
    torch.manual_seed(0)
    h = torch.randn(300, 32, requires_grad=True)
    w = (torch.randn(500, 32) * 0.3).requires_grad_()
    t = torch.randint(0, 500, (300,))
    t[::7] = -1  # ignored positions
    l32 = linear_cross_entropy(h, w, t, chunk=64)
    gh, gw = torch.autograd.grad(l32, (h, w))
    l16 = linear_cross_entropy(h, w, t, chunk=64, mm_dtype=torch.bfloat16)
    gh16, gw16 = torch.autograd.grad(l16, (h, w))
    assert l16.dtype == torch.float32 and l16.item() == pytest.approx(l32.item(), rel=2e-3)
    assert rel(gh16, gh) < 2e-2 and rel(gw16, gw) < 2e-2
    assert gh16[::7].abs().max() == 0  # ignored rows still get no gradient


def test_model_in_bf16_mode_keeps_fp32_interfaces():
    cfg = GPTConfig(vocab_size=128, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    torch.manual_seed(0)
    model = PretrainGPT(cfg)
    idx = torch.randint(0, 128, (2, 16))
    logits32 = GPT.forward(model, idx)
    _, loss32 = model(idx, idx)
    with cpu_bf16_matmuls():
        logits16 = GPT.forward(model, idx)  # the output layer returns fp32 logits
        hidden = model.hidden_states(idx)  # what reward / value heads read
        _, loss16 = model(idx, idx)  # the fused loss, with bf16 matmuls
    assert logits16.dtype == hidden.dtype == loss16.dtype == torch.float32
    assert rel(logits16, logits32) < 2e-2
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-3)


def test_dtype_auto_picks_bf16_matmuls_on_cpus_with_amx(monkeypatch):
    import chatstack.train.loop as L

    cpu = torch.device("cpu")
    monkeypatch.setattr(L, "cpu_has_amx", lambda: True)
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    assert resolve_dtype("auto", cpu, width=128) == torch.bfloat16
    assert resolve_dtype("auto", cpu, width=32) == torch.float32  # too narrow: the casts cost more
    assert resolve_dtype("bf16", cpu, width=32) == torch.bfloat16  # asked for explicitly
    with autocast(cpu, torch.bfloat16):  # bf16 on CPU = bf16 matmuls, not torch.autocast
        assert cpu_bf16_active() and not torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(L, "cpu_has_amx", lambda: False)
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16 and resolve_dtype("fp32", cpu) == torch.float32


def test_the_mode_belongs_to_the_thread_that_entered_it():
    import threading

    seen = {}
    with cpu_bf16_matmuls():
        t = threading.Thread(target=lambda: seen.setdefault("other", cpu_bf16_active()))
        t.start()
        t.join()
        seen["this"] = cpu_bf16_active()
    assert seen == {"this": True, "other": False}
