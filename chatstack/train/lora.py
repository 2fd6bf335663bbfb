"""Parameter-efficient fine-tuning for the training loop: LoRA (through `peft`) and frozen layers.

    chatstack sft --base runs/smol/base --out runs/smol/sft --seq-len 512 --lora-rank 16
    chatstack sft ... --lora-targets qkv,attn.proj --lora-alpha 16    # attention only
    chatstack sft ... --train-layers 4                                # the cheap alternative: last 4 blocks

LoRA replaces each targeted Linear (matched by module name, as peft matches: the whole name or its
dot-separated tail, e.g. `qkv`, `attn.proj`, `mlp.fc`) with W x + (alpha / r) B A x, A: (r, in), B: (out, r),
B starting at zero so training starts from the base model. Only A and B train, plus any parameter outside
the GPT (a reward model's head). Saving merges W <- W + (alpha / r) B A into a plain copy, so the checkpoint
is an ordinary one; with `--no-lora-merge` it keeps the base weights and writes the adapters beside them
(adapter.safetensors, merged by chatstack.checkpoint.load_weights when the checkpoint is loaded).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from chatstack.model import GPT

DEFAULT_TARGETS = "qkv,attn.proj,mlp.fc,mlp.proj"


@dataclass
class LoraArgs:
    """The LoRA flags of every training stage (the supervised loop's TrainConfig, PPO's config)."""

    lora_rank: int = field(
        default=0, metadata={"help": "LoRA rank r (0 = train all weights); see chatstack.train.lora"}
    )
    lora_alpha: float = field(default=0.0, metadata={"help": "LoRA alpha: updates scale by alpha/r (0 = 2 x rank)"})
    lora_targets: str = field(
        default=DEFAULT_TARGETS, metadata={"help": "comma-separated Linear module names (or name tails) to adapt"}
    )
    lora_merge: bool = field(
        default=True,
        metadata={"help": "merge the adapters into the saved weights (--no-lora-merge: adapter.safetensors apart)"},
    )

    @property
    def lora_scale_alpha(self) -> float:
        return self.lora_alpha or 2.0 * self.lora_rank


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def check_targets(model: nn.Module, targets: list[str]) -> dict[str, list[str]]:
    """{target: module names it matches}; a ValueError naming --lora-targets for a target that matches none."""
    names = linear_names(model)
    found = {t: [n for n in names if _matches(n, t)] for t in targets}
    for t, hits in found.items():
        if not hits:
            short = sorted({".".join(n.split(".")[-2:]) if n.split(".")[0] == "blocks" else n for n in names})
            raise ValueError(f"--lora-targets: {t!r} matches no Linear module (the model has {', '.join(short)})")
    for gpt in (m for m in model.modules() if isinstance(m, GPT)):
        if gpt.config.tie_embeddings and any(_matches(n, "lm_head") for t in found.values() for n in t):
            raise ValueError("--lora-targets: lm_head is tied to the token embedding; a LoRA update cannot stay tied")
    return found


def check_flags(model: nn.Module, lora_rank: int, lora_targets: str, train_layers: int) -> None:
    """The --lora-* / --train-layers checks, for a stage to run before it spends time on data."""
    if lora_rank and train_layers:
        raise ValueError("--lora-rank and --train-layers: choose one way to limit what trains")
    if lora_rank < 0 or train_layers < 0:
        raise ValueError("--lora-rank / --train-layers must not be negative")
    if lora_rank:
        check_targets(model, [t.strip() for t in lora_targets.split(",") if t.strip()])
    for gpt in (m for m in model.modules() if isinstance(m, GPT)):
        if train_layers > len(gpt.blocks):
            raise ValueError(f"--train-layers {train_layers}: the model has {len(gpt.blocks)} blocks")


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: str, dropout: float = 0.0) -> list[str]:
    """Wrap the targeted Linear modules in place; freeze the GPT's own weights. Returns the wrapped names."""
    from peft import LoraConfig, inject_adapter_in_model  # noqa: PLC0415 (peft: optional, only for LoRA)

    if rank <= 0:
        raise ValueError(f"--lora-rank must be positive, got {rank}")
    tlist = [t.strip() for t in targets.split(",") if t.strip()]
    if not tlist:
        raise ValueError("--lora-targets: give at least one module name")
    found = check_targets(model, tlist)
    gpt_params = {id(p) for m in model.modules() if isinstance(m, GPT) for p in m.parameters()}
    outside = [p for p in model.parameters() if id(p) not in gpt_params and p.requires_grad]
    inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=tlist, bias="none"), model
    )
    for p in outside:  # heads outside the GPT (reward, value) train in full
        p.requires_grad_(True)
    return sorted({n for hits in found.values() for n in hits})


def is_lora(model: nn.Module) -> bool:
    return any(hasattr(m, "lora_A") and hasattr(m, "base_layer") for m in model.modules())


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (adapters, heads), by name: what a LoRA run's resume needs besides its base."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, sd: dict[str, torch.Tensor], where: str = "state") -> None:
    params = dict(model.named_parameters())
    missing = [n for n in sd if n not in params]
    if missing:
        raise ValueError(f"{where}: trained parameters {missing[:3]} are not in the model (different --lora-* flags?)")
    with torch.no_grad():
        for n, t in sd.items():
            params[n].copy_(t)


def unwrap_lora(model: nn.Module, merge: bool = True) -> dict[str, torch.Tensor]:
    """In place: replace every LoRA-wrapped Linear by its base layer (with W + (alpha/r) B A when `merge`).

    Returns the adapters under plain module names ({name}.lora_A, {name}.lora_B, {name}.lora_scale), the
    format of adapter.safetensors."""
    adapters = {}
    wrapped = [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    for name, m in wrapped:
        base = m.get_base_layer()
        for key in m.lora_A:  # one adapter ("default") here
            A, B = m.lora_A[key].weight.detach(), m.lora_B[key].weight.detach()
            scale = float(m.scaling[key])
            adapters[f"{name}.lora_A"], adapters[f"{name}.lora_B"] = A.cpu().clone(), B.cpu().clone()
            adapters[f"{name}.lora_scale"] = torch.tensor(scale)
            if merge:
                with torch.no_grad():
                    base.weight += scale * (B.float() @ A.float()).to(base.weight.dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, base)
    return adapters


def plain_copy(model: nn.Module, merge: bool = True) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(a copy of `model` without LoRA wrappers, merged or not; the adapters) for saving; `model` is untouched."""
    twin = copy.deepcopy(model)
    adapters = unwrap_lora(twin, merge)
    return twin, adapters


def freeze_all_but_last(model: nn.Module, n: int) -> int:
    """Train only the last `n` blocks of each GPT (+ the final norm, an untied output layer and heads outside the
    GPT); returns the number of parameters that train."""
    gpts = [m for m in model.modules() if isinstance(m, GPT)]
    if not gpts:
        raise ValueError("--train-layers: the model has no GPT blocks")
    for gpt in gpts:
        L = len(gpt.blocks)
        if not 0 < n <= L:
            raise ValueError(f"--train-layers {n}: the model has {L} blocks")
        keep = {id(p) for b in gpt.blocks[L - n :] for p in b.parameters()} | {id(p) for p in gpt.norm_f.parameters()}
        if not gpt.config.tie_embeddings:
            keep |= {id(p) for p in gpt.lm_head.parameters()}
        for p in gpt.parameters():
            p.requires_grad_(id(p) in keep)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
