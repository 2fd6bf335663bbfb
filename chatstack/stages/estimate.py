"""`chatstack estimate`: parameters, memory, FLOPs and wall-clock of a model (the arithmetic: chatstack/estimate.py).

chatstack estimate --preset gpt2
chatstack estimate --preset gpt3-175b --tokens 300e9 --gpus 1024 --gpu-tflops 312 --mfu 0.462 --json
chatstack estimate --preset gpt3-175b --tokens 300e9 --gpus 1024 --recompute --achieved-tflops 140
chatstack estimate --preset llama-65b --tokens 1.4e12 --gpus 2048 --tokens-per-gpu-s 380
chatstack estimate --checkpoint runs/speedrun/base --batch 16 --seq 256
chatstack estimate --checkpoint runs/vision --images 2     # + the image encoder and the image tokens' share
"""

from __future__ import annotations

import argparse
import json
import math

from chatstack import estimate as E
from chatstack.args import CLIError
from chatstack.checkpoint import CheckpointError, read_config
from chatstack.model import GPTConfig
from chatstack.presets import get_preset


def _number(s: str) -> float:
    """Floats also as 300e9; argparse shows a failure as a usage error (exit 2)."""
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "estimate",
        help="parameters, memory, FLOPs and training time of a model",
        description=__doc__ + E.__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("model (one of)")
    src.add_argument("--preset", help="a preset name (see chatstack.presets); default gpt2")
    src.add_argument("--checkpoint", metavar="DIR", help="a checkpoint directory (reads config.json 'model')")
    src.add_argument("--params", type=_number, help="override N, e.g. the nominal 175e9 of GPT-3")
    run = p.add_argument_group("training run")
    run.add_argument("--tokens", type=_number, help="training tokens D (default: 20 per parameter)")
    run.add_argument("--recompute", action="store_true", help="activation recomputation: 8ND instead of 6ND")
    run.add_argument(
        "--attention", action="store_true", help="add the attention-score FLOPs 12*l*h*T per token (PaLM's formula)"
    )
    run.add_argument(
        "--batch",
        type=_number,
        help="batch size for the activation / KV-cache estimates (default: none, or 1 with --seq)",
    )
    run.add_argument("--seq", type=_number, help="sequence length (default: the model's context length)")
    run.add_argument("--flash", action="store_true", help="fused attention: no s^2 score activations")
    run.add_argument(
        "--images", type=int, default=1, help="images per context, for a vision checkpoint's image-token share"
    )
    hw = p.add_argument_group("hardware (throughput: --tokens-per-gpu-s, else --achieved-tflops, else peak x MFU)")
    hw.add_argument("--gpus", type=_number, default=1, help="number of GPUs (default 1)")
    hw.add_argument(
        "--gpu-tflops",
        type=_number,
        default=E.A100_BF16_TFLOPS,
        help=f"peak TFLOP/s per GPU (default {E.A100_BF16_TFLOPS:g}, A100 bf16)",
    )
    hw.add_argument("--mfu", type=_number, default=0.4, help="model FLOPs utilisation, 0-1 (default 0.4)")
    hw.add_argument("--achieved-tflops", type=_number, help="achieved TFLOP/s per GPU (instead of peak x MFU)")
    hw.add_argument("--tokens-per-gpu-s", type=_number, help="measured training tokens/s per GPU")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=run_cli)


def _args_to_estimate(args) -> E.EstimateArgs:
    if args.preset and args.checkpoint:
        raise CLIError("give --preset or --checkpoint, not both")
    for flag in (
        "params",
        "tokens",
        "batch",
        "seq",
        "gpus",
        "gpu_tflops",
        "mfu",
        "achieved_tflops",
        "tokens_per_gpu_s",
    ):
        v = getattr(args, flag)
        if v is not None and (not math.isfinite(v) or v <= 0):
            raise CLIError(f"--{flag.replace('_', '-')} must be a positive number, got {v:g}")
    for flag in ("batch", "seq", "gpus"):
        v = getattr(args, flag)
        if v is not None and not float(v).is_integer():
            raise CLIError(f"--{flag} must be a whole number, got {v:g}")
    if args.mfu > 1:
        raise CLIError(f"--mfu is a fraction between 0 and 1, got {args.mfu:g}")
    if args.checkpoint:
        try:
            full = read_config(args.checkpoint)
            vision = full.get("vision")
            cfg = GPTConfig.from_dict(full["model"])
        except CheckpointError as e:
            raise CLIError(str(e)) from e
        except (TypeError, ValueError) as e:
            raise CLIError(f"{args.checkpoint}/config.json: bad 'model' field ({e})") from e
        name = str(args.checkpoint)
    else:
        name = args.preset or "gpt2"
        try:
            cfg = get_preset(name)
        except ValueError as e:
            raise CLIError(str(e)) from e
    return E.EstimateArgs(
        cfg=cfg,
        name=name,
        tokens=args.tokens,
        params=args.params,
        gpus=int(args.gpus),
        gpu_tflops=args.gpu_tflops,
        mfu=args.mfu,
        achieved_tflops=args.achieved_tflops,
        tokens_per_gpu_s=args.tokens_per_gpu_s,
        recompute=args.recompute,
        attention=args.attention,
        batch=int(args.batch or 0),
        seq=int(args.seq) if args.seq else None,
        flash=args.flash,
        vision=vision if args.checkpoint else None,
        images=args.images,
    )


def run_cli(args) -> int:
    r = E.estimate(_args_to_estimate(args))
    print(json.dumps(r, indent=2) if args.json else E.format_table(r))
    return 0
