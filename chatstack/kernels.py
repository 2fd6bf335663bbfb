"""Fused CPU kernels for the training step: GPT-2's tanh GELU, forward and backward, one memory pass each.

    from chatstack.kernels import gelu_tanh
    y = gelu_tanh(x)          # == F.gelu(x, approximate="tanh"), to ~5e-7 absolute

Why: aten's tanh-approximation GELU is slow on CPUs (its vectorised tanh); the same function written with a
sigmoid, 0.5 * x * (1 + tanh(z)) = x * sigmoid(2z), z = sqrt(2/pi) * (x + 0.044715 x^3) (an identity, not
another approximation) and fused by torch.compile (Inductor's C++ backend) runs in one pass, fp32 or bf16
in/out with fp32 math inside. benchmarks/kernels.py measures it against aten, alone and in a training step.

Where it is used: chatstack.model's MLP, only while autograd records a CPU tensor of >= 65,536 elements (a
training step), because the first such call in a process compiles (several seconds; one line on stderr says
so). Decode steps, evals, tiny test models and GPUs keep aten's GELU. If compilation fails (no C++ compiler,
an Inductor error) a warning is printed once and aten is used from then on. CHATSTACK_FUSED_KERNELS=0 turns
it off.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F

MIN_NUMEL = 1 << 16  # below this the kernel gains little and compiling would cost more than it saves

_A = 2.0 * math.sqrt(2.0 / math.pi)  # 2z = x * (_A + _B x^2)
_B = _A * 0.044715


def _gelu_fwd(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.sigmoid(xf * (_A + _B * xf * xf))).to(x.dtype)


def _gelu_bwd(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
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


def _run(
    name: str, fn: Callable[..., torch.Tensor], fallback: Callable[..., torch.Tensor], *args: torch.Tensor
) -> torch.Tensor:
    """fn compiled (once per process; Inductor's dynamic shapes cover every size), or the aten fallback."""
    global _enabled
    if _enabled:
        try:
            if name not in _compiled:
                if not _compiled and os.environ.get("RANK", "0") == "0":
                    # the first training step stalls for this: say why (once per process, rank 0)
                    print(
                        "chatstack: compiling fused GELU kernels for CPU training (a few seconds, once; "
                        "CHATSTACK_FUSED_KERNELS=0 skips)",
                        file=sys.stderr,
                        flush=True,
                    )
                _compiled[name] = torch.compile(fn, dynamic=True)
            return _compiled[name](*args)
        except Exception as e:  # no compiler, or Inductor failed: aten from now on
            _enabled = False
            warnings.warn(
                f"chatstack.kernels: torch.compile of {name} failed ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); using aten's GELU instead",
                RuntimeWarning,
            )
    return fallback(*args)


def _aten_gelu_bwd(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_backward(g, x, approximate="tanh")


class _GeluTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)  # the pre-activation, as aten's GELU keeps it
        return _run("gelu_fwd", _gelu_fwd, _aten_gelu, x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return _run("gelu_bwd", _gelu_bwd, _aten_gelu_bwd, g.contiguous(), x)


def use_fused(x: torch.Tensor) -> bool:
    # requires_grad first: it is False in every decode step, which then pays one attribute read
    return (
        x.requires_grad
        and _enabled
        and torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.numel() >= MIN_NUMEL
        and x.dtype in (torch.float32, torch.bfloat16)
        and not torch.compiler.is_compiling()
    )


def _aten_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (GPT-2's); the fused kernel where it pays (see the module doc)."""
    return _GeluTanh.apply(x) if use_fused(x) else _aten_gelu(x)
