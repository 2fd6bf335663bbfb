"""The arithmetic of PPO for language models, as pure functions on tensors (no model, no I/O).

Everything works on response-aligned tensors of shape (B, R): row b is one sampled response, column t
its t-th token, and `mask` (B, R) is 1 on real tokens (responses are right-padded). Nothing here knows
about models or tokenizers, so each piece is unit-tested against hand computations (tests/test_ppo_core.py).

    per-token reward   r_t = -beta * KL_t (+ RM score at the final token, - penalty if it never ended)
    advantages         GAE(gamma, lambda) over r_t and the value estimates V_t, then whitened
    policy loss        -min(ratio * A, clip(ratio, 1-eps, 1+eps) * A)            (Schulman et al. 2017)
    value loss         0.5 * max((V - G)^2, (V_old + clip(V - V_old, +-eps_v) - G)^2)
    KL estimators      k1 = log p - log q, k3 = (q/p - 1) - log(q/p)             (Schulman, "Approximating KL")

The KL controllers follow Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries (as numpy's ddof=1)."""
    mask = mask.to(x.dtype)
    n = mask.sum()
    mean = (x * mask).sum() / n.clamp_min(1.0)
    return (((x - mean) ** 2) * mask).sum() / (n - 1).clamp_min(1.0)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise the masked entries to variance 1 (and mean 0 unless shift_mean=False); padding stays 0."""
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def kl_estimate(
    logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi: log-probs of the sampled tokens under both.

    k1 = log pi - log ref        unbiased, can be negative on single samples
    k3 = (r - 1) - log r         with r = ref/pi: unbiased, always >= 0, lower variance when pi ~ ref
    With `mask`, positions off the mask give 0: padding's log-probs are arbitrary, and under a sharp policy
    e^(log r) there overflows to inf, which a later `* mask` turns into NaN (in the gradient too).
    """
    if kind == "k1":
        return (logp - ref_logp) if mask is None else (logp - ref_logp) * mask
    if kind == "k3":
        log_r = ref_logp - logp
        if mask is not None:
            log_r = log_r * mask
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {kind!r}; use 'k1' or 'k3'")


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (B,); a row with no tokens gives 0."""
    lengths = mask.long().sum(1)
    return (lengths - 1).clamp_min(0)


def token_rewards(
    score: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, R): -kl_coef * KL_t everywhere, plus the sequence score (B,) at the final token.

    Returns (rewards, kl) with kl the per-token estimate (masked to 0 on padding).
    """
    m = mask.to(logp.dtype)
    kl = kl_estimate(logp, ref_logp, kl_kind, m)
    rewards = -kl_coef * kl
    idx = last_index(mask)
    rewards = rewards.scatter_add(1, idx[:, None], score[:, None].to(rewards.dtype))
    return rewards * m, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded rows. Returns (advantages, returns), (B, R).

    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last real token = 0: the episode ended)
    A_t     = delta_t + gamma * lam * A_{t+1}
    returns = A_t + V_t  (the value targets)
    """
    m = mask.to(values.dtype)
    B, R = rewards.shape
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros(B, dtype=values.dtype, device=values.device)
    for t in reversed(range(R)):
        # padding columns carry nothing: reset the running values so a row's own end starts fresh
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        a = a * m[:, t]
        adv[:, t] = a
        next_value = values[:, t] * m[:, t]
        next_adv = a
    returns = adv + values * m
    return adv, returns


def reduce_loss(x: torch.Tensor, mask: torch.Tensor, norm: str = "token", horizon: float = 1.0) -> torch.Tensor:
    """A per-token loss (B, R) to a scalar. "token": mean over all real tokens of the batch (long answers weigh
    more); "seq": mean over each answer's tokens, then over answers (every answer weighs the same, and each token
    of a long answer weighs less); "sum": sum over each answer's tokens, mean over answers, divided by the constant
    `horizon` (Dr. GRPO, Liu et al. 2025): for a sequence-level advantage this is the policy gradient itself,
    A * grad log pi(answer), with no bias from the answer's length."""
    if norm == "token":
        return masked_mean(x, mask)
    if norm == "sum":
        return (x * mask.to(x.dtype)).sum(1).mean() / horizon
    if norm == "seq":
        m = mask.to(x.dtype)
        rows = m.sum(1) > 0
        per_row = (x * m).sum(1) / m.sum(1).clamp_min(1.0)
        return per_row[rows].mean() if bool(rows.any()) else per_row.sum() * 0.0
    raise ValueError(f"loss normalisation must be 'token', 'seq' or 'sum', got {norm!r}")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    norm: str = "token",
    horizon: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate (a loss to minimise), with clip fraction and approx-KL (k3, old||new)."""
    log_ratio = (logp - old_logp) * mask  # padding's log-probs are arbitrary: keep e^x finite there
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = reduce_loss(torch.maximum(unclipped, clipped), mask, norm, horizon)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)  # k3 estimate of KL(old || new)
    return loss, {"clipfrac": clipfrac.item(), "approx_kl": approx_kl.item()}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    norm: str = "token",
    horizon: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss: 0.5 * max((V - G)^2, (V_clipped - G)^2), V_clipped within +-clip of V_old."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    l1 = (values - returns) ** 2
    l2 = (v_clipped - returns) ** 2
    loss = 0.5 * reduce_loss(torch.maximum(l1, l2), mask, norm, horizon)
    with torch.no_grad():
        vclipfrac = masked_mean((l2 > l1).float(), mask)
    return loss, {"value_clipfrac": vclipfrac.item()}


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the categorical distribution softmax(logits / T) at every position: (..., V) -> (...)."""
    logp = F.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under softmax(logits / T): (B, R, V), (B, R) -> (B, R). T is the sampling temperature, so the
    log-probs are those of the distribution the tokens were drawn from (T = 0, greedy, counts as 1)."""
    t = temperature if temperature > 0 else 1.0
    logp = F.log_softmax(logits.float() / t, dim=-1)
    return logp.gather(-1, tokens.clamp_min(0).unsqueeze(-1)).squeeze(-1)


@dataclass
class FixedKLController:
    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])


@dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019: beta <- beta * (1 + K_beta * e), e = clip(KL/target - 1, -0.2, 0.2), K_beta = n/horizon."""

    value: float
    target: float
    horizon: int = 10000

    def update(self, current_kl: float, n_steps: int) -> None:
        err = max(-0.2, min(0.2, current_kl / self.target - 1.0))
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])


def make_kl_controller(kl_coef: float, target_kl: float | None, horizon: int = 10000):
    if target_kl is not None and target_kl > 0 and not math.isinf(target_kl):
        return AdaptiveKLController(kl_coef, target_kl, horizon)
    return FixedKLController(kl_coef)
