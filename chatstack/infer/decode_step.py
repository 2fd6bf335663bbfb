"""The engine's decode forward: one new token for each running row, through a chatstack GPT, as plain tensor ops.

`GPT.hidden_states` (chatstack.model) is the reference forward: training, prefill, evals. A decode step runs the
same operations, in the same order and on the same weights, for one position per row, but without nn.Module
calls, dropout modules, 3-D reshapes or the cache object's generic `update`. At one row on a small model that
Python overhead costs more than the arithmetic (benchmarks/decode.py and
benchmarks/decode_breakdown.py measure it; docs/benchmarks.md has the numbers).

The logits are the same as `model.lm_head(model.hidden_states(...))` bit for bit on CPU: the same kernels see the
same values. tests/test_engine.py pins the engine (which uses this for every decode step of a GPT) to full forward
passes: greedy tokens and log-probabilities, both model families, GQA, rows of different lengths, int8 weights.

Models that are not a chatstack GPT (test doubles, wrappers) have no `DecodeStep`: the engine calls their
`hidden_states` instead (`DecodeStep.for_model` returns None).

    from chatstack.infer.decode_step import DecodeStep
    step = DecodeStep.for_model(model)
    logits = step(idx, positions, kv, write, S, mask)     # (B, V); the engine supplies the cache arguments
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from chatstack.kernels import gelu_tanh
from chatstack.model import GPT, apply_rope, decode_attention


def _linear(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What chatstack.model.Linear.forward computes, without the Module call: the bound fast_weight (an (in, out)
    copy's transposed view, an Int8Weight or a CPUWeight) when the engine bound one, else the Linear's own forward."""
    w = m.__dict__.get("fast_weight")
    if w is None:
        return m.forward(x)
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, m._parameters["bias"])
    return w.linear(x, m._parameters["bias"])


class DecodeStep:
    """Callable decode forward for one GPT. Holds the model's layer modules (found once); weights are read from
    them at every call, so in-place updates, new storage and the engine's bound copies are always seen."""

    def __init__(self, model: GPT) -> None:
        cfg = model.config
        self.model = model
        self.H, self.Hkv, self.hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.rope = cfg.pos == "rope"
        self.gelu = cfg.mlp == "gelu"
        self.layernorm = cfg.norm == "layernorm"
        # per layer: (norm1, qkv, proj, norm2, fc, mlp proj); through _modules, once (Module.__getattr__ is slow)
        self.layers = []
        for b in model.blocks:
            a, m = b._modules["attn"], b._modules["mlp"]
            self.layers.append(
                (
                    b._modules["norm1"],
                    a._modules["qkv"],
                    a._modules["proj"],
                    b._modules["norm2"],
                    m._modules["fc"],
                    m._modules["proj"],
                )
            )
        self.norm_f, self.lm_head = model._modules["norm_f"], model._modules["lm_head"]

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> Optional[DecodeStep]:
        """A DecodeStep for a chatstack GPT; None for anything else (the engine then uses model.hidden_states)."""
        return cls(model) if isinstance(model, GPT) else None

    def _norm(self, m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        p = m._parameters
        if self.layernorm:
            return F.layer_norm(x, m.normalized_shape, p["weight"], p.get("bias"), m.eps)
        return F.rms_norm(x, m.normalized_shape, p["weight"], m.eps)

    def __call__(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor,
        kv: torch.Tensor,
        write: Union[int, torch.Tensor],
        S: int,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Next-token logits (B, V).

        idx: (B,) the token each row feeds. positions: (B, 1) each row's position, or (1, 1) when all agree.
        kv: the engine's cache, (n_layer, 2, slots, Hkv, length, hd); rows are slots 0..B-1. write: the position
        every row writes its key/value at (an int), or, for rows of different lengths, the flat row index of
        each (k|v, row, head) in a layer's kv viewed as (-1, hd) (KVCache.decode makes it). S: keys to attend
        over (the longest row's, this token included). mask: None when every row has S valid keys, else an
        additive (B, H|1, 1, S) mask (0 or -inf).
        """
        model, H, Hkv, hd = self.model, self.H, self.Hkv, self.hd
        B = idx.size(0)
        mp = model._modules
        x = F.embedding(idx, mp["tok_emb"]._parameters["weight"])  # (B, h)
        cos = sin = None
        if self.rope:
            cos, sin = model.rope_cos[positions].unsqueeze(1), model.rope_sin[positions].unsqueeze(1)  # (B|1, 1, 1, hd)
        else:
            x = x + F.embedding(positions.view(-1), mp["pos_emb"]._parameters["weight"])  # (B|1, h) broadcast
        per_row = not isinstance(write, int)
        qd, kd = H * hd, Hkv * hd
        for layer, (n1, qkv_m, proj_m, n2, fc_m, mproj_m) in enumerate(self.layers):
            qkv = _linear(qkv_m, self._norm(n1, x))  # (B, qd + 2 kd)
            q = qkv[:, :qd].view(B, H, 1, hd)
            kvl = kv[layer]  # (2, slots, Hkv, L, hd)
            if self.rope:
                q = apply_rope(q, cos, sin)
                k = apply_rope(qkv[:, qd : qd + kd].view(B, Hkv, 1, hd), cos, sin)
                new = torch.stack([k.view(B, Hkv, hd), qkv[:, qd + kd :].view(B, Hkv, hd)])  # (2, B, Hkv, hd)
            else:
                new = qkv[:, qd:].view(B, 2, Hkv, hd).transpose(0, 1)  # (2, B, Hkv, hd) view
            if per_row:
                kvl.view(-1, hd).index_copy_(0, write, new.reshape(-1, hd))  # each row at its own position
            else:
                kvl[:, :B, :, write] = new
            k, v = kvl[0, :B, :, :S], kvl[1, :B, :, :S]  # (B, Hkv, S, hd) views
            y = decode_attention(q, k, v, mask)  # (B, H*hd)
            x = x + _linear(proj_m, y)
            u = _linear(fc_m, self._norm(n2, x))
            if self.gelu:
                u = gelu_tanh(u)
            else:
                gate, up = u.chunk(2, dim=-1)
                u = F.silu(gate) * up
            x = x + _linear(mproj_m, u)
        return _linear(self.lm_head, self._norm(self.norm_f, x))  # (B, V)
