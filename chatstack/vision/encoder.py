"""The CLIP pair: a small convolutional image encoder, a byte-level text encoder, and CLIP's symmetric loss.

    python -m chatstack.vision.encoder      # prints the parameter counts of the default sizes

Image encoder (CNN, not a ViT): three conv stages on a (3, 32, 32) image -> a 4x4 grid of `width`-wide
feature vectors. Each grid cell is one image token (what the projection maps into the GPT), and the mean
over the grid, through a linear layer, is the image's CLIP embedding. A CNN because the built-in data are
1,438 digit images and procedurally drawn scenes trained on two CPU cores in minutes: convolutions bring
locality and translation equivariance as priors, where a ViT has to learn them from far more images.

Text encoder: UTF-8 bytes (no tokenizer needed, so `clip-train` stands alone without a GPT), learned
positions, `text_layers` pre-norm transformer layers, mean over the real bytes -> a linear layer.

Loss (CLIP, Radford et al. 2021): cosine similarities of every image with every caption in the batch,
times a learned temperature exp(logit_scale) (initialised to 1/0.07, clamped at 100), cross-entropy
in both directions with the matching pair as the target, averaged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatstack.vision.data import SIZE


@dataclass
class CLIPConfig:
    channels: tuple = (32, 64, 96)  # conv widths of the three stages; the last is the image-token width
    embed_dim: int = 64  # the shared image/text embedding
    text_width: int = 96
    text_layers: int = 2
    text_heads: int = 4
    text_len: int = 64  # bytes per caption (longer ones are cut)
    image_size: int = SIZE

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        problems = []
        if len(self.channels) != 3 or min(self.channels) <= 0:
            problems.append(f"channels must be three positive widths, got {self.channels}")
        if self.text_width % self.text_heads:
            problems.append(f"text_width={self.text_width} is not divisible by text_heads={self.text_heads}")
        if self.image_size != SIZE:
            problems.append(f"image_size must be {SIZE}")
        for f in ("embed_dim", "text_width", "text_layers", "text_len"):
            if getattr(self, f) <= 0:
                problems.append(f"{f} must be positive, got {getattr(self, f)}")
        if problems:
            raise ValueError("invalid CLIPConfig: " + "; ".join(problems))

    @property
    def width(self) -> int:
        return self.channels[-1]

    @property
    def grid(self) -> int:
        return self.image_size // 8  # three 2x poolings

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CLIPConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown CLIPConfig field(s): {sorted(unknown)}")
        return cls(**d)


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8 if cout % 8 == 0 else 1, cout), nn.GELU())


class ImageEncoder(nn.Module):
    """(B, 3, 32, 32) in [0, 1] -> image tokens (B, 16, width) and a CLIP embedding (B, embed_dim)."""

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.config = cfg
        c1, c2, c3 = cfg.channels
        self.stages = nn.Sequential(
            _conv(3, c1),
            nn.MaxPool2d(2),  # 16x16 (one conv at full size: most of the cost)
            _conv(c1, c2),
            _conv(c2, c2),
            nn.MaxPool2d(2),  # 8x8
            _conv(c2, c3),
            _conv(c3, c3),
            nn.MaxPool2d(2),  # 4x4
        )
        self.norm = nn.LayerNorm(c3)
        self.head = nn.Linear(c3, cfg.embed_dim)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The grid of image tokens, row-major (top-left first): (B, grid*grid, width)."""
        x = (images - 0.5) / 0.25  # roughly zero-mean inputs
        f = self.stages(x)  # (B, C, g, g)
        return self.norm(f.flatten(2).transpose(1, 2))  # (B, g*g, C)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.tokens(images).mean(1))  # (B, embed_dim)


def encode_text_bytes(texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, L), mask (B, L)) of UTF-8 bytes; id 0 is padding, byte b is b + 1."""
    raw = [t.encode("utf-8")[:max_len] for t in texts]
    L = max(1, max(len(r) for r in raw))
    ids = torch.zeros(len(raw), L, dtype=torch.long)
    for i, r in enumerate(raw):
        if r:
            ids[i, : len(r)] = torch.tensor(list(r)) + 1
    return ids, ids > 0


class TextEncoder(nn.Module):
    """Bytes (B, L) -> a CLIP embedding (B, embed_dim)."""

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.config = cfg
        w = cfg.text_width
        self.tok = nn.Embedding(257, w, padding_idx=0)
        self.pos = nn.Embedding(cfg.text_len, w)
        layer = nn.TransformerEncoderLayer(
            w, cfg.text_heads, 4 * w, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, cfg.embed_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        L = ids.size(1)
        x = self.tok(ids) + self.pos(torch.arange(L, device=ids.device))[None]  # (B, L, w)
        x = self.norm(self.layers(x, src_key_padding_mask=~mask))
        m = mask.unsqueeze(-1).float()
        return self.head((x * m).sum(1) / m.sum(1).clamp_min(1.0))  # (B, embed_dim)


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.config = cfg
        self.image = ImageEncoder(cfg)
        self.text = TextEncoder(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        ids, mask = encode_text_bytes(texts, self.config.text_len)
        dev = self.logit_scale.device
        return F.normalize(self.text(ids.to(dev), mask.to(dev)), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image.embed(images), dim=-1)

    def forward(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits (B, B)) of a batch of matching (image, caption) pairs."""
        img = F.normalize(self.image.embed(images), dim=-1)
        txt = F.normalize(self.text(ids, mask), dim=-1)
        logits = clip_logits(img, txt, self.logit_scale)
        return clip_loss(logits), logits


def clip_logits(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Scaled cosine similarities (B_img, B_txt) of unit vectors; the scale is capped at 100 as in CLIP."""
    return logit_scale.clamp(max=math.log(100.0)).exp() * img @ txt.t()


def clip_loss(logits: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: pair i is the target of row i (images -> texts) and of column i."""
    target = torch.arange(logits.size(0), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


@torch.no_grad()
def zero_shot_classify(model: CLIP, images: torch.Tensor, prompts: list[str], batch: int = 256) -> torch.Tensor:
    """The index of the prompt each image is most similar to: (N,)."""
    txt = model.encode_text(prompts)  # (K, d)
    out = []
    for i in range(0, len(images), batch):
        out.append((model.encode_image(images[i : i + batch].to(txt.device)) @ txt.t()).argmax(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


if __name__ == "__main__":
    cfg = CLIPConfig()
    m = CLIP(cfg)
    for name, mod in (("image encoder", m.image), ("text encoder", m.text)):
        print(f"{name:14s} {sum(p.numel() for p in mod.parameters()):>10,}")
