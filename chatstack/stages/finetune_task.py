"""`chatstack finetune-task`: GPT-1-style fine-tuning of a pretrained decoder on a labelled task.

    chatstack finetune-task --base runs/base --task entail --builtin shakespeare-entail --out runs/task/entail
    chatstack finetune-task --base runs/base --task classify --builtin chatterbot-topics --out runs/task/topics
    chatstack finetune-task --base runs/base --task classify --data train.jsonl --eval-data test.jsonl --out DIR
    chatstack finetune-task --base runs/base --task choice --builtin shakespeare-choice --random-init --out DIR

The decoder gets three new embedding rows (start, delim, extract) and one linear head; each example is
turned into token sequences by GPT-1's input transformations (chatstack/heads.py). The loss is the task's
cross-entropy plus --lm-coef (GPT-1's lambda, default 0.5) times the language-modelling loss on the
example's text. --random-init trains the same architecture from random weights (the baseline GPT-1
compares against). Training runs through the one loop (chatstack.train.loop): warmup + cosine, AdamW,
metrics.jsonl with `accuracy` on the evaluation set every --eval-every steps, atomic checkpoint, --resume.

Data: --builtin NAME (chatstack/data/task_sets.py: chatterbot-topics, shakespeare-entail,
shakespeare-similar, shakespeare-choice, shakespeare-speaker; each has a fixed train/test split), or --data FILE.jsonl
(+ optional --eval-data; else 10% of --data is held out). JSONL fields per --task:
    classify {"text", "label"} · entail {"premise", "hypothesis", "label"} · similar {"a", "b", "label"}
    choice {"context", "options": [...], "label": index}
The output is a checkpoint of kind "task"; `chatstack eval-task DIR --json` reports its accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import asdict, dataclass, field, replace

import torch

from chatstack.args import CLIError, add_dataclass_args, dataclass_from_args
from chatstack.checkpoint import CheckpointError, load_checkpoint
from chatstack.data.shards import DataError
from chatstack.data.task_sets import BUILTIN_SETS, KINDS, builtin_task_set, label_names, read_task_file
from chatstack.heads import SPECIAL_INITS, TaskModel, accuracy, encode_examples, make_batch
from chatstack.train.loop import TrainConfig, train


@dataclass
class FinetuneTaskConfig(TrainConfig):
    base: str = field(default="", metadata={"help": "pretrained checkpoint (its tokenizer and architecture are used)"})
    task: str = field(default="", metadata={"help": "task type", "choices": list(KINDS)})
    builtin: str = field(default="", metadata={"help": "a built-in set: " + ", ".join(BUILTIN_SETS)})
    data: str = field(default="", metadata={"help": "training examples (JSONL, fields per --task: see above)"})
    eval_data: str = field(
        default="", metadata={"help": "evaluation examples (default: the built-in test split, or 10% of --data)"}
    )
    lm_coef: float = field(
        default=0.5, metadata={"help": "weight of the auxiliary language-modelling loss (GPT-1's lambda; 0 = off)"}
    )
    max_len: int = field(default=64, metadata={"help": "most tokens per sequence (longer inputs are cut)"})
    random_init: bool = field(
        default=False, metadata={"help": "same architecture, random initial weights (the no-pretraining baseline)"}
    )
    head_dropout: float = field(default=0.1, metadata={"help": "dropout before the linear head"})
    dropout: float = field(default=0.0, metadata={"help": "dropout inside the decoder while fine-tuning"})
    special_init: str = field(
        default="random",
        metadata={
            "help": "initial start/delim/extract embeddings: random (GPT-1) or mean (of the base's rows)",
            "choices": list(SPECIAL_INITS),
        },
    )
    max_steps: int = field(default=300, metadata={"help": "optimizer steps"})
    epochs: float = field(
        default=0.0,
        metadata={"help": "passes over the training examples; > 0 sets the steps to ceil(epochs x n / batch size)"},
    )
    batch_size: int = field(default=16, metadata={"help": "examples per micro-batch"})
    lr: float = field(
        default=3e-4, metadata={"help": "peak learning rate (chosen on held-out training pairs: docs/finetune_task.md)"}
    )
    min_lr: float = field(default=3e-5, metadata={"help": "learning rate at the end of the cosine"})
    warmup_steps: int = field(default=40, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW decay on matrices"})
    eval_every: int = field(default=100, metadata={"help": "evaluate every N steps (0 = only at the end)"})
    log_every: int = field(default=20, metadata={"help": "write a metrics line every N steps"})
    dtype: str = field(
        default="fp32", metadata={"help": "fp32 | bf16 | fp16 | auto", "choices": ["auto", "fp32", "bf16", "fp16"]}
    )


class TaskTrainer:
    """The loop's Task: random batches of encoded examples (a pure function of seed and step), the GPT-1 loss,
    accuracy on the evaluation set."""

    def __init__(self, train_enc: list, eval_enc: list, base_vocab: int, cfg: FinetuneTaskConfig):
        self.train_enc, self.eval_enc, self.V, self.cfg = train_enc, eval_enc, base_vocab, cfg
        # multiple choice with varying option counts: batches draw from one option count at a time
        self.groups: dict[int, list[int]] = {}
        for i, (seqs, _) in enumerate(train_enc):
            self.groups.setdefault(len(seqs), []).append(i)
        self.group_keys = sorted(self.groups)

    def train_batch(self, step, micro, rank, world):
        rng = random.Random(f"{self.cfg.seed}/{step}/{micro}/{rank}")
        key = rng.choices(self.group_keys, weights=[len(self.groups[k]) for k in self.group_keys])[0]
        ids = [rng.choice(self.groups[key]) for _ in range(self.cfg.batch_size)]
        return make_batch([self.train_enc[i] for i in ids], self.V, with_lm=self.cfg.lm_coef > 0)

    def count_tokens(self, batch) -> int:
        return int((batch["last"] + 1).sum())

    def loss(self, model, batch):
        m = getattr(model, "module", model)
        return m.loss(batch, self.cfg.lm_coef)

    def evaluate(self, model):
        return {"accuracy": accuracy(getattr(model, "module", model), self.eval_enc), "eval_n": len(self.eval_enc)}


def load_data(cfg: FinetuneTaskConfig) -> tuple[list, list, str]:
    if bool(cfg.builtin) == bool(cfg.data):
        raise CLIError("give exactly one of --builtin NAME or --data FILE.jsonl")
    try:
        if cfg.builtin:
            if cfg.builtin not in BUILTIN_SETS:
                raise CLIError(f"--builtin {cfg.builtin!r}: choose one of {', '.join(BUILTIN_SETS)}")
            if BUILTIN_SETS[cfg.builtin] != cfg.task:
                raise CLIError(f"--builtin {cfg.builtin} is a {BUILTIN_SETS[cfg.builtin]} set, not --task {cfg.task}")
            train_rows, eval_rows = builtin_task_set(cfg.builtin, cfg.seed)
            if cfg.eval_data:
                eval_rows = read_task_file(cfg.eval_data, cfg.task)
            return train_rows, eval_rows, cfg.builtin
        rows = read_task_file(cfg.data, cfg.task)
        if cfg.eval_data:
            return rows, read_task_file(cfg.eval_data, cfg.task), cfg.data
        rng = random.Random(cfg.seed)
        order = list(range(len(rows)))
        rng.shuffle(order)
        n_eval = max(1, len(rows) // 10)
        if len(rows) - n_eval < 1:
            raise CLIError(
                f"{cfg.data}: {len(rows)} example(s) is too few to hold out an evaluation set; give --eval-data"
            )
        return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]], cfg.data
    except DataError as e:
        raise CLIError(str(e)) from None


def run(cfg: FinetuneTaskConfig):
    if not cfg.base:
        raise CLIError("--base: give the pretrained checkpoint to fine-tune")
    if cfg.task not in KINDS:
        raise CLIError(f"--task: choose one of {', '.join(KINDS)}")
    if not cfg.out:
        raise CLIError("--out: give the checkpoint directory to write")
    if cfg.max_len < 8:
        raise CLIError(f"--max-len must be at least 8, got {cfg.max_len}")
    if cfg.epochs < 0:
        raise CLIError(f"--epochs must be >= 0, got {cfg.epochs}")
    train_rows, eval_rows, source = load_data(cfg)
    if cfg.epochs > 0:
        cfg = replace(cfg, max_steps=max(1, math.ceil(cfg.epochs * len(train_rows) / cfg.batch_size)))
    try:
        ck = load_checkpoint(cfg.base)
    except CheckpointError as e:
        raise CLIError(str(e)) from None
    if ck.tokenizer is None:
        raise CLIError(f"{cfg.base}: checkpoint has no tokenizer.json")
    base_cfg = ck.model.config
    max_len = min(cfg.max_len, base_cfg.block_size)
    labels = label_names(train_rows, cfg.task)
    if cfg.task != "choice" and len(labels) < 2:
        raise CLIError(f"{source}: the training examples have {len(labels)} distinct label(s); a classifier needs 2+")
    V = base_cfg.vocab_size
    try:
        train_enc = encode_examples(cfg.task, ck.tokenizer.encode, train_rows, V, max_len, labels)
        eval_enc = encode_examples(cfg.task, ck.tokenizer.encode, eval_rows, V, max_len, labels)
    except ValueError as e:
        raise CLIError(f"{cfg.eval_data or source}: {e}") from None
    torch.manual_seed(cfg.seed)
    model = TaskModel.from_base(
        None if cfg.random_init else ck.model,
        cfg.task,
        len(labels),
        cfg=base_cfg,
        head_dropout=cfg.head_dropout,
        special_init=cfg.special_init,
        dropout=cfg.dropout,
    )
    task_info = {
        "kind": cfg.task,
        "labels": labels,
        "n_classes": len(labels),
        "base_vocab": V,
        "max_len": max_len,
        "head_dropout": cfg.head_dropout,
        "source": source,
        "builtin": cfg.builtin or None,
        "random_init": cfg.random_init,
        "lm_coef": cfg.lm_coef,
        "special_init": cfg.special_init,
        "n_train": len(train_enc),
        "n_eval": len(eval_enc),
    }
    ckpt_config = {
        "stage": "task",
        "kind": "task",
        "parent": str(cfg.base),
        "model": model.config.to_dict(),
        "tokenizer": ck.tokenizer.info(),
        "task": task_info,
        "train": asdict(cfg),
    }
    print(
        f"{cfg.task} on {source}: {len(train_enc):,} train / {len(eval_enc):,} eval examples, "
        f"{'random init' if cfg.random_init else 'from ' + str(cfg.base)}, lm_coef {cfg.lm_coef}, "
        f"{cfg.max_steps} steps of {cfg.batch_size}"
    )
    return train(model, TaskTrainer(train_enc, eval_enc, V, cfg), cfg, ckpt_config, ck.tokenizer)


def _cmd(args) -> int:
    cfg = dataclass_from_args(FinetuneTaskConfig, args)
    try:
        path = run(cfg)
    except (CheckpointError, ValueError) as e:
        raise CLIError(str(e)) from None
    final = [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines() if '"final"' in l]
    if final:
        print(f"final: accuracy {final[-1]['accuracy']:.1%} on {final[-1]['eval_n']} examples")
    print(f"checkpoint: {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "finetune-task",
        help="GPT-1 task fine-tuning: linear head + input transformations",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_args(p, FinetuneTaskConfig)
    p.set_defaults(func=_cmd)
