"""The inference engine: one generator for the chat CLI, the HTTP server, PPO rollouts and the evals.

How it works
  * Prefill: a new request's whole prompt goes through the model once, filling its KV-cache slot; the
    logits at its last prompt token give the first new token.
  * Decode: every step feeds each running row its latest token (one position per row) and attends over
    that row's cached keys/values only, so each step costs one small forward for the whole batch. For a
    chatstack GPT that forward is chatstack.infer.decode_step (the model's ops without nn.Module calls, same logits).
  * Continuous batching: rows live in slots 0..n-1 of a `KVCache` (chatstack.infer.kv_cache); each row keeps its own length. Rows
    of different prompt lengths decode together (per-row positions + a key mask); a finished or cancelled
    row frees its slot at once (the last row moves into the hole, so the batch stays a contiguous view
    of the cache and no gather is needed) and a waiting request joins at the next `step()`.
  * Chunked prefill (optional, `prefill_chunk`): a prompt longer than the chunk is prefilled a chunk per
    step, in a staging cache of its own, between the running rows' decode steps; when done it takes a slot.
    Identical prompts admitted together (n > 1 choices) are prefilled once and their keys/values copied.
  * Prefix caching (optional, `prefix_cache_mb`): finished rows' keys/values are kept, and a new request
    that starts with the same tokens copies them into its slot and prefills only the rest
    (chatstack.infer.prefix_cache).
  * Sampling per row (greedy / temperature / top-k / top-p, see chatstack.infer.sampling); a request's seed fixes
    its random draws, whatever else is in the batch.
  * Detokenisation is incremental and UTF-8 safe: token bytes go through an incremental UTF-8 decoder, so
    a multi-byte character split over tokens is emitted once complete, never half. Stop strings are
    searched in the decoded text; text that might be the start of a stop string is held back until it
    can't be.

  * KV memory (`kv_cache_mb`): the cache (chatstack.infer.kv_cache) holds what the running rows need, in blocks of
    KV_BLOCK positions, grown as tokens come and shrunk as rows leave, within one budget shared with staged prompts
    and the prefix cache. A pending request is admitted when the budget holds it; when the running rows outgrow
    it, the latest admitted are preempted and recomputed later (same tokens).

Context length: a prompt must leave room for at least one new token (len(prompt) < block_size, and below the
longest row the KV budget holds, max_row_len), else ValueError. A row stops with finish_reason "length" when
prompt + generated tokens reach max_row_len (block_size unless the budget is smaller) or max_new_tokens, so the
model never reads a position past its context.

Outputs: `Completion.token_ids` holds every generated token, including a final stop token (the model did
produce it; PPO trains on it, and servers count it), but `text` never contains the stop token's or the
stop string's text. `logprobs` are log-probabilities of the chosen tokens under the model's raw
distribution (log-softmax of the logits, before temperature / top-k / top-p; with `scaled_logprobs`, of
logits / temperature: the distribution the row samples from, what RL rollouts need); `top_logprobs` the top-N
alternatives of that same distribution, most likely first.

    from chatstack.infer.engine import Engine, SamplingParams
    engine = Engine(model, tokenizer)
    out = engine.generate([tokenizer.encode("Once upon a time")], SamplingParams(max_new_tokens=50, temperature=0))
    for ev in engine.stream(ids, SamplingParams(temperature=0.8, seed=1)): print(ev.text, end="", flush=True)

Lower-precision weights (CPU, chatstack.infer.quantize): `Engine(..., quantize="int8")` runs decode steps with int8
copies of the weights (prefill keeps fp32), faster at one or two rows; `quantize="bf16"` runs every product, prefill
and decode, on bf16 copies, faster from a few rows up (a server's batches).

The engine is not thread-safe: one scheduler (the server's, or generate/stream here) drives `step()`.
"""

from __future__ import annotations

import codecs
import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from tqdm import tqdm

from chatstack.infer.cpu import (
    THREAD_POLICY_INTERVAL_S,
    CPUWeight,
    apply_thread_policy,
    available_memory_bytes,
    cpu_matmul_backend,
    release_free_memory,
)
from chatstack.infer.decode_step import DecodeStep
from chatstack.infer.kv_cache import KV_BLOCK, KVCache, round_up
from chatstack.infer.prefix_cache import PrefixCache
from chatstack.infer.quantize import BF16Weight, Int8Weight, check_quantize, int8_supported
from chatstack.infer.sampling import greedy, sample
from chatstack.model import GPTConfig, Linear
from chatstack.tokenizer import Tokenizer

# Optimizer steps taken anywhere in this process. Fused optimizers (AdamW(fused=True)) update weights
# without bumping their version counters, so this count is how an engine learns that its (in, out) weight
# copies may be stale (PPO samples from the model it trains). A global post-step hook sees every
# torch.optim optimizer, fused or not.
_optimizer_steps = 0


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the returned text)
    stop_token_ids: Optional[list[int]] = None  # None = the tokenizer's <|endoftext|> and <|im_end|>
    seed: Optional[int] = None  # per-request generator: same seed -> same output
    logprobs: bool = False  # per-token log-probability of the chosen token
    top_logprobs: int = 0  # also the top-N alternatives per position
    scaled_logprobs: bool = False  # log-probs of softmax(logits / temperature), the sampled distribution

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_logprobs < 0:
            problems.append(f"top_logprobs must be >= 0, got {self.top_logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop strings must be non-empty strings")
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))


