"""What int8 weights (chatstack.infer.quantize) cost in quality: one checkpoint, fp32 against int8, on held-out text.

    python benchmarks/quantize_quality.py runs/speedrun/base                 # held-out Shakespeare plays
    python benchmarks/quantize_quality.py runs/smollm2 --text README.md --tokens 1024

Prints, over --tokens positions of the text (windows of the model's context):
  * perplexity with fp32 weights and with int8 weights (every Linear the kernel takes), and the change;
  * the mean KL divergence KL(fp32 || int8) of the next-token distributions, in nats;
  * top-1 agreement: how often the two pick the same most likely next token (greedy decoding follows
    the int8 model wherever they disagree).
Every position runs through int8 weights here, so this bounds what the engine's int8 decoding costs (it
prefills prompts with fp32 weights).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatstack.checkpoint import load_checkpoint  # noqa: E402
from chatstack.infer.quantize import Int8Weight, int8_supported  # noqa: E402
from chatstack.model import Linear  # noqa: E402


def log_probs(model, ids: torch.Tensor, window: int) -> torch.Tensor:
    """(N-1, V) next-token log-probabilities over ids (N,), in non-overlapping windows of the context."""
    out = []
    for s in range(0, ids.numel() - 1, window):
        x = ids[s : s + window + 1]
        out.append(model(x[None, :-1])[0].float().log_softmax(-1))
    return torch.cat(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--text", default=None, help="a text file (default: the built-in held-out Shakespeare plays)")
    ap.add_argument("--tokens", type=int, default=4096, help="positions to score")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    ck = load_checkpoint(args.checkpoint)
    model, tok = ck.model.eval(), ck.tokenizer
    if args.text:
        text = Path(args.text).read_text(encoding="utf-8")
    else:
        from chatstack.data.builtin import builtin_texts

        text = "\n".join(builtin_texts("shakespeare", "val"))
    ids = torch.tensor(tok.encode(text[: args.tokens * 20])[: args.tokens + 1])
    window = min(model.config.block_size, 1024)
    lp32 = log_probs(model, ids, window)

    w8 = {
        m: Int8Weight(m.weight)
        for m in model.modules()
        if isinstance(m, Linear) and int8_supported(m.in_features, torch.device("cpu"))
    }
    n_lin = sum(isinstance(m, Linear) for m in model.modules())
    for m, w in w8.items():
        m.__dict__["fast_weight"] = w
    try:
        lp8 = log_probs(model, ids, window)
    finally:
        for m in w8:
            m.__dict__.pop("fast_weight", None)

    y = ids[1:]
    nll32 = F.nll_loss(lp32, y).item()
    nll8 = F.nll_loss(lp8, y).item()
    kl = (lp32.exp() * (lp32 - lp8)).sum(-1).mean().item()
    agree = (lp32.argmax(-1) == lp8.argmax(-1)).float().mean().item()
    print(f"{ck.path}: {y.numel()} positions, {len(w8)}/{n_lin} Linears in int8")
    print(
        f"  perplexity fp32 {math.exp(nll32):.3f}   int8 {math.exp(nll8):.3f}   "
        f"({(math.exp(nll8 - nll32) - 1) * 100:+.2f}%)"
    )
    print(f"  KL(fp32 || int8) {kl:.5f} nats per token;  top-1 agreement {agree:.1%}")


if __name__ == "__main__":
    main()
