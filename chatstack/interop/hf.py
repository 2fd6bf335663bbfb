"""Hugging Face transformers <-> chatstack GPT: weight converters, both families.

    from chatstack.interop.hf import from_hf, to_hf
    gpt = from_hf(GPT2LMHeadModel(...))        # or LlamaForCausalLM; weights copied, logits identical
    hf = to_hf(gpt)                            # GPT family -> GPT2LMHeadModel, Llama family -> LlamaForCausalLM
    chatstack export hf runs/speedrun/sft --out hf_model/    # (chatstack.stages.interop)

What differs between the two codebases, and is undone here:
- GPT-2 stores its linear layers as `Conv1D` with weights (in, out): transposed against nn.Linear.
- GPT-2's `gelu_new` is GELU with the tanh approximation, which chatstack's GELU MLP uses.
- Llama keeps q, k, v (and gate, up) as separate matrices; chatstack fuses them into one matmul
  (`attn.qkv` = [q; k; v] rows, `mlp.fc` = [gate; up] rows).
- HF Llama's q/k weights are laid out for `rotate_half` RoPE (first half / second half of each head),
  which chatstack's RoPE uses too: no permutation needed (GGUF is different: see interop/gguf.py).
- Grouped-query attention maps to `num_key_value_heads`; tied/untied output to `tie_word_embeddings`.

transformers 5.x quirks handled here (checked on 5.24): the RoPE base lives in `config.rope_parameters`
({"rope_type", "rope_theta"}) rather than `rope_theta` (both are read); LlamaConfig defaults to an untied
output; the KV-cache argument of `forward` is being renamed from `past_key_values` to `cache` (the tests
use whichever the installed version takes).
"""

from __future__ import annotations

import torch

from chatstack.model import GPT, GPTConfig


class ConversionError(ValueError):
    """The source model uses a feature the target architecture cannot express; the message names it."""


# ---------------------------------------------------------------------------------------------- configs


def _family(cfg: GPTConfig) -> str:
    if (
        cfg.pos == "learned"
        and cfg.norm == "layernorm"
        and cfg.mlp == "gelu"
        and cfg.bias
        and cfg.n_kv_head == cfg.n_head
    ):
        return "gpt2"
    if cfg.pos == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu":
        return "llama"
    raise ConversionError(
        f"no Hugging Face architecture for this mix (pos={cfg.pos}, norm={cfg.norm}, mlp={cfg.mlp}, bias={cfg.bias}, "
        f"n_kv_head={cfg.n_kv_head}/{cfg.n_head}): GPT2LMHeadModel needs learned/layernorm/gelu/bias/MHA, "
        "LlamaForCausalLM needs rope/rmsnorm/swiglu"
    )


