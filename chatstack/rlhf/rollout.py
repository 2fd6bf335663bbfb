"""PPO's data side: the policy with its value head, rollouts through the engine, scoring, and token log-probs.

    policy = PolicyWithValue(sft_gpt)             # value head on the policy's own trunk (see below)
    batch = rollout(engine, policy, ref, rm, tokenizer, prompt_ids, params)   # a Rollout of (B, R) tensors

Value function: a scalar head on the policy's final hidden states (a shared trunk), initialised to zero.
InstructGPT initialised a separate value model from the reward model; we share the trunk because on a
2-core CPU a second transformer doubles the cost of every PPO minibatch, and the value loss (weighted by
`vf_coef`, 0.1) is small next to the policy loss, so it perturbs the policy little. The reward model is
centred (mean 0 on the SFT model's answers), so a zero-initialised value head starts unbiased.

Token alignment: a row is [prompt, response] right-padded. The response's t-th token is predicted from
position (prompt_len - 1 + t), so logits, values and log-probs for the response are gathered at those
positions: only the response positions go through the output layer (cheaper, same numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from chatstack.model import GPT
from chatstack.rlhf import ppo_core as pc


class PolicyWithValue(nn.Module):
    """The policy language model plus a value head that reads the same hidden states."""

    def __init__(self, lm: GPT):
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(lm.config.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @property
    def config(self):
        return self.lm.config

    def forward(self, idx: torch.Tensor, prompt_lens: torch.Tensor, resp: torch.Tensor, with_value: bool = True):
        """Logits (B, R, V) and values (B, R) at the response positions of right-padded rows idx (B, L)."""
        h = self.lm.hidden_states(idx)  # (B, L, h)
        h = gather_response(h, prompt_lens, resp.size(1))  # (B, R, h)
        logits = self.lm.lm_head(h)  # (B, R, V)
        values = self.value_head(h).squeeze(-1) if with_value else None
        return logits, values


def gather_response(h: torch.Tensor, prompt_lens: torch.Tensor, R: int) -> torch.Tensor:
    """Hidden states at the positions that predict response tokens 0..R-1: (B, L, h) -> (B, R, h)."""
    B, L, H = h.shape
    pos = (prompt_lens[:, None] - 1 + torch.arange(R, device=h.device)[None]).clamp(max=L - 1)  # (B, R)
    return h.gather(1, pos[:, :, None].expand(B, R, H))


def response_logprobs(lm: GPT, idx, prompt_lens, resp, temperature: float = 1.0) -> torch.Tensor:
    """log p(response tokens) under a plain language model (the frozen reference) at `temperature`: (B, R)."""
    h = gather_response(lm.hidden_states(idx), prompt_lens, resp.size(1))
    return pc.logprobs_of(lm.lm_head(h), resp, temperature)


@dataclass
class Rollout:
    idx: torch.Tensor  # (B, L) prompt + response, right-padded
    prompt_lens: torch.Tensor  # (B,)
    resp: torch.Tensor  # (B, R) response tokens, right-padded with 0
    mask: torch.Tensor  # (B, R) 1 on response tokens
    logp: torch.Tensor  # (B, R) log-probs under the policy that sampled them
    ref_logp: torch.Tensor  # (B, R) under the frozen reference
    values: torch.Tensor  # (B, R) value estimates
    score: torch.Tensor  # (B,) reward-model score (before penalties)
    ended: torch.Tensor  # (B,) 1 if the response ended with a stop token
    texts: list[str]
    engine_logprob_err: float  # max |engine log-prob - recomputed log-prob|: the two code paths agree

    def __len__(self):
        return self.idx.size(0)


def build_rows(prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """Right-padded (prompt + response) rows and right-padded responses."""
    B = len(prompts)
    L = max(len(p) + len(r) for p, r in zip(prompts, responses))
    R = max(1, max(len(r) for r in responses))
    idx = torch.full((B, L), pad_id, dtype=torch.long)
    resp = torch.zeros((B, R), dtype=torch.long)
    mask = torch.zeros((B, R))
    for i, (p, r) in enumerate(zip(prompts, responses)):
        row = p + r
        idx[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        if r:
            resp[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
    return idx, torch.tensor([len(p) for p in prompts]), resp, mask


@torch.no_grad()
def score_rows(rm, idx: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    return rm(idx, lengths, starts).float()


@torch.no_grad()
def rollout(
    engine,
    policy: PolicyWithValue,
    ref: GPT,
    rm,
    tokenizer,
    prompts: list[list[int]],
    params,
    temperature: float = 1.0,
    with_value: bool = True,
) -> Rollout:
    """Sample one response per prompt (a prompt repeated K times: a group of K) through the engine, then score
    and evaluate it (no gradients). Log-probs are those of the sampling distribution, logits / `temperature`,
    for the policy and the reference alike (TRL's convention): ratios and KL then refer to what was sampled.
    `with_value=False` (critic-free methods) leaves the values at 0."""
    comps = engine.generate(prompts, params)
    responses = [list(c.token_ids) for c in comps]
    ended = torch.tensor([1.0 if c.finish_reason == "stop" else 0.0 for c in comps])
    device = next(policy.parameters()).device
    idx, plen, resp, mask = build_rows(prompts, responses, tokenizer.eot_id)
    idx, plen, resp, mask = idx.to(device), plen.to(device), resp.to(device), mask.to(device)
    was_training = policy.training
    policy.eval()
    logits, values = policy(idx, plen, resp, with_value=with_value)
    if values is None:
        values = torch.zeros_like(mask)
    policy.train(was_training)
    logp = pc.logprobs_of(logits, resp, temperature) * mask
    ref_logp = response_logprobs(ref, idx, plen, resp, temperature) * mask
    lengths = plen + mask.sum(1).long()
    # an empty response (the model stopped at once... impossible: the stop token itself is a response token)
    score = score_rows(rm, idx, lengths.clamp_min(1), plen)
    err = 0.0
    for i, c in enumerate(comps):
        if c.logprobs:
            n = len(c.logprobs)
            e = (torch.tensor(c.logprobs, device=device) - logp[i, :n]).abs().max().item()
            err = max(err, e)
    return Rollout(
        idx, plen, resp, mask, logp, ref_logp, values * mask, score, ended.to(device), [c.text for c in comps], err
    )
