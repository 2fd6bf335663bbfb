"""The embedding layer between the image encoder and the GPT: encoder tokens -> n image tokens of width n_embd.

    adapter = VisionAdapter(VisionConfig(clip=clip_cfg, n_embd=gpt.config.n_embd, image_tokens=16))
    embeds = adapter(images)          # (B, 3, 32, 32) -> (B, 16, n_embd): what the GPT reads at image positions

The encoder's 4x4 grid of features (chatstack.vision.encoder.ImageEncoder.tokens) is pooled to
`image_tokens` cells (16 = the grid as is, 4 = 2x2, 1 = one token) and each cell goes through a two-layer
MLP (LLaVA-1.5's projector) into the GPT's embedding space. Row-major order: the GPT sees the top-left
cell first, so where a thing is in the picture is where its token is in the sequence.

A vision chat checkpoint keeps this module (encoder + projection) in `vision.safetensors` next to the
GPT's `model.safetensors`, and config.json's "vision" field holds `VisionConfig.to_dict()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatstack.vision.encoder import CLIPConfig, ImageEncoder


@dataclass
class VisionConfig:
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    n_embd: int = 128  # the GPT's width
    image_tokens: int = 16  # grid cells per image: a square number <= the encoder's grid cells
    global_token: bool = False  # one more token per image: the image's CLIP embedding, projected
    coords: bool = False  # add a learned linear map of each cell's (x, y) centre to its token

    @property
    def tokens_per_image(self) -> int:
        return self.image_tokens + int(self.global_token)

    def __post_init__(self) -> None:
        if isinstance(self.clip, dict):
            self.clip = CLIPConfig.from_dict(self.clip)
        side = math.isqrt(max(self.image_tokens, 0))
        g = self.clip.grid
        if self.image_tokens <= 0 or side * side != self.image_tokens or side > g or g % side:
            raise ValueError(
                f"image_tokens must be a square that divides the encoder's {g}x{g} grid "
                f"(1, 4 or {g * g}), got {self.image_tokens}"
            )
        if self.n_embd <= 0:
            raise ValueError(f"n_embd must be positive, got {self.n_embd}")

    def to_dict(self) -> dict:
        return {
            "clip": self.clip.to_dict(),
            "n_embd": self.n_embd,
            "image_tokens": self.image_tokens,
            "global_token": self.global_token,
            "coords": self.coords,
        }

    @classmethod
    def from_dict(cls, d: dict) -> VisionConfig:
        unknown = set(d) - {"clip", "n_embd", "image_tokens", "global_token", "coords"}
        if unknown:
            raise ValueError(f"unknown VisionConfig field(s): {sorted(unknown)}")
        return cls(
            clip=CLIPConfig.from_dict(d["clip"]),
            n_embd=int(d["n_embd"]),
            image_tokens=int(d["image_tokens"]),
            global_token=bool(d.get("global_token", False)),
            coords=bool(d.get("coords", False)),
        )


class Projection(nn.Module):
    """(B, g*g, width) encoder tokens -> (B, n, n_embd): pool to n cells, then a two-layer MLP per cell; with
    embed_dim, a first token more from the image's (unit-length) CLIP embedding through its own MLP."""

    def __init__(
        self, width: int, n_embd: int, grid: int, image_tokens: int, embed_dim: int = 0, coords: bool = False
    ) -> None:
        super().__init__()
        self.grid, self.side = grid, math.isqrt(image_tokens)
        self.fc1 = nn.Linear(width, n_embd)
        self.fc2 = nn.Linear(n_embd, n_embd)
        # the CLIP embedding was trained to match captions naming colours, shapes and their order: one token of
        # it hands the GPT that summary directly (the cells carry the detail)
        self.glob = None
        if embed_dim:
            self.glob = nn.Sequential(nn.Linear(embed_dim, n_embd), nn.GELU(), nn.Linear(n_embd, n_embd))
            nn.init.normal_(self.glob[2].weight, std=0.02)
            nn.init.zeros_(self.glob[2].bias)
        # where each cell is: the convolutions are translation-equivariant, so a cell's features alone do not
        # say where it sits (what ViT's position embeddings add to its patches)
        self.pos = nn.Parameter(torch.randn(image_tokens + int(bool(embed_dim)), n_embd) * 0.02)
        # with coords, also one direction per axis, scaled by the cell's centre in [-1, 1]: "how far right" is then
        # the same feature in every row, and comparing two objects' places is a difference along one direction
        self.coord = None
        if coords:
            self.coord = nn.Linear(2, n_embd, bias=False)
            nn.init.normal_(self.coord.weight, std=0.02)
            c = (torch.arange(self.side, dtype=torch.float32) + 0.5) / self.side * 2 - 1
            yy, xx = torch.meshgrid(c, c, indexing="ij")
            self.register_buffer("cell_xy", torch.stack([xx.flatten(), yy.flatten()], 1), persistent=False)
        # start near the scale of the GPT's token embeddings (std 0.02 at init): the first steps then do not
        # swamp the residual stream
        nn.init.normal_(self.fc2.weight, std=0.02)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, tokens: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = tokens.shape
        if self.side != self.grid:
            x = tokens.transpose(1, 2).reshape(B, C, self.grid, self.grid)
            tokens = F.adaptive_avg_pool2d(x, self.side).flatten(2).transpose(1, 2)  # (B, n, C)
        out = self.fc2(F.gelu(self.fc1(tokens)))  # (B, n, h)
        if self.coord is not None:
            out = out + self.coord(self.cell_xy)
        if self.glob is not None:
            out = torch.cat([self.glob(F.normalize(embedding, dim=-1))[:, None], out], dim=1)  # (B, 1 + n, h)
        return out + self.pos


class VisionAdapter(nn.Module):
    """Image encoder + projection: what a vision chat checkpoint adds next to its GPT."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = ImageEncoder(cfg.clip)
        embed_dim = cfg.clip.embed_dim if cfg.global_token else 0
        self.projection = Projection(
            cfg.clip.width, cfg.n_embd, cfg.clip.grid, cfg.image_tokens, embed_dim, coords=cfg.coords
        )

    @property
    def image_tokens(self) -> int:
        """GPT positions per image (the cells, and the global token if any)."""
        return self.config.tokens_per_image

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, 32, 32) in [0, 1] -> (B, image_tokens, n_embd)."""
        cells = self.encoder.tokens(images)  # (B, g*g, width)
        emb = self.encoder.head(cells.mean(1)) if self.projection.glob is not None else None
        return self.projection(cells, emb)
