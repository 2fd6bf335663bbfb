"""Choosing the next token from logits: greedy, temperature, top-k, top-p; per-row settings, vectorised.

Every row of a batch has its own temperature / top_k / top_p, so one decode step samples all rows with a
handful of tensor ops (no Python loop over rows or over the vocabulary). Randomness comes in as one
uniform number per row (`u`), drawn by the engine from that request's own seeded generator: a request's
output then depends on its seed only, never on which other requests share the batch.

    from chatstack.infer.sampling import sample
    next_ids = sample(logits, temperature, top_k, top_p, u)     # logits (B, V) -> (B,)

Conventions (as in Hugging Face / OpenAI):
  temperature 0 = greedy (argmax); top_k 0 = off; top_p 1.0 = off.
  top-k keeps the k most likely tokens; top-p then keeps the smallest prefix of the (sorted, top-k
  filtered, temperature-scaled) distribution whose probability reaches top_p (always at least one token).
"""

from __future__ import annotations

import torch


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim (first index on ties), (B, V) -> (B,).

    CPU's argmax walks a row one element at a time, while amax is vectorised: for many rows of a large
    vocabulary (B * V >= 2**19), each row is cut into blocks of 64, the vectorised amax of each block picks the
    first block holding the row's maximum, then argmax inside that one block. Same answer, ties included.
    Below the threshold plain argmax is faster where a decode step calls it (right after the output layer's
    product, caches cold); docs/benchmarks.md has the measurements."""
    B, V = logits.shape
    blk = 64
    if B * V < 2**19 or logits.stride(-1) != 1:
        return logits.argmax(dim=-1)
    nb = V // blk
    v = logits.as_strided((B, nb, blk), (logits.stride(0), blk, 1))  # (B, nb, blk); a sliced vocab too
    if V % blk == 0:
        best_blk = v.amax(dim=-1).argmax(dim=-1)  # (B,)
        inner = v.gather(1, best_blk.view(B, 1, 1).expand(B, 1, blk)).view(B, blk)  # (B, blk)
        return best_blk * blk + inner.argmax(dim=-1)
    # a short last block: its maximum joins the others'; the chosen block's columns are gathered from the row,
    # and past its end they repeat the row's last column, which can only tie with an earlier copy of itself
    block_max = torch.cat([v.amax(dim=-1), logits[:, nb * blk :].amax(dim=-1, keepdim=True)], dim=1)  # (B, nb + 1)
    best_blk = block_max.argmax(dim=-1)
    cols = (best_blk[:, None] * blk + torch.arange(blk, device=logits.device)).clamp_(max=V - 1)  # (B, blk)
    return best_blk * blk + logits.gather(1, cols).argmax(dim=-1)


def filtered_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, k_limit: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling distribution of each row, sorted by probability: (probs (B, K), token ids (B, K)).

    logits (B, V) float; temperature/top_p (B,) float; top_k (B,) long. Greedy rows (temperature 0) are
    scaled with 1.0 here; `sample` takes the argmax for them. k_limit > 0 (every row has 0 < top_k <=
    k_limit) lets us take a partial top-k instead of sorting the whole vocabulary.
    """
    B, V = logits.shape
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = logits.float() / t[:, None]
    if not bool((top_k > 0).any()) and not bool((top_p < 1.0).any()):
        # plain temperature sampling: no filter needs the order, so skip the (B, V) sort (the costliest
        # op of a batched decode step for a small model); inverse-CDF over vocabulary order is just as exact
        return scaled.softmax(dim=-1), torch.arange(V, device=logits.device).expand(B, V)
    if 0 < k_limit < V:
        vals, idx = scaled.topk(k_limit, dim=-1)  # (B, k_limit), sorted descending
    else:
        vals, idx = scaled.sort(dim=-1, descending=True)  # (B, V)
    K = vals.size(1)
    ranks = torch.arange(K, device=logits.device)
    k_eff = torch.where(top_k > 0, top_k, torch.full_like(top_k, K))
    vals = vals.masked_fill(ranks[None, :] >= k_eff[:, None], float("-inf"))
    probs = vals.softmax(dim=-1)
    # top-p: drop a token when the mass strictly before it already reaches p (the first token always stays)
    before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill(before >= top_p[:, None], 0.0)
    return probs / probs.sum(dim=-1, keepdim=True), idx


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    u: torch.Tensor,
    k_limit: int = 0,
) -> torch.Tensor:
    """Next token per row (B,) long. u (B,) uniforms in [0, 1): inverse-CDF draw from each row's distribution."""
    probs, idx = filtered_probs(logits, temperature, top_k, top_p, k_limit)
    cdf = probs.cumsum(dim=-1)  # (B, K), non-decreasing
    # first position whose cdf exceeds u * total; zero-probability tokens can never be chosen
    pick = torch.searchsorted(cdf, (u.to(cdf.dtype) * cdf[:, -1])[:, None], right=True)
    pick = pick.clamp_max(cdf.size(1) - 1)  # (B, 1)
    sampled = idx.gather(1, pick).squeeze(1)
    is_greedy = temperature <= 0
    if bool(is_greedy.any()):
        sampled = torch.where(is_greedy, greedy(logits), sampled)
    return sampled
