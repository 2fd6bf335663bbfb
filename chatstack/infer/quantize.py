"""Lower-precision weight copies for CPU inference: int8 (weight-only, for decode steps) and bf16 (every product).

    chatstack chat runs/smollm2 --quantize int8
    chatstack serve runs/smollm2 --quantize bf16
    chatstack generate CKPT --prompt "Once upon a time" --quantize int8
    python benchmarks/quantize_quality.py CKPT      # what it costs: perplexity, KL, top-1 agreement vs fp32

int8: every weight row (one output channel) stored as int8 with one scale; the product runs in torch's
int8-weight kernel on bf16 activations, accumulating in fp32. bf16: a oneDNN-packed bf16 copy of each weight;
each product rounds its input to bf16, accumulates in fp32 and rounds its result to bf16 (oneDNN's output), returned
as fp32, so norms, attention, the residual stream and the KV cache stay fp32 (vLLM's CPU build runs the whole model
in bf16).

Why: a decode step of one row reads every weight once and does two FLOPs per weight, so on a CPU it is bound
by streaming weights from memory (GPT-2 small: ~500 MB of fp32 per token). int8 weights are a quarter of
those bytes. Only the weights are quantised: with dynamic int8 activations as well (torch.ao's
quantize_dynamic) SmolLM2-135M's perplexity rose 68% (activation outliers); weight-only int8, +0.3%.

The engine (chatstack.infer.engine, `Engine(..., quantize="int8")`) binds these weights for its decode steps only.
Prompts are prefilled with the fp32 weights: the kernel is made for a few rows, and at 16 rows and more
fp32 sgemm is faster (measured 768->3072: 16 rows 856 vs 683 us; 256 rows 12.4 vs 5.6 ms). Linears whose
input width is not a multiple of 16 stay fp32: torch 2.13's kernel crashed on such widths (e.g. 30, 100).

bf16 is for batches (a server's many streams): oneDNN's bf16 products on AVX512-BF16 or AMX take 0.55-0.8x the
time of its fp32 ones from 4 rows up (SmolLM2-135M's 121 products, weights streaming from memory: 16 rows 31.7 vs
39.6 ms, 64 rows 75 vs 132 ms), and prefill runs on them too. int8's kernel is the faster one at 1-2 rows and
slower than fp32 from 8 rows (docs/benchmarks.md).

Measured and not shipped: 4-bit weights (torch's _weight_int4pack_mm_for_cpu, asymmetric, round to nearest)
stream 2.4x faster than fp32 per matrix (int8: 1.45x), but cost SmolLM2-135M +7.5% perplexity with groups of
32 along the input (+16% with 128) and 83% top-1 agreement, against int8's +1.2% and 94%.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chatstack.infer.cpu import PACK_ROWS, onednn_bf16_linear_works

# the kernel's input width must be a multiple of this (see the docstring)
INT8_IN_MULTIPLE = 16
QUANTIZE_KINDS = ("int8", "bf16")


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


class BF16Weight:
    """A bf16 copy of one Linear's weight: oneDNN-packed where oneDNN packs bf16 here, else a plain bf16 tensor
    (one of the two is kept, not both); `linear(x, bias)` rounds x to bf16 and returns the bf16 product as fp32,
    plus the bias in fp32 (the engine binds one as a Linear's fast_weight)."""

    __slots__ = ("w", "packed")

    def __init__(self, weight: torch.Tensor) -> None:
        w = weight.detach().to(torch.bfloat16)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS) if onednn_bf16_linear_works() else None
        self.w = None if self.packed is not None else w

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        if self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(xb, self.packed, None, "none", [], "").float()
        else:
            y = F.linear(xb, self.w).float()  # (bf16 out, as oneDNN's)
        if bias is not None:
            y += bias
        return y


def check_quantize(kind: str | None, device: torch.device) -> str | None:
    """None/"" -> None; "int8" or "bf16" on CPU -> the kind; anything else a ValueError that says what is
    possible."""
    if not kind:
        return None
    if kind not in QUANTIZE_KINDS:
        raise ValueError(f"quantize: unknown kind {kind!r} (choose from: {', '.join(QUANTIZE_KINDS)})")
    if device.type != "cpu":
        raise ValueError(
            f"quantize={kind}: {kind} weight copies are for CPU inference (device is {device.type}); on a GPU load "
            "the model in bf16"
        )
    return kind
