"""Fused CPU kernels for the training step: GPT-2's tanh GELU, forward and backward, one memory pass each.

    from chatstack.kernels import gelu_tanh
    y = gelu_tanh(x)          # == F.gelu(x, approximate="tanh"), to ~5e-7 absolute

Why: aten's tanh-approximation GELU is slow on this CPU (its vectorised tanh): 2.6-3.2 ms forward and 2.9-3.5 ms
backward for the tiny preset's (4096, 512) activation at 2 threads, against ~0.4 ms for a plain multiply, so
GELU was ~8% of a training step (12% in bf16 mode). The same function written with a sigmoid,

    0.5 * x * (1 + tanh(z)) = x * sigmoid(2z),   z = sqrt(2/pi) * (x + 0.044715 x^3)

(an identity, not another approximation) and fused by torch.compile (Inductor's C++ backend) into one pass
runs in 1.1-1.8 ms forward and 1.3-2.2 ms backward, fp32 or bf16 in/out with fp32 math inside. The tanh form
compiled is no faster (3.9 ms): the sigmoid's exp is the cheap part. `python -m chatstack.kernels` measures
the kernel against aten, then a whole training step with and without it.

Where it is used: chatstack.model's MLP, only while autograd records a CPU tensor of >= 65,536 elements (a
training step), because the first such call in a process compiles: 5-9 s here, mostly importing and starting
torch.compile (Inductor's disk cache saves only the code generation); one line on stderr says so. Decode
steps, evals, tiny test models and GPUs keep aten's GELU. If compilation fails (no C++ compiler, an Inductor
error) a warning is printed once and aten is used from then on. CHATSTACK_FUSED_KERNELS=0 turns it off.
"""
from __future__ import annotations

import math
import os
import sys
import warnings

import torch
import torch.nn.functional as F

MIN_NUMEL = 1 << 16          # below this the kernel gains little and compiling would cost more than it saves

_A = 2.0 * math.sqrt(2.0 / math.pi)      # 2z = x * (_A + _B x^2)
_B = _A * 0.044715


def _gelu_fwd(x):
    xf = x.float()
    return (xf * torch.sigmoid(xf * (_A + _B * xf * xf))).to(x.dtype)


def _gelu_bwd(g, x):
    # d/dx [x s(u)], u = x (A + B x^2):  s + x s (1 - s) (A + 3 B x^2)
    xf = x.float()
    x2 = xf * xf
    s = torch.sigmoid(xf * (_A + _B * x2))
    return (g.float() * (s + xf * s * (1.0 - s) * (_A + 3.0 * _B * x2))).to(g.dtype)


_compiled: dict = {}
_enabled = os.environ.get("CHATSTACK_FUSED_KERNELS", "1") != "0"


def fused_available() -> bool:
    """False once compilation has failed, or when CHATSTACK_FUSED_KERNELS=0."""
    return _enabled


def _run(name: str, fn, fallback, *args):
    """fn compiled (once per process; Inductor's dynamic shapes cover every size), or the aten fallback."""
    global _enabled
    if _enabled:
        try:
            if name not in _compiled:
                if not _compiled and os.environ.get("RANK", "0") == "0":
                    # the first training step stalls for this: say why (once per process, rank 0)
                    print("chatstack: compiling fused GELU kernels for CPU training (a few seconds, once; "
                          "CHATSTACK_FUSED_KERNELS=0 skips)", file=sys.stderr, flush=True)
                _compiled[name] = torch.compile(fn, dynamic=True)
            return _compiled[name](*args)
        except Exception as e:   # no compiler, or Inductor failed: aten from now on
            _enabled = False
            warnings.warn(f"chatstack.kernels: torch.compile of {name} failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); using aten's GELU instead", RuntimeWarning)
    return fallback(*args)


def _aten_gelu_bwd(g, x):
    return torch.ops.aten.gelu_backward(g, x, approximate="tanh")


