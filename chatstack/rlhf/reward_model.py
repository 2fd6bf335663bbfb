"""The reward model: the SFT transformer plus a scalar head at the final token (optionally a likelihood term).

    likelihood="none" (InstructGPT):  r(x, y) = head(h_T)
    likelihood="mean" (our default):  r(x, y) = head(h_T) + s * 1/|y| sum_t log p(y_t | x, y_<t)
    likelihood="sum":                 r(x, y) = head(h_T) + s * sum_t log p(y_t | x, y_<t)

h_T is the final-normed hidden state at the response's last token (its <|im_end|>); p is the RM's own output
layer (kept only with a likelihood term; tied to the embedding in our presets, so no extra parameters); s is
a learned scalar (init 1) and the head starts at zero, so the untrained RM is the SFT model's own likelihood.

Why the likelihood term: on the built-in tasks the judge's pairs are "correct vs wrong, both well-formed", and
the head alone, trained from a few thousand pairs, learns to check answers poorly (61% held-out pairwise
accuracy in the speedrun). The SFT model's likelihood of an answer already ranks 80-83% of those pairs right:
the output layer is exactly the part of the SFT model that knows which digits should come next, and
InstructGPT's RM throws it away. Training then adjusts both terms (docs/rlhf.md, "The likelihood term").

Trained with InstructGPT's K-wise loss (Ouyang et al. 2022, eq. 1): for one prompt with a ranking of K
responses, all C(K,2) (winner, loser) pairs form ONE batch element,

    loss(x) = -1/C(K,2) * sum_{(w,l)} log sigmoid(r(x, y_w) - r(x, y_l))

and the batch loss is the mean over prompts. A prompt's comparisons are never split across batch elements
(splitting them makes each response appear K-1 times per epoch, which the paper found overfits).

After training, the head's bias is shifted so the mean reward over the reference responses is 0
(`normalise_`), so PPO's reward starts centred.

A reward-model checkpoint has kind "reward" and "likelihood" in config.json: model.safetensors holds `gpt.*`
(no lm_head unless the likelihood term needs one), `head.*` and, with the likelihood term, `lik_scale`.

    from chatstack.rlhf.reward_model import RewardModel, load_reward_model
    rm, cfg = load_reward_model("runs/x/rm"); scores = rm(idx, lengths, starts)    # (B,)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatstack.checkpoint import CheckpointError, load_weights, read_config
from chatstack.model import GPT, GPTConfig
from chatstack.rlhf.ppo_core import logprobs_of
from chatstack.rlhf.rollout import gather_response

LIKELIHOOD_MODES = ("none", "mean", "sum")


class RewardModel(nn.Module):
    """`likelihood`: "none" = InstructGPT's RM (no output layer); "mean" / "sum" = the output layer is kept and
    the score adds `lik_scale` x the mean (or sum) log-probability of the response tokens (see module doc)."""

    def __init__(self, cfg: GPTConfig, likelihood: str = "none"):
        super().__init__()
        if likelihood not in LIKELIHOOD_MODES:
            raise ValueError(f"likelihood must be one of {LIKELIHOOD_MODES}, got {likelihood!r}")
        self.config = cfg
        self.likelihood = likelihood
        self.gpt = GPT(cfg)
        if likelihood == "none":
            self.gpt.lm_head = None  # the output layer is not part of a reward model (unties it if tied)
        else:
            self.lik_scale = nn.Parameter(torch.tensor(1.0))
        self.head = nn.Linear(cfg.n_embd, 1)
        # with a likelihood term the head starts at zero: the untrained RM *is* the LM's own likelihood
        nn.init.normal_(self.head.weight, std=0.0 if likelihood != "none" else 1.0 / (cfg.n_embd + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_lm(cls, lm: GPT, likelihood: str = "none") -> RewardModel:
        """Initialise the trunk (and, with a likelihood term, the output layer) from a language model."""
        rm = cls(lm.config, likelihood)
        sd = lm.state_dict()
        if likelihood == "none":
            sd = {k: v for k, v in sd.items() if not k.startswith("lm_head.")}
        rm.gpt.load_state_dict(sd, strict=True)
        return rm.to(lm.tok_emb.weight.device)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (B,) read at token lengths-1 of each right-padded row idx (B, T).

        `starts` (B,): where each response begins (the prompt's length); needed with a likelihood term."""
        h = self.gpt.hidden_states(idx)  # (B, T, h)
        rows = torch.arange(idx.size(0), device=idx.device)
        last = (lengths - 1).clamp_min(0)
        score = self.head(h[rows, last]).squeeze(-1)  # (B,)
        if self.likelihood == "none":
            return score
        if starts is None:
            raise ValueError("this reward model scores the response's likelihood: pass starts (prompt lengths)")
        # response token j sits at position starts+j and is predicted from position starts+j-1 (starts >= 1)
        R = int((lengths - starts).max().clamp_min(1))
        j = torch.arange(R, device=idx.device)[None]  # (1, R)
        mask = (j < (lengths - starts)[:, None]).to(h.dtype)  # (B, R)
        tokens = idx.gather(1, (starts[:, None] + j).clamp(max=idx.size(1) - 1))  # (B, R)
        logp = logprobs_of(self.gpt.lm_head(gather_response(h, starts, R)), tokens) * mask  # (B, R)
        lik = logp.sum(1)
        if self.likelihood == "mean":
            lik = lik / mask.sum(1).clamp_min(1.0)
        return score + self.lik_scale * lik

    @torch.no_grad()
    def normalise_(self, mean_reward: float) -> None:
        self.head.bias -= mean_reward


