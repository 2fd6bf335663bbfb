"""`chatstack reward`: train a reward model on rankings (or pairs) with the shared training loop.

    chatstack reward --sft runs/x/sft --data runs/x/ranks.jsonl --out runs/x/rm

The model is the SFT transformer plus a scalar head at the answer's last token (chatstack.rlhf.reward_model);
by default (`--likelihood mean`) it keeps the output layer and adds the answer's mean token log-probability to
the head's score, which lifts held-out pairwise accuracy from ~61% to ~81-85% on the built-in tasks;
`--likelihood none` is InstructGPT's RM exactly (no output layer). Why: docs/rlhf.md, "The likelihood term".
One batch element = one prompt with all its comparisons (InstructGPT's K-wise loss); `--batch-size` counts
prompts. Prompts are split into train / held-out by a hash of the prompt, so held-out pairwise accuracy
(`val_accuracy` in metrics.jsonl) measures answers to prompts the model never saw.

After training, the head's bias is shifted so the mean reward over the training responses (the SFT
model's own samples: the reference responses) is 0; the shift is logged as `reward_bias_shift`.
The loss is invariant to that shift, so it does not change training or resume.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field

import torch

from chatstack.args import CLIError, add_dataclass_args, dataclass_from_args
from chatstack.checkpoint import CheckpointError, load_checkpoint, load_state, read_config, save_checkpoint
from chatstack.data.conversations import resolve_seq_len
from chatstack.data.preferences import PreferenceError, load_preferences, split_by_prompt, summary
from chatstack.rlhf.reward_model import RewardModel, batch_loss, collate, evaluate_groups, mean_score
from chatstack.train.loop import Metrics, TrainConfig, train
from chatstack.train.lora import check_flags


@dataclass
class RewardConfig(TrainConfig):
    sft: str = field(default="", metadata={"help": "SFT checkpoint to initialise the reward model from"})
    data: list[str] = field(default_factory=list, metadata={"help": "rankings / pairs JSONL file(s)"})
    likelihood: str = field(
        default="mean",
        metadata={
            "help": "add lik_scale x the response's mean (or sum) token log-prob under the RM's own output layer to "
            "the head's score: 'none' is InstructGPT's RM (no output layer); see docs/rlhf.md",
            "choices": ["none", "mean", "sum"],
        },
    )
    seq_len: int = field(
        default=0,
        metadata={"help": "tokens per prompt + response (longer: the prompt's start is cut); 0 = min(context, 1024)"},
    )
    val_frac: float = field(default=0.15, metadata={"help": "fraction of prompts held out (by prompt hash)"})
    # overrides of the loop's defaults, sized for the built-in demo on a CPU (see docs/rlhf.md)
    # held-out accuracy on the speedrun's 1,200 x C(8,2) pairs plateaus by ~100 steps (0.867 at 50, 0.879 at 100,
    # 0.869 at 400; docs/benchmarks.md), so longer training only costs time
    max_steps: int = field(default=120, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "prompts (comparison groups) per micro-batch"})
    # with the likelihood term the untrained RM already ranks ~80% of held-out pairs right; a high lr fits the
    # training prompts and loses that (3e-4: 85% -> 77% in 150 steps; 3e-5: 81% -> 77.5% on one speedrun's
    # data), 1e-5 kept or added 1 point on every data set tried (docs/rlhf.md)
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate (3e-4 suits --likelihood none)"})
    min_lr: float = field(default=1e-6, metadata={"help": "learning rate at the end of the cosine"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decay on matrices"})
    eval_every: int = field(default=50, metadata={"help": "evaluate held-out accuracy every N steps"})
    log_every: int = field(default=10, metadata={"help": "write a metrics line every N steps"})
    time_budget: float = field(
        default=90.0, metadata={"help": "seconds of training (0 = no limit); the whole command stays under 2 minutes"}
    )


class RewardTask:
    """Batches of comparison groups for the shared loop (deterministic in step/micro/rank: exact resume)."""

    def __init__(self, train_groups, val_groups, tokenizer, block_size: int, cfg: RewardConfig):
        self.train_groups, self.val_groups = train_groups, val_groups
        self.tok, self.block_size, self.cfg = tokenizer, block_size, cfg
        self.encoded: dict = {}

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
        return torch.randperm(len(self.train_groups), generator=g).tolist()

    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        B, N = self.cfg.batch_size, len(self.train_groups)
        start = ((step * self.cfg.grad_accum + micro) * world + rank) * B
        picked, orders = [], {}
        for j in range(start, start + B):
            epoch, pos = divmod(j, N)
            if epoch not in orders:
                orders[epoch] = self._order(epoch)
            picked.append(self.train_groups[orders[epoch][pos]])
        return collate(picked, self.tok, self.block_size, self.encoded)

    def loss(self, model, batch):
        return batch_loss(model, batch)

    def evaluate(self, model) -> dict[str, float]:
        if not self.val_groups:
            return {}
        return evaluate_groups(model, self.val_groups, self.tok, self.block_size, encoded=self.encoded)

    def count_tokens(self, batch) -> int:
        return int(batch["lengths"].sum())


def train_reward(cfg: RewardConfig) -> dict:
    if not cfg.sft:
        raise ValueError("--sft: give the SFT checkpoint to start from")
    if not cfg.data:
        raise ValueError("--data: give at least one rankings / pairs JSONL file")
    if not cfg.out:
        raise ValueError("--out: give the reward-model directory to write")
    torch.manual_seed(cfg.seed)
    ck = load_checkpoint(cfg.sft, device="cpu")
    if ck.tokenizer is None:
        raise ValueError(f"{cfg.sft}: checkpoint has no tokenizer.json")
    groups = load_preferences(cfg.data)
    train_g, val_g = split_by_prompt(groups, cfg.val_frac, cfg.seed)
    if not train_g:
        raise ValueError(f"{', '.join(cfg.data)}: no training prompts left after holding out {cfg.val_frac:.0%}")
    print(f"preferences: train {summary(train_g)}, held out {summary(val_g)}")
    rm = RewardModel.from_lm(ck.model, cfg.likelihood)
    block = resolve_seq_len(cfg.seq_len, ck.model.config.block_size)
    check_flags(rm, cfg.lora_rank, cfg.lora_targets, cfg.train_layers)
    task = RewardTask(train_g, val_g, ck.tokenizer, block, cfg)
    ckpt_config = {
        "kind": "reward",
        "stage": "reward",
        "likelihood": cfg.likelihood,
        "model": ck.model.config.to_dict(),
        "parent": str(cfg.sft),
        "tokenizer": ck.tokenizer.info(),
        "train": asdict(cfg),
        "data": {"files": list(cfg.data), "train": summary(train_g), "val": summary(val_g)},
    }
    out = train(rm, task, cfg, ckpt_config, ck.tokenizer)

    # centre the rewards on the reference responses (the loss is shift-invariant: resume is unaffected)
    rm = rm.cpu().eval()
    shift = mean_score(rm, train_g, ck.tokenizer, block, encoded=task.encoded)
    rm.normalise_(shift)
    final = evaluate_groups(rm, val_g, ck.tokenizer, block, encoded=task.encoded) if val_g else {}
    # which tasks does the RM really judge? (rankings from the built-in judge carry their task)
    for name in sorted({g.task for g in val_g if g.task}):
        sub = [g for g in val_g if g.task == name]
        r = evaluate_groups(rm, sub, ck.tokenizer, block, encoded=task.encoded)
        final[f"val_accuracy_{name}"], final[f"val_pairs_{name}"] = r["val_accuracy"], r["val_pairs"]
    state = load_state(out)
    ckpt_config["reward_bias_shift"] = shift
    if "finetune" in read_config(out):  # what the loop recorded (LoRA, frozen layers)
        ckpt_config["finetune"] = read_config(out)["finetune"]
    ckpt_config["val"] = final
    save_checkpoint(out, rm, ckpt_config, ck.tokenizer, state)
    step = int(state.get("train", {}).get("step", 0))
    Metrics(out, True).write(step=step, reward_bias_shift=shift, **final)
    return {"out": str(out), "reward_bias_shift": shift, **final}


def _cmd(args) -> int:
    cfg = dataclass_from_args(RewardConfig, args)
    try:
        res = train_reward(cfg)
    except (ValueError, PreferenceError, CheckpointError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    print(json.dumps(res, indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "reward",
        help="train a reward model on rankings / pairs (InstructGPT K-wise loss)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_args(p, RewardConfig)
    p.set_defaults(func=_cmd)
