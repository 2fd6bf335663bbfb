"""`chatstack pretrain`: train a GPT from scratch on prepared token shards (the base model).

    chatstack tokenizer train --builtin shakespeare --vocab-size 4096 --out runs/tok
    chatstack data prepare --builtin shakespeare --tokenizer runs/tok --out runs/data
    chatstack pretrain --data runs/data --out runs/base --preset tiny            # ~5 minutes on 2 CPU cores
    chatstack pretrain --data runs/data --out runs/base --resume                  # continue after a crash
    chatstack pretrain --data a:0.7,b:0.3 --out runs/base --time-budget 300       # a mixture, 5 minutes
    torchrun --standalone --nproc_per_node 2 -m chatstack.cli pretrain --data runs/data --out runs/base

Held-out evaluation reports `val_loss` (nats/token), `val_bpb` (bits per UTF-8 byte: comparable across
tokenizers) and `val_bpc` (bits per character). Periodic evals read an evenly spaced --eval-tokens subset of
the validation split; the final eval reads all of it. The run ends with a sampled passage in metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from chatstack.args import CLIError, add_dataclass_args, dataclass_from_args
from chatstack.checkpoint import CheckpointError, load_checkpoint
from chatstack.data.mixture import Mixture
from chatstack.data.shards import DataError, Split
from chatstack.estimate import flops_per_token as estimate_flops
from chatstack.infer.engine import Engine, SamplingParams
from chatstack.model import GPT, cpu_bf16_active
from chatstack.presets import get_preset
from chatstack.stages.prepare import load_tokenizer_arg
from chatstack.train.fused_loss import linear_cross_entropy
from chatstack.train.loop import TrainConfig, train


@dataclass
class PretrainConfig(TrainConfig):
    data: str = field(default="", metadata={"help": "prepared dataset dir, or a mixture 'a:0.7,b:0.3' / mix.json"})
    tokenizer: str = field(
        default="", metadata={"help": "tokenizer to check the shards against (default: the one saved in the data dir)"}
    )
    preset: str = field(default="tiny", metadata={"help": "model size (chatstack.presets)"})
    init: str = field(
        default="",
        metadata={
            "help": "start from this checkpoint's weights and architecture (continued pretraining / "
            "fine-tuning on new text; its tokenizer must be the data's)"
        },
    )
    n_layer: int = field(default=0, metadata={"help": "override the preset (0 = keep)"})
    n_head: int = field(default=0, metadata={"help": "override the preset (0 = keep)"})
    n_embd: int = field(default=0, metadata={"help": "override the preset (0 = keep)"})
    block_size: int = field(default=0, metadata={"help": "context length; override the preset (0 = keep)"})
    dropout: float = field(default=-1.0, metadata={"help": "override the preset's dropout (-1 = keep)"})
    batch_tokens: int = field(
        default=0,
        metadata={
            "help": "target tokens per optimizer step; sets grad_accum = batch_tokens / (batch_size*block*world)"
        },
    )
    eval_tokens: int = field(default=32768, metadata={"help": "validation tokens per periodic eval"})
    sample_tokens: int = field(default=200, metadata={"help": "tokens sampled at the end (0 = none)"})
    # defaults for the built-in run (tiny preset, Shakespeare, 2 CPU cores): 8 x 256-token rows a step at
    # lr 3e-3 learned ~1.7x more per token than 16 rows at 2e-3 (val 2.43 vs 2.51 bits/char after 1.2M tokens);
    # 2,800 steps = 5.7M tokens ~ 5 minutes at the 16-20k tokens/s this model trains at on an idle 2-core
    # CPU (docs/benchmarks.md); --time-budget (default 300 s) shortens the schedule on a slower or busy machine.
    max_steps: int = field(default=2800, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "rows per micro-batch (per process)"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=3e-4, metadata={"help": "learning rate at the end of the cosine"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup steps"})
    eval_every: int = field(default=200, metadata={"help": "evaluate every N steps (0 = only at the end)"})
    save_every: int = field(default=500, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    out: str = field(default="runs/base", metadata={"help": "checkpoint directory to write (and resume from)"})
    time_budget: float = field(
        default=300.0,
        metadata={
            "help": "seconds of training per process: after 20 steps max_steps is cut to fit if needed, and "
            "re-planned from the pace of steps 21-100 (the cosine still ends at min_lr); stops cleanly when time runs out (0 = no limit)"
        },
    )


def flops_per_token(cfg) -> float:
    """Training FLOPs per token from the estimator (6N + PaLM's 12*L*h*T attention term), for MFU."""

    return float(estimate_flops(cfg))


class PretrainGPT(GPT):
    """The GPT, whose fp32 training forward (targets, no cache, no mask) computes the loss with the fused
    output layer + cross-entropy (chatstack/train/fused_loss.py) and returns (None, loss): no logits tensor.
    Inside chatstack.model.cpu_bf16_matmuls the fused loss's matmuls take bf16 operands like every Linear.
    Same parameters and names as GPT, so its checkpoints load as a plain GPT."""

    def forward(
        self, idx, targets=None, loss_mask=None, cache=None, positions=None, attn_mask=None, last_only: bool = False
    ):
        if (
            targets is None
            or loss_mask is not None
            or cache is not None
            or last_only
            or self.lm_head.weight.dtype != torch.float32
            or torch.is_autocast_enabled(idx.device.type)
        ):
            return super().forward(idx, targets, loss_mask, cache, positions, attn_mask, last_only)
        h = self.hidden_states(idx, positions=positions, attn_mask=attn_mask)  # (B, T, C)
        mm = torch.bfloat16 if cpu_bf16_active() and idx.device.type == "cpu" else None
        return None, linear_cross_entropy(h, self.lm_head.weight, targets, mm_dtype=mm)


def token_lengths(tok) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes and characters of every token id. Special tokens count 0 and are left out of bits-per-byte
    (they are not text). Characters = UTF-8 lead bytes, so a character split over two tokens counts once."""
    nbytes = torch.zeros(tok.vocab_size, dtype=torch.float64)
    nchars = torch.zeros(tok.vocab_size, dtype=torch.float64)
    special = set(tok.special_ids) if hasattr(tok, "special_ids") else {tok.eot_id}
    for i in range(tok.vocab_size):
        if i in special:
            continue
        b = tok.token_bytes(i)
        nbytes[i] = len(b)
        nchars[i] = sum(1 for x in b if x & 0xC0 != 0x80)
    return nbytes, nchars


class PretrainTask:
    """Next-token prediction on random windows of the mixture; eval on the held-out split."""

    def __init__(self, model_cfg, mixture: Mixture, val: Optional[Split], tok, cfg: PretrainConfig, world: int):
        self.T = model_cfg.block_size
        self.mixture, self.val, self.tok, self.cfg = mixture, val, tok, cfg
        self.world = world
        self.rows_per_step = cfg.batch_size * cfg.grad_accum * world
        self.flops_per_token = flops_per_token(model_cfg)
        self.nbytes, self.nchars = token_lengths(tok)
        self._cache_step, self._cache_rows = -1, None

    # ---- training --------------------------------------------------------------------------------
    def train_batch(self, step, micro, rank, world):
        if world != self.world:
            raise ValueError(f"task built for world {self.world}, called with {world}")
        if step != self._cache_step:
            self._cache_rows = self.mixture.sample_rows(self.cfg.seed, step, self.rows_per_step, self.T)
            self._cache_step = step
        B = self.cfg.batch_size
        start = (micro * world + rank) * B  # this micro-batch's slice of the global batch
        rows = self._cache_rows[start : start + B]  # (B, T+1)
        return {"idx": rows[:, :-1].contiguous(), "targets": rows[:, 1:].contiguous()}

    def loss(self, model, batch):
        _, loss = model(batch["idx"], batch["targets"])
        return loss, {}

    # ---- evaluation ------------------------------------------------------------------------------
    def _windows(self, n_windows: Optional[int]):
        toks = self.val.tokens
        total = (len(toks) - 1) // self.T
        if total == 0:
            raise DataError(f"validation split has {len(toks)} tokens, fewer than one window of {self.T + 1}")
        if n_windows is None or n_windows >= total:
            return [i * self.T for i in range(total)]
        stride = total / n_windows  # evenly spaced over all held-out documents
        return [int(i * stride) * self.T for i in range(n_windows)]

    @torch.no_grad()
    def _eval(self, model, n_windows: Optional[int]) -> dict[str, float]:
        if self.val is None:
            return {}
        device = next(model.parameters()).device
        starts = self._windows(n_windows)
        nats = torch.zeros((), dtype=torch.float64)
        n_tok = n_bytes = n_chars = 0.0
        bs = max(1, self.cfg.batch_size)
        for i in range(0, len(starts), bs):
            rows = np.stack([self.val.tokens[s : s + self.T + 1] for s in starts[i : i + bs]]).astype(np.int64)
            rows = torch.from_numpy(rows)
            x, y = rows[:, :-1].to(device), rows[:, 1:]
            logits = model(x).float().cpu()
            per_tok = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
            yb = self.nbytes[y.reshape(-1)]
            text = yb > 0  # special tokens (document ends) are not text: out of every count
            nats += per_tok.double()[text].sum()
            n_tok += float(text.sum())
            n_bytes += float(yb.sum())
            n_chars += float(self.nchars[y.reshape(-1)].sum())
        bits = float(nats) / math.log(2)
        return {
            "val_loss": float(nats) / n_tok,
            "val_bpb": bits / n_bytes,
            "val_bpc": bits / n_chars,
            "val_tokens": int(n_tok),
        }

    def evaluate(self, model):
        return self._eval(model, max(1, self.cfg.eval_tokens // self.T))

    def final_evaluate(self, model):
        return self._eval(model, None)

    def sample(self, model, temperature: float = 0.8, top_k: int = 50) -> str:
        """A preview of what the model writes from a document start (through the one engine)."""
        n = min(self.cfg.sample_tokens, self.T - 1)
        if n <= 0:
            return ""
        params = SamplingParams(max_new_tokens=n, temperature=temperature, top_k=top_k, seed=self.cfg.seed)
        return Engine(model, self.tok, max_batch_size=1).generate([[self.tok.eot_id]], params)[0].text


def build_model_config(cfg: PretrainConfig, vocab_size: int):
    over = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(cfg, k) > 0}
    if cfg.dropout >= 0:
        over["dropout"] = cfg.dropout
    mcfg = get_preset(cfg.preset, **over)
    if mcfg.vocab_size != vocab_size:
        # the data's tokenizer decides the vocabulary; the preset's is only a default
        mcfg = get_preset(cfg.preset, **{**over, "vocab_size": vocab_size})
    return mcfg


def run(cfg: PretrainConfig):
    if not cfg.data:
        raise DataError("--data: give a prepared dataset directory (chatstack data prepare) or a mixture")
    mixture = Mixture.from_spec(cfg.data)
    primary = mixture.primary
    tok = primary.tokenizer()
    if cfg.tokenizer:
        for ds in mixture.datasets:
            ds.check_tokenizer(load_tokenizer_arg(cfg.tokenizer), cfg.tokenizer)
    val = primary.split("val") if "val" in primary.meta["splits"] else None
    init = None
    if cfg.init:
        init = load_checkpoint(cfg.init, with_tokenizer=False)
        mcfg = init.model.config  # the architecture is the starting checkpoint's; the preset flags are ignored
        if mcfg.vocab_size != tok.vocab_size:
            raise DataError(
                f"--init {cfg.init}: its vocabulary ({mcfg.vocab_size}) is not the data's "
                f"tokenizer's ({tok.vocab_size}); prepare the data with the checkpoint's tokenizer"
            )
    else:
        mcfg = build_model_config(cfg, tok.vocab_size)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_tokens:
        per_micro = cfg.batch_size * mcfg.block_size * world
        if cfg.batch_tokens % per_micro:
            raise ValueError(
                f"--batch-tokens {cfg.batch_tokens} is not a multiple of batch_size*block_size*world = {per_micro}"
            )
        cfg.grad_accum = cfg.batch_tokens // per_micro
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run
    model = PretrainGPT(mcfg)
    if init is not None:
        model.load_state_dict(init.model.state_dict())
    task = PretrainTask(mcfg, mixture, val, tok, cfg, world)
    if int(os.environ.get("RANK", "0")) == 0:
        srcs = ", ".join(f"{d['path']} ({d['train_tokens']:,} tok, w={d['weight']})" for d in mixture.describe())
        print(
            f"model: {cfg.preset} {model.num_params():,} params | data: {srcs} | "
            f"{task.rows_per_step * mcfg.block_size:,} tokens/step x {cfg.max_steps} steps"
        )
    ckpt_config = {
        "stage": "base",
        "parent": str(cfg.init) if cfg.init else None,
        "model": mcfg.to_dict(),
        "tokenizer": tok.info() if hasattr(tok, "info") else {"vocab_size": tok.vocab_size},
        "data": mixture.describe(),
        "train": asdict(cfg),
    }
    return train(model, task, cfg, ckpt_config, tok)


def _cmd_pretrain(args) -> int:
    cfg = dataclass_from_args(PretrainConfig, args)
    try:
        path = run(cfg)
    except (DataError, CheckpointError, ValueError) as e:
        raise CLIError(str(e)) from None
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        _print_summary(path)
    return 0


def _print_summary(path) -> None:
    rows = [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines() if l.strip()]
    final = [r for r in rows if r.get("final")]
    if final:
        r = final[-1]
        print(
            f"final: step {r['step']} val_loss {r['val_loss']:.4f} val_bpb {r['val_bpb']:.4f} "
            f"val_bpc {r['val_bpc']:.4f}"
        )
    samples = [r["sample"] for r in rows if "sample" in r]
    if samples:
        print("sample:\n" + samples[-1][:600])
    print(f"checkpoint: {path}")


def register(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="train a GPT from scratch on token shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_args(p, PretrainConfig)
    p.set_defaults(func=_cmd_pretrain)
