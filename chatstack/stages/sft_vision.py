"""`chatstack sft-vision`: teach a chat model to read images through a CLIP encoder and a projection.

    chatstack sft-vision --base runs/speedrun/sft --clip runs/clip_mix --out runs/vision   # 2,000 steps
    chatstack sft-vision --base ... --clip ... --out ... --image-tokens 4 --train-encoder
    chatstack eval-vision runs/vision --json

The encoder from --clip (frozen unless --train-encoder) turns an image into a grid of tokens; a new
projection (chatstack.vision.projection) maps them into n image tokens of the GPT's width, placed where the
user's message holds the image. The projection and the GPT train together through the one training loop on
image-question-answer conversations (chatstack.vision.chat_data: held-out digits and scenes are never
trained on), with the usual assistant-only loss. The output is the base's checkpoint format with the
encoder + projection in vision.safetensors and a "vision" field in config.json; text-only tools load its
GPT as before. --zero-images trains the same model with every image token zeroed (the ablation's control).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field

import torch

from chatstack.args import CLIError, add_dataclass_args, dataclass_from_args
from chatstack.checkpoint import CheckpointError, load_checkpoint, read_config
from chatstack.evals.vision import chat_metrics
from chatstack.infer.engine import Engine
from chatstack.train.loop import TrainConfig, train
from chatstack.vision import data as D
from chatstack.vision.chat_data import TASKS, TrainExamples, collate
from chatstack.vision.projection import VisionAdapter, VisionConfig
from chatstack.vision.vlm import VisionChatModel, load_clip


@dataclass
class SFTVisionConfig(TrainConfig):
    base: str = field(default="", metadata={"help": "chat (or base) GPT checkpoint to build on"})
    clip: str = field(default="", metadata={"help": "a chatstack clip-train checkpoint: its image encoder is used"})
    image_tokens: int = field(
        default=16, metadata={"help": "grid-cell tokens per image: 16 (the encoder's 4x4 grid), 4 or 1"}
    )
    global_token: bool = field(
        default=True, metadata={"help": "one more token per image: its CLIP embedding (--no-global-token: cells only)"}
    )
    coords: bool = field(
        default=True,
        metadata={
            "help": "add each cell's (x, y) centre through a learned linear map to its image token "
            "(--no-coords: a learned embedding per cell only)"
        },
    )
    train_encoder: bool = field(
        default=False,
        metadata={"help": "fine-tune the image encoder too, at --encoder-lr-scale times the learning rate"},
    )
    encoder_lr_scale: float = field(
        default=0.1, metadata={"help": "with --train-encoder: the encoder's learning rate as a share of --lr"}
    )
    zero_images: bool = field(default=False, metadata={"help": "zero every image token (ablation control)"})
    digit_share: float = field(default=0.25, metadata={"help": "share of digit questions (the rest: scene questions)"})
    question_weights: str = field(
        default="position=3,where=1,describe=3",
        metadata={
            "help": "relative weights of the scene question types in training conversations (colour, shape, "
            "count, position; and two training-only types: 'where', one object's column band, and 'describe', "
            "the scene named left to right); unnamed types weigh 1, the training-only ones 0"
        },
    )
    max_questions: int = field(
        default=3, metadata={"help": "questions about one scene per training conversation: 1 to this many"}
    )
    eval_n: int = field(default=40, metadata={"help": "held-out questions per task for the periodic evaluation"})
    out: str = field(default="runs/vision", metadata={"help": "checkpoint directory to write"})
    max_steps: int = field(
        default=2000,
        metadata={
            "help": "optimizer steps (looking an object up by a word of the question is learned late, at "
            "1,000-1,800 steps with the defaults: docs/vision.md)"
        },
    )
    batch_size: int = field(default=32, metadata={"help": "conversations per micro-batch"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=5e-5, metadata={"help": "learning rate at the end of the cosine"})
    warmup_steps: int = field(default=30, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decay on matrices"})
    eval_every: int = field(default=400, metadata={"help": "evaluate every N steps (0 = only at the end)"})
    time_budget: float = field(
        default=0.0,
        metadata={
            "help": "seconds of training; max_steps is cut to fit (0 = no limit: the run is defined by its steps)"
        },
    )


class VisionSFTTask:
    """Rows of one image-question-answer conversation each; loss on the answer and its <|im_end|>."""

    def __init__(self, cfg: SFTVisionConfig, tokenizer, block_size: int, tokens_per_image: int):
        self.cfg, self.tok, self.block_size, self.n_img = cfg, tokenizer, block_size, tokens_per_image
        self.examples = TrainExamples(
            cfg.seed, cfg.digit_share, parse_question_weights(cfg.question_weights), cfg.max_questions
        )

    def train_batch(self, step, micro, rank, world):
        B = self.cfg.batch_size
        start = ((step * self.cfg.grad_accum + micro) * world + rank) * B
        return collate([self.examples(start + i) for i in range(B)], self.tok, self.n_img, self.block_size)

    def count_tokens(self, batch) -> int:
        return int(batch["n_tokens"])

    def loss(self, model, batch):
        _, loss = model(
            batch["idx"],
            batch["targets"],
            batch["images"],
            batch["img_row"],
            batch["img_start"],
            batch.get("positions"),
            batch.get("attn_mask"),
        )
        return loss, {}

    def evaluate(self, model) -> dict:
        m = model.module if hasattr(model, "module") else model
        eng = Engine(m.gpt, self.tok, max_batch_size=64, transposed_weights=False)
        res = chat_metrics(eng, m.vision, TASKS, self.cfg.eval_n, zero_images=self.cfg.zero_images)
        out = {f"acc_{t}": v["accuracy"] for t, v in res["tasks"].items()}
        if "scenes_mean" in res:
            out["acc_scenes_mean"] = res["scenes_mean"]
        return out


def parse_question_weights(spec: str) -> dict[str, float]:
    """'position=3,where=1' -> {"position": 3.0, "where": 1.0}; a clear error for anything else."""
    known = D.QUESTION_TYPES + D.AUX_QUESTION_TYPES
    out: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, val = item.partition("=")
        if not eq or name.strip() not in known:
            raise ValueError(f"--question-weights: {item!r} is not TYPE=WEIGHT with TYPE one of {', '.join(known)}")
        try:
            w = float(val)
        except ValueError:
            w = -1.0
        if not w >= 0:
            raise ValueError(f"--question-weights: the weight of {name.strip()} must be a number >= 0, got {val!r}")
        out[name.strip()] = w
    if out and all(out.get(t, 1.0) == 0 for t in D.QUESTION_TYPES):
        raise ValueError("--question-weights: every evaluated question type has weight 0")
    return out


def run_sft_vision(cfg: SFTVisionConfig, log=print):
    if not cfg.base:
        raise ValueError("--base: give the chat checkpoint to build on")
    if not cfg.clip:
        raise ValueError("--clip: give a chatstack clip-train checkpoint")
    parse_question_weights(cfg.question_weights)  # a bad spec fails before anything is loaded
    if cfg.max_questions < 1:
        raise ValueError(f"--max-questions must be at least 1, got {cfg.max_questions}")
    torch.manual_seed(cfg.seed)
    ck = load_checkpoint(cfg.base, device="cpu")
    if ck.tokenizer is None:
        raise ValueError(f"{cfg.base}: the checkpoint has no tokenizer.json")
    clip, clip_cfg = load_clip(cfg.clip)
    gpt, tok = ck.model, ck.tokenizer
    vcfg = VisionConfig(
        clip=clip.config,
        n_embd=gpt.config.n_embd,
        image_tokens=cfg.image_tokens,
        global_token=cfg.global_token,
        coords=cfg.coords,
    )
    adapter = VisionAdapter(vcfg)
    adapter.encoder.load_state_dict(clip.image.state_dict())
    if not cfg.encoder_lr_scale > 0:
        raise ValueError(f"--encoder-lr-scale must be positive, got {cfg.encoder_lr_scale}")
    for p in adapter.encoder.parameters():
        p.lr_scale = cfg.encoder_lr_scale  # read by chatstack.train.optim.param_groups
    model = VisionChatModel(gpt, adapter, train_encoder=cfg.train_encoder, zero_images=cfg.zero_images)
    n_enc = sum(p.numel() for p in adapter.encoder.parameters())
    n_proj = sum(p.numel() for p in adapter.projection.parameters())
    log(
        f"sft-vision: GPT {gpt.num_params():,} params + image encoder {n_enc:,} "
        f"({f'trained at {cfg.encoder_lr_scale:g}x the lr' if cfg.train_encoder else 'frozen'}) + projection {n_proj:,}; "
        f"{vcfg.tokens_per_image} image tokens of {gpt.config.n_embd} per image"
        + (" (the grid's cells and a global CLIP token)" if cfg.global_token else "")
    )
    base_cfg = read_config(cfg.base)
    ckpt_config = {
        "stage": "sft-vision",
        "parent": str(cfg.base),
        "model": gpt.config.to_dict(),
        "tokenizer": tok.info(),
        "base_stage": base_cfg.get("stage"),
        "clip": str(cfg.clip),
        "vision": vcfg.to_dict(),
        "params": {"gpt": gpt.num_params(), "image_encoder": n_enc, "projection": n_proj},
        "train": asdict(cfg),
    }
    task = VisionSFTTask(cfg, tok, gpt.config.block_size, vcfg.tokens_per_image)
    return train(model, task, cfg, ckpt_config, tok)


def _cmd(args) -> int:
    cfg = dataclass_from_args(SFTVisionConfig, args)
    try:
        path = run_sft_vision(cfg, log=lambda s: print(s, file=sys.stderr))
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    print(f"saved {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "sft-vision",
        help="fine-tune a chat model to answer questions about images",
        description=__doc__.split("\n\n")[0],
    )
    add_dataclass_args(p, SFTVisionConfig)
    p.set_defaults(func=_cmd)
