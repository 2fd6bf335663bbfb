"""`chatstack sft`: supervised fine-tuning of a base model into a chat assistant.

    chatstack sft --base runs/base --out runs/sft                          # built-in data, ~3-4 min on 2 CPU cores
    chatstack sft --base runs/base --out runs/sft --data my.jsonl --epochs 3 --system "You are terse."
    chatstack sft --base runs/base --out runs/sft --mix chitchat=0.5,tasks=2   # reweight the built-in sources
    chatstack sft --base runs/base --out runs/sft --resume                 # continue after a crash

The same loop as pretraining (chatstack.train.loop) with conversation batches: ChatML rendering, loss only
on assistant tokens (and their <|im_end|>), every assistant turn of a multi-turn conversation trained,
short conversations packed into full rows with attention that stays inside each conversation. The
tokenizer and the architecture come from the base checkpoint; the output is an ordinary checkpoint
(stage "sft", parent = the base). The default learning rate equals pretraining's peak (3e-3): the
built-in skills are new to the base model and a lower rate learned them far more slowly (docs/sft.md).

Data: `--data` JSONL files ({"messages": [...]}; see chatstack.data.conversations), or when none are given
the built-in mix (chatstack.data.chat_builtin): chit-chat, chatterbot Q&A, identity, verifiable tasks, and on
request (`--mix ...,replay=1`) the base model's own replies to open questions (chatstack.data.replay).
Held-out loss (`val_loss`) is measured on --val-data, or on the built-in held-out split, or on 5% of --data.
"""

from __future__ import annotations

import math
import os
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from chatstack.args import CLIError, add_dataclass_args, dataclass_from_args
from chatstack.checkpoint import CheckpointError, load_checkpoint, read_config
from chatstack.data.chat_builtin import builtin_mix
from chatstack.data.conversations import (
    ConversationError,
    LoadSummary,
    PackedRows,
    encode_conversations,
    make_batch,
    pack,
    read_jsonl,
    resolve_seq_len,
)
from chatstack.data.replay import replay_conversations, replay_prompts
from chatstack.evals.tasks_eval import conversation_loss
from chatstack.infer.engine import Engine, SamplingParams
from chatstack.model import GPT
from chatstack.stages.pretrain import flops_per_token
from chatstack.train.loop import TrainConfig, train
from chatstack.train.lora import check_flags


