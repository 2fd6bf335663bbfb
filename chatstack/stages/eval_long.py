"""`chatstack eval-long`: passkey retrieval accuracy per context length and needle depth.

    chatstack eval-long runs/smollm2 --lengths 1024 2048 4096 8192 --json
    chatstack eval-long runs/smollm2 --lengths 12288 16384 --rope-scaling yarn --rope-factor 2 --json
    chatstack eval-long runs/smollm2 --lengths 1024 --depths 0 0.5 1 --n 4 --chat

A length above the model's context needs RoPE scaling (--rope-scaling linear|ntk|yarn with --rope-factor F:
the context becomes F x the trained one; chatstack/model.py). Prompts are prefilled in --prefill-chunk
pieces. Output (--json): {"lengths": {"1024": {"accuracy", "n", "depths": {...}, "prompt_tokens",
"seconds"}, ...}, "rope_scaling", "rope_factor", "context", "peak_rss_bytes", "kv_cache_bytes_at_max"};
the samples (key, reply, right or wrong) go to --out (default CKPT/eval_long.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from chatstack.args import CLIError, add_dataclass_args, dataclass_from_args
from chatstack.checkpoint import CheckpointError, load_checkpoint
from chatstack.estimate import kv_cache_bytes
from chatstack.evals.long_context import evaluate_passkey
from chatstack.model import ROPE_SCALINGS


@dataclass
class EvalLongConfig:
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096], metadata={"help": "prompt lengths (tokens)"})
    depths: list[float] = field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
        metadata={"help": "where the passkey sits (0 = start, 1 = end)"},
    )
    n: int = field(default=2, metadata={"help": "prompts per (length, depth)"})
    seed: int = field(default=0, metadata={"help": "fixes the passkeys"})
    chat: bool = field(default=False, metadata={"help": "ask in a ChatML user turn (chat models)"})
    rope_scaling: str = field(default="none", metadata={"help": "RoPE scaling", "choices": list(ROPE_SCALINGS)})
    rope_factor: float = field(default=1.0, metadata={"help": "context multiple for --rope-scaling"})
    prefill_chunk: int = field(default=512, metadata={"help": "prefill this many tokens per engine step"})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda"})
    out: str = field(default="", metadata={"help": "result JSON with samples (default: CKPT/eval_long.json)"})
    json: bool = field(default=False, metadata={"help": "print the result as JSON"})


def run(ckpt: str, cfg: EvalLongConfig, log=print) -> dict:
    if not cfg.lengths or any(L < 64 for L in cfg.lengths):
        raise CLIError(f"--lengths: give lengths of at least 64 tokens, got {cfg.lengths}")
    if cfg.n < 1:
        raise CLIError(f"--n must be >= 1, got {cfg.n}")
    if any(not 0 <= d <= 1 for d in cfg.depths):
        raise CLIError(f"--depths must lie in [0, 1], got {cfg.depths}")
    try:
        ck = load_checkpoint(ckpt, device=cfg.device)
    except CheckpointError as e:
        raise CLIError(str(e)) from None
    if ck.tokenizer is None:
        raise CLIError(f"{ckpt}: checkpoint has no tokenizer.json")
    model = ck.model.eval()
    if cfg.rope_scaling != "none" or cfg.rope_factor != 1.0:
        try:
            model.set_rope_scaling(cfg.rope_scaling, cfg.rope_factor)
        except ValueError as e:
            raise CLIError(f"--rope-scaling: {e}") from None
    context = model.config.block_size
    too_long = [L for L in cfg.lengths if L > context]
    if too_long:
        hint = (
            "; add --rope-scaling linear|ntk|yarn --rope-factor F to read F x the trained context"
            if model.config.pos == "rope"
            else ""
        )
        raise CLIError(
            f"--lengths {too_long}: above what this model supports ({context} tokens with its "
            f"{'scaled ' if model.config.rope_scaling != 'none' else ''}positions){hint}"
        )
    res = evaluate_passkey(
        model, ck.tokenizer, cfg.lengths, cfg.depths, cfg.n, cfg.seed, cfg.chat, cfg.prefill_chunk, log=log
    )
    res.update(
        checkpoint=str(ckpt),
        rope_scaling=model.config.rope_scaling,
        rope_factor=model.config.rope_factor,
        context=context,
        chat=cfg.chat,
        kv_cache_bytes_at_max=kv_cache_bytes(model.config, 1, max(cfg.lengths), bytes_per_value=4),
    )
    return res


def _cmd(args) -> int:
    cfg = dataclass_from_args(EvalLongConfig, args)
    log = (lambda s: print(s, file=sys.stderr)) if cfg.json else print
    res = run(args.checkpoint, cfg, log)
    out = cfg.out or str(Path(args.checkpoint) / "eval_long.json")
    Path(out).write_text(json.dumps(res, indent=1) + "\n")
    if cfg.json:
        print(json.dumps({k: v for k, v in res.items() if k != "samples"}))
    else:
        for L, r in res["lengths"].items():
            depths = "  ".join(f"{d}:{a:.0%}" for d, a in r["depths"].items())
            print(f"{L:>6s} tokens  accuracy {r['accuracy']:.0%} (n={r['n']})  by depth {depths}  {r['seconds']} s")
        print(
            f"peak RSS {res['peak_rss_bytes'] / 2**20:.0f} MiB; KV cache at {max(cfg.lengths)} tokens "
            f"(fp32) {res['kv_cache_bytes_at_max'] / 2**20:.0f} MiB; wrote {out}"
        )
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "eval-long",
        help="passkey retrieval per context length and depth (long context)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="checkpoint directory")
    add_dataclass_args(p, EvalLongConfig)
    p.set_defaults(func=_cmd)
