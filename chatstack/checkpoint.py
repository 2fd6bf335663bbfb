"""One checkpoint format for every stage: a directory, written atomically.

    runs/<name>/<stage>/
      config.json        {"format": 1, "kind": "lm", "stage": ..., "model": GPTConfig, "tokenizer": {...},
                          "parent": path or null, "train": the stage's full config, ...}
      model.safetensors  weights (safetensors: loading never runs code)
      vision.safetensors a vision chat model's image encoder + projection (chatstack.vision); its config.json
                         has a "vision" field. model.safetensors stays a plain GPT, so text-only tools load it
      tokenizer.json     Hugging Face `tokenizers` format
      adapter.safetensors  only after `--no-lora-merge`: LoRA adapters, added to the weights when loaded
      metrics.jsonl      one JSON object per logged step / eval (appended by the training loop)
      state/             what exact resume needs: *.pt loaded with weights_only=True, *.json

A save writes everything into a sibling temporary directory, then swaps it into place with renames,
so a crash never leaves half a checkpoint. Files the stage keeps in the directory between saves
(metrics.jsonl, samples, plots) are carried over into the new copy.

    chatstack estimate --checkpoint runs/speedrun/base   # a checkpoint's model, read from its config.json
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file, load_model, save_file, save_model

from chatstack.model import GPT, GPTConfig
from chatstack.tokenizer import Tokenizer

FORMAT_VERSION = 1
MANAGED = {"config.json", "model.safetensors", "vision.safetensors", "tokenizer.json", "state", "adapter.safetensors"}


def weight_parts(module: nn.Module) -> dict[str, nn.Module]:
    """{file stem: module} of what a save writes: the module as model.safetensors, or, for a module that defines
    `checkpoint_parts()` (a GPT with an image encoder next to it: chatstack.vision), each part in its own file,
    so model.safetensors always holds a plain GPT that every text-only tool loads as is."""
    parts = getattr(module, "checkpoint_parts", None)
    return parts() if parts is not None else {"model": module}


class CheckpointError(Exception):
    """A checkpoint directory is missing, incomplete or corrupt; the message names the file."""


@dataclass
class Checkpoint:
    path: Path
    config: dict
    model: nn.Module
    tokenizer: Any = None
    state: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name


def _tmp_and_old(path: Path) -> tuple[Path, Path]:
    return path.parent / f".{path.name}.tmp", path.parent / f".{path.name}.old"


def recover(path: str | os.PathLike) -> None:
    """Finish a swap that a crash interrupted (between the two renames of `save_checkpoint`)."""
    path = Path(path)
    tmp, old = _tmp_and_old(path)
    if not path.exists() and tmp.exists() and (tmp / ".complete").exists():
        tmp.rename(path)
    if path.exists() and old.exists():
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    config: dict,
    tokenizer: Tokenizer | None = None,
    state: Optional[dict] = None,
    adapters: Optional[dict] = None,
) -> Path:
    """Write `model` (any nn.Module), `config` (JSON-able) and optional tokenizer/state atomically to `path`.

    adapters: LoRA adapters kept apart from the weights ({module}.lora_A / .lora_B / .lora_scale tensors,
    chatstack.train.lora.unwrap_lora), written as adapter.safetensors and merged by load_weights.

    state: {name: object}; objects made of tensors/lists/dicts/numbers are saved as state/<name>.pt
    (torch.save, loadable with weights_only=True); dicts marked JSON-able may also be plain JSON.
    """

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp, old = _tmp_and_old(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    cfg = {"format": FORMAT_VERSION, "kind": "lm", **config}
    # weights: safetensors dedups tied tensors (the output layer shares the embedding)
    for stem, part in weight_parts(model).items():
        save_model(part, str(tmp / f"{stem}.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(str(tmp / "tokenizer.json"))
    if adapters:
        save_file({k: v.contiguous() for k, v in adapters.items()}, str(tmp / "adapter.safetensors"))
    if state:
        (tmp / "state").mkdir()
        for name, obj in state.items():
            torch.save(obj, tmp / "state" / f"{name}.pt")
    with open(tmp / "config.json", "w") as f:
        json.dump(cfg, f, indent=2, default=str)
    # carry over the stage's own files (metrics.jsonl, samples, ...) from the previous copy
    if path.exists():
        for item in path.iterdir():
            if item.name not in MANAGED and not (tmp / item.name).exists():
                if item.is_dir():
                    shutil.copytree(item, tmp / item.name)
                else:
                    shutil.copy2(item, tmp / item.name)
    (tmp / ".complete").touch()
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    (path / ".complete").unlink(missing_ok=True)
    return path


def read_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    recover(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{cfg_path}: missing (is {path} a chatstack checkpoint?)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: corrupt JSON ({e})") from e
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise CheckpointError(f"{cfg_path}: no 'model' field")
    return cfg


def load_weights(path: str | os.PathLike, module: nn.Module, strict: bool = True) -> None:
    """Load model.safetensors of checkpoint `path` into `module` (any architecture; a module with
    `checkpoint_parts()` loads each part from its own file, see weight_parts)."""
    parts = weight_parts(module)
    for stem, part in parts.items():
        wpath = Path(path) / f"{stem}.safetensors"
        if not wpath.exists():
            raise CheckpointError(f"{wpath}: missing")
        try:
            load_model(part, str(wpath), strict=strict)
        except Exception as e:  # safetensors raises several types for truncated / foreign files
            raise CheckpointError(f"{wpath}: cannot load weights ({type(e).__name__}: {e})") from e
    apath = Path(path) / "adapter.safetensors"
    if apath.exists():
        try:
            merge_adapters_(parts["model"], load_file(str(apath)))
        except Exception as e:
            raise CheckpointError(f"{apath}: cannot merge the adapters ({type(e).__name__}: {e})") from e


def merge_adapters_(module: nn.Module, adapters: dict[str, torch.Tensor]) -> None:
    """W <- W + scale * B @ A for every LoRA adapter ({name}.lora_A, {name}.lora_B, {name}.lora_scale)."""
    with torch.no_grad():
        for key in adapters:
            if key.endswith(".lora_A"):
                name = key[: -len(".lora_A")]
                lin = module.get_submodule(name)
                A, B = adapters[key].float(), adapters[f"{name}.lora_B"].float()
                lin.weight += (float(adapters[f"{name}.lora_scale"]) * (B @ A)).to(lin.weight.dtype)


def load_state(path: str | os.PathLike) -> dict:
    """The state/ entries of a checkpoint (optimizer, RNG, data position), without unpickling code."""
    sdir = Path(path) / "state"
    state = {}
    if sdir.is_dir():
        for f in sorted(sdir.glob("*.pt")):
            try:
                state[f.stem] = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{f}: cannot load ({type(e).__name__}: {e})") from e
    return state


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    tpath = Path(path) / "tokenizer.json"
    if not tpath.exists():
        raise CheckpointError(f"{tpath}: missing")
    try:
        return Tokenizer.load(str(tpath))
    except Exception as e:
        raise CheckpointError(f"{tpath}: cannot load ({type(e).__name__}: {e})") from e


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", with_state: bool = False, with_tokenizer: bool = True
) -> Checkpoint:
    """Load a language-model checkpoint (kind "lm"): GPT weights, tokenizer, config, optional state."""

    path = Path(path)
    cfg = read_config(path)
    try:
        mcfg = GPTConfig.from_dict(cfg["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: bad 'model' field ({e})") from e
    model = GPT(mcfg)
    load_weights(path, model, strict=cfg.get("kind", "lm") == "lm")
    model.to(device)
    tok = load_tokenizer(path) if with_tokenizer and (path / "tokenizer.json").exists() else None
    state = load_state(path) if with_state else {}
    return Checkpoint(path=path, config=cfg, model=model, tokenizer=tok, state=state)
