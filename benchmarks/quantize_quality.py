"""What lower-precision weights (chatstack.infer.quantize: int8, bf16) cost in quality: one checkpoint, fp32 against
each kind, on held-out text.

    python benchmarks/quantize_quality.py runs/speedrun/base                 # held-out Shakespeare plays
    python benchmarks/quantize_quality.py runs/smollm2 --text README.md --tokens 1024 --kinds bf16

Prints, for each kind, over --tokens positions of the text (windows of the model's context):
  * perplexity with fp32 weights and with the kind's weights (int8: every Linear the kernel takes), and the change;
  * the mean KL divergence KL(fp32 || kind) of the next-token distributions, in nats;
  * top-1 agreement: how often the two pick the same most likely next token (greedy decoding follows
    the lower-precision model wherever they disagree).
Every position runs through the kind's weights here, as the engine's bf16 products do; its int8 decoding
prefills prompts with fp32 weights, so for int8 this is a bound.
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
from chatstack.infer.quantize import QUANTIZE_KINDS, BF16Weight, Int8Weight, int8_supported  # noqa: E402
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
    ap.add_argument("--kinds", nargs="+", choices=QUANTIZE_KINDS, default=list(QUANTIZE_KINDS))
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

    y = ids[1:]
    nll32 = F.nll_loss(lp32, y).item()
    n_lin = sum(isinstance(m, Linear) for m in model.modules())
    print(f"{ck.path}: {y.numel()} positions, perplexity fp32 {math.exp(nll32):.3f}")
    for kind in args.kinds:
        copies = {
            m: Int8Weight(m.weight) if kind == "int8" else BF16Weight(m.weight)
            for m in model.modules()
            if isinstance(m, Linear) and (kind == "bf16" or int8_supported(m.in_features, torch.device("cpu")))
        }
        for m, w in copies.items():
            m.__dict__["fast_weight"] = w
        try:
            lpq = log_probs(model, ids, window)
        finally:
            for m in copies:
                m.__dict__.pop("fast_weight", None)
        nll = F.nll_loss(lpq, y).item()
        kl = (lp32.exp() * (lp32 - lpq)).sum(-1).mean().item()
        agree = (lp32.argmax(-1) == lpq.argmax(-1)).float().mean().item()
        print(
            f"  {kind} ({len(copies)}/{n_lin} Linears): perplexity {math.exp(nll):.3f} "
            f"({(math.exp(nll - nll32) - 1) * 100:+.2f}%), KL(fp32 || {kind}) {kl:.5f} nats per token, "
            f"top-1 agreement {agree:.1%}"
        )


if __name__ == "__main__":
    main()
