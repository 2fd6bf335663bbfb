"""Arithmetic of scale: parameters, memory, FLOPs and wall-clock for any model config.

    chatstack estimate --preset gpt2        (the command: chatstack/stages/estimate.py)

The formulas (the source's, for the GPT family; every term generalises to Llama-style configs):

    masked attention   4h^2 + 4h    fused q,k,v (3h^2 + 3h) + output projection (h^2 + h)
                                    GQA: h*(n_head + 2*n_kv_head)*hd for q,k,v
    feed-forward       8h^2 + 5h    h -> 4h -> h with biases; SwiGLU: 3*h*f, no biases
    two norms          4h           LayerNorm weight + bias; RMSNorm: h each
    a block            12h^2 + 13h
    embedding          Vh           shared with the output layer when tied (else + Vh)
    positions          Th           learned positions only (RoPE has none)
    final norm         2h           (RMSNorm: h)

    training memory    20 bytes/param (mixed precision + AdamW) + activations for a batch and context
    inference memory   2 bytes/param (16-bit weights) + KV cache for a batch and context
    training FLOPs     6ND (forward 2ND + backward 4ND); 8ND with activation recomputation (one more forward)
    inference FLOPs    2N per token
    time               FLOPs / (GPUs * peak * utilisation), or tokens / (GPUs * tokens/s per GPU)

`chatstack estimate` uses the exact count as N (what the model holds; Hugging Face's count for GPT-2) and
prints the headline `l(12h^2+13h)+Vh` beside it; `--params` overrides N (e.g. GPT-3's nominal 175e9).

Every function here is pure (a config in, numbers out) so the training loop's MFU and the report card
reuse them: `flops_per_token(cfg, seq_len)` is the per-token training cost the loop divides by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from chatstack.model import GPT, GPTConfig

# Mixed-precision training with AdamW, bytes per parameter:
#   fp32 master weights 4 + fp32 gradients 4 + Adam first and second moments 4 + 4 + 16-bit weights 2
#   + 16-bit gradients 2 = 20 (the source's figure).
TRAIN_BYTES_PER_PARAM = 20
INFER_BYTES_PER_PARAM = 2  # 16-bit weights
A100_BF16_TFLOPS = 312.0


# ---------------------------------------------------------------------------------------------- parameters


def attention_params(cfg: GPTConfig) -> int:
    """Masked self-attention of one block: 4h^2 + 4h for multi-head attention with biases."""
    h, hd = cfg.n_embd, cfg.head_dim
    qkv_out = (cfg.n_head + 2 * cfg.n_kv_head) * hd
    attn_width = cfg.n_head * hd
    n = h * qkv_out + attn_width * h
    if cfg.bias:
        n += qkv_out + h
    return n


def mlp_params(cfg: GPTConfig) -> int:
    """Feed-forward of one block: 8h^2 + 5h for GELU with f = 4h and biases; SwiGLU has 3 matrices."""
    h, f = cfg.n_embd, cfg.ffn_hidden
    if cfg.mlp == "gelu":
        n = 2 * h * f
        if cfg.bias:
            n += f + h
    else:
        n = 3 * h * f
        if cfg.bias:
            n += 2 * f + h
    return n


def norm_params(cfg: GPTConfig) -> int:
    """One norm: LayerNorm has a weight and (with bias) a bias: 2h; RMSNorm only a weight: h."""
    h = cfg.n_embd
    return 2 * h if (cfg.norm == "layernorm" and cfg.bias) else h


def block_params(cfg: GPTConfig) -> int:
    """One transformer block: attention + feed-forward + two norms = 12h^2 + 13h for the GPT family."""
    return attention_params(cfg) + mlp_params(cfg) + 2 * norm_params(cfg)


def param_breakdown(cfg: GPTConfig) -> dict[str, int]:
    """Parameters per module (each block's parts once, and all blocks together), plus totals.

    total            every parameter the model holds (a tied output counted once), what `GPT.num_params()` says
    headline         the source's `l(12h^2+13h) + Vh`: blocks + embedding (+ untied output), no positions/final norm
    non_embedding    total minus embedding, positions and an untied output: Kaplan et al.'s N
    compute          the parameters that do matmuls per token (FLOPs use this): total minus the input lookup
                     tables (positions; the token embedding when the output is untied)
    """
    l, h, V, T = cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.block_size
    b = dict(
        attention=attention_params(cfg),
        mlp=mlp_params(cfg),
        norms=2 * norm_params(cfg),
        block=block_params(cfg),
    )
    b["blocks"] = l * b["block"]
    b["embedding"] = V * h
    b["positions"] = T * h if cfg.pos == "learned" else 0
    b["final_norm"] = norm_params(cfg)
    b["lm_head"] = 0 if cfg.tie_embeddings else V * h
    b["total"] = b["blocks"] + b["embedding"] + b["positions"] + b["final_norm"] + b["lm_head"]
    b["headline"] = b["blocks"] + b["embedding"] + b["lm_head"]
    b["non_embedding"] = b["blocks"] + b["final_norm"]
    b["compute"] = b["total"] - b["positions"] - (0 if cfg.tie_embeddings else b["embedding"])
    return b


def gpt_block_formula(h: int) -> int:
    """The source's block count 12h^2 + 13h (GPT family: MHA, 4h GELU, biases, LayerNorm)."""
    return 12 * h * h + 13 * h


def twelve_l_h2(cfg: GPTConfig) -> int:
    """The LLaMA table's approximate count 12*l*h^2 (blocks without the linear terms)."""
    return 12 * cfg.n_layer * cfg.n_embd**2


def count_params_meta(cfg: GPTConfig) -> int:
    """Instantiate the real model on the meta device (no memory) and count: 175B in a second or two."""

    with torch.device("meta"):
        model = GPT(cfg)
    return model.num_params()


# ---------------------------------------------------------------------------------------------- FLOPs


def flops_per_token(
    cfg: GPTConfig,
    seq_len: Optional[int] = None,
    attention: bool = True,
    recompute: bool = False,
    n_params: Optional[int] = None,
) -> float:
    """Training FLOPs per token: 6N (+ 12*l*h_attn*T for attention scores), 8N/16lhT with recomputation.

    N is the compute parameter count (matmul weights + biases; lookup tables excluded). The attention term
    is PaLM's (appendix B): QK^T and AV cost 2*T*h_attn multiply-adds each per token and layer, forward,
    ignoring the causal mask's saving; nanoGPT's MFU uses the same. Backward is twice the forward; full
    activation recomputation runs the forward once more (x4/3).
    """
    n = param_breakdown(cfg)["compute"] if n_params is None else n_params
    T = cfg.block_size if seq_len is None else seq_len
    forward = 2 * n + (4 * cfg.n_layer * cfg.n_head * cfg.head_dim * T if attention else 0)
    return forward * (4 if recompute else 3)


def train_flops(n_params: float, tokens: float, recompute: bool = False) -> float:
    """6ND, or 8ND with activation recomputation."""
    return (8 if recompute else 6) * n_params * tokens


def inference_flops_per_token(cfg: GPTConfig, context: int = 0, n_params: Optional[int] = None) -> float:
    """2N per generated token, plus 4*l*h_attn*context for attending over a cached context."""
    n = param_breakdown(cfg)["compute"] if n_params is None else n_params
    return 2 * n + 4 * cfg.n_layer * cfg.n_head * cfg.head_dim * context


# ---------------------------------------------------------------------------------------------- memory


def activation_bytes(cfg: GPTConfig, batch: int, seq: int, recompute: bool = False, flash: bool = False) -> int:
    """Activations kept for the backward pass in 16-bit training (Korthikanti et al. 2022, section 4.1).

    Per layer, GPT family: s*b*h*(34 + 5*a*s/h) bytes = attention 11sbh + 5as^2b, MLP 19sbh, norms 4sbh.
    Generalised: attention 7sbh + 4*s*b*h_kv (GQA shrinks K and V); GELU MLP 3sbh + 4sbf; SwiGLU
    3sbh + 8sbf (gate and up outputs, silu output, product). `flash` drops the s^2 score terms (fused
    attention kernels recompute them). With full recomputation only each layer's input (2sbh) is kept,
    plus one layer's full set while it is recomputed. Plus the logits in fp32 for the loss: 4sbV.
    """
    s, b, h, a, f = seq, batch, cfg.n_embd, cfg.n_head, cfg.ffn_hidden
    h_kv = cfg.n_kv_head * cfg.head_dim
    attn = 7 * s * b * h + 4 * s * b * h_kv + (0 if flash else 5 * a * s * s * b)
    mlp = 3 * s * b * h + (4 if cfg.mlp == "gelu" else 8) * s * b * f
    norms = 4 * s * b * h
    per_layer = attn + mlp + norms
    logits = 4 * s * b * cfg.vocab_size
    if recompute:
        return cfg.n_layer * 2 * s * b * h + per_layer + logits
    return cfg.n_layer * per_layer + logits


def kv_cache_bytes(cfg: GPTConfig, batch: int, seq: int, bytes_per_value: int = 2) -> int:
    """Keys and values of every layer for `batch` rows of `seq` tokens: 2 * l * b * s * n_kv_head * hd."""
    return 2 * cfg.n_layer * batch * seq * cfg.n_kv_head * cfg.head_dim * bytes_per_value


def train_memory(
    n_params: float,
    cfg: Optional[GPTConfig] = None,
    batch: int = 0,
    seq: int = 0,
    recompute: bool = False,
    flash: bool = False,
) -> dict[str, float]:
    """{"weights_optimizer": 20N, "activations": ..., "total": ...} in bytes."""
    states = TRAIN_BYTES_PER_PARAM * n_params
    acts = activation_bytes(cfg, batch, seq, recompute, flash) if (cfg is not None and batch and seq) else 0
    return {"weights_optimizer": states, "activations": acts, "total": states + acts}


def inference_memory(
    n_params: float, cfg: Optional[GPTConfig] = None, batch: int = 0, seq: int = 0
) -> dict[str, float]:
    """{"weights": 2N, "kv_cache": ..., "total": ...} in bytes."""
    weights = INFER_BYTES_PER_PARAM * n_params
    kv = kv_cache_bytes(cfg, batch, seq) if (cfg is not None and batch and seq) else 0
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}


