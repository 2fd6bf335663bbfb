"""GPT-1 task heads: the pretrained decoder + one linear layer, with the input transformations of Radford et al. 2018.

    from chatstack.heads import TaskModel, transform, collate
    model = TaskModel.from_base(base_gpt, kind="entail", n_classes=2)
    seqs = transform("entail", tok.encode, {"premise": "...", "hypothesis": "..."}, model.base_vocab, max_len=128)
    batch = collate([seqs], n_seq=1)                       # idx (B, 1, T), last (B, 1)
    logits = model.scores(batch["idx"], batch["last"])    # (B, n_classes)

Every task becomes token sequences the decoder reads left to right; the head reads the final (extract) token:
    classify   [start] text [extract]                                    -> linear head over classes
    entail     [start] premise [delim] hypothesis [extract]              -> linear head over classes
    similar    [start] a [delim] b [extract]  and  [start] b [delim] a [extract]; the two final states are
               added before the head, so the score is symmetric in (a, b) by construction
    choice     [start] context [delim] option_i [extract] for every option -> one score each (a 1-output
               head); the loss is a softmax over the options
start / delim / extract are three new embedding rows appended after the base vocabulary (ids V, V+1, V+2),
initialised like the others; nothing else is added but the head. The output layer stays tied to the
embedding, so the auxiliary language-modelling loss (GPT-1's lambda = 0.5) reads V+3 logits; its targets
are only text tokens that follow text tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatstack.checkpoint import CheckpointError, load_weights, read_config
from chatstack.model import GPT, GPTConfig, lm_loss

START, DELIM, EXTRACT = 0, 1, 2  # offsets past the base vocabulary
N_SPECIAL = 3
KINDS = ("classify", "entail", "similar", "choice")
SPECIAL_INITS = ("random", "mean")


def n_sequences(kind: str, n_options: int = 0) -> int:
    return {"classify": 1, "entail": 1, "similar": 2}.get(kind, n_options)


def _fit(parts: list[list[int]], budget: int) -> list[list[int]]:
    """Cut the longest parts until they fit `budget` tokens together: the first part keeps its end (the words
    next to the delimiter), later parts keep their start."""
    parts = [list(p) for p in parts]
    while sum(map(len, parts)) > budget:
        i = max(range(len(parts)), key=lambda j: len(parts[j]))
        parts[i] = parts[i][1:] if i == 0 and len(parts) > 1 else parts[i][:-1]
    return parts


def transform(
    kind: str, encode: Callable[[str], list[int]], ex: dict, base_vocab: int, max_len: int
) -> list[list[int]]:
    """The token sequences for one example (GPT-1's input transformations, see the module docstring)."""
    s, d, e = base_vocab + START, base_vocab + DELIM, base_vocab + EXTRACT
    if kind == "classify":
        (text,) = _fit([encode(ex["text"])], max_len - 2)
        return [[s, *text, e]]
    if kind == "entail":
        p, h = _fit([encode(ex["premise"]), encode(ex["hypothesis"])], max_len - 3)
        return [[s, *p, d, *h, e]]
    if kind == "similar":
        a, b = _fit([encode(ex["a"]), encode(ex["b"])], max_len - 3)
        return [[s, *a, d, *b, e], [s, *b, d, *a, e]]
    if kind == "choice":
        ctx = encode(ex["context"])
        out = []
        for opt in ex["options"]:
            c, o = _fit([ctx, encode(opt)], max_len - 3)
            out.append([s, *c, d, *o, e])
        return out
    raise ValueError(f"unknown task type {kind!r}; choose one of {', '.join(KINDS)}")


def collate(examples: list[list[list[int]]], base_vocab: Optional[int] = None, pad: int = 0) -> dict:
    """Right-pad every sequence of every example: idx (B, S, T), last (B, S) = index of each extract token,
    lm_targets (B, S, T) = next text token or -1 (only with base_vocab). Padding after the extract token
    cannot change it: attention is causal."""
    S = max(len(x) for x in examples)
    T = max(len(s) for x in examples for s in x)
    B = len(examples)
    idx = torch.full((B, S, T), pad, dtype=torch.long)
    last = torch.zeros((B, S), dtype=torch.long)
    for i, seqs in enumerate(examples):
        if len(seqs) != S:
            raise ValueError(f"example {i} has {len(seqs)} sequences, the batch {S} (options must agree in number)")
        for j, seq in enumerate(seqs):
            idx[i, j, : len(seq)] = torch.tensor(seq)
            last[i, j] = len(seq) - 1
    out = {"idx": idx, "last": last}
    if base_vocab is not None:
        tgt = torch.full_like(idx, -1)
        text = idx < base_vocab
        valid = torch.arange(T)[None, None, :] < last[..., None]  # positions before the extract token
        nxt_text = torch.zeros_like(text)
        nxt_text[..., :-1] = text[..., 1:]
        keep = text & nxt_text & valid
        tgt[..., :-1] = torch.where(keep[..., :-1], idx[..., 1:], tgt[..., :-1])
        out["lm_targets"] = tgt
    return out


class TaskModel(nn.Module):
    """GPT (vocabulary + 3 special rows) + dropout + one linear head on the extract token's final state."""

    def __init__(self, cfg: GPTConfig, kind: str, n_classes: int, base_vocab: int, head_dropout: float = 0.1) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown task type {kind!r}; choose one of {', '.join(KINDS)}")
        if cfg.vocab_size != base_vocab + N_SPECIAL:
            raise ValueError(f"task model vocabulary {cfg.vocab_size} != base {base_vocab} + {N_SPECIAL} specials")
        self.kind, self.n_classes, self.base_vocab = kind, n_classes, base_vocab
        self.gpt = GPT(cfg)
        self.drop = nn.Dropout(head_dropout)
        self.head = nn.Linear(cfg.n_embd, 1 if kind == "choice" else n_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self) -> GPTConfig:
        return self.gpt.config

    @classmethod
    def from_base(
        cls,
        base: Optional[GPT],
        kind: str,
        n_classes: int,
        cfg: Optional[GPTConfig] = None,
        head_dropout: float = 0.1,
        special_init: str = "random",
        dropout: Optional[float] = None,
    ) -> TaskModel:
        """A task model whose decoder starts from `base`'s weights (None: random initialisation of `cfg`).

        special_init: how the three new embedding rows start: "random" (N(0, 0.02), as GPT-1) or "mean" (the
        mean of the base's rows, so a special token first reads as an average token to the pretrained layers).
        dropout: the decoder's dropout while fine-tuning (None: the base's)."""
        if special_init not in SPECIAL_INITS:
            raise ValueError(f"special_init must be one of {', '.join(SPECIAL_INITS)}, got {special_init!r}")
        base_cfg = base.config if base is not None else cfg
        V = base_cfg.vocab_size
        over = {"vocab_size": V + N_SPECIAL} if dropout is None else {"vocab_size": V + N_SPECIAL, "dropout": dropout}
        new_cfg = GPTConfig.from_dict({**base_cfg.to_dict(), **over})
        m = cls(new_cfg, kind, n_classes, V, head_dropout)
        if base is not None:
            sd = base.state_dict()
            own = m.gpt.state_dict()
            for k, v in sd.items():
                if k in ("tok_emb.weight", "lm_head.weight") and v.size(0) == V:
                    own[k][:V] = v  # the base rows; rows V.. (the specials) keep their fresh init
                    if special_init == "mean":
                        own[k][V:] = v.mean(0)
                elif k in own:
                    own[k].copy_(v)
            m.gpt.load_state_dict(own)
        return m

    def features(
        self, idx: torch.Tensor, last: torch.Tensor, with_lm: bool = False
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """idx (B, S, T), last (B, S) -> final states at the extract tokens (B, S, h) [, lm logits (B, S, T, V+3)]."""
        B, S, T = idx.shape
        h = self.gpt.hidden_states(idx.reshape(B * S, T))  # (B*S, T, h)
        feats = h[torch.arange(B * S), last.reshape(-1)].view(B, S, -1)  # (B, S, h)
        if not with_lm:
            return feats, None
        return feats, self.gpt.lm_head(h).view(B, S, T, -1)

    def scores(
        self, idx: torch.Tensor, last: torch.Tensor, with_lm: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Task logits: (B, n_classes) for classify/entail/similar, (B, n_options) for choice."""
        feats, lm = self.features(idx, last, with_lm)
        if self.kind == "similar":
            feats = feats.sum(1, keepdim=True)  # both orders added: symmetric in (a, b)
        out = self.head(self.drop(feats))  # (B, S, C) or (B, S, 1)
        out = out[..., 0] if self.kind == "choice" else out[:, 0]
        return (out, lm) if with_lm else out

    def loss(self, batch: dict, lm_coef: float = 0.5) -> tuple[torch.Tensor, dict]:
        """Task cross-entropy + lm_coef x the auxiliary language-modelling loss on the text tokens."""
        with_lm = lm_coef > 0 and "lm_targets" in batch
        out = self.scores(batch["idx"], batch["last"], with_lm=with_lm)
        logits, lm = out if with_lm else (out, None)
        task = F.cross_entropy(logits.float(), batch["labels"])
        extra = {
            "task_loss": float(task.detach()),
            "train_acc": float((logits.detach().argmax(-1) == batch["labels"]).float().mean()),
        }
        if not with_lm:
            return task, extra
        aux = lm_loss(lm.reshape(-1, lm.size(-2), lm.size(-1)), batch["lm_targets"].reshape(-1, lm.size(-2)))
        extra["lm_loss"] = float(aux.detach())
        return task + lm_coef * aux, extra


# ---- examples -> tensors, accuracy, loading ------------------------------------------------------------------
def encode_examples(
    kind: str, encode: Callable[[str], list[int]], rows: list[dict], base_vocab: int, max_len: int, labels: list
) -> list:
    """[(sequences, label index)] for a list of example dicts; a label not among `labels` raises ValueError."""
    index = {lab: i for i, lab in enumerate(labels)}
    out = []
    for n, ex in enumerate(rows):
        seqs = transform(kind, encode, ex, base_vocab, max_len)
        if kind == "choice":
            y = int(ex["label"])
        elif ex["label"] in index:
            y = index[ex["label"]]
        else:
            raise ValueError(
                f"example {n + 1}: label {ex['label']!r} was not seen in training "
                f"(labels: {', '.join(map(str, labels))})"
            )
        out.append((seqs, y))
    return out


def make_batch(encoded: list, base_vocab: int, with_lm: bool = True) -> dict:
    batch = collate([s for s, _ in encoded], base_vocab if with_lm else None)
    batch["labels"] = torch.tensor([y for _, y in encoded], dtype=torch.long)
    return batch


@torch.no_grad()
def predict(model: TaskModel, encoded: list, batch_size: int = 64) -> list[int]:
    """Predicted class (or option) index per encoded example. Multiple-choice examples are grouped by their
    number of options so each batch has one shape."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    preds: dict[int, int] = {}
    groups: dict[int, list[int]] = {}
    for i, (seqs, _) in enumerate(encoded):
        groups.setdefault(len(seqs), []).append(i)
    for ids in groups.values():
        for j in range(0, len(ids), batch_size):
            chunk = ids[j : j + batch_size]
            b = collate([encoded[i][0] for i in chunk])
            logits = model.scores(b["idx"].to(device), b["last"].to(device))
            for i, p in zip(chunk, logits.argmax(-1).tolist()):
                preds[i] = p
    model.train(was)
    return [preds[i] for i in range(len(encoded))]


def accuracy(model: TaskModel, encoded: list, batch_size: int = 64) -> float:
    if not encoded:
        return float("nan")
    preds = predict(model, encoded, batch_size)
    return sum(int(p == y) for p, (_, y) in zip(preds, encoded)) / len(encoded)


def load_task_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[TaskModel, dict]:
    """A task checkpoint (kind "task", written by `chatstack finetune-task`) -> (model, its config.json)."""
    cfg = read_config(path)
    if cfg.get("kind") != "task" or "task" not in cfg:
        raise CheckpointError(
            f"{path}: not a task checkpoint (kind {cfg.get('kind')!r}); make one with `chatstack finetune-task`"
        )
    t = cfg["task"]
    model = TaskModel(
        GPTConfig.from_dict(cfg["model"]), t["kind"], t["n_classes"], t["base_vocab"], t.get("head_dropout", 0.1)
    )
    load_weights(path, model, strict=True)
    return model.to(device).eval(), cfg
