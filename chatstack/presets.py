"""Named model sizes: the classic GPTs, GPT-3 175B, the LLaMA family, SmolLM2, and tiny CPU models.

from chatstack.presets import get_preset; cfg = get_preset("gpt2")
chatstack estimate --preset gpt3-175b      # arithmetic of scale for any of them
"""

from __future__ import annotations

from chatstack.model import GPTConfig

_GPT = dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True)
_LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False)

PRESETS: dict[str, dict] = {
    # tiny CPU models: "tiny" is the default pretraining run on the built-in corpus (see the README);
    # "nano" / "nano-llama" are for unit tests (milliseconds a step).
    "tiny": dict(_GPT, vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=128),
    "tiny-llama": dict(
        _LLAMA,
        vocab_size=4096,
        block_size=256,
        n_layer=4,
        n_head=4,
        n_kv_head=2,
        n_embd=128,
        ffn_hidden=384,
        tie_embeddings=True,
    ),
    "nano": dict(_GPT, vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=32),
    "nano-llama": dict(
        _LLAMA,
        vocab_size=512,
        block_size=64,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=32,
        ffn_hidden=96,
        tie_embeddings=False,
    ),
    # the source's models
    "gpt1": dict(_GPT, vocab_size=40478, block_size=512, n_layer=12, n_head=12, n_embd=768),
    "gpt2": dict(_GPT, vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(_GPT, vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(_GPT, vocab_size=50257, block_size=1024, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(_GPT, vocab_size=50257, block_size=1024, n_layer=48, n_head=25, n_embd=1600),
    "gpt3-175b": dict(_GPT, vocab_size=50257, block_size=2048, n_layer=96, n_head=96, n_embd=12288),
    # LLaMA (Touvron et al. 2023): untied output, SwiGLU widths as released
    "llama-7b": dict(
        _LLAMA,
        vocab_size=32000,
        block_size=2048,
        n_layer=32,
        n_head=32,
        n_embd=4096,
        ffn_hidden=11008,
        norm_eps=1e-6,
        tie_embeddings=False,
    ),
    "llama-13b": dict(
        _LLAMA,
        vocab_size=32000,
        block_size=2048,
        n_layer=40,
        n_head=40,
        n_embd=5120,
        ffn_hidden=13824,
        norm_eps=1e-6,
        tie_embeddings=False,
    ),
    "llama-33b": dict(
        _LLAMA,
        vocab_size=32000,
        block_size=2048,
        n_layer=60,
        n_head=52,
        n_embd=6656,
        ffn_hidden=17920,
        norm_eps=1e-6,
        tie_embeddings=False,
    ),
    "llama-65b": dict(
        _LLAMA,
        vocab_size=32000,
        block_size=2048,
        n_layer=80,
        n_head=64,
        n_embd=8192,
        ffn_hidden=22016,
        norm_eps=1e-6,
        tie_embeddings=False,
    ),
    # SmolLM2-135M-Instruct (the GGUF that installs offline, see docs/data.md)
    "smollm2-135m": dict(
        _LLAMA,
        vocab_size=49152,
        block_size=8192,
        n_layer=30,
        n_head=9,
        n_kv_head=3,
        n_embd=576,
        ffn_hidden=1536,
        rope_base=100000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
    ),
}


def get_preset(name: str, **overrides: object) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})