# ---------------------------------------------------------------------------------------------- time


def time_to_train(
    flops: float = 0.0,
    gpus: int = 1,
    gpu_tflops: float = A100_BF16_TFLOPS,
    mfu: float = 0.4,
    achieved_tflops: Optional[float] = None,
    tokens: Optional[float] = None,
    tokens_per_gpu_s: Optional[float] = None,
) -> dict[str, float]:
    """Wall-clock for a training run: {"seconds", "gpu_hours", "gpu_days", "days", "achieved_tflops"}.

    Throughput per GPU is, in order of preference: measured tokens/s per GPU (needs `tokens`), an achieved
    TFLOP/s, or the peak TFLOP/s times the utilisation (MFU).
    """
    if gpus <= 0:
        raise ValueError(f"gpus must be positive, got {gpus}")
    if tokens_per_gpu_s is not None:
        if tokens is None:
            raise ValueError("tokens_per_gpu_s needs tokens")
        seconds = tokens / (gpus * tokens_per_gpu_s)
        achieved = flops / (seconds * gpus) / 1e12 if seconds > 0 else 0.0
    else:
        achieved = achieved_tflops if achieved_tflops is not None else gpu_tflops * mfu
        if achieved <= 0:
            raise ValueError(f"throughput must be positive, got {achieved} TFLOP/s")
        seconds = flops / (gpus * achieved * 1e12)
    gpu_hours = seconds * gpus / 3600
    return {
        "seconds": seconds,
        "gpu_hours": gpu_hours,
        "gpu_days": gpu_hours / 24,
        "days": seconds / 86400,
        "achieved_tflops": achieved,
    }


