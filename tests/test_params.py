"""Parameter-count formulas (chatstack.estimate) against instantiated models, module by module.

    python -m pytest tests/test_params.py -q

Small models are built for real; the big presets are built on the meta device (no memory is allocated,
GPT-3 175B included) and counted the same way.
"""

import pytest
import torch

from chatstack import estimate as E
from chatstack.model import GPT, GPTConfig
from chatstack.presets import PRESETS, get_preset


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


SMALL = {
    "nano": get_preset("nano"),
    "nano-llama": get_preset("nano-llama"),
    "tiny": get_preset("tiny"),
    "tiny-llama": get_preset("tiny-llama"),
    # the other corners: GPT family untied, Llama family with biases and LayerNorm, GQA with GELU
    "gpt-untied": get_preset("nano", tie_embeddings=False),
    "llama-bias-ln": get_preset("nano-llama", bias=True, norm="layernorm", tie_embeddings=True),
    "gqa-gelu-nobias": get_preset("nano", n_head=4, n_kv_head=1, bias=False, ffn_hidden=80),
}


@pytest.mark.parametrize("name", list(SMALL))
def test_per_module_formula_matches_model(name):
    cfg = SMALL[name]
    m = GPT(cfg)
    br = E.param_breakdown(cfg)
    blk = m.blocks[0]
    assert numel(blk.attn) == br["attention"]
    assert numel(blk.mlp) == br["mlp"]
    assert numel(blk.norm1) + numel(blk.norm2) == br["norms"]
    assert numel(blk) == br["block"]
    assert sum(numel(b) for b in m.blocks) == br["blocks"]
    assert m.tok_emb.weight.numel() == br["embedding"]
    assert numel(m.pos_emb) == br["positions"]
    assert numel(m.norm_f) == br["final_norm"]
    assert (0 if cfg.tie_embeddings else m.lm_head.weight.numel()) == br["lm_head"]
    assert m.num_params() == br["total"]


@pytest.mark.parametrize("h", [32, 48, 64, 768])
def test_gpt_block_is_12h2_plus_13h(h):
    # the source's breakdown, term by term, for the classic recipe (MHA, 4h GELU, biases, LayerNorm)
    cfg = GPTConfig(vocab_size=100, block_size=16, n_layer=1, n_head=4, n_embd=h)
    m = GPT(cfg)
    blk = m.blocks[0]
    assert numel(blk.attn) == 4 * h * h + 4 * h
    assert numel(blk.mlp) == 8 * h * h + 5 * h
    assert numel(blk.norm1) + numel(blk.norm2) == 4 * h
    assert numel(blk) == 12 * h * h + 13 * h == E.gpt_block_formula(h)
    assert numel(m.pos_emb) == 16 * h
    assert numel(m.norm_f) == 2 * h
    # embedding Vh shared with the output: counted once
    assert m.lm_head.weight is m.tok_emb.weight
    assert m.num_params() == 1 * (12 * h * h + 13 * h) + 100 * h + 16 * h + 2 * h


def test_llama_family_terms():
    # SwiGLU 3hf, RMSNorm h, GQA q,k,v widths, untied output Vh, no positions
    cfg = get_preset("nano-llama")  # h=32, 4 heads / 2 kv heads (hd 8), f=96, V=512
    h, f, hd, V = 32, 96, 8, 512
    m = GPT(cfg)
    blk = m.blocks[0]
    assert numel(blk.attn) == h * (4 + 2 * 2) * hd + (4 * hd) * h
    assert numel(blk.mlp) == 3 * h * f
    assert numel(blk.norm1) == h
    assert m.pos_emb is None
    assert m.num_params() == 2 * (numel(blk)) + 2 * V * h + h


@pytest.mark.parametrize("name", [n for n in PRESETS if n not in SMALL])
def test_big_presets_on_meta_device(name):
    cfg = get_preset(name)
    assert E.count_params_meta(cfg) == E.param_breakdown(cfg)["total"]


def test_meta_device_allocates_nothing():
    cfg = get_preset("gpt3-175b")
    with torch.device("meta"):
        m = GPT(cfg)
    assert all(p.device.type == "meta" for p in m.parameters())
    assert m.num_params() == 174_579_068_928 + 2048 * 12288 + 2 * 12288
    assert sum(numel(b) for b in m.blocks) == 96 * (12 * 12288**2 + 13 * 12288)


def test_gpt2_family_counts():
    # Hugging Face's reported counts (output tied, positions included)
    want = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}
    for name, n in want.items():
        assert E.param_breakdown(get_preset(name))["total"] == n


def test_smollm2_count():
    # 134.5M read off the GGUF (docs/data.md): 30 layers, 576 wide, 9/3 heads, f=1536, V=49152, tied
    assert E.param_breakdown(get_preset("smollm2-135m"))["total"] == 134_515_008
