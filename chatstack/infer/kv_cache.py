"""The KV cache: keys and values of every layer for the engine's running rows, one slot per row.

    cache = KVCache(model.config, device, dtype, max_slots=B)
    cache.reserve(B, length); cache.prefill(0, B); model(ids, cache=cache)       # fills slots 0..B-1
    cache.decode(B, write_pos, S); model(next_ids, positions=..., cache=cache)   # one token per row

The model only calls `update(layer, k, v)` (which returns the keys/values to attend over) and reads `.pos`;
the engine (chatstack/infer/engine.py) says beforehand where the next forward writes.
"""

from __future__ import annotations

from typing import Union

import torch

from chatstack.model import GPTConfig


class KVCache:
    """KV cache with one slot per running row and per-row lengths.

    kv: (n_layer, 2, slots, n_kv_head, length, head_dim); k = kv[:, 0] and v = kv[:, 1] (keys and values in
    one tensor, so a decode step with per-row positions writes both with one index_copy_ per layer). The
    running batch is always slots 0..B-1, so the keys a decode step attends over are a view
    `k[layer, :B, :, :S]`. The model calls `update(layer, k, v)` and reads `.pos`; the engine says beforehand where this forward writes (`prefill` or `decode`).
    Capacity grows on demand (doubling), so a short request doesn't allocate the whole context.
    """

    def __init__(self, cfg: GPTConfig, device: torch.device, dtype: torch.dtype, max_slots: int) -> None:
        self.max_slots = max_slots
        self.n_layer, self.n_kv, self.hd = cfg.n_layer, cfg.n_kv_head, cfg.head_dim
        self.max_len = cfg.block_size
        self.device, self.dtype = device, dtype
        self.kv = self.k = self.v = None
        self.slots = self.length = 0
        self.pos = 0  # read by the model only when it builds default positions/masks (prefill: 0)
        self._mode = None
        self._base_key = self._base = None  # decode(): flat offsets of (k|v, slot, head) rows, per batch shape

    def reserve(self, slots: int, length: int) -> None:
        if slots <= self.slots and length <= self.length:
            return
        new_slots = max(slots, min(2 * self.slots, self.max_slots))
        new_len = min(self.max_len, max(length, 2 * self.length))
        kv = torch.zeros(
            (self.n_layer, 2, new_slots, self.n_kv, new_len, self.hd), device=self.device, dtype=self.dtype
        )
        if self.kv is not None:
            kv[:, :, : self.slots, :, : self.length] = self.kv
        self.kv, self.k, self.v, self.slots, self.length = kv, kv[:, 0], kv[:, 1], new_slots, new_len

    def prefill(self, first_slot: int, B: int, start: int = 0) -> None:
        """Next forward: B prompts (right-padded to T) written to slots first_slot.., positions start..start+T-1
        (start > 0: a chunk after a prefix already in the slot; B must then be 1)."""
        self._mode = ("prefill", first_slot, B, start)
        self.pos = start

    def decode(self, B: int, write_pos: Union[int, torch.Tensor], S: int) -> Union[int, torch.Tensor]:
        """Next forward: one token for rows 0..B-1, written at write_pos (an int when all rows agree, else (B,)).
        Returns where the keys/values go: the int, or each (k|v, row, head)'s flat row index in a layer's kv
        viewed as (-1, head_dim) (what chatstack.infer.decode_step takes)."""
        if not isinstance(write_pos, int):
            # flat row index of (k|v, slot b, head h, position p) in a layer viewed as (2*slots*Hkv*length, hd):
            # one index_copy_ per layer writes every row's new key and value at its own position
            if self._base_key != (B, self.slots, self.length, write_pos.device):  # same for a whole batch
                heads = torch.arange(B * self.n_kv, device=write_pos.device).view(1, B, self.n_kv)  # b*Hkv + h
                kv_off = torch.tensor([0, self.slots * self.n_kv], device=write_pos.device).view(2, 1, 1)
                self._base = (heads + kv_off) * self.length  # (2, B, Hkv)
                self._base_key = (B, self.slots, self.length, write_pos.device)
            write_pos = (self._base + write_pos[:, None]).view(-1)  # (2*B*Hkv,)
        self._mode = ("decode", B, write_pos, S)
        self.pos = S - 1
        return write_pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mode = self._mode
        if mode[0] == "prefill":
            _, s0, B, start = mode
            T = k.size(2)
            self.k[layer, s0 : s0 + B, :, start : start + T] = k  # (B, Hkv, T, hd)
            self.v[layer, s0 : s0 + B, :, start : start + T] = v
            if start:  # the chunk attends over the cached prefix too
                return self.k[layer, s0 : s0 + B, :, : start + T], self.v[layer, s0 : s0 + B, :, : start + T]
            return k, v
        _, B, wp, S = mode
        if isinstance(wp, int):
            self.k[layer, :B, :, wp : wp + 1] = k
            self.v[layer, :B, :, wp : wp + 1] = v
        else:
            # (2, B, Hkv, 1, hd) -> (2*B*Hkv, hd), rows in the order of wp
            self.kv[layer].view(-1, self.hd).index_copy_(0, wp, torch.stack([k, v]).view(-1, self.hd))
        return self.k[layer, :B, :, :S], self.v[layer, :B, :, :S]  # (B, Hkv, S, hd) views

    def advance(self, T: int) -> None:
        pass  # lengths are per row; the engine tracks them

    def move(self, src: int, dst: int, n: int) -> None:
        """Copy the first n positions of slot src into slot dst (compaction after a row leaves)."""
        self.kv[:, :, dst, :, :n] = self.kv[:, :, src, :, :n]

    def read(self, slot: int, n: int) -> torch.Tensor:
        """A copy of the first n positions of a slot: (n_layer, 2, Hkv, n, hd)."""
        return self.kv[:, :, slot, :, :n].clone()

    def write(self, slot: int, kv: torch.Tensor, n: int) -> None:
        """Put the first n positions of `kv` (as `read` returns it) into a slot."""
        self.kv[:, :, slot, :, :n] = kv[:, :, :, :n]