# ---------------------------------------------------------------------------------------------- the report


@dataclass
class EstimateArgs:
    cfg: GPTConfig
    name: str
    tokens: Optional[float] = None
    params: Optional[float] = None
    gpus: int = 1
    gpu_tflops: float = A100_BF16_TFLOPS
    mfu: float = 0.4
    achieved_tflops: Optional[float] = None
    tokens_per_gpu_s: Optional[float] = None
    recompute: bool = False
    attention: bool = False
    batch: int = 0  # 0: no activation / KV-cache estimate (20N and 2N alone)
    seq: Optional[int] = None
    flash: bool = False
    vision: Optional[dict] = None  # a vision chat checkpoint's "vision" config (chatstack.vision.projection)
    images: int = 1  # images per context, for the image tokens' share


def vision_params(vision: dict) -> dict[str, int]:
    """Parameters of the image encoder (chatstack.vision.encoder.ImageEncoder: one 3x3 conv at full size, two at
    1/2 and two at 1/4, each + GroupNorm; a LayerNorm on the tokens; the CLIP head) and of the projection (a
    two-layer MLP width -> n_embd -> n_embd, a position embedding per image token, and with a global token a
    two-layer MLP embed_dim -> n_embd -> n_embd; with coords a 2 -> n_embd map), from a VisionConfig dict."""
    c1, c2, c3 = vision["clip"]["channels"]
    e, h = vision["clip"]["embed_dim"], vision["n_embd"]

    def conv(cin: int, cout: int) -> int:
        return 9 * cin * cout + cout + 2 * cout  # weights + bias + GroupNorm

    encoder = conv(3, c1) + conv(c1, c2) + conv(c2, c2) + conv(c2, c3) + conv(c3, c3) + 2 * c3 + c3 * e + e
    n = int(vision["image_tokens"]) + int(bool(vision.get("global_token")))
    projection = c3 * h + h + h * h + h + n * h  # the cells' MLP and a position per token
    if vision.get("global_token"):
        projection += e * h + h + h * h + h  # the CLIP embedding's MLP
    if vision.get("coords"):
        projection += 2 * h  # the cells' (x, y) map
    return {"image_encoder": encoder, "projection": projection}


