"""Group-baseline policy gradients (RLOO, GRPO) and DPO: the algorithm cores, pure tensor functions.

    adv, keep = group_advantages(scores, group=8, algo="rloo")       # (B,) per answer, (B,) bool
    loss, stats = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=0.1)        # sequence log-probs -> DPO loss

Rows come in groups: answers b*K .. b*K+K-1 were sampled for the same prompt.

  RLOO (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019): A_i = r_i - mean_{j != i} r_j
       = K/(K-1) * (r_i - mean_j r_j): each answer is baselined by its K-1 siblings, so the baseline does not
       depend on the answer itself and the gradient stays unbiased.
  GRPO (Shao et al. 2024, DeepSeekMath): A_i = r_i - mean_j r_j, by default WITHOUT dividing by the group's
       std (`scale="std"` does): for binary rewards and small groups the division inflates groups with one
       lucky answer and is a biased estimator (Liu et al. 2025, "Understanding R1-Zero-like training").
  Groups whose K rewards are all equal carry no signal (every advantage is 0): `keep` is False for them, and
       the caller drops those answers from the update (DAPO's dynamic sampling, Yu et al. 2025).

  DPO (Rafailov et al. 2023): loss = -log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))), with pi/ref the
       summed log-probabilities of the chosen (w) and rejected (l) answers under the policy and the frozen
       reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chatstack.rlhf.rollout import response_logprobs

ALGOS = ("rloo", "grpo")


def group_advantages(
    scores: torch.Tensor, group: int, algo: str = "rloo", scale: str = "none", eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages (B,), keep (B,) bool) for B = n_groups * group scores laid out group by group."""
    if algo not in ALGOS:
        raise ValueError(f"unknown algo {algo!r}; choose from {', '.join(ALGOS)}")
    if group < 2:
        raise ValueError(f"a group needs at least 2 answers, got {group}")
    if scores.numel() % group:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group}")
    r = scores.float().view(-1, group)
    mean = r.mean(1, keepdim=True)
    if algo == "rloo":
        adv = (r * group - r.sum(1, keepdim=True)) / (group - 1)  # r_i - mean of the others
    else:
        adv = r - mean
    spread = r.max(1, keepdim=True).values - r.min(1, keepdim=True).values
    keep = (spread > eps).expand_as(r)
    if scale == "std":
        adv = adv / (r.std(1, keepdim=True) + eps)
    elif scale != "none":
        raise ValueError(f"scale must be 'none' or 'std', got {scale!r}")
    return (adv * keep).reshape(-1), keep.reshape(-1)


def dpo_loss(
    pi_w: torch.Tensor, pi_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float = 0.1
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO's loss over a batch of pairs (summed sequence log-probs, (P,) each) and its usual statistics."""
    chosen = beta * (pi_w - ref_w)
    rejected = beta * (pi_l - ref_l)
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        stats = {
            "reward_chosen": chosen.mean().item(),
            "reward_rejected": rejected.mean().item(),
            "reward_margin": margin.mean().item(),
            "reward_accuracy": (margin > 0).float().mean().item(),
        }
    return loss, stats


def sequence_logprobs(
    lm, idx: torch.Tensor, prompt_lens: torch.Tensor, resp: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Summed log-probability of each response under a language model: (B,) (right-padded rows, as in
    chatstack.rlhf.rollout.build_rows)."""
    return (response_logprobs(lm, idx, prompt_lens, resp) * mask).sum(1)
