"""`chatstack rl`: group-baseline reinforcement learning (RLOO, GRPO) on the PPO stage's rollout and update code.

    chatstack rl --policy runs/x/sft --reward judge --algo rloo --group 8 --out runs/x/rl
    chatstack rl --policy runs/x/sft --reward runs/x/rm --algo grpo --group 8 --out runs/x/grpo_rm
    chatstack rl --policy runs/x/sft --reward judge --out runs/x/rl --resume          # continue exactly

The same stage as `chatstack ppo` (chatstack.stages.ppo: one rollout path through the engine, one policy
update, the same checkpoints, metrics.jsonl and exact `--resume`) with these defaults: every iteration
samples `--group` K answers for each of `--rollout-batch` prompts; each answer's advantage is its reward
minus the mean of its K-1 siblings (RLOO) or of its group (GRPO, no std scaling unless `--adv-scale std`);
groups whose K rewards are all equal are dropped; no critic; the KL to the frozen SFT model is in the loss
(k3, weight `--kl-coef`); each answer's token losses are summed (`--loss-norm sum`: the policy gradient of
the whole answer, whatever its length); small steps (lr 2e-5, two passes of minibatch 64 per rollout) with the
final norm at 50x the lr, and one learned scalar for the scale of all the logits (`--logit-scale-lr`, an Adam
step of its own on the final norm's overall gain: sampling at T = 1 from a policy whose logits RL has scaled
by e^s is sampling the SFT model at T = e^-s, the sharpening RL does at this size). metrics.jsonl has per iteration
`reward` (mean score), `kl` (k1 nats per answer to the reference), `kept_frac` (answers in groups with a
signal), `entropy`, `response_length`, `logit_scale`, ... The defaults were chosen by the sweep in docs/rlhf.md.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from chatstack.args import add_dataclass_args
from chatstack.stages.ppo import PPOConfig, _cmd


@dataclass
class RLConfig(PPOConfig):
    algo: str = field(default="rloo", metadata={"help": "rloo (leave-one-out baseline) | grpo (group mean) | ppo"})
    group: int = field(default=8, metadata={"help": "answers sampled per prompt (K >= 2)"})
    rollout_batch: int = field(default=32, metadata={"help": "prompts per iteration (each sampled --group times)"})
    minibatch: int = field(default=64, metadata={"help": "answers per update step"})
    ppo_epochs: int = field(default=2, metadata={"help": "passes over each rollout (the second is PPO-clipped)"})
    lr: float = field(
        default=2e-5, metadata={"help": "learning rate (constant after warmup; the sweep is in docs/rlhf.md)"}
    )
    final_norm_lr_mult: float = field(
        default=50.0,
        metadata={"help": "learning-rate multiplier for the final norm (the logits' scale: how sharp sampling is)"},
    )
    loss_norm: str = field(
        default="sum",
        metadata={
            "help": "sum: each answer's token losses summed / --max-new-tokens (the policy gradient); seq: mean "
            "per answer; token: mean over all tokens",
            "choices": ["seq", "token", "sum"],
        },
    )
    warmup: int = field(default=5, metadata={"help": "warmup iterations (Adam's first steps are the largest)"})
    logit_scale_lr: float = field(
        default=2e-2,
        metadata={
            "help": "lr of the learned logit scale (one scalar: how sharply the policy samples; "
            "chatstack.rlhf.logit_scale); 0 = off"
        },
    )
    kl_coef: float = field(default=0.01, metadata={"help": "weight of the k3 KL to the reference in the loss"})
    iterations: int = field(default=40, metadata={"help": "iterations (rollout + update)"})
    time_budget: float = field(default=0.0, metadata={"help": "seconds for the whole run, evals included (0 = none)"})
    eval_every: int = field(default=0, metadata={"help": "held-out eval every N iterations (0 = start and end only)"})
    eval_n: int = field(default=100, metadata={"help": "held-out questions per task per eval"})


def register(sub) -> None:
    p = sub.add_parser(
        "rl",
        help="group-baseline RL (RLOO / GRPO): K answers per prompt, no critic, KL in the loss",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_args(p, RLConfig)
    p.set_defaults(func=_cmd)