def estimate(a: EstimateArgs) -> dict:
    """Everything `chatstack estimate` prints, as one JSON-able dict."""
    cfg = a.cfg
    br = param_breakdown(cfg)
    seq = a.seq or cfg.block_size
    batch = a.batch or (1 if a.seq else 0)  # --seq alone means one row
    # N is the exact count (the source's full breakdown: blocks + Vh + Th + final norm; what Hugging Face
    # reports). The source's headline l(12h^2+13h)+Vh drops the two small terms (0.01% for GPT-3) and is
    # reported beside it. An explicit --params (e.g. GPT-3's nominal 175e9) overrides N everywhere.
    n = float(a.params) if a.params is not None else float(br["total"])
    n_mem = n
    tokens = float(a.tokens) if a.tokens is not None else 20.0 * n  # Chinchilla: ~20 tokens per parameter
    flops = train_flops(n, tokens, a.recompute)
    if a.attention:
        attn_per_token = flops_per_token(cfg, seq, attention=True, recompute=a.recompute, n_params=0)
        flops += attn_per_token * tokens
    t = time_to_train(flops, a.gpus, a.gpu_tflops, a.mfu, a.achieved_tflops, tokens, a.tokens_per_gpu_s)
    tm = train_memory(n_mem, cfg, batch, seq, a.recompute, a.flash)
    im = inference_memory(n_mem, cfg, batch, seq)
    if a.tokens_per_gpu_s is not None:
        throughput = f"{a.tokens_per_gpu_s:g} tokens/s per GPU"
    elif a.achieved_tflops is not None:
        throughput = f"{a.achieved_tflops:g} TFLOP/s achieved per GPU"
    else:
        throughput = f"{a.gpu_tflops:g} TFLOP/s peak x {a.mfu:g} MFU"
    vis = None
    if a.vision is not None:
        vp = vision_params(a.vision)
        per_image = int(a.vision["image_tokens"]) + int(bool(a.vision.get("global_token")))
        n_img = per_image * a.images
        vis = {
            **vp,
            "image_tokens": per_image,
            "images": a.images,
            "image_token_share": n_img / cfg.block_size,  # of the context, with `images` images in it
            "total_params": int(n) + vp["image_encoder"] + vp["projection"],
        }
    return {
        "model": a.name,
        "config": cfg.to_dict(),
        "vision": vis,
        "params": int(n),
        "params_exact": br["total"],
        "params_headline": br["headline"],
        "params_12lh2": twelve_l_h2(cfg),
        "breakdown": {
            k: br[k]
            for k in ("attention", "mlp", "norms", "block", "blocks", "embedding", "positions", "final_norm", "lm_head")
        },
        "tokens": tokens,
        "tokens_default": a.tokens is None,
        "recompute": a.recompute,
        "attention_flops": a.attention,
        "flops_per_token": flops / tokens if tokens else 0.0,
        "train_flops": flops,
        "inference_flops_per_token": inference_flops_per_token(cfg, 0, n_params=int(n)),
        "batch": batch,
        "seq": seq if batch else None,
        "train_memory_bytes": tm["total"],
        "train_state_bytes": tm["weights_optimizer"],
        "activation_bytes": tm["activations"],
        "inference_memory_bytes": im["total"],
        "inference_weight_bytes": im["weights"],
        "kv_cache_bytes": im["kv_cache"],
        "gpus": a.gpus,
        "throughput": throughput,
        "achieved_tflops": t["achieved_tflops"],
        "seconds": t["seconds"],
        "gpu_hours": t["gpu_hours"],
        "gpu_days": t["gpu_days"],
        "days": t["days"],
    }


