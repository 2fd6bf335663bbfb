"""Long context: RoPE scaling (unscaled path unchanged; linear / YaRN against Hugging Face's tables), passkey
prompts and the eval-long command, the KV-cache estimate at 32K.

    python3 -m pytest -q tests/test_long_context.py
"""

import importlib.util
import json
import math

import pytest
import torch
from helpers import nano_model, small_tokenizer

from chatstack.checkpoint import load_checkpoint, save_checkpoint
from chatstack.cli import main
from chatstack.estimate import kv_cache_bytes
from chatstack.evals.long_context import QUESTION, TASK, first_number, passkey_prompt
from chatstack.infer.engine import Engine, SamplingParams
from chatstack.model import GPT, GPTConfig, rope_frequencies, rope_tables, scaled_rope_tables, with_rope_scaling
from chatstack.presets import get_preset


def reference_rope(hd, T, base, inv_scale=1.0, pos_scale=1.0):
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)) * inv_scale
    f = torch.outer(torch.arange(T, dtype=torch.float64) / pos_scale, inv_freq)
    emb = torch.cat([f, f], -1)
    return emb.cos().float(), emb.sin().float()


def test_unscaled_path_is_unchanged():
    cfg = get_preset("nano-llama")
    assert cfg.rope_scaling == "none" and cfg.rope_factor == 1.0
    cos, sin = scaled_rope_tables(cfg)
    ref_cos, ref_sin = reference_rope(cfg.head_dim, cfg.block_size, cfg.rope_base)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    assert torch.equal(cos, rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_base)[0])
    # a model whose scaling is switched on and back off computes exactly what it did before
    m = nano_model("nano-llama")
    x = torch.randint(0, 320, (2, 40))
    with torch.no_grad():
        before = m(x)
        m.set_rope_scaling("yarn", 4.0)
        m.set_rope_scaling("none")
        after = m(x)
    assert torch.equal(before, after) and m.config.block_size == 64
    # checkpoints written before these fields existed load unscaled
    d = cfg.to_dict()
    for k in ("rope_scaling", "rope_factor", "rope_original_context"):
        d.pop(k)
    assert GPTConfig.from_dict(d) == cfg


def test_linear_interpolation_reads_position_p_times_s_as_p():
    cfg = with_rope_scaling(get_preset("nano-llama"), "linear", 4.0)
    assert cfg.block_size == 256 and cfg.rope_original_context == 64
    cos, _ = scaled_rope_tables(cfg)
    plain, _ = reference_rope(cfg.head_dim, 64, cfg.rope_base)
    torch.testing.assert_close(cos[::4], plain)


def test_ntk_changes_the_base():
    cfg = with_rope_scaling(get_preset("nano-llama"), "ntk", 4.0)
    hd = cfg.head_dim
    cos, _ = scaled_rope_tables(cfg)
    ref, _ = reference_rope(hd, cfg.block_size, cfg.rope_base * 4.0 ** (hd / (hd - 2)))
    torch.testing.assert_close(cos, ref)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_scaled_tables_match_hugging_face(kind):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = with_rope_scaling(get_preset("smollm2-135m", block_size=2048), kind, 4.0)
    hc = LlamaConfig(
        hidden_size=cfg.n_embd,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        max_position_embeddings=cfg.block_size,
        rope_parameters={
            "rope_type": kind,
            "factor": 4.0,
            "rope_theta": cfg.rope_base,
            "original_max_position_embeddings": 2048,
        },
    )
    inv_freq, attn_factor = ROPE_INIT_FUNCTIONS[kind](hc)
    mine, factor = rope_frequencies(cfg)
    torch.testing.assert_close(mine.float(), inv_freq.float(), rtol=1e-6, atol=0)  # HF keeps fp32 frequencies
    assert factor == pytest.approx(attn_factor)
    cos, _ = scaled_rope_tables(cfg)
    assert cos[0, 0] == pytest.approx(attn_factor)
    if kind == "yarn":
        assert attn_factor == pytest.approx(0.1 * math.log(4.0) + 1)


