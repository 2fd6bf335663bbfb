"""Weight-only int8 quantisation for CPU decoding: every weight row (one output channel) stored as int8 with
one scale; the product runs in torch's int8-weight kernel on bf16 activations, accumulating in fp32.

    chatstack chat runs/smollm2 --quantize int8
    chatstack generate CKPT --prompt "Once upon a time" --quantize int8
    python benchmarks/quantize_quality.py CKPT      # what it costs: perplexity, KL, top-1 agreement vs fp32

Why: a decode step of one row reads every weight once and does two FLOPs per weight, so on a CPU it is bound
by streaming weights from memory (GPT-2 small: ~500 MB of fp32 per token). int8 weights are a quarter of
those bytes. Only the weights are quantised: with dynamic int8 activations as well (torch.ao's
quantize_dynamic) SmolLM2-135M's perplexity rose 68% (activation outliers); weight-only int8, +0.3%.

The engine (chatstack.infer.engine, `Engine(..., quantize="int8")`) binds these weights for its decode steps only.
Prompts are prefilled with the fp32 weights: the kernel is made for a few rows, and at 16 rows and more
fp32 sgemm is faster (measured 768->3072: 16 rows 856 vs 683 us; 256 rows 12.4 vs 5.6 ms). Linears whose
input width is not a multiple of 16 stay fp32: torch 2.13's kernel crashed on such widths (e.g. 30, 100).

Measured and not shipped: 4-bit weights (torch's _weight_int4pack_mm_for_cpu, asymmetric, round to nearest)
stream 2.4x faster than fp32 per matrix (int8: 1.45x), but cost SmolLM2-135M +7.5% perplexity with groups of
32 along the input (+16% with 128) and 83% top-1 agreement, against int8's +1.2% and 94%.
"""

from __future__ import annotations

import torch

# the kernel's input width must be a multiple of this (see the docstring)
INT8_IN_MULTIPLE = 16
QUANTIZE_KINDS = ("int8",)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (q: int8 (out, in), scale: bf16 (out,)), symmetric per output row, rounded to
    nearest: w ~= q * scale[:, None]. The scale is kept in bf16 (the kernel takes scales in the activations'
    dtype), and q is rounded against that bf16 scale, so the dequantised weight is exactly what the kernel
    multiplies by."""
    w = w.detach().float()
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax)).to(torch.bfloat16)  # zero rows: any scale
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 weight an int8 weight stands for: q * scale, row by row."""
    return q.float() * scale.float()[:, None]


def int8_supported(in_features: int, device: torch.device) -> bool:
    return device.type == "cpu" and in_features % INT8_IN_MULTIPLE == 0


class Int8Weight:
    """An int8 copy of one Linear's weight; chatstack.model.Linear calls `linear(x, bias)` when the engine binds
    one as its fast_weight."""

    __slots__ = ("q", "scale")

    def __init__(self, weight: torch.Tensor) -> None:
        self.q, self.scale = quantize_int8(weight)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)  # (N, in)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale)  # (N, out) bf16
        y = y.float().view(*shape[:-1], -1)
        if bias is not None:
            y += bias
        return y

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.q, self.scale)


def check_quantize(kind: str | None, device: torch.device) -> str | None:
    """None/"" -> None; "int8" on CPU -> "int8"; anything else a ValueError that says what is possible."""
    if not kind:
        return None
    if kind not in QUANTIZE_KINDS:
        raise ValueError(f"quantize: unknown kind {kind!r} (choose from: {', '.join(QUANTIZE_KINDS)})")
    if device.type != "cpu":
        raise ValueError(
            f"quantize={kind}: int8 weights are for CPU decoding (device is {device.type}); on a GPU use bf16"
        )
    return kind
