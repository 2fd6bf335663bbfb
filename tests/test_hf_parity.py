"""Parity with an independent implementation: Hugging Face GPT2LMHeadModel / LlamaForCausalLM.

    python -m pytest tests/test_hf_parity.py -q        (or: pytest -k parity)

Random-weight HF models (small configs: MHA and GQA, tied and untied, with and without biases) are
converted into chatstack's GPT (and back) and must give the same logits (max abs diff <= 1e-4 in fp32),
the same greedy continuation, and the same logits through the KV-cache path. HF runs its eager
attention so the two sides share no attention kernel.
"""

import pytest
import torch
from helpers import cached_forward

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from chatstack.interop.hf import ConversionError, config_from_hf, from_hf, hf_config, to_hf  # noqa: E402
from chatstack.model import GPT  # noqa: E402
from chatstack.presets import get_preset  # noqa: E402

TOL = 1e-4
V = 96


def _gpt2(tied):
    return GPT2Config(
        vocab_size=V,
        n_positions=48,
        n_embd=32,
        n_layer=2,
        n_head=4,
        tie_word_embeddings=tied,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )


def _llama(n_kv, tied, bias=False):
    return LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=n_kv,
        max_position_embeddings=48,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        rms_norm_eps=1e-5,
        attention_bias=bias,
        mlp_bias=bias,
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


CONFIGS = {
    "gpt2-tied": lambda: _gpt2(True),
    "gpt2-untied": lambda: _gpt2(False),
    "llama-mha-untied": lambda: _llama(4, False),
    "llama-gqa-tied": lambda: _llama(2, True),
    "llama-mqa-untied-bias": lambda: _llama(1, False, bias=True),
}


def randomize(model, seed=0):
    """Weights large enough that logits differ clearly between tokens; norms and biases non-trivial too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln" in name) and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def make_hf(name, seed=0):
    hc = CONFIGS[name]()
    cls = GPT2LMHeadModel if hc.model_type == "gpt2" else LlamaForCausalLM
    torch.manual_seed(seed)
    m = cls._from_config(hc, attn_implementation="eager") if hasattr(cls, "_from_config") else cls(hc)
    randomize(m, seed)
    if hc.tie_word_embeddings:
        m.tie_weights()
    return m.eval()


def tokens(B=2, T=17, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def greedy(step_logits, idx, n):
    """Argmax loop over a full recompute each step: `step_logits(idx) -> (B, T, V)`."""
    for _ in range(n):
        nxt = step_logits(idx)[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_parity_from_hf_logits_and_greedy(name):
    hf = make_hf(name)
    ours = from_hf(hf)
    assert ours.config.tie_embeddings == hf.config.tie_word_embeddings
    assert ours.num_params() == hf.num_parameters()
    x = tokens()
    want = hf(x).logits
    got = ours(x)
    assert want.abs().max() > 1.0  # the comparison is not between near-zero logits
    assert (got - want).abs().max().item() <= TOL
    prompt = x[:, :5]
    a = greedy(lambda i: hf(i).logits, prompt, 12)
    b = greedy(lambda i: ours(i), prompt, 12)
    assert torch.equal(a, b)
    assert len(set(a[0, 5:].tolist())) > 1  # a continuation that does something


def hf_cached(hf, ids, cache=None):
    """One HF forward with its KV cache. transformers 5.24 renamed `past_key_values` to `cache` (the old name
    warns and goes away in 5.40); use whichever this version takes. Returns (logits, cache)."""
    import inspect

    key = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    out = hf(ids, use_cache=True, **({key: cache} if cache is not None else {}))
    new = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
    return out.logits, new


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_parity_kv_cache_matches_hf(name):
    hf = make_hf(name, seed=3)
    ours = from_hf(hf)
    x = tokens(B=2, T=9, seed=4)
    want, pkv = hf_cached(hf, x)
    fwd, cache = cached_forward(ours, 2, 32)
    got = fwd(x)
    assert (got - want).abs().max().item() <= TOL
    nxt = want[:, -1].argmax(-1, keepdim=True)
    for _ in range(8):  # one-token decode steps against HF's DynamicCache
        want, pkv = hf_cached(hf, nxt, pkv)
        got = fwd(nxt)
        assert (got - want).abs().max().item() <= TOL
        nxt = want[:, -1].argmax(-1, keepdim=True)
        assert torch.equal(nxt, got[:, -1].argmax(-1, keepdim=True))
    assert cache.pos == 9 + 8 - 1  # the last decode step wrote position 16


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("nano", {}),
        ("nano", {"tie_embeddings": False}),
        ("nano-llama", {}),
        ("nano-llama", {"tie_embeddings": True, "n_kv_head": 1}),
        ("nano-llama", {"bias": True, "rope_base": 1234.0, "norm_eps": 1e-6}),
    ],
)
@torch.no_grad()
def test_parity_to_hf(preset, overrides):
    cfg = get_preset(preset, **overrides)
    torch.manual_seed(0)
    ours = randomize(GPT(cfg), seed=5).eval()
    hf = to_hf(ours)
    assert type(hf).__name__ == ("GPT2LMHeadModel" if cfg.pos == "learned" else "LlamaForCausalLM")
    x = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(6))
    assert (hf(x).logits - ours(x)).abs().max().item() <= TOL
    if cfg.tie_embeddings:
        assert hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    # and back: the round trip is exact, config included
    back = from_hf(hf)
    assert back.config.to_dict() == {**cfg.to_dict(), "dropout": back.config.dropout}
    for (n, p), (n2, p2) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert n == n2 and torch.equal(p, p2)


@torch.no_grad()
def test_parity_hf_generate_greedy():
    """HF's own `generate` (greedy, with its cache) continues exactly as chatstack's argmax loop with a KV cache."""
    hf = make_hf("llama-gqa-tied", seed=7)
    ours = from_hf(hf)
    prompt = tokens(B=1, T=6, seed=8)
    a = hf.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10, pad_token_id=0)
    fwd, _ = cached_forward(ours, 1, 32)
    logits = fwd(prompt)
    seq = prompt
    for _ in range(10):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        logits = fwd(nxt)
    assert torch.equal(a, seq)


def test_parity_unconvertible_configs_name_the_problem():
    with pytest.raises(ConversionError, match="no Hugging Face architecture"):
        hf_config(get_preset("nano", pos="rope"))
    with pytest.raises(ConversionError, match="no Hugging Face architecture"):
        hf_config(get_preset("nano", n_head=4, n_kv_head=2))  # GPT-2 has no GQA
    hc = _gpt2(True)
    hc.activation_function = "relu"
    with pytest.raises(ConversionError, match="activation_function"):
        config_from_hf(hc)
    hc = _llama(2, False)
    hc.rope_parameters = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0}
    with pytest.raises(ConversionError, match="rope_type"):
        config_from_hf(hc)
