"""`chatstack ppo`: RLHF with PPO against a reward model, a KL penalty to the SFT model, and PPO-ptx.

    chatstack ppo --policy runs/x/sft --reward runs/x/rm --out runs/x/ppo
    chatstack ppo --policy runs/x/sft --reward runs/x/rm --out runs/x/ppo --ptx-coef 0.5 --kl-coef 0.2
    chatstack ppo --policy runs/x/sft --reward runs/x/rm --out runs/x/ppo --resume       # continue exactly
    chatstack ppo --policy runs/x/sft --reward runs/x/rm --out runs/x/ppo --rounds 2     # label -> RM -> PPO again
    chatstack ppo --policy runs/x/sft --reward judge --out runs/x/ppo_judge   # built-in judge as reward (ceiling)

One iteration (InstructGPT / Ziegler et al. 2019):
  1. rollout: sample one answer per prompt through the engine (temperature 1, per-token log-probs);
  2. score: r = RM(prompt, answer) at the answer's final token, minus `no_eos_penalty` if it never ended;
     per-token reward = -beta * KL_t(policy || SFT) (k1, or k3), plus r on the last token;
     beta fixed, or adaptive toward `target_kl` (nats per answer);
  3. GAE(gamma, lambda) with the value head, advantages whitened over the batch;
  4. `ppo_epochs` passes over minibatches: clipped policy loss + vf_coef * clipped value loss
     (+ ptx_coef * next-token loss on a pretraining batch: PPO-ptx).
The policy shares its trunk with the value head (see chatstack/rlhf/rollout.py for why).

Metrics per iteration go to OUT/metrics.jsonl: reward (mean RM score), kl (mean per-answer KL to the SFT
model, k1), entropy, clipfrac, approx_kl, value_loss, response_length, ... ; every `eval_every`
iterations also held-out exact-match accuracy on the built-in tasks and the held-out pretraining loss
(`ptx_val_loss`: the "alignment tax"). The checkpoint in OUT is a plain language-model checkpoint (stage
"ppo"); the value head, optimizer and KL controller are in OUT/state for exact resume.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from chatstack.args import CLIError, add_dataclass_args, dataclass_from_args
from chatstack.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_state,
    load_weights,
    read_config,
    recover,
    save_checkpoint,
)
from chatstack.data.builtin import builtin_texts
from chatstack.data.shards import TokenDataset
from chatstack.evals.sampled import evaluate_questions, task_questions
from chatstack.infer.engine import Engine, SamplingParams
from chatstack.rlhf import ppo_core as pc
from chatstack.rlhf.group import ALGOS, group_advantages
from chatstack.rlhf.logit_scale import LogitScale
from chatstack.rlhf.reward_model import load_reward_model
from chatstack.rlhf.rollout import PolicyWithValue, build_rows, rollout, score_rows
from chatstack.stages.label import LabelConfig, file_prompts, judge_score, label, task_prompts
from chatstack.stages.reward import RewardConfig, train_reward
from chatstack.train.loop import Metrics
from chatstack.train.lora import LoraArgs, apply_lora, check_flags, load_trainable_state, plain_copy, trainable_state
from chatstack.train.optim import build_adamw, lr_at


@dataclass
class PPOConfig(LoraArgs):
    policy: str = field(default="", metadata={"help": "SFT checkpoint: the initial policy and the KL reference"})
    reward: str = field(
        default="",
        metadata={
            "help": "reward-model checkpoint (chatstack reward), or 'judge': the "
            "built-in judge's score of each answer (verifiable tasks only; "
            "the ceiling a perfect reward model would give)"
        },
    )
    reference: str = field(default="", metadata={"help": "frozen KL reference (default: --policy)"})
    out: str = field(default="", metadata={"help": "checkpoint directory to write (and resume from)"})
    prompts: str = field(
        default="", metadata={"help": "JSONL of {'prompt'} / {'messages'} (default: built-in task prompts)"}
    )
    tasks: str = field(
        default="", metadata={"help": "comma-separated built-in tasks for prompts and eval (default: all)"}
    )
    # -- algorithm
    algo: str = field(
        default="ppo",
        metadata={
            "help": "ppo: value head + GAE, KL in the reward (InstructGPT); rloo / "
            "grpo: K answers per prompt, group baseline, no critic, k3 KL "
            "in the loss (checked by the stage: a one-line error)"
        },
    )
    group: int = field(default=1, metadata={"help": "answers sampled per prompt (rloo/grpo: K >= 2)"})
    adv_scale: str = field(
        default="none",
        metadata={
            "help": "grpo: 'std' divides by the group's std (biased for binary rewards and small groups)",
            "choices": ["none", "std"],
        },
    )
    loss_norm: str = field(
        default="seq",
        metadata={
            "help": "seq: every answer weighs the same (mean over its tokens, "
            "then over answers); token: mean over all tokens; sum: sum over each answer's tokens / "
            "--max-new-tokens (the unbiased policy gradient, Dr. GRPO)",
            "choices": ["seq", "token", "sum"],
        },
    )
    prompt_filter: int = field(
        default=0,
        metadata={
            "help": "before training, sample N answers per pool prompt from the "
            "initial policy and keep the prompts whose answers score "
            "differently (0 = off)"
        },
    )
    pool: int = field(default=4000, metadata={"help": "built-in task prompts in the training pool"})
    # -- schedule
    iterations: int = field(default=300, metadata={"help": "PPO iterations (rollout + update)"})
    time_budget: float = field(default=270.0, metadata={"help": "seconds for the whole run, evals included (0 = none)"})
    rollout_batch: int = field(default=64, metadata={"help": "prompts per iteration (each sampled --group times)"})
    max_new_tokens: int = field(
        default=48, metadata={"help": "answer length cap during rollouts and evals (48 as chatstack eval)"}
    )
    temperature: float = field(default=1.0, metadata={"help": "rollout sampling temperature"})
    ppo_epochs: int = field(default=2, metadata={"help": "passes over each rollout batch"})
    minibatch: int = field(default=32, metadata={"help": "answers per PPO minibatch"})
    # lr 2e-5 and beta 0.2 kept held-out accuracy flat over 100 iterations; 1e-4 / 0.05 lost 9 points in 20 (docs/rlhf.md)
    lr: float = field(default=2e-5, metadata={"help": "learning rate (constant after warmup)"})
    warmup: int = field(default=5, metadata={"help": "warmup iterations"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decay on matrices"})
    final_norm_lr_mult: float = field(
        default=1.0,
        metadata={
            "help": "learning-rate multiplier for the final norm's parameters, which set the scale of the logits "
            "(how sharp sampling is): Adam moves each parameter by about lr per step, so at the body's lr "
            "sharpening the whole distribution takes thousands of iterations (docs/rlhf.md); with --lora-rank "
            "a multiplier other than 1 also trains the final norm in full (it is saved in the weights)"
        },
    )
    logit_scale_lr: float = field(
        default=0.0,
        metadata={
            "help": "lr of a learned scalar logit scale (the final norm's overall gain: how sharply the policy "
            "samples; chatstack.rlhf.logit_scale); 0 = off"
        },
    )
    grad_clip: float = field(default=1.0, metadata={"help": "global gradient-norm clip"})
    # -- PPO
    kl_coef: float = field(default=0.2, metadata={"help": "beta: KL penalty per token (initial value if adaptive)"})
    target_kl: float = field(
        default=0.0, metadata={"help": "adaptive beta toward this KL per answer, nats (0 = fixed)"}
    )
    kl_horizon: int = field(default=10000, metadata={"help": "adaptive KL controller horizon (answers)"})
    kl_estimator: str = field(
        default="k1", metadata={"help": "per-token KL estimate in the reward", "choices": ["k1", "k3"]}
    )
    gamma: float = field(default=1.0, metadata={"help": "GAE discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value clip"})
    vf_coef: float = field(default=0.1, metadata={"help": "value-loss weight"})
    whiten_advantages: bool = field(default=True, metadata={"help": "normalise advantages per batch"})
    no_eos_penalty: float = field(default=1.0, metadata={"help": "subtracted from the score of answers that never end"})
    # -- PPO-ptx
    ptx_coef: float = field(default=0.0, metadata={"help": "gamma_ptx: weight of the pretraining loss (0 = plain PPO)"})
    ptx_data: str = field(
        default="",
        metadata={"help": "prepared pretraining data dir (default: the base model's, else built-in Shakespeare)"},
    )
    ptx_batch: int = field(default=8, metadata={"help": "pretraining rows per PPO minibatch"})
    ptx_len: int = field(default=128, metadata={"help": "tokens per pretraining row"})
    ptx_mode: str = field(
        default="relative",
        metadata={
            "help": "relative: penalise only the pretraining loss above the frozen reference's on the same batch, "
            "max(0, L_pi - L_ref) (stable, see docs/rlhf.md); absolute: plain L_pi (InstructGPT's form)",
            "choices": ["relative", "absolute"],
        },
    )
    # -- bookkeeping
    eval_every: int = field(
        default=20, metadata={"help": "held-out accuracy + pretraining loss every N iterations (0 = ends only)"}
    )
    eval_n: int = field(default=30, metadata={"help": "held-out examples per task per eval"})
    eval_samples: int = field(
        default=0,
        metadata={
            "help": "in-loop evals also sample this many answers per question "
            "at --temperature (avg@K, maj@K, pass@K; 0 = greedy only)"
        },
    )
    save_every: int = field(default=50, metadata={"help": "checkpoint every N iterations (0 = end only)"})
    seed: int = field(default=1337, metadata={"help": "seed for prompts, sampling and minibatches"})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda | ..."})
    resume: bool = field(default=False, metadata={"help": "continue from the checkpoint in --out, exactly"})
    progress: bool = field(default=True, metadata={"help": "progress bar"})
    # -- iterated RLHF
    rounds: int = field(default=1, metadata={"help": "repeat label -> reward -> PPO with the newest policy"})
    label_prompts: int = field(default=400, metadata={"help": "rounds > 1: prompts labelled per round"})
    label_k: int = field(default=4, metadata={"help": "rounds > 1: answers ranked per prompt"})


# ---- prompts and pretraining data ------------------------------------------------------------------------
def prompt_pool(cfg: PPOConfig, tokenizer) -> list[tuple[list[int], object]]:
    """(prompt token ids, its task Example or None) for every rollout prompt."""

    if cfg.prompts:
        items = file_prompts(cfg.prompts)
    else:
        names = [t.strip() for t in cfg.tasks.split(",") if t.strip()] or None
        items = task_prompts(cfg.pool, "train", cfg.seed, names)
    if not items:
        raise ValueError(f"{cfg.prompts or 'built-in tasks'}: no prompts")
    return [(tokenizer.render_prompt(m), ex) for m, ex in items]


class JudgeReward(torch.nn.Module):
    """`--reward judge`: the built-in judge's score of each answer as the reward (label.judge_score: 2 correct and
    well-formed, 1 correct but malformed, 0 wrong but well-formed, -1 wrong and malformed), minus `centre` (the
    SFT policy's mean, measured on the first rollout, as a reward model is centred on reference answers).

    Not RLHF: no labeller and no reward model. It is reinforcement learning from a verifiable reward, and here
    it measures what PPO could do with a perfect reward model (docs/rlhf.md, "What limits PPO here"). Same interface as a
    reward model: (idx (B, L), lengths (B,), starts (B,)) -> (B,) scores."""

    def __init__(self, tokenizer, pool: list[tuple[list[int], object]]):
        super().__init__()
        if any(ex is None for _, ex in pool):
            raise ValueError(
                "--reward judge scores the built-in verifiable tasks only; it cannot be used with --prompts"
            )
        self.tok = tokenizer
        self.examples = {tuple(ids): ex for ids, ex in pool}
        self.centre: float | None = None

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        specials = self.tok.special_ids
        out = []
        for row, n, s in zip(idx.tolist(), lengths.tolist(), starts.tolist()):
            answer = self.tok.decode([t for t in row[s:n] if t not in specials])
            out.append(judge_score(answer, self.examples[tuple(row[:s])]))
        scores = torch.tensor(out, device=idx.device)
        if self.centre is None:
            self.centre = scores.mean().item()
        return scores - self.centre


@torch.no_grad()
def filter_pool(engine, rm, tok, pool: list, cfg: PPOConfig) -> list[int]:
    """Indices of the pool prompts whose `prompt_filter` sampled answers (initial policy) get different rewards:
    a prompt the policy always solves, or never does, gives every answer the same reward and no gradient."""

    k = cfg.prompt_filter
    ids = [p for p, _ in pool for _ in range(k)]
    params = [
        SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=_seed(cfg.seed, 7, i))
        for i in range(len(ids))
    ]
    comps = engine.generate(ids, params)
    scores = []
    for s in range(0, len(ids), 256):
        idx, plen, resp, mask = build_rows(
            ids[s : s + 256], [list(c.token_ids) for c in comps[s : s + 256]], tok.eot_id
        )
        ended = torch.tensor([float(c.finish_reason == "stop") for c in comps[s : s + 256]])
        sc = score_rows(rm, idx, (plen + mask.sum(1).long()).clamp_min(1), plen)
        scores.append(sc.cpu() - cfg.no_eos_penalty * (1.0 - ended))
    r = torch.cat(scores).view(len(pool), k)
    return ((r.max(1).values - r.min(1).values) > 1e-6).nonzero().flatten().tolist()


def _lineage_data(policy_path: str) -> str | None:
    """The prepared pretraining data dir of the policy's ancestors (SFT -> base), if recorded and present."""

    path = policy_path
    for _ in range(4):
        try:
            c = read_config(path)
        except Exception:
            return None
        d = (c.get("train") or {}).get("data")
        if isinstance(d, str) and (Path(d) / "meta.json").exists():
            return d
        path = c.get("parent")
        if not path:
            return None
    return None


def pretraining_tokens(cfg: PPOConfig, tokenizer) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(train tokens, held-out tokens, source) for PPO-ptx and the alignment-tax measurement."""

    src = cfg.ptx_data or _lineage_data(cfg.policy)
    if src:
        ds = TokenDataset(src)
        ds.check_tokenizer(tokenizer, f"{cfg.policy}/tokenizer.json")
        tr = torch.from_numpy(np.asarray(ds.split("train").tokens, dtype=np.int64))
        va = torch.from_numpy(np.asarray(ds.split("val").tokens, dtype=np.int64))
        return tr, va, src

    # the built-in corpus, tokenised here (a ~1M-character sample of train is plenty for ptx batches);
    # chunks of lines go through the tokenizer's batch encoder (parallel, in Rust)
    def enc(split, max_chars):
        text, n = [], 0
        for t in builtin_texts("shakespeare", split):
            text.append(t[: max_chars - n])
            n += len(text[-1])
            if n >= max_chars:
                break
        lines = "\n".join(text).splitlines(keepends=True)
        chunks = ["".join(lines[i : i + 200]) for i in range(0, len(lines), 200)]
        return torch.tensor([i for ids in tokenizer.encode_batch(chunks) for i in ids], dtype=torch.long)

    return enc("train", 1_000_000), enc("val", 200_000), "builtin:shakespeare"


def ptx_batch(tokens: torch.Tensor, B: int, T: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, tokens.numel() - T - 1, (B,), generator=g)
    rows = torch.stack([tokens[s : s + T + 1] for s in starts.tolist()])  # (B, T+1)
    return rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def ptx_val_loss(lm, val_tokens: torch.Tensor, T: int, n_rows: int = 32) -> float:
    """Mean next-token loss on fixed held-out pretraining windows (evenly spaced: the same every time)."""
    T = min(T, lm.config.block_size)
    n = val_tokens.numel()
    starts = torch.linspace(0, n - T - 2, n_rows).long().tolist()
    x = torch.stack([val_tokens[s : s + T] for s in starts])
    y = torch.stack([val_tokens[s + 1 : s + T + 1] for s in starts])
    dev = next(lm.parameters()).device
    was = lm.training
    lm.eval()
    _, loss = lm(x.to(dev), targets=y.to(dev))
    lm.train(was)
    return loss.item()


# ---- the run ---------------------------------------------------------------------------------------------
def _seed(*parts: int) -> int:
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p)) % (2**61 - 1)
    return s


def advantages(
    ro, score: torch.Tensor, cfg: PPOConfig, kl_ctl
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(advantages (B, R), value targets (B, R) or None, keep (B,) bool) for one rollout.

    ppo:       per-token reward (score at the end, -beta * KL per token), GAE with the value head, whitened.
    rloo/grpo: one advantage per answer from its group (chatstack.rlhf.group), on every token of the answer;
               no critic; groups whose answers all scored the same are dropped (keep False)."""
    if cfg.algo == "ppo":
        rewards, _ = pc.token_rewards(score, ro.logp, ro.ref_logp, ro.mask, kl_ctl.value, cfg.kl_estimator)
        adv, ret = pc.gae(rewards, ro.values, ro.mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = pc.whiten(adv, ro.mask)
        return adv, ret, torch.ones(len(ro), dtype=torch.bool, device=adv.device)
    seq_adv, keep = group_advantages(score, cfg.group, cfg.algo, cfg.adv_scale)
    return seq_adv[:, None] * ro.mask, None, keep


def policy_update(
    policy,
    ref,
    ro,
    adv: torch.Tensor,
    ret: torch.Tensor | None,
    keep: torch.Tensor,
    opt,
    kl_coef: float,
    cfg: PPOConfig,
    g: torch.Generator,
    ptx_tokens: torch.Tensor | None = None,
    scale: LogitScale | None = None,
) -> dict[str, float]:
    """`ppo_epochs` passes of minibatch updates over the kept answers of a rollout, shared by every algorithm:
    the clipped surrogate (for one epoch over fresh samples the ratio is 1 and it is the plain policy gradient),
    + vf_coef * the clipped value loss when there are value targets (PPO), + kl_coef * k3 KL to the reference
    in the loss (rloo/grpo; PPO puts its KL in the reward), + ptx_coef * the pretraining loss (PPO-ptx).
    Losses are normalised per answer (`loss_norm` "seq"), per token ("token") or summed per answer ("sum")."""
    device = ro.idx.device
    rows = keep.nonzero().flatten().tolist()
    acc: dict[str, float] = {}
    n_mb = 0
    kl_in_loss = cfg.algo != "ppo" and kl_coef > 0
    horizon = float(cfg.max_new_tokens)  # the constant "sum" divides by: the same for every minibatch
    T = cfg.temperature
    for epoch in range(cfg.ppo_epochs):
        perm = [rows[k] for k in torch.randperm(len(rows), generator=g).tolist()]
        for s in range(0, len(perm), cfg.minibatch):
            mb = torch.tensor(perm[s : s + cfg.minibatch], device=device)
            # trim the minibatch to its own longest row
            R = int(ro.mask[mb].sum(1).max().item())
            L = int((ro.prompt_lens[mb] + ro.mask[mb].sum(1).long()).max().item())
            m = ro.mask[mb, :R]
            logits, values = policy(ro.idx[mb, :L], ro.prompt_lens[mb], ro.resp[mb, :R], with_value=ret is not None)
            logp = pc.logprobs_of(logits, ro.resp[mb, :R], T)
            pg, s1 = pc.policy_loss(logp, ro.logp[mb, :R], adv[mb, :R], m, cfg.cliprange, cfg.loss_norm, horizon)
            loss = pg
            parts = {"policy_loss": pg.item(), **s1}
            if ret is not None:
                vf, s2 = pc.value_loss(
                    values, ro.values[mb, :R], ret[mb, :R], m, cfg.cliprange_value, cfg.loss_norm, horizon
                )
                loss = loss + cfg.vf_coef * vf
                parts.update(value_loss=vf.item(), **s2)
            if kl_in_loss:
                kl = pc.reduce_loss(pc.kl_estimate(logp, ro.ref_logp[mb, :R], "k3", m), m, cfg.loss_norm, horizon)
                loss = loss + kl_coef * kl
                parts["kl_loss"] = kl.item()
            with torch.no_grad():
                parts["entropy"] = pc.masked_mean(pc.entropy_from_logits(logits, T), m).item()
            if ptx_tokens is not None and cfg.ptx_coef > 0:
                x, y = ptx_batch(ptx_tokens, cfg.ptx_batch, min(cfg.ptx_len, policy.config.block_size), g)
                _, ptx = policy.lm(x.to(device), targets=y.to(device))
                if n_mb == 0:
                    # the normalisation question in numbers: gradient norms of the two terms, before weighting
                    params_ = [p for p in policy.parameters() if p.requires_grad]
                    g_ppo = torch.autograd.grad(loss, params_, retain_graph=True, allow_unused=True)
                    g_ptx = torch.autograd.grad(ptx, params_, retain_graph=True, allow_unused=True)
                    norm = lambda gs: torch.sqrt(sum((x.float() ** 2).sum() for x in gs if x is not None)).item()
                    n_steps = cfg.ppo_epochs * math.ceil(len(rows) / cfg.minibatch)
                    acc["ppo_grad_norm"] = norm(g_ppo) * n_steps
                    acc["ptx_grad_norm"] = norm(g_ptx) * n_steps
                parts["ptx_loss"] = ptx.item()
                if cfg.ptx_mode == "relative":
                    # measured against the SFT reference on the same tokens: no pull beyond the reference
                    # (which drags the policy off it and inflates the KL), only a push back when PPO has
                    # made the pretraining loss worse than it was (the alignment tax)
                    with torch.no_grad():
                        _, ref_ptx = ref(x.to(device), targets=y.to(device))
                    excess = ptx - ref_ptx
                    parts["ptx_excess"] = excess.item()
                    parts["ptx_active"] = float(excess.item() > 0)
                    ptx = torch.clamp(excess, min=0.0)
                loss = loss + cfg.ptx_coef * ptx
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if scale is not None:
                scale.step()  # from the unclipped gradients; rescales the final norm before opt.step
            gn = torch.nn.utils.clip_grad_norm_(
                policy.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            )
            opt.step()
            parts["grad_norm"] = float(gn)
            for k, v in parts.items():
                acc[k] = acc.get(k, 0.0) + v
            n_mb += 1
    out = {k: v / max(n_mb, 1) for k, v in acc.items()}
    out["updates"] = n_mb
    return out


def ppo_iteration(
    policy,
    ref,
    rm,
    engine,
    tok,
    opt,
    kl_ctl,
    prompts: list[list[int]],
    params,
    cfg: PPOConfig,
    g: torch.Generator,
    ptx_tokens: torch.Tensor | None = None,
    scale: LogitScale | None = None,
) -> dict[str, float]:
    """One iteration of any algorithm: rollout (prompts laid out group by group for rloo/grpo) -> scores ->
    advantages -> policy_update. `rm` is any module rm(idx, lengths, starts) -> (B,) scores. Returns metrics."""

    t0 = time.perf_counter()
    ro = rollout(engine, policy, ref, rm, tok, prompts, params, cfg.temperature, with_value=cfg.algo == "ppo")
    t_roll = time.perf_counter() - t0
    score = ro.score - cfg.no_eos_penalty * (1.0 - ro.ended)
    adv, ret, keep = advantages(ro, score, cfg, kl_ctl)
    kl_seq = ((ro.logp - ro.ref_logp) * ro.mask).sum(1)  # k1 per answer (B,)
    upd = (
        policy_update(policy, ref, ro, adv, ret, keep, opt, kl_ctl.value, cfg, g, ptx_tokens, scale)
        if keep.any()
        else {}
    )
    kl_mean = kl_seq.mean().item()
    kl_ctl.update(kl_mean, len(ro))
    row = {
        "reward": ro.score.mean().item(),
        "reward_penalised": score.mean().item(),
        "kl": kl_mean,
        "kl_per_token": pc.masked_mean(ro.logp - ro.ref_logp, ro.mask).item(),
        "kl_coef": kl_ctl.value,
        "response_length": ro.mask.sum(1).mean().item(),
        "ended_frac": ro.ended.mean().item(),
        "engine_logprob_err": ro.engine_logprob_err,
        "kept_frac": keep.float().mean().item(),
        **upd,
        **({"logit_scale": scale.scale} if scale is not None else {}),
        "rollout_s": round(t_roll, 3),
    }
    return row


def run_ppo(cfg: PPOConfig) -> Path:
    for name in ("policy", "reward", "out"):
        if not getattr(cfg, name):
            raise ValueError(f"--{name}: required")
    if cfg.minibatch <= 0 or cfg.rollout_batch <= 0 or cfg.ppo_epochs <= 0:
        raise ValueError("--rollout-batch, --minibatch and --ppo-epochs must be positive")
    if cfg.algo not in ("ppo", *ALGOS):
        raise ValueError(f"--algo: unknown algorithm {cfg.algo!r}; choose from ppo, {', '.join(ALGOS)}")
    if cfg.algo != "ppo" and cfg.group < 2:
        raise ValueError(
            f"--group: {cfg.algo} compares answers within a group, it needs --group >= 2 (got {cfg.group})"
        )
    if cfg.group < 1:
        raise ValueError(f"--group must be >= 1, got {cfg.group}")
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if read_config(cfg.policy).get("kind", "lm") != "lm":
        raise ValueError(
            f"--policy {cfg.policy}: a {read_config(cfg.policy).get('kind')!r} checkpoint; the policy must be a "
            "language model (the SFT checkpoint)"
        )
    ck = load_checkpoint(cfg.policy, device=device)
    tok = ck.tokenizer
    if tok is None:
        raise ValueError(f"{cfg.policy}: checkpoint has no tokenizer.json")
    pool = prompt_pool(cfg, tok)
    if cfg.reward == "judge":
        rm, rm_cfg = JudgeReward(tok, pool), {}
    else:
        rm, rm_cfg = load_reward_model(cfg.reward, device=device)
    if rm_cfg.get("tokenizer", {}).get("vocab_size") not in (None, tok.vocab_size):
        raise ValueError(
            f"{cfg.reward}: reward model's tokenizer (vocab {rm_cfg['tokenizer']['vocab_size']}) "
            f"differs from the policy's ({tok.vocab_size})"
        )
    for p in rm.parameters():
        p.requires_grad_(False)
    ref = (
        copy.deepcopy(ck.model)
        if not cfg.reference or cfg.reference == cfg.policy
        else load_checkpoint(cfg.reference, device=device).model
    ).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    policy = PolicyWithValue(ck.model).to(device)
    policy.train()
    check_flags(policy, cfg.lora_rank, cfg.lora_targets, 0)
    if cfg.lora_rank:  # adapters on the policy's matrices; the value head trains in full
        apply_lora(policy, cfg.lora_rank, cfg.lora_scale_alpha, cfg.lora_targets)
    if cfg.final_norm_lr_mult != 1.0:
        for p in policy.lm.norm_f.parameters():
            p.requires_grad_(True)  # LoRA froze it; its gain is the logits' scale, the cheapest knob to sharpen
            p.lr_scale = cfg.final_norm_lr_mult  # its own optimizer group (chatstack.train.optim.param_groups)
    scale = None
    if cfg.logit_scale_lr > 0:
        for p in policy.lm.norm_f.parameters():
            p.requires_grad_(True)  # before the optimizer is built, so opt.zero_grad clears their gradients
        scale = LogitScale(policy.lm.norm_f, cfg.logit_scale_lr)
    opt = build_adamw(policy, cfg.lr, cfg.weight_decay, (0.9, 0.95))
    kl_ctl = pc.make_kl_controller(cfg.kl_coef, cfg.target_kl or None, cfg.kl_horizon)

    out = Path(cfg.out)
    recover(out)
    metrics = Metrics(out, True)
    start_it, max_iters = 0, cfg.iterations
    if cfg.resume and (out / "state" / "ppo.pt").exists():
        st = load_state(out)["ppo"]
        if cfg.lora_rank:  # the base is --policy; the state holds the adapters
            load_trainable_state(policy, st["lora"], f"{out}/state/ppo.pt")
        else:
            load_weights(out, policy.lm, strict=True)
        policy.value_head.load_state_dict(st["value_head"])
        opt.load_state_dict(st["optimizer"])
        kl_ctl.load_state_dict(st["kl_ctl"])
        if scale is not None and st.get("logit_scale") is not None:
            scale.load_state_dict(st["logit_scale"])
        if isinstance(rm, JudgeReward):
            rm.centre = st.get("judge_centre")
        if st.get("pool_keep") is not None:
            pool = [pool[i] for i in st["pool_keep"]]
        start_it, max_iters = int(st["iter"]), int(st["max_iters"])
        print(f"resuming {out} from iteration {start_it} of {max_iters}")
    else:
        if cfg.resume:
            print(f"--resume: no checkpoint in {out} yet, starting from iteration 0")
        metrics.path.unlink(missing_ok=True)
    metrics.truncate_after(start_it)

    tr_tokens, va_tokens, ptx_src = pretraining_tokens(cfg, tok)
    # the engine re-makes its weight copies after every optimizer step (fused AdamW included), so rollouts
    # always sample from the policy being trained; engine_logprob_err in metrics.jsonl checks it
    engine = Engine(policy.lm, tok, max_batch_size=max(cfg.rollout_batch * cfg.group, 8), device=device)
    task_names = [t.strip() for t in cfg.tasks.split(",") if t.strip()] or None
    pool_keep = None
    if cfg.prompt_filter > 0 and start_it == 0:
        t0 = time.perf_counter()
        pool_keep = filter_pool(engine, rm, tok, pool, cfg)
        print(
            f"prompt filter: kept {len(pool_keep)} of {len(pool)} prompts whose {cfg.prompt_filter} answers scored "
            f"differently ({time.perf_counter() - t0:.0f} s)"
        )
        if not pool_keep:
            raise ValueError("--prompt-filter: no prompt's answers scored differently; nothing to learn from")
        pool = [pool[i] for i in pool_keep]
    questions = task_questions(task_names, cfg.eval_n, cfg.seed) if not cfg.prompts else []
    ckpt_config = {
        "kind": "lm",
        "stage": "ppo" if cfg.algo == "ppo" else "rl",
        "algo": cfg.algo,
        "model": ck.model.config.to_dict(),
        "parent": str(cfg.policy),
        "reference": str(cfg.reference or cfg.policy),
        "reward_model": str(cfg.reward),
        "tokenizer": tok.info(),
        "train": asdict(cfg),
        "ptx_source": ptx_src,
        "value_function": "scalar head on the policy's trunk (shared), zero-initialised",
    }

    def evaluate(it: int, final: bool = False) -> dict:
        t0 = time.perf_counter()
        res = {}
        if questions:
            ev = evaluate_questions(
                policy.lm, tok, questions, cfg.eval_samples, cfg.temperature, cfg.max_new_tokens, cfg.seed, n_boot=200
            )
            res.update({k: v for k, v in ev["mean"].items() if not k.endswith("_ci")})
            res.update({f"acc_{name}": t["accuracy"] for name, t in ev["tasks"].items()})
            if cfg.eval_samples:
                res.update({f"avg_{name}": t["avg_at_k"] for name, t in ev["tasks"].items()})
        res["ptx_val_loss"] = ptx_val_loss(policy.lm, va_tokens, cfg.ptx_len)
        res["eval_s"] = round(time.perf_counter() - t0, 2)
        metrics.write(step=it, iter=it, eval=True, **({"final": True} if final else {}), **res)
        return res

    def save(it: int, final_eval: dict | None = None):
        state = {
            "ppo": {
                "iter": it,
                "max_iters": max_iters,
                "optimizer": opt.state_dict(),
                "value_head": policy.value_head.state_dict(),
                "kl_ctl": kl_ctl.state_dict(),
                "judge_centre": getattr(rm, "centre", None),
                "pool_keep": pool_keep,
                "logit_scale": scale.state_dict() if scale is not None else None,
            }
        }
        conf = dict(ckpt_config)
        if final_eval:
            conf["eval"] = final_eval
        lm, adapters = policy.lm, None
        if cfg.lora_rank:
            state["ppo"]["lora"] = trainable_state(policy)
            lm, adapters = plain_copy(policy.lm, merge=cfg.lora_merge)
            conf["finetune"] = {
                "lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_scale_alpha},
                "merged": cfg.lora_merge,
            }
        save_checkpoint(out, lm, conf, tok, state, None if cfg.lora_merge else adapters)

    eval_cost = 0.0
    if start_it == 0:
        first = evaluate(0)
        eval_cost = first["eval_s"]
        print(f"SFT policy: {json.dumps({k: round(v, 4) for k, v in first.items()})}")
    bar = None
    if cfg.progress:
        bar = tqdm(total=max_iters, initial=start_it, desc=cfg.algo, dynamic_ncols=True)
    it = start_it
    t_loop = time.perf_counter()
    while it < max_iters:
        t_it = time.perf_counter()
        torch.manual_seed(_seed(cfg.seed, it, 1))
        lr = lr_at(it, cfg.lr, cfg.lr, cfg.warmup, max_iters)
        for gr in opt.param_groups:
            gr["lr"] = lr * gr.get("lr_scale", 1.0)
        if scale is not None:
            scale.lr_factor = lr / cfg.lr
        g = torch.Generator().manual_seed(_seed(cfg.seed, it, 2))
        pick = torch.randint(0, len(pool), (cfg.rollout_batch,), generator=g).tolist()
        pick = [j for j in pick for _ in range(cfg.group)]  # a group's answers sit next to each other
        params = [
            SamplingParams(
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                logprobs=True,
                scaled_logprobs=True,
                seed=_seed(cfg.seed, it, 3, i),
            )
            for i in range(len(pick))
        ]
        row = ppo_iteration(
            policy,
            ref,
            rm,
            engine,
            tok,
            opt,
            kl_ctl,
            [pool[j][0] for j in pick],
            params,
            cfg,
            g,
            tr_tokens if cfg.ptx_coef > 0 else None,
            scale,
        )
        it += 1
        row = {
            "step": it,
            "iter": it,
            "lr": lr,
            **row,
            "iter_s": round(time.perf_counter() - t_it, 3),
            "elapsed_s": round(time.perf_counter() - t_start, 2),
        }
        kl_mean = row["kl"]
        metrics.write(**row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{kl_mean:.3f}", len=f"{row['response_length']:.1f}")
        # time budget: leave room for the final evaluation and save
        elapsed = time.perf_counter() - t_start
        per_it = (time.perf_counter() - t_loop) / max(it - start_it, 1)
        out_of_time = cfg.time_budget > 0 and elapsed + per_it + eval_cost * 1.2 + 2 > cfg.time_budget
        if out_of_time:
            max_iters = it
        if it >= max_iters:
            break
        if cfg.eval_every and it % cfg.eval_every == 0:
            eval_cost = evaluate(it)["eval_s"]
        if cfg.save_every and it % cfg.save_every == 0:
            save(it)
    if bar is not None:
        bar.close()
    final = evaluate(it, final=True) if it > start_it or not (out / "state" / "ppo.pt").exists() else {}
    save(it, final)
    print(
        f"{cfg.algo.upper()} done after {it} iterations ({time.perf_counter() - t_start:.0f} s): "
        f"{json.dumps({k: round(v, 4) for k, v in final.items()})}"
    )
    return out


# ---- iterated RLHF: label -> reward -> PPO with the newest policy ---------------------------------------------
def run_rounds(cfg: PPOConfig) -> Path:
    """Round 1 is PPO with the given reward model; each later round labels the newest policy's answers with
    the built-in judge, trains a fresh reward model on them (from the newest policy) and runs PPO again
    (the KL reference stays the original SFT policy). Earlier rounds live in OUT.rounds/."""
    if cfg.rounds <= 1:
        return run_ppo(cfg)
    if cfg.reward == "judge":
        raise ValueError("--rounds > 1 trains a new reward model each round; with --reward judge there is none")
    work = Path(str(cfg.out).rstrip("/") + ".rounds")
    policy, reward = cfg.policy, cfg.reward
    for r in range(1, cfg.rounds + 1):
        rdir = work / f"round{r}"
        if r > 1:
            ranks = rdir / "ranks.jsonl"
            print(f"round {r}: labelling answers of {policy}")
            print(
                json.dumps(
                    label(
                        policy,
                        str(ranks),
                        LabelConfig(k=cfg.label_k, prompts=cfg.label_prompts, seed=cfg.seed + r, device=cfg.device),
                    )
                )
            )
            rcfg = RewardConfig(
                sft=policy, data=[str(ranks)], out=str(rdir / "rm"), seed=cfg.seed + r, progress=cfg.progress
            )
            print(json.dumps(train_reward(rcfg)))
            reward = str(rdir / "rm")
        target = cfg.out if r == cfg.rounds else str(rdir / "ppo")
        rc = PPOConfig(
            **{
                **asdict(cfg),
                "policy": policy,
                "reward": reward,
                "out": target,
                "rounds": 1,
                "reference": cfg.reference or cfg.policy,
            }
        )
        run_ppo(rc)
        policy = target
    return Path(cfg.out)


def _cmd(args) -> int:
    cfg = dataclass_from_args(PPOConfig, args)
    try:
        run_rounds(cfg)
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "ppo",
        help="RLHF: PPO against a reward model with a KL penalty (and PPO-ptx)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_args(p, PPOConfig)
    p.set_defaults(func=_cmd)
