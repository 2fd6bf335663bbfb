"""The one supervised training loop: pretraining, SFT and the reward model all run through `train()`.

    from chatstack.train.loop import TrainConfig, Task, train
    ckpt_path = train(model, task, TrainConfig(out="runs/x", max_steps=100), ckpt_config, tokenizer)

A stage supplies a `Task` (its batches, its loss, its evaluation) and a checkpoint config; the loop owns
everything else: AdamW (decay on matrices only), linear warmup + cosine decay, gradient accumulation,
gradient clipping, mixed precision (bf16 autocast, fp16 with a GradScaler, or on CPU bf16 matmuls), optional torch.compile,
DDP / FSDP under torchrun, metrics.jsonl, a progress bar, atomic checkpoints and exact `--resume`.

Exact resume: nothing in the loop depends on hidden state that a checkpoint does not hold. Batches are a
pure function of (seed, step, micro, rank, world) (the Task's contract); the global RNG is reseeded from
(seed, step, rank) at every step (dropout); the checkpoint holds weights, optimizer moments, the step and
the step budget. Resuming truncates metrics.jsonl back to the checkpoint's step, so the logged curve of an
interrupted + resumed run is the uninterrupted run's curve, bit for bit on the same machine and threads.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Protocol, runtime_checkable

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm import tqdm

from chatstack.checkpoint import CheckpointError, load_state, load_weights, recover, save_checkpoint
from chatstack.estimate import activation_bytes
from chatstack.infer.cpu import apply_thread_policy, cpu_has_amx, tune_malloc
from chatstack.model import GPT, cpu_bf16_matmuls
from chatstack.tokenizer import Tokenizer
from chatstack.train import distributed as D
from chatstack.train.lora import (
    LoraArgs,
    apply_lora,
    check_flags,
    freeze_all_but_last,
    load_trainable_state,
    plain_copy,
    trainable_state,
    unwrap_lora,
)
from chatstack.train.optim import build_adamw, lr_at

# Peak dense FLOP/s used for MFU when --peak-flops is 0. The CPU figure is the fp32 matmul peak measured
# on a 2-vCPU AVX-512 Xeon (benchmarks/train_throughput.py re-measures it); "cpu-bf16" is the
# bf16 matmul peak of a 2-vCPU Xeon with AMX (1024^3 in 2.15 ms), used with --dtype bf16 on CPU; GPU
# figures are the vendors' dense bf16 numbers.
PEAK_FLOPS = {
    "cpu": 370e9,
    "cpu-bf16": 1000e9,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10": 125e12,
    "4090": 165e12,
    "T4": 65e12,
    "cuda": 100e12,
}


@dataclass
class TrainConfig(LoraArgs):
    """Fields common to every supervised stage (a stage's config subclasses this); the LoRA flags come first."""

    out: str = field(default="", metadata={"help": "checkpoint directory to write (and resume from)"})
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "rows per micro-batch (per process)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=1e-4, metadata={"help": "learning rate at the end of the cosine"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay on matrices (never biases/norms)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm (0 = off)"})
    eval_every: int = field(default=250, metadata={"help": "evaluate every N steps (0 = only at the end)"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    log_every: int = field(default=10, metadata={"help": "write a metrics line every N steps"})
    seed: int = field(default=1337, metadata={"help": "seed for init, batches and dropout"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "auto (CUDA: bf16 if supported, else fp16; CPU: bf16 matmuls if it has AMX and the model is >= 96 wide, "
            "else fp32) | fp32 | bf16 "
            "(on CPU: bf16 matmuls, fp32 elsewhere) | fp16",
            "choices": ["auto", "fp32", "bf16", "fp16"],
        },
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    resume: bool = field(default=False, metadata={"help": "continue from the checkpoint in --out, exactly"})
    time_budget: float = field(
        default=0.0,
        metadata={
            "help": "seconds of training: after 20 steps max_steps is cut to fit, re-planned after 100 (the cosine still ends at "
            "min_lr), and training stops cleanly when time runs out (0 = no limit)"
        },
    )
    parallel: str = field(
        default="ddp", metadata={"help": "under torchrun: ddp | fsdp", "choices": ["ddp", "fsdp", "none"]}
    )
    optimizer: str = field(
        default="auto",
        metadata={"help": "AdamW kernel: auto | fused | foreach | for", "choices": ["auto", "fused", "foreach", "for"]},
    )
    peak_flops: float = field(default=0.0, metadata={"help": "peak FLOP/s per device for MFU (0 = table)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    grad_checkpoint: Optional[bool] = field(
        default=None,
        metadata={
            "help": "activation checkpointing: recompute each block in backward (less memory, ~1.3x compute); "
            "default: on CPU, on when a micro-batch's activations would exceed 2 GB (chatstack.estimate)"
        },
    )
    train_layers: int = field(
        default=0, metadata={"help": "train only the last N transformer blocks (+ final norm/head); 0 = all"}
    )


@runtime_checkable
class Task(Protocol):
    """What a stage supplies to the loop. Optional extras the loop uses if present:

    flops_per_token: float        training FLOPs per token (forward + backward), for MFU
    count_tokens(batch) -> int    tokens in a batch, for tokens/s (default: numel of batch["idx"])
    final_evaluate(model) -> dict the end-of-run evaluation, if it differs from the periodic one
    sample(model) -> str          text to show at the end (logged to metrics.jsonl as {"sample": ...})
    """

    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]: ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...


# the narrowest model (n_embd) that --dtype auto trains with bf16 matmuls on an AMX CPU: below it the casts
# cost more than the faster products (training step, bf16 / fp32 tokens/s: width 32 0.75x, 64 0.99x,
# 96 1.33x, 128 1.16-1.35x; Intel Xeon with AMX, 2 threads, docs/benchmarks.md)
CPU_BF16_MIN_WIDTH = 96


# --grad-checkpoint's default: recompute when one micro-batch's activations would take more than this (fp32)
AUTO_RECOMPUTE_BYTES = 2e9


def _val_postfix(last_eval: dict) -> dict:
    """The progress bar's held-out number: the task's val_loss, or its first val_* metric (the reward model's
    val_accuracy) when it has no loss."""
    if "val_loss" in last_eval:
        return {"val": f"{last_eval['val_loss']:.3f}"}
    for k, v in last_eval.items():
        if k.startswith("val_") and isinstance(v, (int, float)):
            return {k[4:]: f"{v:.3f}"}
    return {}


def resolve_dtype(name: str, device: torch.device, width: Optional[int] = None) -> torch.dtype:
    """The training precision for --dtype NAME on DEVICE, for a model `width` (n_embd) wide if given.

    auto: CUDA: bf16 where supported, else fp16 (with a GradScaler). CPU with AMX: bf16 matmuls, fp32
    everything else (chatstack.model.cpu_bf16_matmuls: 1.27-1.35x fp32's tokens/s on the tiny preset), for
    models at least CPU_BF16_MIN_WIDTH wide. Other CPUs and narrower models: fp32 (without AMX, bf16
    autocast trained at 0.6x fp32 speed on an AVX-512 Xeon without AMX)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_amx() and (width is None or width >= CPU_BF16_MIN_WIDTH):
            return torch.bfloat16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """The mixed-precision context of a forward pass. bf16 on CPU means bf16 matmuls only (see resolve_dtype)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    if device.type == "cpu" and dtype == torch.bfloat16:
        return cpu_bf16_matmuls()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_flops(cfg: TrainConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    if cfg.peak_flops > 0:
        return cfg.peak_flops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, v in PEAK_FLOPS.items():
            if key in name:
                return v
        return PEAK_FLOPS["cuda"]
    return PEAK_FLOPS["cpu-bf16" if dtype == torch.bfloat16 else "cpu"]


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63)


def _to_device(batch: dict, device: torch.device) -> dict:
    if device.type != "cuda":
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    # pinned host memory lets the copy run asynchronously with the previous step's kernels
    return {k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _count_tokens(task: Task, batch: dict) -> int:
    if hasattr(task, "count_tokens"):
        return int(task.count_tokens(batch))
    for key in ("idx", "input_ids", "ids"):
        if key in batch and torch.is_tensor(batch[key]):
            return batch[key].numel()
    return next(v.numel() for v in batch.values() if torch.is_tensor(v))


class Metrics:
    """metrics.jsonl in the run directory; one JSON object a line. Opened per write: the checkpoint save
    renames the directory, and a kept file handle would point into the old copy."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.path = out / "metrics.jsonl"
        self.enabled = enabled

    def write(self, **row: object) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (an interrupted run may have logged past its last checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if row.get("step", 0) <= step:
                keep.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        os.replace(tmp, self.path)


def has_checkpoint(out: str | os.PathLike) -> bool:
    out = Path(out)
    recover(out)
    return (out / "state" / "train.pt").exists() and (out / "model.safetensors").exists()


def _full_state_for_save(model: nn.Module, shadow: Optional[nn.Module]) -> nn.Module:
    """The module to hand to save_checkpoint: the model itself, or (FSDP) a CPU copy filled from the shards."""
    if shadow is None:
        return model

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if shadow is not None and sd:
        shadow.load_state_dict(sd)
    return shadow


def train(
    model: nn.Module, task: Task, cfg: TrainConfig, ckpt_config: dict, tokenizer: Tokenizer | None = None
) -> Path:
    """Train `model` on `task`; write checkpoints to cfg.out; return the final checkpoint's path."""
    if not cfg.out:
        raise ValueError("TrainConfig.out: give the checkpoint directory to write")
    for name in ("max_steps", "batch_size", "grad_accum"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(cfg, name)}")
    tune_malloc()
    apply_thread_policy()
    info = D.setup(cfg.device)
    device, rank, world = info.device, info.rank, info.world
    dtype = resolve_dtype(cfg.dtype, device, getattr(getattr(model, "config", None), "n_embd", None))
    if info.is_main and cfg.progress and device.type == "cpu" and dtype == torch.bfloat16:
        print(
            f"precision: bf16 matmuls, fp32 elsewhere ({'this CPU has AMX; ' if cfg.dtype == 'auto' else ''}"
            f"--dtype fp32 for fp32 throughout)"
        )
    out = Path(cfg.out)
    metrics = Metrics(out, info.is_main)
    ckpt_config = dict(ckpt_config)
    ckpt_config.setdefault("train", asdict(cfg))

    model.to(device)
    gpts = [m for m in model.modules() if isinstance(m, GPT)]
    recompute = bool(cfg.grad_checkpoint)
    if cfg.grad_checkpoint is None and gpts and device.type == "cpu":
        # in CPU RAM (a GPU's memory is a different budget): the first step's batch shape decides (batches are a pure
        # function of the step)
        idx = task.train_batch(0, 0, rank, world).get("idx")
        if torch.is_tensor(idx):
            acts = 2 * activation_bytes(gpts[0].config, idx.size(0), idx.size(1), flash=True)  # fp32: 2x 16-bit
            recompute = acts > AUTO_RECOMPUTE_BYTES
            if recompute and info.is_main and cfg.progress:
                print(f"activation checkpointing on: a micro-batch's activations would take ~{acts / 1e9:.1f} GB")
    for m in gpts:
        m.grad_checkpoint = recompute
    lora = cfg.lora_rank > 0
    check_flags(model, cfg.lora_rank, cfg.lora_targets, cfg.train_layers)
    if lora:
        adapted = apply_lora(model, cfg.lora_rank, cfg.lora_scale_alpha, cfg.lora_targets)
        ckpt_config["finetune"] = {
            "lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_scale_alpha, "modules": len(adapted)},
            "merged": cfg.lora_merge,
        }
    elif cfg.train_layers:
        freeze_all_but_last(model, cfg.train_layers)
        ckpt_config["finetune"] = {"train_layers": cfg.train_layers}
    if info.is_main and (lora or cfg.train_layers) and cfg.progress:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        print(f"training {n_train:,} of {n_all:,} parameters ({n_train / n_all:.2%})")
    start_step, max_steps, tokens_seen, resumed_state = 0, cfg.max_steps, 0, None
    if cfg.resume and has_checkpoint(out):
        if lora:  # the frozen base is the stage's parent; the state holds what trained
            load_trainable_state(model, load_state(out)["lora"], f"{out}/state/lora.pt")
        else:
            load_weights(out, model, strict=True)
        resumed_state = load_state(out)["train"]
        start_step = int(resumed_state["step"])
        # the step budget the first process settled on (a --time-budget may have cut it), unless the user
        # asks for a different --max-steps now (e.g. to train a finished run further)
        if int(resumed_state.get("cfg_max_steps", cfg.max_steps)) == cfg.max_steps:
            max_steps = int(resumed_state["max_steps"])
        tokens_seen = int(resumed_state.get("tokens_seen", 0))
        if info.is_main:
            print(f"resuming {out} from step {start_step} of {max_steps}")
    elif cfg.resume and info.is_main:
        print(f"--resume: no checkpoint in {out} yet, starting from step 0")
    if info.is_main and not (cfg.resume and resumed_state):
        metrics.path.unlink(missing_ok=True)  # a fresh run: the old curve does not belong to it
    metrics.truncate_after(start_step)

    # FSDP shards the parameters in place; keep an unsharded CPU copy on rank 0 to gather into for saving
    shadow = None
    if info.enabled and cfg.parallel == "fsdp":
        shadow = copy.deepcopy(model).cpu() if info.is_main else nn.Module()
    wrapped = D.wrap_model(model, info, cfg.parallel)
    opt = build_adamw(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), impl=cfg.optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    if resumed_state is not None:
        if not resumed_state.get("optimizer"):
            raise CheckpointError(
                f"{out}/state/train.pt: no optimizer state (an FSDP run); exact --resume "
                f"needs a DDP or single-process checkpoint"
            )
        opt.load_state_dict(resumed_state["optimizer"])
        if resumed_state.get("scaler"):
            scaler.load_state_dict(resumed_state["scaler"])
    fwd = torch.compile(wrapped) if cfg.compile else wrapped
    is_ddp = isinstance(wrapped, nn.parallel.DistributedDataParallel)
    flops_per_token = float(getattr(task, "flops_per_token", 0.0) or 0.0)
    peak = peak_flops(cfg, device, dtype)

    def save(step: int) -> None:
        # FSDP: the checkpoint holds the gathered full weights only; its optimizer moments stay sharded and
        # are not saved (torch's full optimizer-state gather failed here), so FSDP runs cannot --resume
        opt_sd = opt.state_dict() if shadow is None else {}
        to_save = _full_state_for_save(model, shadow)
        adapters = None
        if lora and info.is_main:
            # an ordinary checkpoint: the adapters merged into a plain copy (or kept beside the base weights)
            to_save, adapters = plain_copy(to_save, merge=cfg.lora_merge)
        if info.is_main:
            state = {
                "train": {
                    "step": step,
                    "max_steps": max_steps,
                    "cfg_max_steps": cfg.max_steps,
                    "tokens_seen": tokens_seen,
                    "optimizer": opt_sd,
                    "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                }
            }
            if lora:
                state["lora"] = trainable_state(model)
            save_checkpoint(out, to_save, ckpt_config, tokenizer, state, None if cfg.lora_merge else adapters)
        D.barrier()

    def evaluate(step: int, final: bool = False) -> dict:
        # FSDP needs every rank in the forward; otherwise rank 0 alone evaluates the plain module
        res = {}
        if info.is_main or shadow is not None:
            model.eval()
            with torch.no_grad(), autocast(device, dtype):
                res = task.final_evaluate(model) if final and hasattr(task, "final_evaluate") else task.evaluate(model)
            model.train()
            if info.is_main and res:
                metrics.write(step=step, **({"final": True} if final else {}), **res)
        D.barrier()
        return res

    bar = None
    if info.is_main and cfg.progress:
        bar = tqdm(total=max_steps, initial=start_step, desc="train", dynamic_ncols=True, smoothing=0.1)
    model.train()
    t_start = time.perf_counter()
    t_log, tokens_log = t_start, 0
    last_eval: dict = {}
    step = start_step
    stopped_early = False
    while step < max_steps:
        lr = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, max_steps)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        torch.manual_seed(_step_seed(cfg.seed, step, rank))  # dropout masks: a function of the step alone
        loss_sum = torch.zeros((), device=device)
        extras: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = _to_device(task.train_batch(step, micro, rank, world), device)
            n_tok = _count_tokens(task, batch) * world
            tokens_log += n_tok
            tokens_seen += n_tok
            # DDP all-reduces gradients on every backward unless told to wait for the last micro-batch
            sync_ctx = wrapped.no_sync() if (is_ddp and micro < cfg.grad_accum - 1) else contextlib.nullcontext()
            with sync_ctx:
                with autocast(device, dtype):
                    loss, extra = task.loss(fwd, batch)
                scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
            for k, v in (extra or {}).items():
                extras[k] = extras.get(k, 0.0) + float(v) / cfg.grad_accum
        scaler.unscale_(opt)
        if cfg.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        else:
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        if hasattr(gnorm, "full_tensor"):  # FSDP2: a DTensor
            gnorm = gnorm.full_tensor()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        step += 1

        if step % cfg.log_every == 0 or step == max_steps or step == 1:
            loss_avg = D.all_reduce_mean(loss_sum / cfg.grad_accum).item()
            now = time.perf_counter()
            dt = max(now - t_log, 1e-9)
            tps = tokens_log / dt
            row = {
                "step": step,
                "loss": loss_avg,
                "lr": lr,
                "grad_norm": float(gnorm),
                "tokens_per_s": round(tps, 1),
                "tokens": tokens_seen,
                "elapsed_s": round(now - t_start, 2),
            }
            if flops_per_token:
                row["mfu"] = round(tps * flops_per_token / (peak * world), 5)
            row.update({k: round(v, 6) for k, v in extras.items()})
            if not math.isfinite(loss_avg) and info.is_main:
                print(f"warning: loss is {loss_avg} at step {step}")
            metrics.write(**row)
            if bar is not None:
                bar.set_postfix(
                    loss=f"{loss_avg:.4f}",
                    tok_s=f"{tps:,.0f}",
                    **_val_postfix(last_eval),
                )
            t_log, tokens_log = now, 0
        if bar is not None:
            bar.update(1)

        # time budget: once the step time is known, shorten the run so the cosine still completes
        # (not on a resumed run: its step budget was already fixed by the first process, and is in the state)
        if cfg.time_budget > 0:
            elapsed = time.perf_counter() - t_start
            if step == start_step + 20:
                elapsed_20 = elapsed
            # plan the step budget after 20 steps, then re-plan after 100 from the steady-state pace of steps
            # 21-100 (the first steps are slower: allocation, warm caches; planning from them alone ended a
            # 300 s pretraining run 30 s early). The re-plan may extend the run up to --max-steps; it happens
            # only before the first checkpoint (a resume restores the budget saved there) and, with the
            # default warmup of >= 100 steps, before the cosine starts, so the schedule has no kink.
            replan = step == start_step + 100 and not (cfg.save_every and cfg.save_every <= step)
            if (step == start_step + 20 or replan) and resumed_state is None and step < max_steps:
                per_step = elapsed / 20 if step == start_step + 20 else (elapsed - elapsed_20) / 80
                fit = D.broadcast_object(step + int(max(cfg.time_budget * 0.97 - elapsed, 0) / per_step))
                new_max = max(min(fit, cfg.max_steps), step)
                if new_max != max_steps and (new_max < max_steps or replan):
                    max_steps = new_max
                    if bar is not None:
                        bar.total = max_steps
                        bar.refresh()
            # rank 0's clock decides for everyone, so all ranks stop at the same step
            stopped_early = bool(D.broadcast_object(elapsed > cfg.time_budget)) and step < max_steps
        final = step >= max_steps or stopped_early
        if cfg.eval_every and step % cfg.eval_every == 0 and not final:
            last_eval = evaluate(step)
        if cfg.save_every and step % cfg.save_every == 0 and not final:
            save(step)
        if stopped_early:
            max_steps = step  # what the checkpoint records: this run ended here
            break
    if bar is not None:
        bar.close()

    if step > start_step or not has_checkpoint(out):
        evaluate(step, final=True)
        save(step)
        if info.is_main and hasattr(task, "sample"):
            # after the save: under FSDP the gathered CPU copy is what can generate on one rank
            m = shadow if shadow is not None else model
            m.eval()
            with torch.no_grad(), autocast(device, dtype):
                text = task.sample(m)
            m.train()
            if text:
                metrics.write(step=step, sample=text)
    if lora:
        unwrap_lora(model, merge=True)  # the caller gets the fine-tuned model as a plain module
    D.cleanup()
    return out