@dataclass
class SFTConfig(TrainConfig):
    base: str = field(default="", metadata={"help": "base checkpoint to fine-tune (its tokenizer is used)"})
    data: list[str] = field(
        default_factory=list,
        metadata={"help": 'conversation JSONL files {"messages": [...]} (none = the built-in mix)'},
    )
    val_data: list[str] = field(
        default_factory=list,
        metadata={"help": "held-out conversation JSONL (default: built-in held-out split, or 5%% of --data)"},
    )
    system: str = field(default="", metadata={"help": "system prompt added to every conversation without one"})
    epochs: float = field(
        default=0.0, metadata={"help": "train this many passes over the data (overrides --max-steps)"}
    )
    mix: str = field(
        default="",
        metadata={
            "help": "built-in source weights (repeats per epoch); default 'chitchat=0.3,chatterbot=0.5,identity=2,tasks=6'"
            "; replay=W adds the base model's own replies (see --replay)"
        },
    )
    task_mix: str = field(
        default="",
        metadata={
            "help": "built-in per-task shares, e.g. 'add3=2,compare=0.5' (default: chatstack.data.chat_builtin."
            "DEFAULT_TASK_WEIGHTS)"
        },
    )
    chitchat: int = field(default=2000, metadata={"help": "built-in: chit-chat conversations to use"})
    replay: int = field(
        default=300,
        metadata={
            "help": "built-in source 'replay' (--mix ...,replay=W): the base model's own greedy replies to this many "
            "open questions, so a pretrained chat model keeps chatting (chatstack.data.replay)"
        },
    )
    replay_tokens: int = field(default=160, metadata={"help": "replay: longest reply generated, in tokens"})
    tasks_per_task: int = field(default=4000, metadata={"help": "built-in: training examples per verifiable task"})
    on_long: str = field(
        default="truncate",
        metadata={
            "help": "conversations longer than the context: truncate at a turn boundary, or drop",
            "choices": ["truncate", "drop"],
        },
    )
    seq_len: int = field(
        default=0,
        metadata={
            "help": "tokens per training row; longer conversations are cut per --on-long (0 = min(context, 1024))"
        },
    )
    packing: bool = field(default=True, metadata={"help": "pack several conversations per row"})
    strict: bool = field(default=True, metadata={"help": "stop at the first invalid line (else skip and count)"})
    # fine-tuning defaults: lower learning rate than pretraining, a short run (see docs/sft.md)
    max_steps: int = field(default=600, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "rows per micro-batch (per process)"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=1e-4, metadata={"help": "learning rate at the end of the cosine"})
    warmup_steps: int = field(default=30, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decay on matrices"})
    eval_every: int = field(default=200, metadata={"help": "evaluate every N steps (0 = only at the end)"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    time_budget: float = field(
        default=225.0, metadata={"help": "seconds of training; max_steps is cut to fit (0 = no limit)"}
    )
    out: str = field(default="runs/sft", metadata={"help": "checkpoint directory to write (and resume from)"})


def parse_mix(spec: str) -> dict[str, float]:
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, w = part.partition("=")
        try:
            out[name.strip()] = float(w)
        except ValueError:
            raise ValueError(f"--mix: expected name=weight, got {part!r}") from None
    return out


class SFTTask:
    """Batches of packed conversation rows; loss on assistant tokens; held-out conversation loss."""

    def __init__(
        self, train_rows: PackedRows, val_rows: PackedRows, batch_size: int, grad_accum: int, seed: int, tokenizer=None
    ):
        if len(train_rows) == 0:
            raise ValueError("no training conversations left after validation/length filtering")
        self.train_rows, self.val_rows = train_rows, val_rows
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.tokenizer = tokenizer
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            self._perms = {epoch: torch.randperm(len(self.train_rows), generator=g)}  # keep one epoch
        return self._perms[epoch]

    def rows_for(self, step: int, micro: int, rank: int, world: int) -> torch.Tensor:
        """Row indices of one micro-batch: consecutive slices of per-epoch shuffles (a pure function)."""
        B, N = self.batch_size, len(self.train_rows)
        start = ((step * self.grad_accum + micro) * world + rank) * B
        idx = []
        for i in range(start, start + B):
            idx.append(int(self._perm(i // N)[i % N]))
        return torch.tensor(idx)

    def train_batch(self, step, micro, rank, world):
        return make_batch(self.train_rows, self.rows_for(step, micro, rank, world))

    def count_tokens(self, batch) -> int:
        return int(batch["n_tokens"])  # real tokens, not padding: what packing is measured by

    def loss(self, model, batch):
        if not isinstance(model, GPT):  # DDP / compiled: the module's own forward
            _, loss = model(batch["idx"], batch["targets"], positions=batch["positions"], attn_mask=batch["attn_mask"])
            return loss, {}
        # the output layer only at the positions that carry a loss (assistant tokens: about a third of a row),
        # not over the whole (B, T, vocab) logits: with SmolLM2's 49k vocabulary those are 1.6 GB a batch
        h = model.hidden_states(batch["idx"], positions=batch["positions"], attn_mask=batch["attn_mask"])
        targets = batch["targets"]
        keep = targets >= 0
        logits = model.lm_head(h[keep])  # (N, V)
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum") / keep.sum().clamp_min(1), {}

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        if self.val_rows is None or len(self.val_rows) == 0:
            return {}

        return {"val_loss": conversation_loss(model, self.val_rows, self.batch_size)[0]}

    @torch.no_grad()
    def sample(self, model) -> str:
        if self.tokenizer is None:
            return ""

        eng = Engine(model, self.tokenizer, max_batch_size=4)
        lines = []
        for q in ("Hello! How are you today?", "Who are you?", "What is 23 + 45?"):
            c = eng.chat([{"role": "user", "content": q}], SamplingParams(max_new_tokens=40, temperature=0))
            lines.append(f"user: {q}\nassistant: {c.text}")
        return "\n".join(lines)


def _replay(cfg: SFTConfig, model: GPT, tokenizer, log=print) -> list[list[dict]]:
    """The 'replay' source: the base model's greedy replies to --replay open questions (cached in OUT)."""
    prompts = replay_prompts(cfg.replay, cfg.seed)

    def generate(qs: list[str]) -> list[tuple[str, bool]]:
        log(f"replay: the base model answers {len(qs)} open questions (up to {cfg.replay_tokens} tokens each)")
        was_training = model.training
        eng = Engine(model.eval(), tokenizer, max_batch_size=32)
        ids = [tokenizer.render_prompt([{"role": "user", "content": q}]) for q in qs]
        outs = eng.generate(ids, SamplingParams(max_new_tokens=cfg.replay_tokens, temperature=0.0), progress=True)
        model.train(was_training)
        return [(o.text, o.finish_reason == "stop") for o in outs]

    return replay_conversations(Path(cfg.out) / "replay.jsonl", prompts, generate)


def load_sft_data(cfg: SFTConfig, tokenizer, max_len: int, log=print, model: GPT | None = None):
    """(train encoded, val encoded, summaries) from --data/--val-data or the built-in mix; `model` (the base)
    answers the 'replay' source's questions."""
    system = cfg.system or None
    if cfg.data:
        tr_sum, convs = LoadSummary(), []
        for p in cfg.data:
            c = read_jsonl(p, strict=cfg.strict, summary=tr_sum)
            tr_sum.sources[str(p)] = len(c)
            convs += c
        if cfg.val_data:
            va_sum, val_convs = LoadSummary(), []
            for p in cfg.val_data:
                val_convs += read_jsonl(p, strict=cfg.strict, summary=va_sum)
        else:
            # hold out 5% (at least 1, unless there is only one conversation)
            rng = random.Random(cfg.seed)
            order = list(range(len(convs)))
            rng.shuffle(order)
            k = max(1, len(convs) // 20) if len(convs) > 1 else 0
            held = set(order[:k])
            val_convs = [c for i, c in enumerate(convs) if i in held]
            convs = [c for i, c in enumerate(convs) if i not in held]
            va_sum = LoadSummary()
    else:
        mix = parse_mix(cfg.mix)
        replay_w = mix.pop("replay", 0.0)
        sizes = {"chitchat": cfg.chitchat, "tasks_per_task": cfg.tasks_per_task}
        train_mix = builtin_mix("train", seed=cfg.seed, mix=mix, sizes=sizes, task_weights=parse_mix(cfg.task_mix))
        val_mix = builtin_mix("test", seed=cfg.seed, mix=mix, sizes=sizes)
        if replay_w > 0:
            if model is None:
                raise ValueError("--mix replay=W needs the base model to answer the replay questions")
            if cfg.replay <= 0:
                raise ValueError(f"--mix names replay but --replay is {cfg.replay}; give a positive count")
            replay = _replay(cfg, model, tokenizer, log)
            rng = random.Random(f"replay-mix|{cfg.seed}")
            whole, frac = int(replay_w), replay_w - int(replay_w)
            chosen = replay * whole + [c for c in replay if rng.random() < frac]
            train_mix += [{"messages": c, "source": "replay"} for c in chosen]
            rng.shuffle(train_mix)
        convs = [c["messages"] for c in train_mix]
        tr_sum = LoadSummary()
        for c in train_mix:
            tr_sum.sources[c["source"]] = tr_sum.sources.get(c["source"], 0) + 1
        if cfg.val_data:
            va_sum, val_convs = LoadSummary(), []
            for p in cfg.val_data:
                val_convs += read_jsonl(p, strict=cfg.strict, summary=va_sum)
        else:
            val_convs, va_sum = [c["messages"] for c in val_mix], LoadSummary()
    train_enc, tr_sum = encode_conversations(tokenizer, convs, max_len, system, cfg.on_long, tr_sum)
    val_enc, va_sum = encode_conversations(tokenizer, val_convs, max_len, system, cfg.on_long, va_sum)
    return train_enc, val_enc, tr_sum, va_sum


def run_sft(cfg: SFTConfig, log=print, stage: str = "sft", extra: dict | None = None):
    """Fine-tune; `stage` and `extra` (merged into config.json) let other stages reuse it (self-improve)."""
    if not cfg.base:
        raise ValueError("--base: give the base checkpoint directory")
    torch.manual_seed(cfg.seed)
    ck = load_checkpoint(cfg.base, device="cpu")
    if ck.tokenizer is None:
        raise ValueError(f"{cfg.base}: the base checkpoint has no tokenizer.json")
    model, tok = ck.model, ck.tokenizer
    check_flags(model, cfg.lora_rank, cfg.lora_targets, cfg.train_layers)
    T = resolve_seq_len(cfg.seq_len, model.config.block_size)
    row_len = T + 1  # inputs are row[:-1], targets row[1:]: a row holds block_size + 1 tokens
    train_enc, val_enc, tr_sum, va_sum = load_sft_data(cfg, tok, row_len, log, model=model)
    train_rows = pack(train_enc, row_len, tok.eot_id, seed=cfg.seed, packed=cfg.packing)
    val_rows = pack(val_enc, row_len, tok.eot_id, seed=cfg.seed, packed=True)
    if len(train_rows) == 0:
        raise ValueError(f"--seq-len {T}: no training conversation fits ({tr_sum.line()})")
    log(f"sft data: train {tr_sum.line()}")
    if tr_sum.sources:
        log("  sources: " + ", ".join(f"{k} {v:,}" for k, v in tr_sum.sources.items()))
    log(f"  held-out {va_sum.line()}")
    log(
        f"  {len(train_rows):,} train rows of {row_len} tokens ({train_rows.fill():.1%} full"
        f"{', packed' if cfg.packing else ', one conversation per row'}), {len(val_rows):,} held-out rows"
    )
    rows_per_step = cfg.batch_size * cfg.grad_accum
    if cfg.epochs > 0:
        cfg.max_steps = max(1, math.ceil(cfg.epochs * len(train_rows) / rows_per_step))
    log(
        f"  {cfg.max_steps} steps x {rows_per_step} rows = {cfg.max_steps * rows_per_step / len(train_rows):.2f} "
        f"epochs (time budget {cfg.time_budget:.0f}s)"
    )
    base_cfg = read_config(cfg.base)
    task = SFTTask(train_rows, val_rows, cfg.batch_size, cfg.grad_accum, cfg.seed, tok)
    try:
        task.flops_per_token = flops_per_token(model.config)
    except ImportError:
        pass
    ckpt_config = {
        "stage": stage,
        "parent": str(cfg.base),
        "model": model.config.to_dict(),
        "tokenizer": tok.info(),
        "base_stage": base_cfg.get("stage"),
        "train": asdict(cfg),
        "data": {
            "train": asdict(tr_sum),
            "val": asdict(va_sum),
            "rows": len(train_rows),
            "fill": round(train_rows.fill(), 4),
            "builtin": not cfg.data,
        },
        **(extra or {}),
    }
    return train(model, task, cfg, ckpt_config, tok)


def _cmd_sft(args) -> int:
    cfg = dataclass_from_args(SFTConfig, args)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 talks
    try:
        path = run_sft(cfg, log=(lambda s: print(s, file=sys.stderr)) if main_rank else (lambda s: None))
    except (ConversationError, CheckpointError, ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    if main_rank:
        print(f"saved {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "sft",
        help="supervised fine-tuning on conversations (assistant-only loss)",
        description=__doc__.split("\n\n")[0],
    )
    add_dataclass_args(p, SFTConfig)
    p.set_defaults(func=_cmd_sft)