class _GeluTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)        # the pre-activation, as aten's GELU keeps it
        return _run("gelu_fwd", _gelu_fwd, _aten_gelu, x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _run("gelu_bwd", _gelu_bwd, _aten_gelu_bwd, g.contiguous(), x)


def use_fused(x: torch.Tensor) -> bool:
    # requires_grad first: it is False in every decode step, which then pays one attribute read
    return (x.requires_grad and _enabled and torch.is_grad_enabled() and x.device.type == "cpu"
            and x.numel() >= MIN_NUMEL and x.dtype in (torch.float32, torch.bfloat16)
            and not torch.compiler.is_compiling())


def _aten_gelu(x):
    return F.gelu(x, approximate="tanh")


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (GPT-2's); the fused kernel where it pays (see the module doc)."""
    return _GeluTanh.apply(x) if use_fused(x) else _aten_gelu(x)


def _bench(reps: int = 50, rounds: int = 10) -> None:
    """The kernel alone against aten, then a whole tiny-preset training step (B=16, T=256, AdamW) with and
    without it, interleaved rounds of 3 steps, in fp32 and (with AMX) in bf16-matmul mode."""
    import statistics
    import time

    # the model calls the imported module: under `python -m` this file is __main__, a second copy; use the first
    from chatstack import kernels as K

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    x = torch.randn(4096, 512)
    g = torch.randn_like(x)

    def t(f):
        for _ in range(5):
            f()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2] * 1e3

    def fwd(xd):
        return K._run("gelu_fwd", K._gelu_fwd, K._aten_gelu, xd)

    def bwd(gd, xd):
        return K._run("gelu_bwd", K._gelu_bwd, K._aten_gelu_bwd, gd, xd)

    for dtype in (torch.float32, torch.bfloat16):
        xd, gd = x.to(dtype), g.to(dtype)
        t0 = time.perf_counter()
        fwd(xd), bwd(gd, xd)
        print(f"{str(dtype):15s} compile {time.perf_counter() - t0:.1f} s | forward: aten "
              f"{t(lambda: K._aten_gelu(xd)):.2f} ms, fused {t(lambda: fwd(xd)):.2f} ms"
              f" | backward: aten {t(lambda: K._aten_gelu_bwd(gd, xd)):.2f} ms, fused "
              f"{t(lambda: bwd(gd, xd)):.2f} ms  (4096 x 512, median of {reps})")

    from chatstack.model import cpu_bf16_matmuls
    from chatstack.presets import get_preset
    from chatstack.train.optim import build_adamw
    from chatstack.train.pretrain import PretrainGPT

    torch.manual_seed(0)
    cfg = get_preset("tiny")
    model = PretrainGPT(cfg)
    opt = build_adamw(model, 1e-3, 0.1, (0.9, 0.95))
    idx = torch.randint(0, cfg.vocab_size, (16, cfg.block_size + 1))
    x_, y_ = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    modes = [("fp32", False)] + ([("bf16 matmuls", True)] if torch.cpu._is_amx_tile_supported() else [])
    for label, bf16 in modes:
        def step():
            with cpu_bf16_matmuls(bf16):
                _, loss = model(x_, y_)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        times = {True: [], False: []}
        for on in (True, False):
            K._enabled = on
            step()
        for r in range(rounds):
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                K._enabled = on
                t0 = time.perf_counter()
                for _ in range(3):
                    step()
                times[on].append((time.perf_counter() - t0) / 3 * 1e3)
        K._enabled = True
        ratio = statistics.median(a / b for a, b in zip(times[False], times[True]))
        print(f"training step, tiny preset, {label}: aten GELU {statistics.median(times[False]):.0f} ms, fused "
              f"{statistics.median(times[True]):.0f} ms; median of per-round ratios {ratio:.3f}x ({rounds} rounds)")


if __name__ == "__main__":
    _bench()
