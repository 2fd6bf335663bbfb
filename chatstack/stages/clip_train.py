"""`chatstack clip-train`: train the image encoder and a text encoder together with CLIP's contrastive loss.

    chatstack clip-train --builtin digits --out runs/clip                  # ~2-3 min on 2 CPU cores
    chatstack clip-train --builtin digits,scenes --out runs/clip_mix       # the encoder sft-vision builds on
    chatstack clip-train --data DIR --out runs/clip_mine                   # DIR/captions.jsonl: {"image", "caption"}
    chatstack eval-vision runs/clip --json                                 # zero-shot accuracy on held-out digits

The same loop as every other stage (chatstack.train.loop) with batches of (image, caption) pairs; the
checkpoint is an ordinary checkpoint directory of kind "clip" (config.json's "model" is the CLIPConfig).
Captions: digits get one of a few templates ("a handwritten seven", "the number 7", ...), scenes their
description ("a red circle left of a blue square"). --hard-negatives (default 0.5): that share of scenes is
followed in its batch by the same layout with colours, shapes or places moved round ("a blue circle left of a
red square"), so matching captions takes which colour goes with which shape and what is left of what, not
only the set of words in them. Training images of digits are shifted by up to 2
pixels (the one augmentation). The held-out images (20% of the digits, hash-held-out scenes, 10% of --data)
are never trained on; --eval-every reports zero-shot accuracy on them while training.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from chatstack.args import CLIError, add_dataclass_args, dataclass_from_args
from chatstack.checkpoint import CheckpointError
from chatstack.evals.vision import clip_metrics
from chatstack.train.loop import TrainConfig, train
from chatstack.vision import data as D
from chatstack.vision.encoder import CLIP, CLIPConfig, encode_text_bytes


@dataclass
class CLIPTrainConfig(TrainConfig):
    builtin: str = field(default="", metadata={"help": "built-in data: digits, scenes, or digits,scenes"})
    data: str = field(
        default="", metadata={"help": 'a folder with captions.jsonl lines {"image": FILE, "caption": str}'}
    )
    embed_dim: int = field(default=64, metadata={"help": "shared image/text embedding width"})
    channels: str = field(default="32,64,96", metadata={"help": "conv widths of the encoder's three stages"})
    scene_share: float = field(default=0.5, metadata={"help": "with digits,scenes: share of scene pairs per batch"})
    hard_negatives: float = field(
        default=0.5,
        metadata={"help": "share of scenes followed in the batch by the same layout with attributes rearranged"},
    )
    out: str = field(default="runs/clip", metadata={"help": "checkpoint directory to write"})
    max_steps: int = field(default=400, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=64, metadata={"help": "pairs per batch (the contrastive negatives)"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=1e-4, metadata={"help": "learning rate at the end of the cosine"})
    warmup_steps: int = field(default=30, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW decay on matrices"})
    eval_every: int = field(default=100, metadata={"help": "evaluate every N steps (0 = only at the end)"})
    log_every: int = field(default=10, metadata={"help": "write a metrics line every N steps"})
    time_budget: float = field(
        default=240.0, metadata={"help": "seconds of training; max_steps is cut to fit (0 = no limit)"}
    )


def parse_builtin(spec: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in D.BUILTINS]
    if bad or not names:
        raise ValueError(
            f"--builtin: unknown dataset {bad[0] if bad else spec!r} (use digits, scenes or digits,scenes)"
        )
    return names


def read_caption_folder(folder: str, seed: int = 0):
    """(train, test) lists of (image tensor, caption) from DIR/captions.jsonl; 10% (at least 1) held out."""
    root = Path(folder)
    index = root / "captions.jsonl"
    if not index.exists():
        raise ValueError(
            f'{index}: missing (--data needs a folder with captions.jsonl lines {{"image": FILE, "caption": str}})'
        )
    pairs = []
    for ln, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{index}:{ln}: bad JSON ({e.msg})") from e
        if (
            not isinstance(obj, dict)
            or not isinstance(obj.get("image"), str)
            or not isinstance(obj.get("caption"), str)
        ):
            raise ValueError(f'{index}:{ln}: expected {{"image": FILE, "caption": str}}')
        try:
            pairs.append((D.load_image(root / obj["image"]), obj["caption"]))
        except ValueError as e:
            raise ValueError(f"{index}:{ln}: {e}") from None
    if len(pairs) < 2:
        raise ValueError(f"{index}: needs at least 2 image-caption pairs, has {len(pairs)}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    k = max(1, len(pairs) // 10)
    return [pairs[i] for i in order[k:]], [pairs[i] for i in order[:k]]


class CLIPTask:
    """Batches of (image, caption) pairs; the loss is CLIP's; evaluation is zero-shot on held-out images."""

    def __init__(self, cfg: CLIPTrainConfig, sources: list[str], text_len: int, folder=None):
        self.cfg, self.sources, self.folder, self.text_len = cfg, sources, folder, text_len
        if "digits" in sources:
            self.dx, self.dy = D.digits("train")

    def _pair(self, rng: random.Random, prev: D.Scene | None = None):
        """(image, caption, scene or None); with `prev`, a hard negative of it when one is drawn."""
        if self.folder is not None:
            return (*self.folder[0][rng.randrange(len(self.folder[0]))], None)
        if prev is not None and self.cfg.hard_negatives > 0 and rng.random() < self.cfg.hard_negatives:
            s = D.counterfactual(prev, rng)
            if not s.held_out():
                return s.draw(), s.caption(), None
        use_scene = "scenes" in self.sources and ("digits" not in self.sources or rng.random() < self.cfg.scene_share)
        if use_scene:
            while True:
                s = D.random_scene(rng)
                if not s.held_out():
                    return s.draw(), s.caption(), s
        j = rng.randrange(len(self.dx))
        img = self.dx[j]
        dx, dy = rng.randint(-2, 2), rng.randint(-2, 2)  # a random shift: the digits are few
        return torch.roll(img, (dy, dx), (1, 2)), D.digit_caption(int(self.dy[j]), rng), None

    def train_batch(self, step, micro, rank, world):
        start = ((step * self.cfg.grad_accum + micro) * world + rank) * self.cfg.batch_size
        pairs, prev = [], None
        for i in range(self.cfg.batch_size):
            img, cap, scene = self._pair(random.Random(f"{self.cfg.seed}-{start + i}"), prev)
            pairs.append((img, cap))
            prev = scene
        ids, mask = encode_text_bytes([c for _, c in pairs], self.text_len)
        return {"images": torch.stack([p for p, _ in pairs]), "ids": ids, "mask": mask}

    def count_tokens(self, batch) -> int:
        return batch["images"].size(0)  # tokens/s in the metrics are pairs/s here

    def loss(self, model, batch):
        loss, logits = model(batch["images"], batch["ids"], batch["mask"])
        acc = (logits.argmax(1) == torch.arange(logits.size(0), device=logits.device)).float().mean()
        return loss, {"batch_acc": float(acc)}

    def evaluate(self, model) -> dict:
        m = model.module if hasattr(model, "module") else model
        res = clip_metrics(m, self.sources, folder_test=self.folder[1] if self.folder else None)
        res.pop("per_class", None)
        return res


