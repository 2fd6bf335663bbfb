"""Prefix caching: keep finished requests' KV caches so that a new request starting with the same tokens skips
prefilling them. A multi-turn chat resends its whole history every turn (the terminal chat, and clients of
the HTTP API); with this, only the new turn is prefilled.

    engine = Engine(model, tok, prefix_cache_mb=256)       # chatstack chat / serve turn it on (--prefix-cache-mb)
    engine.prefix_cache.hits, engine.prefix_cache.tokens_reused

How: when a row finishes, the keys/values of every token it fed (its prompt and all but its last generated
token) are copied out of its slot into a store keyed by those token ids. When a request is admitted, the
entry sharing the longest prefix with its prompt (at least MIN_PREFIX tokens, and never the whole prompt: the
last prompt token must run to give the first logits) is copied into the new row's slot and only the rest of
the prompt is prefilled, as a chunk after the cached prefix. Keys and values depend only on the tokens before
them, so the result equals a full prefill (tested: same greedy tokens, log-probabilities within 1e-4). With
int8 decoding (chatstack.infer.quantize) the reused keys/values of generated tokens are the int8 steps' own, as in
the request that made them, where a full prefill would recompute them in fp32.
Entries are evicted least recently used first, to stay under the memory budget; an entry that is a prefix of
a newly stored one is dropped (the new one serves both).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Optional

import torch

MIN_PREFIX = 16  # shorter matches are prefilled with the batch (one row at a time would cost more than it saves)


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.entries: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()  # ids -> (n_layer, 2, Hkv, L, hd)
        self.bytes = 0
        self.hits = 0
        self.tokens_reused = 0
        self.weights = None  # what the entries were computed with (the engine's signature of the weights)

    def check_weights(self, signature: object) -> None:
        """Forget every entry if the weights changed since they were stored (PPO samples from a model it trains)."""
        if signature != self.weights:
            self.clear()
            self.weights = signature

    def add(self, ids: list[int], kv: torch.Tensor) -> None:
        """Store the keys/values `kv` (n_layer, 2, Hkv, len(ids), hd; a copy the store owns) of tokens `ids`."""
        size = kv.numel() * kv.element_size()
        if len(ids) < MIN_PREFIX or size > self.max_bytes:
            return
        key = tuple(ids)
        for old in [k for k in self.entries if len(k) <= len(key) and key[: len(k)] == k]:
            self._drop(old)  # the new entry covers it (or is it: refresh)
        self.entries[key] = kv
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self.entries)))

    def lookup(self, prompt: list[int]) -> tuple[int, Optional[torch.Tensor]]:
        """(n, kv): the longest stored prefix of `prompt` usable for it, n tokens (0 = none, kv None)."""
        best, best_key = 0, None
        prompt_t = tuple(prompt)
        for key in self.entries:
            n = len(os.path.commonprefix([key, prompt_t]))
            if n > best:
                best, best_key = n, key
        n = min(best, len(prompt) - 1)
        if n < MIN_PREFIX:
            return 0, None
        self.entries.move_to_end(best_key)  # recently used
        self.hits += 1
        self.tokens_reused += n
        return n, self.entries[best_key]

    def shrink_to(self, max_bytes: int) -> None:
        """Evict least recently used entries until the store takes at most max_bytes (what the engine's KV budget
        leaves it)."""
        while self.entries and self.bytes > max(0, max_bytes):
            self._drop(next(iter(self.entries)))

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def _drop(self, key: tuple[int, ...]) -> None:
        kv = self.entries.pop(key)
        self.bytes -= kv.numel() * kv.element_size()
