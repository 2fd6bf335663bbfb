"""A GPT that reads images: the GPT, plus the image encoder and projection (VisionAdapter) next to it.

    from chatstack.vision.vlm import load_vision
    adapter = load_vision("runs/vision_sft")     # None for a text-only checkpoint
    embeds = adapter(images)                      # (N, n, n_embd): the GPT's input at image positions

Training (`chatstack sft-vision`) runs `VisionChatModel` through the one training loop: the token embeddings
of a batch, with each image's `n` placeholder positions overwritten by its projected encoder tokens, go into
the GPT's `embeds` input; the loss is the GPT's ordinary next-token loss on the assistant's tokens.
`checkpoint_parts()` tells chatstack.checkpoint to write the GPT to model.safetensors (so every text-only
tool still loads it as is) and the adapter to vision.safetensors; config.json's "vision" field describes it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_model

from chatstack.checkpoint import CheckpointError, load_weights, read_config
from chatstack.tokenizer import Tokenizer
from chatstack.vision.encoder import CLIP, CLIPConfig
from chatstack.vision.projection import VisionAdapter, VisionConfig

VISION_WEIGHTS = "vision.safetensors"


def place_images(x: torch.Tensor, embeds: torch.Tensor, img_row: torch.Tensor, img_start: torch.Tensor) -> torch.Tensor:
    """x (B, T, h) with each image's n embeddings (N, n, h) written at row img_row[i], positions img_start[i]..+n."""
    if embeds.numel() == 0:
        return x
    n = embeds.size(1)
    rows = img_row[:, None].expand(-1, n)  # (N, n)
    cols = img_start[:, None] + torch.arange(n, device=x.device)[None]  # (N, n)
    return x.index_put((rows.reshape(-1), cols.reshape(-1)), embeds.reshape(-1, x.size(-1)).to(x.dtype))


class VisionChatModel(nn.Module):
    """GPT + VisionAdapter for training; the loop sees one module, the checkpoint gets two weight files."""

    def __init__(
        self, gpt: nn.Module, adapter: VisionAdapter, train_encoder: bool = False, zero_images: bool = False
    ) -> None:
        super().__init__()
        self.gpt, self.vision = gpt, adapter
        self.config = gpt.config
        self.zero_images = zero_images
        adapter.encoder.requires_grad_(train_encoder)

    def checkpoint_parts(self) -> dict:
        return {"model": self.gpt, "vision": self.vision}

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        img_row: torch.Tensor | None = None,
        img_start: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, V); with targets, the logits at the target positions only (N, V) and the mean
        cross-entropy there (the output layer over every position of a batch would cost more than the GPT)."""
        x = self.gpt.tok_emb(idx)  # (B, T, h)
        if images is not None and images.numel():
            e = self.vision(images)  # (N, n, h)
            if self.zero_images:
                e = torch.zeros_like(e)
            x = place_images(x, e, img_row, img_start)
        h = self.gpt.hidden_states(idx, positions=positions, attn_mask=attn_mask, embeds=x)
        if targets is None:
            return self.gpt.lm_head(h)
        keep = targets >= 0
        logits = self.gpt.lm_head(h[keep])  # (N, V)
        return logits, F.cross_entropy(logits.float(), targets[keep], reduction="sum") / keep.sum().clamp_min(1)


def vision_config_of(cfg: dict, where: str | os.PathLike) -> Optional[VisionConfig]:
    v = cfg.get("vision")
    if v is None:
        return None
    try:
        return VisionConfig.from_dict(v)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(where) / 'config.json'}: bad 'vision' field ({e})") from e


def load_vision(path: str | os.PathLike, device: str | torch.device = "cpu") -> Optional[VisionAdapter]:
    """The image encoder + projection of a vision chat checkpoint, or None when it is text-only."""
    path = Path(path)
    vcfg = vision_config_of(read_config(path), path)
    if vcfg is None:
        return None
    adapter = VisionAdapter(vcfg)
    w = path / VISION_WEIGHTS
    if not w.exists():
        raise CheckpointError(f"{w}: missing (config.json describes an image encoder)")
    try:
        load_model(adapter, str(w), strict=True)
    except Exception as e:
        raise CheckpointError(f"{w}: cannot load ({type(e).__name__}: {e})") from e
    return adapter.to(device).eval()


def load_clip(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[CLIP, dict]:
    """(CLIP model, config dict) of a `chatstack clip-train` checkpoint (kind "clip")."""
    path = Path(path)
    cfg = read_config(path)
    if cfg.get("kind") != "clip":
        raise CheckpointError(
            f"{path}: not a CLIP checkpoint (kind {cfg.get('kind')!r}; make one with chatstack clip-train)"
        )
    try:
        ccfg = CLIPConfig.from_dict(cfg["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: bad 'model' field ({e})") from e
    model = CLIP(ccfg)
    load_weights(path, model, strict=True)
    return model.to(device).eval(), cfg


@torch.no_grad()
def image_embeds(adapter: VisionAdapter, images: list[torch.Tensor], zero: bool = False) -> list[torch.Tensor]:
    """Per image, its (n, n_embd) GPT-space tokens (zeros with zero=True: the ablation)."""
    if not images:
        return []
    p = next(adapter.parameters())
    e = adapter(torch.stack(images).to(p.device, p.dtype))  # (N, n, h)
    if zero:
        e = torch.zeros_like(e)
    return list(e.unbind(0))


def render_request(
    tokenizer: Tokenizer,
    adapter: Optional[VisionAdapter],
    messages: list[dict],
    images: list[torch.Tensor],
    zero: bool = False,
) -> tuple[list[int], Optional[tuple[list[int], torch.Tensor]]]:
    """(prompt ids ending in `<|im_start|>assistant\\n`, engine embeds or None) for messages whose image parts
    take `images` in order. A text-only model (adapter None) given an image part raises ValueError."""
    n = adapter.image_tokens if adapter is not None else 0
    ids, _, pos = tokenizer.render_multimodal(messages, n, generation_prompt=True)
    if len(pos) != n * len(images):
        raise ValueError(f"the messages hold {len(pos) // max(n, 1)} image part(s) but {len(images)} image(s) came")
    if not pos:
        return ids, None
    emb = torch.cat(image_embeds(adapter, images, zero))  # (k*n, h)
    return ids, (pos, emb)
