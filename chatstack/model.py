"""The decoder-only transformer: one `GPTConfig`, one `GPT`, two families.

GPT-2/3 (the classic recipe):   learned positions, pre-LayerNorm with bias, multi-head attention,
                                GELU feed-forward of 4h, biases everywhere, output tied to the embedding.
Llama-style:                    RoPE, RMSNorm, SwiGLU, no biases, grouped-query attention, tied or not.

Per GPT block the parameters are exactly `12h^2 + 13h`:
    attention  4h^2 + 4h   (fused q,k,v: 3h^2 + 3h; output projection: h^2 + h)
    MLP        8h^2 + 5h   (h -> 4h: 4h^2 + 4h; 4h -> h: 4h^2 + h)
    2 norms    4h          (weight + bias each)

Inference passes a KV cache (chatstack.infer.kv_cache): each attention layer calls `cache.update(layer, k, v)`
and attends over the keys/values it returns. Prefill + one-token steps give the same logits as a full pass.

CPU mixed precision: inside `with cpu_bf16_matmuls():` every Linear multiplies in bf16 (AMX) and all else
stays fp32; the training loop uses it for --dtype bf16 on CPU.

    chatstack estimate --preset tiny   # the parameter breakdown of a preset
"""

from __future__ import annotations

import bisect
import contextlib
import contextvars
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from chatstack.kernels import gelu_tanh


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # context length T
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None  # grouped-query attention; None = n_head (plain multi-head)
    n_embd: int = 768
    ffn_hidden: Optional[int] = None  # None = 4h (gelu) / 8h/3 rounded to 64 (swiglu)
    pos: str = "learned"  # "learned" | "rope"
    rope_base: float = 10000.0
    # RoPE scaling for contexts beyond the trained one (Llama family): "none" | "linear" (position
    # interpolation) | "ntk" (NTK-aware base change) | "yarn" (NTK-by-parts + attention temperature)
    rope_scaling: str = "none"
    rope_factor: float = 1.0  # new context / trained context
    rope_original_context: int = 0  # the context the model was trained at (0 = block_size)
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # "gelu" (tanh approximation, as GPT-2) | "swiglu"
    bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.ffn_hidden is None:
            if self.mlp == "gelu":
                self.ffn_hidden = 4 * self.n_embd
            else:
                self.ffn_hidden = int(math.ceil(8 * self.n_embd / 3 / 64) * 64)
        problems = []
        if self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            problems.append(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.pos not in ("learned", "rope"):
            problems.append(f"pos must be 'learned' or 'rope', got {self.pos!r}")
        if self.norm not in ("layernorm", "rmsnorm"):
            problems.append(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.mlp not in ("gelu", "swiglu"):
            problems.append(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            problems.append("rope needs an even head dimension")
        if self.rope_scaling not in ROPE_SCALINGS:
            problems.append(f"rope_scaling must be one of {', '.join(ROPE_SCALINGS)}, got {self.rope_scaling!r}")
        elif self.rope_scaling != "none" and self.pos != "rope":
            problems.append(
                f"rope_scaling {self.rope_scaling!r} needs pos='rope' (this model has {self.pos} positions)"
            )
        if self.rope_factor < 1:
            problems.append(f"rope_factor must be >= 1, got {self.rope_factor}")
        for f in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, f) <= 0:
                problems.append(f"{f} must be positive, got {getattr(self, f)}")
        if problems:
            raise ValueError("invalid GPTConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s): {sorted(unknown)}")
        return cls(**d)


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
    return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)


ROPE_SCALINGS = ("none", "linear", "ntk", "yarn")


def with_rope_scaling(cfg: GPTConfig, kind: str, factor: float) -> GPTConfig:
    """The config of `cfg`'s model read at `factor` x its trained context with RoPE scaling `kind`.
    The trained context is kept in rope_original_context; block_size becomes original x factor."""
    original = cfg.rope_original_context or cfg.block_size
    d = cfg.to_dict()
    if kind == "none":
        d.update(rope_scaling="none", rope_factor=1.0, rope_original_context=0, block_size=original)
    else:
        d.update(
            rope_scaling=kind,
            rope_factor=float(factor),
            rope_original_context=original,
            block_size=int(original * factor),
        )
    return GPTConfig.from_dict(d)


def rope_frequencies(cfg: GPTConfig) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (hd/2,) in float64, attention factor) under cfg's RoPE scaling."""
    hd, base, s = cfg.head_dim, cfg.rope_base, cfg.rope_factor
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    if cfg.rope_scaling == "linear":
        # position interpolation (Chen et al. 2023): position p is read as p / s
        return inv_freq / s, 1.0
    if cfg.rope_scaling == "ntk":
        # NTK-aware: a larger base stretches low frequencies most and leaves the highest almost unchanged
        return 1.0 / ((base * s ** (hd / (hd - 2))) ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)), 1.0
    if cfg.rope_scaling == "yarn":
        # YaRN (Peng et al. 2023), as Hugging Face computes it: dimensions that rotate more than beta_fast=32
        # times over the trained context keep their frequency, those under beta_slow=1 are interpolated by s,
        # a linear ramp between; attention logits get the temperature (0.1 ln s + 1)^2 through cos and sin
        original = cfg.rope_original_context or cfg.block_size

        def corr_dim(rot: float) -> float:
            return hd * math.log(original / (rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr_dim(32.0)), 0)
        high = min(math.ceil(corr_dim(1.0)), hd - 1)
        ramp = ((torch.arange(hd // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        extrapolate = 1 - ramp
        inv_freq = inv_freq / s * (1 - extrapolate) + inv_freq * extrapolate
        return inv_freq, (0.1 * math.log(s) + 1.0 if s > 1 else 1.0)
    return inv_freq, 1.0


def scaled_rope_tables(cfg: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for cfg.block_size positions under cfg's RoPE scaling (plain RoPE when "none")."""
    if cfg.rope_scaling == "none":
        return rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_base)
    inv_freq, attn_factor = rope_frequencies(cfg)
    freqs = torch.outer(torch.arange(cfg.block_size, dtype=torch.float64), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * attn_factor).float(), (emb.sin() * attn_factor).float()


def rope_tables(head_dim: int, max_pos: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    t = torch.arange(max_pos, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)  # (T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd), the "rotate_half" layout of HF Llama
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, hd); cos/sin: (B or 1, 1, T, hd)
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


# ---- bf16 matmuls on CPU ---------------------------------------------------------------------------------
# CPUs with AMX (Intel Sapphire Rapids and later) multiply bf16 matrices 3.5-4x faster than fp32 (measured
# here: 4096x128 @ 128x512 in 0.62 vs 2.29 ms). torch.autocast("cpu", bf16) would use them, but it also runs
# GELU, softmax and attention in bf16, and CPU kernels for those are slower in bf16 than in fp32 (SDPA's
# backward 2.4x slower), so it gained only ~10%. This mode changes only the matmuls: each Linear multiplies
# bf16 copies of its input and weight (fp32 accumulation inside the instruction) and returns fp32, or bf16
# where the next op takes bf16 as well (Linear.bf16_out); weights, gradients, optimizer state and every
# other op stay fp32. Measured on the tiny preset's training step:
# 1.27-1.35x the tokens/s of fp32 (benchmarks/train_throughput.py). The training loop enters it for
# --dtype bf16 on CPU, which --dtype auto picks when the CPU has AMX and the model is >= 96 wide
# (chatstack.train.loop.resolve_dtype).
# a context variable, not a module global: a server thread generating while another thread trains in this
# mode keeps its own fp32 matmuls
_cpu_bf16: contextvars.ContextVar[bool] = contextvars.ContextVar("chatstack_cpu_bf16", default=False)


def cpu_bf16_active() -> bool:
    """True inside `cpu_bf16_matmuls()`."""
    return _cpu_bf16.get()


@contextlib.contextmanager
def cpu_bf16_matmuls(enabled: bool = True) -> Iterator[None]:
    """Inside: every chatstack Linear on CPU (and the fused pretraining loss) multiplies in bf16."""
    token = _cpu_bf16.set(enabled)
    try:
        yield
    finally:
        _cpu_bf16.reset(token)


class _BF16Linear(torch.autograd.Function):
    """y = x @ W.T + b with bf16 operands and fp32 accumulation. y is fp32 (bf16 with out_bf16); the input's
    gradient comes back in the input's dtype, the weight's and bias's in fp32."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_bf16: bool
    ) -> torch.Tensor:
        x16 = x.reshape(-1, x.size(-1)).to(torch.bfloat16)  # (N, in)
        w16 = weight.to(torch.bfloat16)  # (out, in)
        if out_bf16:
            y = torch.mm(x16, w16.t()) if bias is None else torch.addmm(bias.to(torch.bfloat16), x16, w16.t())
        else:
            y = torch.mm(x16, w16.t()).float()  # (N, out)
            if bias is not None:
                y += bias
        ctx.save_for_backward(x16, w16)  # bf16: half the activation memory
        ctx.x_dtype, ctx.x_shape, ctx.has_bias = x.dtype, x.shape, bias is not None
        return y.view(*x.shape[:-1], weight.size(0))

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x16, w16 = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.size(-1))  # (N, out)
        g16 = g.to(torch.bfloat16)
        dx = torch.mm(g16, w16).to(ctx.x_dtype).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        dw = torch.mm(g16.t(), x16).float() if ctx.needs_input_grad[1] else None
        db = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            # a bf16 gradient (the MLP's, the projections'): aten's bf16 sum (fp32 accumulation, one rounding) is
            # 4x faster than sum(dtype=float32) here (0.21 vs 0.87 ms at 4096 x 512), and dw is bf16-rounded anyway
            db = g.sum(0).float() if g.dtype == torch.bfloat16 else g.sum(0, dtype=torch.float32)
        return dx, dw, db, None


class Linear(nn.Linear):
    """nn.Linear that computes with `fast_weight` instead of `weight` while an inference engine binds one.

    fast_weight has weight's values and (out, in) shape but is the transposed view of an (in, out)
    contiguous copy, so F.linear hands the BLAS an untransposed right-hand matrix: on CPU that runs 1.3-3x
    faster at the 1-16 rows of a decode step (measured, one thread: 512->128 at 16 rows 43 -> 17 us;
    GPT-2's 768->3072 at one row streams its weight at 16 instead of 11.7 GB/s). The engine
    (chatstack.infer.engine) sets it for the duration of one step and removes it after, so everywhere else
    (training, evals, checkpoints) this is plain nn.Linear, except inside `cpu_bf16_matmuls()` (above).
    For lower-precision weights the engine binds a chatstack.infer.quantize.Int8Weight or BF16Weight instead, and on CPUs
    where MKL is slow a chatstack.infer.cpu.CPUWeight (oneDNN-packed); both compute the product themselves.
    """

    fast_weight = None  # None = use weight; a Tensor (see above); or an object with linear(x, bias)
    # under cpu_bf16_matmuls: return the product in bf16 (set where the consumer takes bf16 as well: the MLP's
    # activation, or a residual add, which promotes to fp32 inside its own kernel) instead of casting it to fp32
    bf16_out: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fast_weight
        if w is not None:
            if isinstance(w, torch.Tensor):
                return F.linear(x, w, self.bias)
            return w.linear(x, self.bias)
        if _cpu_bf16.get() and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
            return _BF16Linear.apply(x, self.weight, self.bias, self.bf16_out)
        return F.linear(x, self.weight, self.bias)


# grouped-query decode attention runs as two batched products (see decode_attention) from this many rows up, while
# rows x keys stays within the second bound (beyond it the score tensor outgrows the L2 cache and SDPA wins)
MATMUL_ATTENTION_ROWS = 8
MATMUL_ATTENTION_ROW_KEYS = 16384


def attention_products(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v as two batched products and a softmax. q: (B, Hkv, G, hd); k, v:
    (B, Hkv, S, hd); mask: None, bool (True = attend) or additive, broadcastable to (B, Hkv, G, S).

    decode_attention's grouped-query path for many short rows: 0.5-0.9x the time of SDPA's CPU kernel there
    (SmolLM2's 3 kv heads x 3 queries, 8-64 rows, up to 16k rows x keys; 1.1-1.3x beyond;
    benchmarks/decode_attention.py)."""
    scale = q.size(-1) ** -0.5
    s = torch.matmul(q, k.transpose(-1, -2))  # (B, Hkv, G, S)
    if mask is None:
        s.mul_(scale)
    elif mask.dtype == torch.bool:
        s.mul_(scale).masked_fill_(~mask, float("-inf"))
    else:
        s = torch.add(mask, s, alpha=scale)
    return torch.matmul(s.softmax(-1), v)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Attention of one new query per row over that row's cached keys: the one decode-attention path (GPT's
    Attention at T == 1 with a cache, and the engine's decode step, chatstack.infer.decode_step).

    q: (B, H, 1, hd); k, v: (B, Hkv, S, hd); mask: None when every row has S valid keys, else a key mask (bool,
    or additive 0/-inf) broadcastable to (B, H, 1, S). Returns (B, H*hd).
    """
    B, H, _, hd = q.shape
    Hkv, S = k.size(1), k.size(2)
    if Hkv != H:
        # grouped keys: fold each group's query heads into the query axis, so each kv head is read once instead
        # of being copied H/Hkv times per step (the copy grows with the context)
        if mask is not None and mask.dim() == 4 and mask.size(1) != 1:
            mask = mask[:, :1]  # a key mask is the same for every head
        qg = q.reshape(B, Hkv, H // Hkv, hd)
        if B < MATMUL_ATTENTION_ROWS or B * S > MATMUL_ATTENTION_ROW_KEYS:
            y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
        else:
            y = attention_products(qg, k, v, mask)
    elif mask is not None and mask.dim() == 4 and mask.dtype == q.dtype:
        # rows of different lengths: batched matrix-vector products per (row, head); SDPA's per-call setup costs
        # more at one query per row (benchmarks/decode.py)
        s = torch.baddbmm(
            mask.expand(B, H, 1, S).reshape(B * H, 1, S),
            q.reshape(B * H, 1, hd),
            k.reshape(B * H, S, hd).transpose(1, 2),
            alpha=hd**-0.5,
        )  # (B*H, 1, S)
        y = torch.bmm(s.softmax(-1), v.reshape(B * H, S, hd))  # (B*H, 1, hd)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, 1, hd)
    return y.reshape(B, H * hd)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # one fused projection for q, k, v: a single matmul is faster than three on every device
        self.qkv = Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.bias)
        self.proj = Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.proj.bf16_out = True  # feeds the residual add
        self.dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Any = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv(x).split([self.n_head * hd, self.n_kv_head * hd, self.n_kv_head * hd], dim=-1)
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv_head, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv_head, hd).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, past+T, hd)
        drop = self.dropout if self.training else 0.0
        if T == 1 and cache is not None and drop == 0.0:
            return self.proj(decode_attention(q, k, v, attn_mask))[:, None]  # (B, 1, h)
        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            S = k.size(2)
            k = k[:, :, None].expand(B, self.n_kv_head, rep, S, hd).reshape(B, self.n_head, S, hd)
            v = v[:, :, None].expand(B, self.n_kv_head, rep, S, hd).reshape(B, self.n_head, S, hd)
        if attn_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)  # one new token sees all the past
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        else:
            # a chunk after a cached prefix: query i (absolute past+i) sees keys 0..past+i
            S = k.size(2)
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * hd)  # (B, T, H*hd)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        f = cfg.ffn_hidden
        # swiglu: gate and up fused in one matmul, split after
        self.fc = Linear(cfg.n_embd, f if cfg.mlp == "gelu" else 2 * f, bias=cfg.bias)
        self.proj = Linear(f, cfg.n_embd, bias=cfg.bias)
        self.fc.bf16_out = self.proj.bf16_out = True  # activation, then the residual add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.kind == "gelu":
            h = gelu_tanh(h)  # aten's, or a fused kernel in CPU training steps (chatstack.kernels)
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg, layer_idx)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Any = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope, cache, attn_mask))  # Add & Norm (pre-norm)
        x = x + self.drop(self.mlp(self.norm2(x)))
        return x


class GPT(nn.Module):
    # activation checkpointing (the training loop's --grad-checkpoint): in training forwards without a cache each
    # block keeps only its input and recomputes its activations during backward (~1.3x the compute, 1/n_layer
    # of the activation memory)
    grad_checkpoint: bool = False

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.norm_f = make_norm(cfg)
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.pos == "rope":
            cos, sin = scaled_rope_tables(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream keeps its variance
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def set_rope_scaling(self, kind: str, factor: float = 1.0) -> None:
        """Read positions up to factor x the trained context with RoPE scaling `kind` ("none" restores the
        trained tables). Changes the config (block_size, rope_*) and the cos/sin tables; weights stay."""
        if self.config.pos != "rope":
            raise ValueError(f"RoPE scaling needs a rope model; this one has {self.config.pos} positions")
        cfg = with_rope_scaling(self.config, kind, factor)
        cos, sin = scaled_rope_tables(cfg)
        self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)
        self.config = cfg
        for block in self.blocks:
            block.attn.cfg = cfg

    def num_params(self, exclude_positions: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() counts a tied weight once
        if exclude_positions and self.pos_emb is not None:
            n -= self.pos_emb.weight.numel()
        return n

    def hidden_states(
        self,
        idx: torch.Tensor,
        cache: Any = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states (B, T, n_embd): what the LM head, a reward head or a value head read.

        embeds: optional (B, T, n_embd) input embeddings used instead of idx's token embeddings (image positions
        carry projected image features: chatstack.vision); positions are added to them as usual."""
        cfg = self.config
        B, T = idx.shape
        past = cache.pos if cache is not None else 0
        if positions is None:
            if past + T > cfg.block_size:
                raise ValueError(f"sequence of {past + T} tokens exceeds the context length {cfg.block_size}")
            positions = torch.arange(past, past + T, device=idx.device).unsqueeze(0)  # (1, T)
        x = self.tok_emb(idx) if embeds is None else embeds  # (B, T, h)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        else:
            rope = (self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1))  # (B|1, 1, T, hd)
        x = self.drop(x)
        recompute = self.grad_checkpoint and self.training and cache is None and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                # the backward pass runs outside the loop's precision context: recompute in the forward's mode
                bf16 = cpu_bf16_active()
                ctx = lambda: (contextlib.nullcontext(), cpu_bf16_matmuls(bf16))  # noqa: E731
                x = checkpoint(block, x, rope, None, attn_mask, use_reentrant=False, context_fn=ctx)
            else:
                x = block(x, rope, cache, attn_mask)
        if cache is not None:
            cache.advance(T)
        return self.norm_f(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        cache: Any = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        last_only: bool = False,
        embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, V) (or (B, 1, V) with last_only); with targets also the mean cross-entropy.

        targets: (B, T) next tokens, -1 = ignore. loss_mask: optional (B, T) weights (1 = count).
        embeds: optional (B, T, n_embd) input embeddings in place of idx's (see hidden_states).
        """
        x = self.hidden_states(idx, cache, positions, attn_mask, embeds)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)
        if targets is None:
            return logits
        loss = lm_loss(logits, targets, loss_mask)
        return logits, loss


def best_fit_rows(lengths: list[int], row_len: int) -> list[list[int]]:
    """Best-fit-decreasing packing: the indices of the sequences in each row, longest first, each placed in the row
    with the least room that still holds it (ties: the earliest row); every row's lengths sum to <= row_len."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, row index)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            cap, r = free.pop(j)
            rows[r].append(i)
            cap -= n
        else:
            r = len(rows)
            rows.append([i])
            cap = row_len - n
        if cap > 0:
            bisect.insort(free, (cap, r))
    return rows


def packed_layout(doc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and attention for rows that pack several sequences: doc (B, T) says which sequence of its row
    each token belongs to (equal ids in one run; -1 = padding). Returns positions (B, T) that restart at 0 with
    every sequence, and a bool attn_mask (B, 1, T, T), causal within each sequence, so each sequence is computed
    as if it had its row to itself."""
    B, T = doc.shape
    ar = torch.arange(T, device=doc.device).expand(B, T)
    new_doc = torch.ones(B, T, dtype=torch.bool, device=doc.device)
    new_doc[:, 1:] = doc[:, 1:] != doc[:, :-1]
    start = torch.where(new_doc, ar, torch.zeros_like(ar)).cummax(dim=1).values
    same = doc[:, :, None] == doc[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    return ar - start, (same & causal)[:, None]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over counted positions (targets == -1 never count)."""
    V = logits.size(-1)
    if loss_mask is None:
        return F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1), ignore_index=-1)
    per_tok = F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1).clamp_min(0), reduction="none")
    w = loss_mask.reshape(-1).float() * (targets.reshape(-1) >= 0).float()
    return (per_tok * w).sum() / w.sum().clamp_min(1.0)