def run_clip_train(cfg: CLIPTrainConfig, log=print):
    if bool(cfg.builtin) == bool(cfg.data):
        raise ValueError("give one of --builtin NAME or --data DIR")
    try:
        channels = tuple(int(c) for c in cfg.channels.split(","))
    except ValueError:
        raise ValueError(f"--channels: expected three comma-separated integers, got {cfg.channels!r}") from None
    ccfg = CLIPConfig(channels=channels, embed_dim=cfg.embed_dim)
    if not 0.0 <= cfg.hard_negatives <= 1.0:
        raise ValueError(f"--hard-negatives must be in [0, 1], got {cfg.hard_negatives}")
    sources, folder = (
        (parse_builtin(cfg.builtin), None) if cfg.builtin else (["data"], read_caption_folder(cfg.data, cfg.seed))
    )
    torch.manual_seed(cfg.seed)
    model = CLIP(ccfg)
    n_img = sum(p.numel() for p in model.image.parameters())
    n_txt = sum(p.numel() for p in model.text.parameters())
    log(
        f"clip: image encoder {n_img:,} params (CNN {ccfg.channels}, {ccfg.grid}x{ccfg.grid} tokens of {ccfg.width}), "
        f"text encoder {n_txt:,} params | data: {cfg.builtin or cfg.data}"
        + (f" ({len(folder[0])} train / {len(folder[1])} held-out pairs)" if folder else "")
    )
    task = CLIPTask(cfg, sources, ccfg.text_len, folder)
    ckpt_config = {
        "kind": "clip",
        "stage": "clip",
        "parent": None,
        "model": ccfg.to_dict(),
        "data": {"builtin": sources if cfg.builtin else None, "data": cfg.data or None},
        "params": {"image_encoder": n_img, "text_encoder": n_txt},
        "train": asdict(cfg),
    }
    return train(model, task, cfg, ckpt_config, tokenizer=None)


def _cmd(args) -> int:
    cfg = dataclass_from_args(CLIPTrainConfig, args)
    try:
        path = run_clip_train(cfg)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    print(f"saved {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "clip-train", help="contrastive (CLIP) training of the image encoder", description=__doc__.split("\n\n")[0]
    )
    add_dataclass_args(p, CLIPTrainConfig)
    p.set_defaults(func=_cmd)
