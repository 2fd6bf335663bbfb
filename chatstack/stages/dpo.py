"""`chatstack dpo`: Direct Preference Optimisation from rankings, through the one training loop.

    chatstack dpo --sft runs/x/sft --data runs/x/rankings.jsonl --out runs/x/dpo
    chatstack dpo --sft runs/x/sft --data ranks.jsonl --out runs/x/dpo --beta 0.2 --max-steps 200
    chatstack dpo --sft runs/x/sft --data ranks.jsonl --out runs/x/dpo --rounds 2   # label -> DPO -> label -> DPO

Every ranking of K answers gives all its C(K,2) (better, worse) pairs (answers the judge tied are not
paired), the K-wise idea InstructGPT used for its reward model, here fed to DPO (Rafailov et al. 2023):

    loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))
           [+ nll_coef * (-log pi(y_w|x) / |y_w|)]       (RPO: `--nll-coef`, Pang et al. 2024)

with summed response log-probs; the reference (the SFT model, frozen) scores every answer once, before
training. The policy trains through chatstack.train.loop (AdamW, warmup + cosine, checkpoints, exact
`--resume`, metrics.jsonl with loss, reward_margin, reward_accuracy, and held-out pair accuracy).
`--rounds R` (on-policy, iterated): round r > 1 labels the newest policy's answers with the built-in judge and
runs DPO again from that policy, which is also the new reference; earlier rounds live in OUT.rounds/.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from chatstack.args import CLIError, add_dataclass_args, dataclass_from_args
from chatstack.checkpoint import CheckpointError, load_checkpoint
from chatstack.data.preferences import PreferenceError, load_preferences, split_by_prompt, summary
from chatstack.rlhf.group import dpo_loss, sequence_logprobs
from chatstack.rlhf.reward_model import encode_response
from chatstack.rlhf.rollout import build_rows
from chatstack.stages.label import LabelConfig, label
from chatstack.train.loop import TrainConfig, train


@dataclass
class DPOConfig(TrainConfig):
    sft: str = field(default="", metadata={"help": "SFT checkpoint: the initial policy and the frozen reference"})
    data: list[str] = field(default_factory=list, metadata={"help": "rankings / pairs JSONL file(s)"})
    beta: float = field(default=0.1, metadata={"help": "DPO beta: strength of the implicit KL to the reference"})
    nll_coef: float = field(
        default=1.0,
        metadata={
            "help": "weight of the chosen answers' per-token negative log-likelihood added to the DPO loss "
            "(RPO, Pang et al. 2024: keeps the likelihood of good answers from falling with the bad ones')"
        },
    )
    val_frac: float = field(default=0.1, metadata={"help": "fraction of prompts held out (by prompt hash)"})
    max_steps: int = field(default=150, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "pairs per micro-batch"})
    # 3e-4 without the NLL term lost 18 points of avg@8 (KL 28 nats per answer); docs/rlhf.md
    lr: float = field(default=5e-5, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=5e-6, metadata={"help": "learning rate at the end of the cosine"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decay on matrices"})
    eval_every: int = field(default=50, metadata={"help": "held-out pair accuracy every N steps"})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda | ..."})
    rounds: int = field(default=1, metadata={"help": "label -> DPO rounds with the newest policy (built-in judge)"})
    label_prompts: int = field(default=600, metadata={"help": "rounds > 1: prompts labelled per round"})
    label_k: int = field(default=4, metadata={"help": "rounds > 1: answers ranked per prompt"})


def pair_rows(groups, tok, block_size: int) -> tuple[list, list[tuple[int, int]]]:
    """Distinct (prompt ids, response ids) rows and the (winner row, loser row) pairs over them."""
    rows, pairs = [], []
    for g in groups:
        base = len(rows)
        for r in g.responses:
            ids, start = encode_response(tok, g.prompt, r, block_size, with_start=True)
            rows.append((ids[:start], ids[start:]))
        pairs += [(base + w, base + l) for w, l in g.pairs]
    return rows, pairs


def collate_rows(rows, which: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    idx, plen, resp, mask = build_rows([rows[i][0] for i in which], [rows[i][1] for i in which], pad_id)
    return {"idx": idx, "plen": plen, "resp": resp, "mask": mask}


@torch.no_grad()
def score_rows(lm, rows, pad_id: int, batch: int = 64) -> torch.Tensor:
    was = lm.training
    lm.eval()
    dev = next(lm.parameters()).device
    out = []
    for s in range(0, len(rows), batch):
        b = {k: v.to(dev) for k, v in collate_rows(rows, list(range(s, min(s + batch, len(rows)))), pad_id).items()}
        out.append(sequence_logprobs(lm, b["idx"], b["plen"], b["resp"], b["mask"]).cpu())
    lm.train(was)
    return torch.cat(out) if out else torch.zeros(0)


class DPOTask:
    """Batches of pairs for the shared loop (a pure function of step/micro/rank: exact resume)."""

    def __init__(self, rows, pairs, val_rows, val_pairs, ref_lp, val_ref_lp, tok, cfg: DPOConfig):
        self.rows, self.pairs, self.val_rows, self.val_pairs = rows, pairs, val_rows, val_pairs
        self.ref_lp, self.val_ref_lp, self.tok, self.cfg = ref_lp, val_ref_lp, tok, cfg
        self._perms: dict[int, list[int]] = {}

    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        B, N = self.cfg.batch_size, len(self.pairs)
        start = ((step * self.cfg.grad_accum + micro) * world + rank) * B
        picked = []
        for j in range(start, start + B):
            epoch, pos = divmod(j, N)
            if epoch not in self._perms:
                g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
                self._perms = {epoch: torch.randperm(N, generator=g).tolist()}
            picked.append(self.pairs[self._perms[epoch][pos]])
        which = [w for w, _ in picked] + [l for _, l in picked]
        b = collate_rows(self.rows, which, self.tok.eot_id)
        b["ref"] = self.ref_lp[torch.tensor(which)]
        return b

    def loss(self, model, batch):

        lp = sequence_logprobs(model, batch["idx"], batch["plen"], batch["resp"], batch["mask"])
        P = lp.numel() // 2
        loss, stats = dpo_loss(lp[:P], lp[P:], batch["ref"][:P], batch["ref"][P:], self.cfg.beta)
        if self.cfg.nll_coef > 0:
            # DPO alone lowers the chosen answers' likelihood too (both fall, the rejected faster): on a small
            # model that drifts the policy off its good answers; an NLL term on them holds it (RPO)
            nll = -(lp[:P] / batch["mask"][:P].sum(1).clamp_min(1.0)).mean()
            loss = loss + self.cfg.nll_coef * nll
            stats["nll_chosen"] = nll.item()
        return loss, stats

    def evaluate(self, model) -> dict[str, float]:

        if not self.val_pairs:
            return {}
        lp = score_rows(model, self.val_rows, self.tok.eot_id)
        w = torch.tensor([a for a, _ in self.val_pairs])
        l_ = torch.tensor([b for _, b in self.val_pairs])
        loss, st = dpo_loss(lp[w], lp[l_], self.val_ref_lp[w], self.val_ref_lp[l_], self.cfg.beta)
        return {
            "val_loss": loss.item(),
            "val_reward_accuracy": st["reward_accuracy"],
            "val_reward_margin": st["reward_margin"],
            "val_pairs": len(self.val_pairs),
        }

    def count_tokens(self, batch) -> int:
        return int(batch["plen"].sum() + batch["mask"].sum())


def train_dpo(cfg: DPOConfig) -> dict:
    for name in ("sft", "out"):
        if not getattr(cfg, name):
            raise ValueError(f"--{name}: required")
    if not cfg.data:
        raise ValueError("--data: give at least one rankings / pairs JSONL file")
    if cfg.beta <= 0:
        raise ValueError(f"--beta must be > 0, got {cfg.beta}")
    torch.manual_seed(cfg.seed)
    ck = load_checkpoint(cfg.sft, device="cpu")
    if ck.config.get("kind", "lm") != "lm":
        raise ValueError(f"--sft {cfg.sft}: a {ck.config.get('kind')!r} checkpoint; DPO needs a language model (SFT)")
    if ck.tokenizer is None:
        raise ValueError(f"{cfg.sft}: checkpoint has no tokenizer.json")
    tok, block = ck.tokenizer, ck.model.config.block_size
    groups = load_preferences(cfg.data)
    train_g, val_g = split_by_prompt(groups, cfg.val_frac, cfg.seed)
    rows, pairs = pair_rows(train_g, tok, block)
    if not pairs:
        raise ValueError(f"{', '.join(cfg.data)}: no (better, worse) pairs to train on (all answers tied?)")
    val_rows, val_pairs = pair_rows(val_g, tok, block)
    ref_lp = score_rows(ck.model, rows, tok.eot_id)  # the reference scores every answer once
    val_ref_lp = score_rows(ck.model, val_rows, tok.eot_id)
    print(
        f"DPO: {len(pairs)} pairs from {len(train_g)} prompts (held out: {len(val_pairs)} pairs, {len(val_g)} prompts)"
    )
    task = DPOTask(rows, pairs, val_rows, val_pairs, ref_lp, val_ref_lp, tok, cfg)
    ckpt_config = {
        "kind": "lm",
        "stage": "dpo",
        "model": ck.model.config.to_dict(),
        "parent": str(cfg.sft),
        "reference": str(cfg.sft),
        "tokenizer": tok.info(),
        "train": asdict(cfg),
        "data": {
            "files": list(cfg.data),
            "train": summary(train_g),
            "val": summary(val_g),
            "pairs": len(pairs),
            "val_pairs": len(val_pairs),
        },
    }
    out = train(ck.model, task, cfg, ckpt_config, tok)
    return {"out": str(out), "pairs": len(pairs), **task.evaluate(ck.model)}


def run_rounds(cfg: DPOConfig) -> dict:
    """Round 1: DPO on --data. Round r > 1: the built-in judge ranks the newest policy's answers, DPO runs from
    that policy (the new reference)."""
    if cfg.rounds <= 1:
        return train_dpo(cfg)
    work = Path(str(cfg.out).rstrip("/") + ".rounds")
    policy, data, res = cfg.sft, list(cfg.data), {}
    for r in range(1, cfg.rounds + 1):
        rdir = work / f"round{r}"
        if r > 1:
            ranks = rdir / "ranks.jsonl"
            print(
                json.dumps(
                    label(
                        policy,
                        str(ranks),
                        LabelConfig(k=cfg.label_k, prompts=cfg.label_prompts, seed=cfg.seed + r, device=cfg.device),
                    )
                )
            )
            data = [str(ranks)]
        target = cfg.out if r == cfg.rounds else str(rdir / "dpo")
        res = train_dpo(DPOConfig(**{**asdict(cfg), "sft": policy, "data": data, "out": target, "rounds": 1}))
        policy = target
    return res


def _cmd(args) -> int:
    cfg = dataclass_from_args(DPOConfig, args)
    try:
        res = run_rounds(cfg)
    except (ValueError, PreferenceError, CheckpointError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    print(json.dumps(res, indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "dpo",
        help="Direct Preference Optimisation from rankings (all C(K,2) pairs)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_args(p, DPOConfig)
    p.set_defaults(func=_cmd)