@dataclass
class Completion:
    """One finished request."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[list[tuple[int, float]]]] = None


@dataclass
class TokenEvent:
    """One step of one request."""

    request_id: int
    token_id: Optional[int]
    text: str  # newly completed UTF-8 text (may be "")
    logprob: Optional[float]
    top_logprobs: Optional[list[tuple[int, float]]]
    finished: bool
    finish_reason: Optional[str]
    cached_tokens: int = 0  # on a request's first event: prompt tokens taken from the prefix cache


class _Row:
    """A request's state while it runs."""

    def __init__(
        self,
        rid: int,
        prompt: list[int],
        params: SamplingParams,
        stop_ids: set[int],
        uniforms: Optional[list[float]],
        collect: bool,
        embeds: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> None:
        self.rid, self.prompt, self.params, self.stop_ids = rid, prompt, params, stop_ids
        self.embeds = embeds  # None, or (positions (k,), values (k, n_embd)): input embeddings at those positions
        self.uniforms = uniforms
        self.collect = collect
        self.out: list[int] = []
        self.logprobs: Optional[list[float]] = [] if params.logprobs else None
        self.top: Optional[list] = [] if params.top_logprobs else None
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # decoded so far (may extend past a stop string until it is found)
        self.emitted = 0  # chars of self.text already handed out
        self.finished = False
        self.reason: Optional[str] = None
        self.staged: Optional[KVCache] = None  # chunked prefill: the prompt's keys/values so far
        self.staged_len = 0  # ... and how many prompt tokens they cover
        self.cached = 0  # prompt tokens taken from the prefix cache
        self.admitted = 0  # admission order: the latest admitted is preempted first

    @property
    def cache_len(self) -> int:
        """Positions of this row in its KV slot (the latest token is not cached until it is fed)."""
        return len(self.prompt) + len(self.out) - 1


TRANSPOSED_MAX_BYTES = 1 << 30  # default cap for the engine's (in, out) weight copies (see Engine)
DEFAULT_KV_MAX_MB = 4096  # default KV budget: a quarter of the available memory, at most this ...


def default_kv_cache_mb(cfg: GPTConfig, bytes_per_position: int) -> float:
    """The default KV cache budget in MB: a quarter of the memory available now, at most DEFAULT_KV_MAX_MB, and at
    least what one row of the full context takes (so any prompt the model takes can be answered)."""
    avail = available_memory_bytes()
    mb = DEFAULT_KV_MAX_MB if avail is None else min(DEFAULT_KV_MAX_MB, avail / 4 / 2**20)
    return max(mb, cfg.block_size * bytes_per_position / 2**20)


STREAMING_BYTES = 64 << 20  # a model with more weight bytes than this streams them from memory every step


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        max_batch_size: int = 32,
        device: str | torch.device | None = None,
        transposed_weights: Optional[bool] = None,
        quantize: Optional[str] = None,
        prefix_cache_mb: float = 0,
        prefill_chunk: int = 0,
        cpu_matmul: Optional[str] = None,
        kv_cache_mb: Optional[float] = None,
    ) -> None:
        """kv_cache_mb: the most memory the keys/values may take, running rows, staged prompts and the prefix cache
        together (None: default_kv_cache_mb, from the model and the free memory). The cache grows a block of
        KV_BLOCK positions at a time as tokens are produced and shrinks as rows leave; a request waits in
        `pending` until its prompt fits; when the running rows outgrow the budget, the latest admitted are
        preempted (their keys/values dropped, recomputed when they are re-admitted; their output is unchanged).
        A prompt that could not fit alone is a ValueError; a row that alone reaches the budget ends with "length".

        prefill_chunk: prefill prompts longer than this many tokens in chunks of it, one chunk per step,
        while the running rows go on decoding (a long prompt would otherwise stall every stream for its whole
        prefill). 0 = off: a prompt is prefilled in one forward.

        prefix_cache_mb: keep finished requests' keys/values, up to this many MB, so a request that starts with
        the same tokens (a chat resending its history) prefills only the rest (chatstack.infer.prefix_cache). 0 = off.

        quantize: "int8" runs every decode step with int8 copies of the weights (CPU only; see
        chatstack.infer.quantize: what it costs is measured by benchmarks/quantize_quality.py); prompts are still
        prefilled with the fp32 weights. "bf16" runs every product (prefill and decode) on bf16 copies of the
        weights, with fp32 in and out. The copies are kept and re-made like the transposed ones below.

        transposed_weights: run every matmul of a step from an (in, out) copy of its weight (each
        chatstack.model.Linear; see Linear.fast_weight): on CPU a few-row product runs faster from that layout
        (benchmarks/decode.py). Costs one extra copy of the weights, held by the engine and bound to the model
        only inside step(); re-made when a weight's version counter or storage moves and after any torch.optim
        optimizer step in this process (fused optimizers update weights without bumping the version counter).
        Writes through `.data` are seen by neither: call refresh_weights() after those. Default: on for CPU when
        the weights take at most 1 GiB (a larger model loaded for CPU chat never needs twice its memory).

        cpu_matmul: which kernels those copies are made for (chatstack.infer.cpu): "mkl" (the (in, out) copies
        above), "onednn" (a oneDNN-packed copy per weight, and a one-row product split over the threads when the
        weights stream from memory: faster where MKL is slow, i.e. on x86 CPUs that are not Intel's), or "auto"; None = the CHATSTACK_CPU_MATMUL environment variable, else auto."""
        self.model = model
        self.tok = tokenizer
        self.cfg = model.config
        p = next(model.parameters())
        self.device = torch.device(device) if device is not None else p.device
        if self.device != p.device:
            model.to(self.device)
        self.max_batch_size = max_batch_size
        self.block_size = self.cfg.block_size
        # a model may have more output rows than the tokenizer has tokens (padded vocab): never sample those
        tv = getattr(tokenizer, "vocab_size", self.cfg.vocab_size)
        self.n_vocab = min(tv, self.cfg.vocab_size)
        self.default_stop_ids = sorted(
            {i for i in (getattr(tokenizer, "eot_id", None), getattr(tokenizer, "im_end_id", None)) if i is not None}
        )
        weight_bytes = sum(q.numel() * q.element_size() for q in model.parameters())
        if transposed_weights is None:
            transposed_weights = self.device.type == "cpu" and weight_bytes <= TRANSPOSED_MAX_BYTES
        self.transposed = transposed_weights
        # which kernels the copies are for (chatstack.infer.cpu): MKL from (in, out) copies, or, on CPUs MKL is
        # slow on (x86 that isn't Intel's), oneDNN-packed copies and a one-row product split over the threads
        self.cpu_matmul = cpu_matmul_backend(cpu_matmul) if self.device.type == "cpu" else None
        if self.device.type == "cpu":
            apply_thread_policy()  # as many threads as CPUs are idle (chatstack.infer.cpu)
        self._policy_at = time.monotonic() + THREAD_POLICY_INTERVAL_S  # when to look at the machine's load again
        # weights that can't stay in the caches between steps: a one-row product is bound by memory bandwidth
        self._streaming = weight_bytes > STREAMING_BYTES
        self.quantize = check_quantize(quantize, self.device)
        self.cache = KVCache(self.cfg, self.device, p.dtype, max_batch_size)
        if kv_cache_mb is None:
            kv_cache_mb = default_kv_cache_mb(self.cfg, self.cache.bytes_per_position)
        if not kv_cache_mb > 0:
            raise ValueError(f"kv_cache_mb must be > 0, got {kv_cache_mb}")
        self.kv_budget = int(kv_cache_mb * 2**20)
        # the longest row the budget holds (whole blocks), at most the context
        self.max_row_len = min(self.block_size, self.kv_budget // self.cache.bytes_per_position // KV_BLOCK * KV_BLOCK)
        if self.max_row_len < 2:
            raise ValueError(
                f"kv_cache_mb={kv_cache_mb} holds no row of {KV_BLOCK} positions: one position takes "
                f"{self.cache.bytes_per_position / 2**20:.3f} MB"
            )
        self.preemptions = 0
        self._admitted = itertools.count(1)
        self.prefix_cache = (
            PrefixCache(min(int(prefix_cache_mb * 2**20), self.kv_budget)) if prefix_cache_mb > 0 else None
        )
        if prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be >= 0 (0 = off), got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.prefilling: list[_Row] = []  # long prompts being prefilled chunk by chunk, oldest first
        self._linears: Optional[list] = None  # the model's chatstack.model.Linear modules (found once)
        # decode steps of a chatstack GPT skip the nn.Module calls (chatstack.infer.decode_step); None: hidden_states
        self._decode_step = DecodeStep.for_model(model)
        self._wt_steps = _optimizer_steps  # optimizer steps seen when the copies in _wt were made
        # Linear module -> [(data_ptr, version) of its weight, its (in, out) copy or None, its low-precision copy or None]
        self._wt: dict = {}
        self._int8_ok: set = set()  # the Linears the int8 kernel takes (chatstack.infer.quantize)
        self._key_pos = torch.arange(self.block_size, device=self.device)  # key positions, for decode masks
        # decode masks come per head when every head has its own keys: the model's batched-GEMV attention then
        # reads them as (B*H, 1, S) without a copy per layer; with grouped keys (GQA) one row per batch row
        self._mask_heads = self.cfg.n_head if self.cfg.n_kv_head == self.cfg.n_head else 1
        self.running: list[_Row] = []
        self.pending: list[_Row] = []
        self.done: dict[int, Completion] = {}
        self._ids = itertools.count()
        self._rng = random.Random()
        self._batch_key = None
        self._batch_tensors = None

    # ---- requests ----------------------------------------------------------------------------------------
    def check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise ValueError("empty prompt: generation needs at least one prompt token")
        if len(ids) >= self.block_size:
            raise ValueError(
                f"prompt of {len(ids)} tokens does not fit the model's context length "
                f"{self.block_size} (it must leave room for at least one new token)"
            )
        if len(ids) >= self.max_row_len:
            raise ValueError(
                f"prompt of {len(ids)} tokens does not fit the KV cache budget of "
                f"{self.kv_budget / 2**20:.0f} MB (kv_cache_mb), which holds {self.max_row_len} positions "
                f"per row (the prompt must leave room for at least one new token)"
            )
        bad = [i for i in ids if not 0 <= i < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} outside the vocabulary (0..{self.cfg.vocab_size - 1})")
        return ids

    def check_embeds(
        self, prompt_ids: Sequence[int], embeds: Optional[tuple[Sequence[int] | torch.Tensor, torch.Tensor]]
    ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(positions, values) on the engine's device, checked against the prompt and the model; or None."""
        if embeds is None:
            return None
        if not hasattr(self.model, "tok_emb"):
            raise ValueError("this model takes no input embeddings (a chatstack GPT does)")
        pos, val = embeds
        pos = torch.as_tensor(pos, dtype=torch.long).view(-1)
        if val.dim() != 2 or val.size(0) != pos.numel() or val.size(1) != self.cfg.n_embd:
            raise ValueError(
                f"embeds: expected values of shape ({pos.numel()}, {self.cfg.n_embd}), got {tuple(val.shape)}"
            )
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= len(prompt_ids)):
            raise ValueError(f"embeds: positions must lie inside the prompt of {len(prompt_ids)} tokens")
        return pos.to(self.device), val.detach().to(self.device, self.model.tok_emb.weight.dtype)

    def add_request(
        self,
        prompt_ids: Sequence[int],
        params: Optional[SamplingParams] = None,
        _collect: bool = False,
        embeds: Optional[tuple[Sequence[int] | torch.Tensor, torch.Tensor]] = None,
    ) -> int:
        """Queue a request; it joins the running batch at the next `step()`. Returns its request id.

        embeds: optional (positions, values (k, n_embd)): the prompt's input embeddings at those positions, in
        place of the token embeddings (image tokens, chatstack.vision). Such a prompt is prefilled whole, and
        neither reads nor fills the prefix cache: its ids alone do not say what it holds."""
        params = params or SamplingParams()
        ids = self.check_prompt(prompt_ids)
        embeds = self.check_embeds(ids, embeds)
        rid = next(self._ids)
        stop_ids = set(self.default_stop_ids if params.stop_token_ids is None else params.stop_token_ids)
        uniforms = None
        if params.temperature > 0:
            # all of this request's random draws come from its own generator, fixed by its seed
            seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
            g = torch.Generator().manual_seed(seed)
            n = min(params.max_new_tokens, self.block_size - len(ids))  # never more draws than tokens it can get
            uniforms = torch.rand(n, generator=g, dtype=torch.float64).tolist()
        self.pending.append(_Row(rid, ids, params, stop_ids, uniforms, _collect, embeds))
        return rid

    @torch.inference_mode()  # compaction writes the cache, which step() created in inference mode
    def cancel(self, rid: int) -> bool:
        """Drop a request (queued or running) and free its slot. True if it was found."""
        for rows in (self.pending, self.prefilling):
            for i, r in enumerate(rows):
                if r.rid == rid:
                    del rows[i]
                    return True
        for r in self.running:
            if r.rid == rid and not r.finished:
                r.finished, r.reason, r.collect = True, "cancelled", False
                self._compact()
                self._trim()
                return True
        return False

    def refresh_weights(self) -> None:
        """Forget derived copies of the weights (the (in, out) matrices) and cached prefixes: the next step
        re-makes them."""
        self._wt = {}
        self._linears = None
        self._decode_step = DecodeStep.for_model(self.model)  # modules may have been replaced too
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    def _weights_signature(self) -> tuple:
        """Changes whenever a weight may have changed (optimizer steps, in-place writes, new storage)."""
        return (_optimizer_steps,) + tuple((p.data_ptr(), p._version) for p in self.model.parameters())

    def prepare_weights(self) -> None:
        """Make the derived weight copies (transposed, int8) now rather than in the first request's steps
        (GPT-2 small: ~0.45 s), so a server's or chat's first reply doesn't wait for them."""
        self._unbind_weights(self._bind_weights())
        self._unbind_weights(self._bind_weights(quantized=True))

    def _bind_weights(self, quantized: bool = False) -> list:
        """Give each chatstack.model.Linear its fast_weight for one forward: the transposed view of an (in, out)
        copy of its weight, or its lower-precision copy (bf16: every forward; int8: decode steps, `quantized`);
        each made or re-made when the weight changed. Returns the modules bound."""
        low = self.quantize == "bf16" or (quantized and self.quantize == "int8")
        if not (self.transposed or low):
            return []
        if self._linears is None:
            self._linears = [m for m in self.model.modules() if isinstance(m, Linear)]
            self._int8_ok = {m for m in self._linears if int8_supported(m.in_features, self.device)}
        if self._wt_steps != _optimizer_steps:  # some optimizer stepped: any weight may have moved
            self._wt, self._wt_steps = {}, _optimizer_steps
        wt = self._wt
        bound = []
        for m in self._linears:
            w = m._parameters["weight"]  # (what m.weight returns, without Module.__getattr__)
            # in-place updates (load_state_dict, manual no_grad edits) bump _version; new storage moves data_ptr
            key = (w.data_ptr(), w._version)
            entry = wt.get(m)
            if entry is None or entry[0] != key:
                entry = wt[m] = [key, None, None]
            if low and (self.quantize == "bf16" or m in self._int8_ok):
                if entry[2] is None:
                    entry[2] = BF16Weight(w) if self.quantize == "bf16" else Int8Weight(w)
                fast = entry[2]
            elif self.transposed:
                if entry[1] is None:
                    if self.cpu_matmul == "onednn" and w.dtype == torch.float32:  # (what was measured)
                        entry[1] = CPUWeight(w, streaming=self._streaming)
                    else:
                        entry[1] = w.detach().t().contiguous().t()  # (out, in) view of an (in, out) copy
                fast = entry[1]
            else:
                continue
            m.__dict__["fast_weight"] = fast  # instance attribute over the class default None; no Module hooks
            bound.append(m)
        return bound

    @staticmethod
    def _unbind_weights(bound: list) -> None:
        for m in bound:
            m.__dict__.pop("fast_weight", None)

    def has_unfinished(self) -> bool:
        return bool(self.running or self.pending or self.prefilling)

    # ---- one scheduler step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """One decode step for every running row, then prefill of newly admitted rows (one token each)."""
        was_training = self.model.training
        if was_training:
            self.model.eval()  # no dropout while generating (PPO generates with a model it trains)
        if self.device.type == "cpu" and time.monotonic() >= self._policy_at:
            # other processes' load moves: follow it (our own busy threads are part of the load average)
            apply_thread_policy(own_busy_threads=torch.get_num_threads())
            self._policy_at = time.monotonic() + THREAD_POLICY_INTERVAL_S
        try:
            events = []
            if self.running:
                events += self._decode()
                self._compact()
            new = self._admit()
            if new:
                resumed = [r for r in new if r.out]  # preempted rows: recompute their keys/values
                new = [r for r in new if not r.out]
                if self.prefill_chunk:
                    long = [r for r in new if len(r.prompt) > self.prefill_chunk and r.embeds is None]
                    new = [r for r in new if len(r.prompt) <= self.prefill_chunk or r.embeds is not None]
                    self.prefilling += long
                if resumed:
                    self._resume(resumed)
                if new:
                    events += self._prefill(new)
                    self._compact()
            if self.prefilling:
                events += self._prefill_next_chunk()
                self._compact()
            self._trim()
            return events
        finally:
            if was_training:
                self.model.train()

    # ---- KV memory: admission, growth, preemption, trimming -------------------------------------------------
    def _need(self, r: _Row) -> int:
        """Positions row r needs in its slot through its next token (prompt + generated so far, at least one)."""
        return min(self.block_size, len(r.prompt) + max(len(r.out), 1))

    def _staged_bytes(self) -> int:
        return sum(r.staged.nbytes for r in self.prefilling if r.staged is not None)

    def kv_bytes(self) -> int:
        """What the keys/values take now: the running rows' cache, staged prompts and the prefix cache."""
        pc = self.prefix_cache.bytes if self.prefix_cache is not None else 0
        return self.cache.nbytes + self._staged_bytes() + pc

    def _admit(self) -> list[_Row]:
        """Take pending rows, oldest first, while the batch has slots and the budget holds them with a block of room
        each to grow (the first that doesn't fit stops the rest: no overtaking). An idle engine always takes one
        (check_prompt made sure a prompt fits alone)."""
        free = self.max_batch_size - len(self.running) - len(self.prefilling)
        if not self.pending or free <= 0:
            return []
        rows = self.running + self.prefilling
        n, need = len(rows), max((self._need(r) for r in rows), default=0)
        staged = max((len(r.prompt) for r in self.prefilling), default=0)  # one long prompt is staged at a time
        take = 0
        for r in self.pending[:free]:
            need2 = max(need, self._need(r))
            long = self.prefill_chunk and len(r.prompt) > self.prefill_chunk and not r.out
            staged2 = max(staged, len(r.prompt) if long else 0)
            total = self.cache.bytes_for(
                n + 1, min(self.block_size, round_up(need2 + KV_BLOCK))
            ) + self.cache.bytes_for(1, round_up(staged2))
            if n and total > self.kv_budget:
                break
            n, need, staged, take = n + 1, need2, staged2, take + 1
        rows, self.pending = self.pending[:take], self.pending[take:]
        for r in rows:
            if not r.admitted:  # a preempted row keeps its place: the latest *new* rows give way first (as vLLM's)
                r.admitted = next(self._admitted)
        return rows

    def _fit(self, slots: int, length: int) -> bool:
        """Make the cache hold at least `slots` rows of `length` positions within the budget, evicting cached
        prefixes first; False if the budget can't. Grows with some slack (a re-allocation copies the cache)."""
        c = self.cache
        length = min(self.block_size, round_up(length))
        if slots <= c.slots and length <= c.length:
            return True
        room = self.kv_budget - self._staged_bytes()
        if c.bytes_for(slots, length) > room:
            return False
        s2 = min(self.max_batch_size, max(slots, c.slots, round_up(slots, 4)))
        l2 = min(self.block_size, max(length, c.length, round_up(length + length // 4)))
        if c.bytes_for(s2, l2) > room:
            s2, l2 = slots, length  # exactly what is needed (may also drop room no row uses)
        if self.prefix_cache is not None:
            self.prefix_cache.shrink_to(room - c.bytes_for(s2, l2))
        c.resize(s2, l2)
        return True

    def _fit_or_fail(self, slots: int, length: int) -> None:
        if not self._fit(slots, length):  # admission (_admit) leaves room for what it admits
            raise RuntimeError(f"KV cache: {slots} rows x {length} positions do not fit the budget")

    def _preempt(self, r: _Row) -> None:
        """Take a running row out of the batch (its keys/values are dropped); it waits first in line and is
        recomputed when re-admitted (_resume), then goes on from the token it had."""
        i = self.running.index(r)
        last = self.running.pop()
        if last is not r:
            self.cache.move(len(self.running), i, max(last.cache_len, 0))
            self.running[i] = last
        self.pending.insert(0, r)
        self.preemptions += 1

    def _make_room(self, S: int) -> None:
        """Before a decode step: room for every running row at S positions; staged prompts, then the latest
        admitted rows give way until it fits."""
        while not self._fit(len(self.running), S):
            staged = [r for r in self.prefilling if r.staged is not None]
            if staged:  # a long prompt's partial prefill: redone later
                for r in staged:
                    r.staged, r.staged_len = None, 0
                continue
            if len(self.running) == 1:  # cannot happen: rows end at max_row_len (_advance_row)
                raise RuntimeError(f"KV cache: one row of {S} positions does not fit the budget")
            self._preempt(max(self.running, key=lambda r: r.admitted))
            S = max(r.cache_len for r in self.running) + 1

    def _resume(self, rows: list[_Row]) -> None:
        """Re-admit preempted rows: prefill prompt + all generated tokens but the latest (which the next decode
        step feeds, as it would have), from the prefix cache where it holds them."""
        for r in rows:
            ids = r.prompt + r.out[:-1]
            slot = len(self.running)
            self.running.append(r)
            self._fit_or_fail(len(self.running), max(self._need(x) for x in self.running))
            n, kv = 0, None
            if self.prefix_cache is not None and r.embeds is None:
                self.prefix_cache.check_weights(self._weights_signature())
                n, kv = self.prefix_cache.lookup(ids)
            if n:
                self.cache.write(slot, kv, n)
            self.cache.prefill(slot, 1, start=n)
            idx = torch.tensor([ids[n:]], device=self.device)
            extra = {}
            if r.embeds is not None:  # an image row: its image embeddings again (n is 0 here)
                x = self.model.tok_emb(idx)
                x[0, r.embeds[0]] = r.embeds[1]
                extra["embeds"] = x
            bound = self._bind_weights()
            try:
                self.model.hidden_states(idx, cache=self.cache, **extra)
            finally:
                self._unbind_weights(bound)

    def _trim(self) -> None:
        """Give memory back as rows leave: all of it when nothing runs, else shrink a cache at least twice what its
        rows need (and > 8 MB bigger). Freed memory goes back to the OS (release_free_memory)."""
        c = self.cache
        if c.kv is None:
            return
        if not self.running:  # (a prompt being staged takes a slot when it is done)
            c.free()
            release_free_memory()
            return
        slots = len(self.running)
        length = min(self.block_size, round_up(max(self._need(r) for r in self.running) + KV_BLOCK))
        want = c.bytes_for(slots, length)
        if c.nbytes > 2 * want and c.nbytes - want > 8 << 20:
            c.resize(min(c.slots, max(slots, round_up(slots, 4))), min(c.length, length))
            release_free_memory()

    def _cached_prefixes(self, rows: list[_Row]) -> dict:
        """{rid: (n, kv)} for the rows whose prompt starts with n tokens the prefix cache holds."""
        if self.prefix_cache is None:
            return {}
        self.prefix_cache.check_weights(self._weights_signature())
        hits = {}
        for r in rows:
            if r.embeds is not None:
                continue
            n, kv = self.prefix_cache.lookup(r.prompt)
            if n:
                hits[r.rid] = (n, kv)
        return hits

    def _prefill(self, rows: list[_Row]) -> list[TokenEvent]:
        hits = self._cached_prefixes(rows)
        # Slot order: one group of rows prefilled from scratch, then one group per cached prefix length n (rows
        # that continue a prefix from the prefix cache, positions n..). Each group is one batched forward over
        # contiguous slots, right-padded; a prompt admitted several times at once (n > 1 choices, self-consistency
        # paths, clients sending the same prompt) is prefilled once and its keys/values copied.
        groups: dict[int, list[_Row]] = {}
        for r in rows:
            groups.setdefault(hits[r.rid][0] if r.rid in hits else 0, []).append(r)
        plan = []  # (n, fresh rows, [(copy row, index of its fresh row)])
        for n in sorted(groups):
            first: dict[tuple, int] = {}  # prompt -> index of its first fresh row in this group
            fresh, copies = [], []
            for r in groups[n]:
                key = tuple(r.prompt) if r.embeds is None else r.rid  # same ids may hold different images
                if key in first:
                    copies.append((r, first[key]))
                else:
                    first[key] = len(fresh)
                    fresh.append(r)
            plan.append((n, fresh, copies))
        s0 = len(self.running)
        self.running.extend(r for _, fresh, copies in plan for r in fresh + [c for c, _ in copies])
        self._fit_or_fail(len(self.running), max(self._need(r) for r in self.running))
        events = []
        bound = self._bind_weights()
        try:
            for n, fresh, copies in plan:
                B = len(fresh)
                lens = [len(r.prompt) - n for r in fresh]  # tokens to run per row
                T = max(lens)
                idx = torch.zeros(B, T, dtype=torch.long)
                for i, r in enumerate(fresh):  # right-padded; padding is never attended
                    idx[i, : lens[i]] = torch.tensor(r.prompt[n:])
                    if n:
                        self.cache.write(s0 + i, hits[r.rid][1], n)
                idx = idx.to(self.device)
                positions = torch.arange(n, n + T, device=self.device)[None]  # (1, T)
                self.cache.prefill(s0, B, start=n)
                extra = {}  # (models without image input take no embeds argument)
                if any(r.embeds is not None for r in fresh):  # (image rows are never prefix-cache hits: n == 0)
                    x = self.model.tok_emb(idx)  # (B, T, h)
                    for i, r in enumerate(fresh):
                        if r.embeds is not None:
                            x[i, r.embeds[0]] = r.embeds[1]
                    extra["embeds"] = x
                h = self.model.hidden_states(idx, cache=self.cache, positions=positions, **extra)  # (B, T, h)
                last = h[torch.arange(B, device=self.device), torch.tensor(lens, device=self.device) - 1]  # (B, h)
                logits = self._logits(last)  # (B, V)
                if copies:
                    src = [j for _, j in copies]
                    for i, j in enumerate(src):
                        self.cache.move(s0 + j, s0 + B + i, n + lens[j])
                    logits = torch.cat([logits, logits[src]])  # (B + copies, V)
                group = fresh + [r for r, _ in copies]
                ev = self._accept(group, logits)
                if n:
                    for e, r in zip(ev[: len(group)], group):
                        e.cached_tokens = r.cached = n
                events += ev
                s0 += len(group)
        finally:
            self._unbind_weights(bound)  # outside a forward the model is untouched (training, evals, saving)
        return events

    def _prefill_next_chunk(self) -> list[TokenEvent]:
        """One chunk of the oldest long prompt, into its own staging cache; when the prompt is done, the row
        joins the running batch (its keys/values copied into a slot) with its first token."""
        r = self.prefilling[0]
        if r.staged is None:
            staged = self.cache.bytes_for(1, min(self.block_size, round_up(len(r.prompt))))
            if self.cache.nbytes + staged > self.kv_budget:
                return []  # the running rows hold the budget: start it when some leave
            if self.prefix_cache is not None:
                self.prefix_cache.shrink_to(self.kv_budget - self.cache.nbytes - staged)
            r.staged = KVCache(self.cfg, self.device, self.cache.dtype, 1)
            r.staged.reserve(1, len(r.prompt))
            for n, kv in self._cached_prefixes([r]).values():
                r.staged.write(0, kv, n)
                r.staged_len = r.cached = n
        start = r.staged_len
        end = min(len(r.prompt), start + self.prefill_chunk)
        r.staged.prefill(0, 1, start=start)
        bound = self._bind_weights()
        try:
            h = self.model.hidden_states(
                torch.tensor([r.prompt[start:end]], device=self.device), cache=r.staged
            )  # (1, end - start, h); positions start..
            logits = self._logits(h[:, -1]) if end == len(r.prompt) else None
        finally:
            self._unbind_weights(bound)
        r.staged_len = end
        if logits is None:
            return []
        self.prefilling.pop(0)
        slot = len(self.running)
        self.running.append(r)
        staged, r.staged = r.staged, None  # (its bytes no longer count against the room _fit finds)
        self._fit_or_fail(len(self.running), max(self._need(x) for x in self.running))
        self.cache.write(slot, [kvl[:, 0] for kvl in staged.kv], end)
        del staged
        ev = self._accept([r], logits)
        ev[0].cached_tokens = r.cached
        return ev

    def _decode(self) -> list[TokenEvent]:
        # each row feeds its latest token (not cached yet) at the position = how many its slot holds
        pos = [len(r.prompt) + len(r.out) - 1 for r in self.running]  # r.cache_len, inlined (hot loop)
        S = max(pos) + 1
        if S > self.cache.length or len(self.running) > self.cache.slots:
            self._make_room(S)  # grow by a block, or preempt rows the budget can't hold
            pos = [len(r.prompt) + len(r.out) - 1 for r in self.running]
            S = max(pos) + 1
        rows = self.running
        B = len(rows)
        idx = torch.tensor([r.out[-1] for r in rows], device=self.device).view(B, 1)
        if min(pos) == S - 1:
            # every row at the same length (always so at batch 1): no mask, all S keys are valid
            positions = torch.full((1, 1), S - 1, device=self.device, dtype=torch.long)
            mask = None
            write = self.cache.decode(B, S - 1, S)
        else:
            wp = torch.tensor(pos, device=self.device)
            positions = wp.view(B, 1)
            # additive float mask (0 = attend, -inf = not this row's key): SDPA adds it as is, where a bool
            # mask is converted in every layer (measured ~20% slower per attention call at 16 rows)
            hide = self._key_pos[:S] > positions  # (B, S)
            mask = torch.zeros(B, self._mask_heads, 1, S, device=self.device, dtype=self.cache.dtype).masked_fill_(
                hide.view(B, 1, 1, S), float("-inf")
            )  # (B, Hm, 1, S)
            write = self.cache.decode(B, wp, S)
        bound = self._bind_weights(quantized=True)
        try:
            if self._decode_step is not None:  # a chatstack GPT: the module-free decode forward
                logits = self._decode_step(idx.view(B), positions, self.cache.kv, write, S, mask)  # (B, V)
            else:
                h = self.model.hidden_states(idx, cache=self.cache, positions=positions, attn_mask=mask)  # (B, 1, h)
                logits = self._logits(h[:, -1])
        finally:
            self._unbind_weights(bound)
        return self._accept(rows, logits)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, V) from final hidden states (B, h) (the output layer's bound copy, if any)."""
        return self.model.lm_head(h)

    # ---- sampling and bookkeeping --------------------------------------------------------------------------
    def _sampling_tensors(
        self, rows: list[_Row]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool, int, bool, int]:
        key = tuple(r.rid for r in rows)
        if key != self._batch_key:
            ps = [r.params for r in rows]
            temp = torch.tensor([p.temperature for p in ps], device=self.device)
            top_k = torch.tensor([p.top_k for p in ps], device=self.device)
            top_p = torch.tensor([p.top_p for p in ps], device=self.device)
            all_greedy = all(p.temperature == 0 for p in ps)
            k_limit = max(p.top_k for p in ps) if all(p.top_k > 0 for p in ps) else 0
            want_lp = any(p.logprobs or p.top_logprobs for p in ps)
            n_top = max(p.top_logprobs for p in ps)
            scaled_lp = None
            if any(p.scaled_logprobs and p.temperature > 0 for p in ps):
                scaled_lp = torch.tensor(
                    [p.temperature if p.scaled_logprobs and p.temperature > 0 else 1.0 for p in ps], device=self.device
                )
            self._batch_key = key
            self._batch_tensors = (temp, top_k, top_p, all_greedy, k_limit, want_lp, n_top, scaled_lp)
        return self._batch_tensors

    def _accept(self, rows: list[_Row], logits: torch.Tensor) -> list[TokenEvent]:
        logits = logits[:, : self.n_vocab]
        temp, top_k, top_p, all_greedy, k_limit, want_lp, n_top, scaled_lp = self._sampling_tensors(rows)
        if all_greedy:
            next_ids = greedy(logits)
        else:
            u = torch.tensor([r.uniforms[len(r.out)] if r.uniforms else 0.0 for r in rows], device=self.device)
            next_ids = sample(logits, temp, top_k, top_p, u, k_limit)
        lp = top_vals = top_ids = None
        if want_lp:
            logp = logits.float()
            if scaled_lp is not None:
                # rows asking for it get the log-probs of the distribution they sample from, logits / T (as TRL's
                # trainers and the RL update score them), so a rollout's log-probs hold at any temperature
                logp = logp / scaled_lp[:, None]
            logp = logp.log_softmax(dim=-1)  # (B, V)
            lp = logp.gather(1, next_ids[:, None])[:, 0].tolist()
            if n_top:
                tv, ti = logp.topk(min(n_top, logp.size(1)), dim=-1)
                top_vals, top_ids = tv.tolist(), ti.tolist()
        if lp is None:  # the common case: one plain call per row
            adv = self._advance_row
            return [adv(r, tid, None, None) for r, tid in zip(rows, next_ids.tolist())]
        events = []
        for i, (r, tid) in enumerate(zip(rows, next_ids.tolist())):
            events.append(
                self._advance_row(
                    r,
                    tid,
                    lp[i],
                    list(zip(top_ids[i], top_vals[i]))[: r.params.top_logprobs]
                    if top_ids is not None and r.params.top_logprobs
                    else None,
                )
            )
        return events

    def _advance_row(self, r: _Row, tid: int, lp: float | None, top: list[tuple[int, float]] | None) -> TokenEvent:
        p = r.params
        r.out.append(tid)
        if r.logprobs is not None:
            r.logprobs.append(lp)
        if r.top is not None:
            r.top.append(top)
        if tid in r.stop_ids:
            self._finish(r, "stop")
        else:
            r.text += r.decoder.decode(self.tok.token_bytes(tid))
            if not (p.stop and self._find_stop(r)) and (
                len(r.out) >= p.max_new_tokens or len(r.prompt) + len(r.out) >= self.max_row_len
            ):
                self._finish(r, "length")
        if r.finished:
            end = len(r.text)
        else:
            end = len(r.text) - self._holdback(r)
        piece = r.text[r.emitted : end] if end > r.emitted else ""
        r.emitted = max(r.emitted, end)
        return TokenEvent(
            r.rid,
            tid,
            piece,
            lp if p.logprobs else None,
            top if p.top_logprobs else None,
            r.finished,
            r.reason if r.finished else None,
        )

    def _find_stop(self, r: _Row) -> bool:
        """Cut the text at the first stop string, if one has appeared; True when the row stopped."""
        if not r.params.stop:
            return False
        longest = max(len(s) for s in r.params.stop)
        start = max(0, r.emitted - longest)  # a match may begin inside text held back earlier
        hits = [j for j in (r.text.find(s, start) for s in r.params.stop) if j >= 0]
        if not hits:
            return False
        r.text = r.text[: min(hits)]
        self._finish(r, "stop", flush=False)
        return True

    @staticmethod
    def _holdback(r: _Row) -> int:
        """Chars at the end of the text that could begin a stop string: not emitted yet."""
        if not r.params.stop:
            return 0
        tail = r.text[r.emitted :]
        for n in range(min(len(tail), max((len(s) for s in r.params.stop), default=1) - 1), 0, -1):
            if any(s.startswith(tail[-n:]) for s in r.params.stop):
                return n
        return 0

    def _finish(self, r: _Row, reason: str, flush: bool = True) -> None:
        if flush:
            r.text += r.decoder.decode(b"", final=True)  # an incomplete trailing character becomes U+FFFD
            if reason == "length" and self._find_stop(r):
                return
        r.finished, r.reason = True, reason
        if r.collect:
            self.done[r.rid] = Completion(r.prompt, r.out, r.text, reason, r.logprobs, r.top)

    def _compact(self) -> None:
        """Remove finished rows; the last running row moves into each hole so slots stay 0..B-1."""
        running = self.running
        if self.prefix_cache is not None:
            sig = None
            for slot, r in enumerate(running):
                if r.finished and r.reason != "cancelled" and r.cache_len >= 1 and r.embeds is None:
                    if sig is None:
                        sig = self._weights_signature()
                        self.prefix_cache.check_weights(sig)
                    n = r.cache_len  # every token the row fed: its prompt and all but its last new token
                    self.prefix_cache.add((r.prompt + r.out)[:n], self.cache.read(slot, n))
            if sig is not None:  # the prefix cache gets what the running rows leave of the budget
                self.prefix_cache.shrink_to(self.kv_budget - self.cache.nbytes - self._staged_bytes())
        i = 0
        while i < len(running):
            if not running[i].finished:
                i += 1
                continue
            while len(running) - 1 > i and running[-1].finished:
                running.pop()  # a finished row at the end just leaves: nothing to copy
            last = running.pop()
            if i < len(running):  # last is unfinished: move it (and its cache slot) into the hole
                self.cache.move(len(running), i, max(last.cache_len, 0))
                running[i] = last

    # ---- conveniences built on the primitives ----------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        progress: bool = False,
        embeds: Optional[Sequence] = None,
    ) -> list[Completion]:
        """Complete many prompts (batched, continuous); results in prompt order. embeds: per prompt, None or
        (positions, values) as add_request takes them."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        for i, pr in enumerate(prompts):
            try:
                self.check_prompt(pr)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        embeds = [None] * len(prompts) if embeds is None else list(embeds)
        if len(embeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(embeds)} embeds")
        rids = [
            self.add_request(pr, pa, _collect=True, **({} if e is None else {"embeds": e}))
            for pr, pa, e in zip(prompts, params, embeds)
        ]
        bar = None
        if progress:
            bar = tqdm(total=len(rids), desc="generate", unit="seq")
        wanted = set(rids)
        try:
            while wanted - self.done.keys():
                if not self.has_unfinished():
                    raise RuntimeError("engine idle but requests unfinished (cancelled elsewhere?)")
                events = self.step()
                if bar is not None:
                    bar.update(sum(1 for e in events if e.finished and e.request_id in wanted))
        finally:
            if bar is not None:
                bar.close()
            for rid in rids:
                if rid not in self.done:
                    self.cancel(rid)
        return [self.done.pop(rid) for rid in rids]

    def stream(
        self,
        prompt_ids: Sequence[int],
        params: Optional[SamplingParams] = None,
        embeds: Optional[tuple[Sequence[int] | torch.Tensor, torch.Tensor]] = None,
    ) -> Iterator[TokenEvent]:
        """One request, its tokens as they come. Closing the iterator early cancels the request. embeds: as
        add_request takes them."""
        rid = self.add_request(prompt_ids, params, **({} if embeds is None else {"embeds": embeds}))
        finished = False
        try:
            while not finished:
                for ev in self.step():
                    if ev.request_id == rid:
                        finished = ev.finished
                        yield ev
        finally:
            if not finished:
                self.cancel(rid)

    def chat(self, messages: list[dict], params: Optional[SamplingParams] = None) -> Completion:
        """Reply to a conversation (ChatML prompt ending in `<|im_start|>assistant\\n`)."""
        return self.generate([self.tok.render_prompt(messages)], params)[0]