def hf_config(cfg: GPTConfig):
    """The transformers config (GPT2Config or LlamaConfig) equivalent to a chatstack GPTConfig."""
    from transformers import GPT2Config, LlamaConfig  # noqa: PLC0415 (transformers: heavy, optional)

    if _family(cfg) == "gpt2":
        return GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.block_size,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_inner=cfg.ffn_hidden,
            activation_function="gelu_new",
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            layer_norm_epsilon=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings,
            bos_token_id=None,
            eos_token_id=None,
        )
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_base)},
        attention_bias=cfg.bias,
        mlp_bias=cfg.bias,
        hidden_act="silu",
        attention_dropout=cfg.dropout,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def _rope_theta(hc) -> float:
    rp = getattr(hc, "rope_parameters", None) or getattr(hc, "rope_scaling", None) or {}
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type != "default":
        raise ConversionError(f"{hc.model_type}: rope_type {rope_type!r} (scaled RoPE) is not supported")
    theta = rp.get("rope_theta", getattr(hc, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def config_from_hf(hc) -> GPTConfig:
    """GPTConfig from a transformers GPT2Config / LlamaConfig (a model's `.config`)."""
    mt = hc.model_type
    if mt == "gpt2":
        if hc.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConversionError(
                f"gpt2: activation_function {hc.activation_function!r}; "
                "chatstack's GELU is the tanh approximation (gelu_new)"
            )
        if getattr(hc, "scale_attn_by_inverse_layer_idx", False) or not getattr(hc, "scale_attn_weights", True):
            raise ConversionError("gpt2: non-standard attention scaling is not supported")
        return GPTConfig(
            vocab_size=hc.vocab_size,
            block_size=hc.n_positions,
            n_layer=hc.n_layer,
            n_head=hc.n_head,
            n_embd=hc.n_embd,
            ffn_hidden=hc.n_inner or 4 * hc.n_embd,
            pos="learned",
            norm="layernorm",
            norm_eps=hc.layer_norm_epsilon,
            mlp="gelu",
            bias=True,
            tie_embeddings=bool(hc.tie_word_embeddings),
        )
    if mt == "llama":
        if hc.hidden_act != "silu":
            raise ConversionError(f"llama: hidden_act {hc.hidden_act!r}; chatstack's SwiGLU uses silu")
        head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads
        if head_dim * hc.num_attention_heads != hc.hidden_size:
            raise ConversionError(
                f"llama: head_dim {head_dim} x {hc.num_attention_heads} heads != hidden_size "
                f"{hc.hidden_size}; chatstack needs n_embd = n_head * head_dim"
            )
        if bool(hc.attention_bias) != bool(getattr(hc, "mlp_bias", False)):
            raise ConversionError("llama: attention_bias and mlp_bias differ; chatstack has one `bias` switch")
        return GPTConfig(
            vocab_size=hc.vocab_size,
            block_size=hc.max_position_embeddings,
            n_layer=hc.num_hidden_layers,
            n_head=hc.num_attention_heads,
            n_kv_head=hc.num_key_value_heads or hc.num_attention_heads,
            n_embd=hc.hidden_size,
            ffn_hidden=hc.intermediate_size,
            pos="rope",
            rope_base=_rope_theta(hc),
            norm="rmsnorm",
            norm_eps=hc.rms_norm_eps,
            mlp="swiglu",
            bias=bool(hc.attention_bias),
            tie_embeddings=bool(hc.tie_word_embeddings),
        )
    raise ConversionError(f"model_type {mt!r}: only gpt2 and llama are supported")


# ---------------------------------------------------------------------------------------------- weights


def _gpt2_pairs(cfg: GPTConfig):
    """(chatstack name, HF name, transpose) for every GPT-2 weight."""
    pairs = [
        ("tok_emb.weight", "transformer.wte.weight", False),
        ("pos_emb.weight", "transformer.wpe.weight", False),
        ("norm_f.weight", "transformer.ln_f.weight", False),
        ("norm_f.bias", "transformer.ln_f.bias", False),
    ]
    for i in range(cfg.n_layer):
        c, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in [("norm1", "ln_1"), ("norm2", "ln_2")]:
            pairs += [
                (c + ours + ".weight", h + theirs + ".weight", False),
                (c + ours + ".bias", h + theirs + ".bias", False),
            ]
        for ours, theirs in [
            ("attn.qkv", "attn.c_attn"),
            ("attn.proj", "attn.c_proj"),
            ("mlp.fc", "mlp.c_fc"),
            ("mlp.proj", "mlp.c_proj"),
        ]:
            pairs += [
                (c + ours + ".weight", h + theirs + ".weight", True),  # Conv1D: (in, out)
                (c + ours + ".bias", h + theirs + ".bias", False),
            ]
    if not cfg.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight", False))
    return pairs


def _llama_to_ours(hsd: dict, cfg: GPTConfig) -> dict:
    sd = {"tok_emb.weight": hsd["model.embed_tokens.weight"], "norm_f.weight": hsd["model.norm.weight"]}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = hsd["lm_head.weight"]
    kinds = ["weight", "bias"] if cfg.bias else ["weight"]
    for i in range(cfg.n_layer):
        c, h = f"blocks.{i}.", f"model.layers.{i}."
        sd[c + "norm1.weight"] = hsd[h + "input_layernorm.weight"]
        sd[c + "norm2.weight"] = hsd[h + "post_attention_layernorm.weight"]
        for k in kinds:
            # fused rows: qkv = [q; k; v], fc = [gate; up] (the order chatstack's forward splits in)
            sd[c + f"attn.qkv.{k}"] = torch.cat([hsd[h + f"self_attn.{p}_proj.{k}"] for p in "qkv"], dim=0)
            sd[c + f"attn.proj.{k}"] = hsd[h + f"self_attn.o_proj.{k}"]
            sd[c + f"mlp.fc.{k}"] = torch.cat([hsd[h + f"mlp.{p}_proj.{k}"] for p in ("gate", "up")], dim=0)
            sd[c + f"mlp.proj.{k}"] = hsd[h + f"mlp.down_proj.{k}"]
    return sd


def _ours_to_llama(sd: dict, cfg: GPTConfig) -> dict:
    hd, nq, nkv, f = cfg.head_dim, cfg.n_head, cfg.n_kv_head, cfg.ffn_hidden
    hsd = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm_f.weight"]}
    hsd["lm_head.weight"] = sd["tok_emb.weight"] if cfg.tie_embeddings else sd["lm_head.weight"]
    kinds = ["weight", "bias"] if cfg.bias else ["weight"]
    for i in range(cfg.n_layer):
        c, h = f"blocks.{i}.", f"model.layers.{i}."
        hsd[h + "input_layernorm.weight"] = sd[c + "norm1.weight"]
        hsd[h + "post_attention_layernorm.weight"] = sd[c + "norm2.weight"]
        for k in kinds:
            q, kk, v = sd[c + f"attn.qkv.{k}"].split([nq * hd, nkv * hd, nkv * hd], dim=0)
            hsd[h + f"self_attn.q_proj.{k}"], hsd[h + f"self_attn.k_proj.{k}"], hsd[h + f"self_attn.v_proj.{k}"] = (
                q,
                kk,
                v,
            )
            hsd[h + f"self_attn.o_proj.{k}"] = sd[c + f"attn.proj.{k}"]
            gate, up = sd[c + f"mlp.fc.{k}"].split([f, f], dim=0)
            hsd[h + f"mlp.gate_proj.{k}"], hsd[h + f"mlp.up_proj.{k}"] = gate, up
            hsd[h + f"mlp.down_proj.{k}"] = sd[c + f"mlp.proj.{k}"]
    return hsd


def _load_exact(module: torch.nn.Module, sd: dict, what: str) -> None:
    """Copy `sd` into `module`, requiring every parameter to be covered (buffers aside) and shapes to match."""
    params = dict(module.named_parameters(remove_duplicate=False))
    missing = [n for n in params if n not in sd and not _is_tied_alias(module, n)]
    unexpected = [n for n in sd if n not in params]
    if missing or unexpected:
        raise ConversionError(f"{what}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for n, t in sd.items():
            p = params[n]
            if p.shape != t.shape:
                raise ConversionError(f"{what}: {n} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))


def _is_tied_alias(module, name: str) -> bool:
    return name.endswith("lm_head.weight") and getattr(
        getattr(module, "config", None),
        "tie_word_embeddings",
        getattr(getattr(module, "config", None), "tie_embeddings", False),
    )


def from_hf(hf_model) -> GPT:
    """A chatstack GPT holding the weights of a transformers GPT2LMHeadModel or LlamaForCausalLM (fp32)."""
    cfg = config_from_hf(hf_model.config)
    hsd = {k: v.detach().float().cpu() for k, v in hf_model.state_dict().items()}
    if cfg.tie_embeddings:
        emb = "transformer.wte.weight" if cfg.pos == "learned" else "model.embed_tokens.weight"
        if "lm_head.weight" in hsd and not torch.equal(hsd["lm_head.weight"], hsd[emb]):
            raise ConversionError("tie_word_embeddings is set but lm_head.weight differs from the embedding")
    if hf_model.config.model_type == "gpt2":
        sd = {ours: (hsd[theirs].t() if tr else hsd[theirs]) for ours, theirs, tr in _gpt2_pairs(cfg)}
    else:
        sd = _llama_to_ours(hsd, cfg)
    model = GPT(cfg)
    _load_exact(model, {k: v.contiguous() for k, v in sd.items()}, "from_hf")
    return model.eval()


def to_hf(model: GPT):
    """A transformers GPT2LMHeadModel (GPT family) or LlamaForCausalLM (Llama family) with `model`'s weights."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM  # noqa: PLC0415 (transformers: heavy, optional)

    cfg = model.config
    hc = hf_config(cfg)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if hc.model_type == "gpt2":
        hf = GPT2LMHeadModel(hc)
        hsd = {theirs: (sd[ours].t() if tr else sd[ours]) for ours, theirs, tr in _gpt2_pairs(cfg)}
    else:
        hf = LlamaForCausalLM(hc)
        hsd = _ours_to_llama(sd, cfg)
        if cfg.tie_embeddings:
            del hsd["lm_head.weight"]
    _load_exact(hf, {k: v.contiguous() for k, v in hsd.items()}, "to_hf")
    if cfg.tie_embeddings:
        hf.tie_weights()
    return hf.eval()