def _si(x: float, unit: str = "") -> str:
    for div, p in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {p}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def format_table(r: dict) -> str:
    b = r["breakdown"]
    h = r["config"]["n_embd"]
    rows = [
        ("model", r["model"]),
        ("", ""),
        (
            "parameters (N)",
            f"{r['params']:,}  ({_si(r['params'])})"
            + ("" if r["params"] == r["params_exact"] else f"  (--params; exact {r['params_exact']:,})"),
        ),
        (
            "  l(12h^2+13h)+Vh"
            if r["breakdown"]["block"] == 12 * h * h + 13 * h
            else ("  l*block + Vh" if not b["lm_head"] else "  l*block + 2Vh"),
            f"{r['params_headline']:,}",
        ),
        ("  12 l h^2", f"{r['params_12lh2']:,}"),
        ("  per block", f"{b['block']:,}  = attention {b['attention']:,} + mlp {b['mlp']:,} + norms {b['norms']:,}"),
        ("  embedding", f"{b['embedding']:,}" + ("  (shared with the output)" if not b["lm_head"] else "")),
        ("  output layer", f"{b['lm_head']:,}" if b["lm_head"] else "tied"),
        ("  positions", f"{b['positions']:,}"),
        ("  final norm", f"{b['final_norm']:,}"),
        ("", ""),
        (
            "training memory",
            f"{_si(r['train_memory_bytes'], 'B')}  = 20 B/param {_si(r['train_state_bytes'], 'B')}"
            + (
                f" + activations {_si(r['activation_bytes'], 'B')} (batch {r['batch']} x {r['seq']})"
                if r["batch"]
                else "  (--batch/--seq add activations)"
            ),
        ),
        (
            "inference memory",
            f"{_si(r['inference_memory_bytes'], 'B')}  = 2 B/param "
            f"{_si(r['inference_weight_bytes'], 'B')}"
            + (f" + KV cache {_si(r['kv_cache_bytes'], 'B')}" if r["batch"] else "  (--batch/--seq add the KV cache)"),
        ),
        ("", ""),
        (
            "training tokens (D)",
            f"{r['tokens']:.3g}" + ("  (default: 20 per parameter)" if r["tokens_default"] else ""),
        ),
        ("training FLOPs", f"{r['train_flops']:.3g}  ({'8ND, recomputation' if r['recompute'] else '6ND'})"),
        ("inference FLOPs/token", f"{r['inference_flops_per_token']:.3g}  (2N)"),
        ("throughput", f"{r['throughput']}  ({r['achieved_tflops']:.4g} TFLOP/s per GPU)"),
        ("GPU-hours", f"{r['gpu_hours']:,.0f}  ({r['gpu_days']:,.0f} GPU-days)"),
        ("wall-clock", f"{r['days']:,.2f} days on {r['gpus']:,} GPU{'s' if r['gpus'] != 1 else ''}"),
    ]
    vis = r.get("vision")
    if vis:
        rows += [
            ("", ""),
            ("image encoder", f"{vis['image_encoder']:,}  (CNN; + projection {vis['projection']:,} into the GPT)"),
            ("with the GPT", f"{vis['total_params']:,}"),
            (
                "image tokens",
                f"{vis['image_tokens']} per image; {vis['images']} image(s) take {vis['image_token_share']:.1%} of "
                f"the {r['config']['block_size']:,}-token context",
            ),
        ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" if k else "" for k, v in rows)