def load_reward_model(path: str | Path, device="cpu") -> tuple[RewardModel, dict]:
    cfg = read_config(path)
    if cfg.get("kind") != "reward":
        raise CheckpointError(
            f"{Path(path) / 'config.json'}: kind is {cfg.get('kind')!r}, expected 'reward' "
            "(make one with `chatstack reward`)"
        )
    rm = RewardModel(GPTConfig.from_dict(cfg["model"]), cfg.get("likelihood", "none"))
    load_weights(path, rm, strict=True)
    return rm.to(device).eval(), cfg


# ---- the loss -------------------------------------------------------------------------------------------
def ranking_loss(
    scores: torch.Tensor, pair_w: torch.Tensor, pair_l: torch.Tensor, pair_group: torch.Tensor, n_groups: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """InstructGPT's loss: per group (prompt), the mean of -log sigmoid(r_w - r_l) over its pairs; then the mean
    over groups. scores (N,) over all responses of the batch; pair_* (P,) index responses / groups."""
    margin = scores[pair_w] - scores[pair_l]  # (P,)
    per_pair = -F.logsigmoid(margin)
    sums = torch.zeros(n_groups, dtype=per_pair.dtype, device=per_pair.device).index_add(0, pair_group, per_pair)
    counts = torch.zeros(n_groups, dtype=per_pair.dtype, device=per_pair.device).index_add(
        0, pair_group, torch.ones_like(per_pair)
    )
    loss = (sums / counts.clamp_min(1.0)).mean()
    with torch.no_grad():
        stats = {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item()}
    return loss, stats


# ---- turning comparison groups into tensors -------------------------------------------------------------
def encode_response(tokenizer, prompt: list[dict], response: str, block_size: int, with_start: bool = False):
    """ChatML prompt + response + <|im_end|>: exactly the tokens a policy emits before stopping.
    Over-long rows keep the end of the prompt (the newest turns) and the whole response when possible.
    With `with_start`, returns (ids, index of the response's first token), at least 1: token 0 has no
    position before it to predict it, so a response cut to the whole context is scored from its second token."""
    p = tokenizer.render_prompt(prompt)
    r = tokenizer.encode(response) + [tokenizer.im_end_id]
    if len(r) >= block_size:
        ids = (p[:1] + r)[-block_size:]
        return (ids, 1) if with_start else ids
    if len(p) + len(r) > block_size:
        p = p[len(p) + len(r) - block_size :]
    return (p + r, len(p)) if with_start else p + r


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return idx, torch.tensor([len(r) for r in rows], dtype=torch.long)


def collate(groups, tokenizer, block_size: int, encoded: dict | None = None) -> dict[str, torch.Tensor]:
    """Comparison groups -> {idx (N, T), lengths (N,), starts (N,), pair_w, pair_l, pair_group (P,), n_groups ()}.

    `encoded` is an optional cache {(group key, response): ids} so repeated epochs skip tokenisation."""
    rows, starts, pw, pl, pg = [], [], [], [], []
    for gi, g in enumerate(groups):
        base = len(rows)
        for r in g.responses:
            key = (g.key, r)
            hit = encoded.get(key) if encoded is not None else None
            if hit is None:
                hit = encode_response(tokenizer, g.prompt, r, block_size, with_start=True)
                if encoded is not None:
                    encoded[key] = hit
            rows.append(hit[0])
            starts.append(hit[1])
        for w, l in g.pairs:
            pw.append(base + w)
            pl.append(base + l)
            pg.append(gi)
    idx, lengths = pad_rows(rows, tokenizer.eot_id)
    return {
        "idx": idx,
        "lengths": lengths,
        "starts": torch.tensor(starts, dtype=torch.long),
        "pair_w": torch.tensor(pw),
        "pair_l": torch.tensor(pl),
        "pair_group": torch.tensor(pg),
        "n_groups": torch.tensor(len(groups)),
    }


def batch_loss(rm: RewardModel, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    scores = rm(batch["idx"], batch["lengths"], batch["starts"])
    return ranking_loss(scores, batch["pair_w"], batch["pair_l"], batch["pair_group"], int(batch["n_groups"]))


@torch.no_grad()
def evaluate_groups(
    rm: RewardModel, groups, tokenizer, block_size: int, batch_groups: int = 32, encoded: dict | None = None
) -> dict[str, float]:
    """Pairwise accuracy, mean margin and loss over held-out groups (every pair counted once)."""
    was_training = rm.training
    rm.eval()
    device = next(rm.parameters()).device
    correct = total = 0
    margin_sum = loss_sum = 0.0
    for i in range(0, len(groups), batch_groups):
        b = collate(groups[i : i + batch_groups], tokenizer, block_size, encoded)
        b = {k: v.to(device) for k, v in b.items()}
        scores = rm(b["idx"], b["lengths"], b["starts"])
        m = scores[b["pair_w"]] - scores[b["pair_l"]]
        correct += (m > 0).sum().item()
        total += m.numel()
        margin_sum += m.sum().item()
        loss_sum += (-F.logsigmoid(m)).sum().item()
    rm.train(was_training)
    n = max(total, 1)
    return {
        "val_accuracy": correct / n,
        "val_margin": margin_sum / n,
        "val_pair_loss": loss_sum / n,
        "val_pairs": total,
    }


@torch.no_grad()
def mean_score(
    rm: RewardModel, groups, tokenizer, block_size: int, batch_groups: int = 32, encoded: dict | None = None
) -> float:
    """Mean reward over every response of `groups` (the reference set for normalisation)."""
    device = next(rm.parameters()).device
    s, n = 0.0, 0
    for i in range(0, len(groups), batch_groups):
        b = collate(groups[i : i + batch_groups], tokenizer, block_size, encoded)
        scores = rm(b["idx"].to(device), b["lengths"].to(device), b["starts"].to(device))
        s += scores.sum().item()
        n += scores.numel()
    return s / max(n, 1)