def test_scaling_needs_rope_and_is_stored_in_config_json(tmp_path):
    with pytest.raises(ValueError, match="needs a rope model"):
        nano_model("nano").set_rope_scaling("linear", 2.0)
    with pytest.raises(ValueError, match="rope_scaling must be one of"):
        with_rope_scaling(get_preset("nano-llama"), "magic", 2.0)
    tok = small_tokenizer()
    m = GPT(with_rope_scaling(get_preset("nano-llama", vocab_size=tok.vocab_size), "yarn", 2.0))
    save_checkpoint(tmp_path / "c", m, {"stage": "base", "model": m.config.to_dict(), "tokenizer": tok.info()}, tok)
    saved = json.loads((tmp_path / "c" / "config.json").read_text())["model"]
    assert saved["rope_scaling"] == "yarn" and saved["rope_original_context"] == 64 and saved["block_size"] == 128
    ck = load_checkpoint(tmp_path / "c")
    assert torch.equal(ck.model.rope_cos, m.rope_cos)


def test_engine_generates_past_the_trained_context_with_scaling():
    tok = small_tokenizer()
    m = nano_model("nano-llama", vocab_size=tok.vocab_size)
    prompt = tok.encode("The quick brown fox jumps over the lazy dog. " * 8)[:100]
    with pytest.raises(ValueError):
        Engine(m, tok).generate([prompt], SamplingParams(max_new_tokens=4, temperature=0))
    m.set_rope_scaling("linear", 2.0)
    out = Engine(m, tok, prefill_chunk=32).generate([prompt], SamplingParams(max_new_tokens=4, temperature=0))[0]
    with torch.no_grad():  # the chunked prefill + decode agree with one full forward
        ref = m(torch.tensor([prompt]))[0, -1].argmax().item()
    assert out.token_ids[0] == ref


def test_passkey_prompt_length_depth_and_answer():
    tok = small_tokenizer()
    for n in (200, 800):
        ids = passkey_prompt(tok, n, 0.5, 12345)
        assert abs(len(ids) - n) <= len(
            tok.encode("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
        )
    text0 = tok.decode(passkey_prompt(tok, 400, 0.0, 12345))
    text1 = tok.decode(passkey_prompt(tok, 400, 1.0, 12345))
    assert text0.index("The pass key is 12345") == len(TASK)  # depth 0: right after the task line
    assert text1.index("12345") > len(text1) - len(QUESTION) - 60  # depth 1: just before the question
    assert first_number(" 12,345. Remember") == 12345 and first_number("none") is None


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    tok = small_tokenizer()
    m = nano_model("nano-llama", vocab_size=tok.vocab_size, block_size=256)
    path = tmp_path_factory.mktemp("long") / "base"
    save_checkpoint(path, m, {"stage": "base", "model": m.config.to_dict(), "tokenizer": tok.info()}, tok)
    return path


def test_eval_long_cli(llama_ckpt, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(
        [
            "eval-long",
            str(llama_ckpt),
            "--lengths",
            "128",
            "--depths",
            "0",
            "1",
            "--n",
            "1",
            "--json",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    r = res["lengths"]["128"]
    assert r["n"] == 2 and set(r["depths"]) == {"0.0", "1.0"} and 0 <= r["accuracy"] <= 1
    assert res["rope_scaling"] == "none" and res["context"] == 256
    assert len(json.loads(out.read_text())["samples"]) == 2
    # beyond the context: a one-line error naming the flag; with scaling it runs
    assert main(["eval-long", str(llama_ckpt), "--lengths", "400", "--n", "1"]) == 2
    err = capsys.readouterr().err
    assert "--lengths [400]" in err and "--rope-scaling" in err
    rc = main(
        [
            "eval-long",
            str(llama_ckpt),
            "--lengths",
            "400",
            "--depths",
            "0.5",
            "--n",
            "1",
            "--rope-scaling",
            "yarn",
            "--rope-factor",
            "2",
            "--json",
            "--out",
            str(out),
        ]
    )
    assert rc == 0 and json.loads(capsys.readouterr().out)["context"] == 512


def test_kv_cache_estimate_at_32k():
    smol = get_preset("smollm2-135m")
    # 2 (k, v) x 30 layers x 32768 positions x 3 kv heads x 64 dims x 2 bytes
    assert kv_cache_bytes(smol, 1, 32768) == 2 * 30 * 32768 * 3 * 64 * 2 == 754_974_720
    big = get_preset("gpt3-175b")
    assert kv_cache_bytes(big, 1, 32768) == 2 * 96 * 32768 * 12288 * 2


def test_a_length_equal_to_the_context_is_allowed(llama_ckpt, capsys):
    assert main(["eval-long", str(llama_ckpt), "--lengths", "256", "--depths", "0.5", "--n", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["lengths"]["256"]["prompt_tokens"] <= 256 - 8
