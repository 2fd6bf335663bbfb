"""The KV cache: keys and values of every layer for the engine's running rows, one slot per row.

    cache = KVCache(model.config, device, dtype, max_slots=B)
    cache.resize(B, length); cache.prefill(0, B); model(ids, cache=cache)        # fills slots 0..B-1
    cache.decode(B, write_pos, S); model(next_ids, positions=..., cache=cache)   # one token per row

The model only calls `update(layer, k, v)` (which returns the keys/values to attend over) and reads `.pos`;
the engine (chatstack/infer/engine.py) says beforehand where the next forward writes.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from chatstack.infer.cpu import zeros_unpooled
from chatstack.model import GPTConfig

KV_BLOCK = 64  # cache lengths are whole blocks of positions: grown as tokens are produced, trimmed as rows leave


def round_up(n: int, block: int = KV_BLOCK) -> int:
    return -(-n // block) * block


class KVCache:
    """KV cache with one slot per running row and per-row lengths, sized to what the running rows hold.

    kv: a list with one tensor per layer, (2, slots, n_kv_head, length, head_dim): keys kv[l][0], values kv[l][1]
    (both in one tensor, so a decode step with per-row positions writes both with one index_copy_ per layer). The
    running batch is always slots 0..B-1, so the keys a decode step attends over are a view `kv[l][0, :B, :, :S]`.
    The model calls `update(layer, k, v)` and reads `.pos`; the engine says beforehand where this forward writes
    (`prefill` or `decode`).

    Memory: `resize(slots, length)` re-allocates to exactly that many slots and positions (the engine asks for
    whole KV_BLOCKs, within its budget: Engine._fit), copying what the smaller of the two shapes holds, one layer
    at a time (so a resize needs only one extra layer's worth of memory), and `free()` drops everything. One tensor
    per layer rather than one for all: a 30-layer model grows with 1/30 of the cache as headroom. On a CPU each
    layer's tensor has pages of its own (chatstack.infer.cpu.zeros_unpooled): resident only once written, returned
    to the OS when dropped.
    """

    def __init__(self, cfg: GPTConfig, device: torch.device, dtype: torch.dtype, max_slots: int) -> None:
        self.max_slots = max_slots
        self.n_layer, self.n_kv, self.hd = cfg.n_layer, cfg.n_kv_head, cfg.head_dim
        self.max_len = cfg.block_size
        self.device, self.dtype = device, dtype
        self.bytes_per_position = self.n_layer * 2 * self.n_kv * self.hd * torch.empty((), dtype=dtype).element_size()
        self.kv: Optional[list[torch.Tensor]] = None
        self.slots = self.length = 0
        self.pos = 0  # read by the model only when it builds default positions/masks (prefill: 0)
        self._mode = None
        self._base_key = self._base = None  # decode(): flat offsets of (k|v, slot, head) rows, per batch shape

    @property
    def nbytes(self) -> int:
        return self.slots * self.length * self.bytes_per_position

    def bytes_for(self, slots: int, length: int) -> int:
        return slots * length * self.bytes_per_position

    def resize(self, slots: int, length: int) -> None:
        """Exactly `slots` x `length` positions; the first min(old, new) of each survive."""
        if (slots, length) == (self.slots, self.length):
            return
        if slots == 0 or length == 0:
            return self.free()
        old = self.kv or [None] * self.n_layer
        cs, cl = min(slots, self.slots), min(length, self.length)
        new = []
        for layer in range(self.n_layer):
            t = self._zeros((2, slots, self.n_kv, length, self.hd))
            if old[layer] is not None and cs and cl:
                t[:, :cs, :, :cl] = old[layer][:, :cs, :, :cl]
            old[layer] = None  # this layer's old tensor goes before the next one is made
            new.append(t)
        self.kv, self.slots, self.length = new, slots, length

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        if torch.device(self.device).type == "cpu":  # pages of its own: resident when written, returned when freed
            return zeros_unpooled(shape, self.dtype)
        return torch.zeros(shape, device=self.device, dtype=self.dtype)

    def reserve(self, slots: int, length: int) -> None:
        """At least `slots` x `length` (whole blocks, doubling): for a cache without a budget (staging)."""
        if slots <= self.slots and length <= self.length:
            return
        self.resize(max(slots, self.slots), min(self.max_len, max(round_up(length), self.length)))

    def free(self) -> None:
        self.kv, self.slots, self.length = None, 0, 0
        self._base_key = self._base = None

    def prefill(self, first_slot: int, B: int, start: int = 0) -> None:
        """Next forward: B prompts (right-padded to T) written to slots first_slot.., positions start..start+T-1
        (start > 0: a chunk after a prefix of `start` positions already in each of the B slots)."""
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
        kvl = self.kv[layer]  # (2, slots, Hkv, length, hd)
        if mode[0] == "prefill":
            _, s0, B, start = mode
            T = k.size(2)
            kvl[0, s0 : s0 + B, :, start : start + T] = k  # (B, Hkv, T, hd)
            kvl[1, s0 : s0 + B, :, start : start + T] = v
            if start:  # the chunk attends over the cached prefix too
                return kvl[0, s0 : s0 + B, :, : start + T], kvl[1, s0 : s0 + B, :, : start + T]
            return k, v
        _, B, wp, S = mode
        if isinstance(wp, int):
            kvl[0, :B, :, wp : wp + 1] = k
            kvl[1, :B, :, wp : wp + 1] = v
        else:
            # (2, B, Hkv, 1, hd) -> (2*B*Hkv, hd), rows in the order of wp
            kvl.view(-1, self.hd).index_copy_(0, wp, torch.stack([k, v]).view(-1, self.hd))
        return kvl[0, :B, :, :S], kvl[1, :B, :, :S]  # (B, Hkv, S, hd) views

    def advance(self, T: int) -> None:
        pass  # lengths are per row; the engine tracks them

    def move(self, src: int, dst: int, n: int) -> None:
        """Copy the first n positions of slot src into slot dst (compaction after a row leaves)."""
        for kvl in self.kv:
            kvl[:, dst, :, :n] = kvl[:, src, :, :n]

    def read(self, slot: int, n: int) -> torch.Tensor:
        """A copy of the first n positions of a slot: (n_layer, 2, Hkv, n, hd)."""
        out = self._zeros((self.n_layer, 2, self.n_kv, n, self.hd))
        for layer, kvl in enumerate(self.kv):
            out[layer] = kvl[:, slot, :, :n]
        return out

    def write(self, slot: int, kv: torch.Tensor | list[torch.Tensor], n: int) -> None:
        """Put the first n positions of `kv` (as `read` returns it, or a list of per-layer (2, Hkv, >=n, hd))
        into a slot."""
        for kvl, src in zip(self.kv, kv):
            kvl[:, slot, :, :n] = src[:, :, :n]
