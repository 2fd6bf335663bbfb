"""Where a batch-1 decode token goes: the engine's matrix-vector products against everything else.

    python benchmarks/decode_breakdown.py                 # GPT-2 small config, random weights, ~1 minute
    python benchmarks/decode_breakdown.py --threads 1

What it prints:
  1. per token: the whole engine step, the time inside the model's Linear layers (each timed where it runs,
     so with the caches as the engine leaves them) and their streaming rate, and the remainder (norms,
     attention, KV-cache writes, GELU, residual adds, sampling, Python); next to the bound of
     benchmarks/decode.py (a 512 MB copy's bandwidth / weight bytes per token), timed in the same rounds;
  2. a few of the small ops of a layer, timed right after a product the size of GPT-2's q/k/v projection
     (which streams 7 MB of weights through the 2 MiB L2 of each core) and again with warm caches.

The best of --repeats rounds is kept for each number (other load on a shared machine only slows a run down).
Timing each Linear adds two clock reads per call (~49 per token); the untimed step is printed as well.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from decode import _IdTokenizer, _weights_read_per_token, bandwidth_fns

from chatstack import decode_step
from chatstack.infer.engine import Engine, SamplingParams
from chatstack.model import GPT, Linear
from chatstack.presets import get_preset


def step_split(preset: str, tokens: int, repeats: int) -> None:
    torch.manual_seed(0)
    cfg = get_preset(preset)
    model = GPT(cfg).eval()
    engine = Engine(model, _IdTokenizer(cfg.vocab_size))
    engine.prepare_weights()
    sp = SamplingParams(max_new_tokens=tokens, temperature=0, stop_token_ids=[])
    prompt = list(range(8))
    (copy_fn, _), (copy_bytes, _) = bandwidth_fns()
    weight_bytes = _weights_read_per_token(cfg)

    inside = [0.0]
    plain_forward = Linear.forward  # prefill (GPT.hidden_states) calls the Linear modules
    plain_linear = decode_step._linear  # decode steps (chatstack.infer.decode_step) call this per Linear

    def timed_forward(self, x):
        t0 = time.perf_counter()
        y = plain_forward(self, x)
        inside[0] += time.perf_counter() - t0
        return y

    def timed_linear(m, x):
        t0 = time.perf_counter()
        y = plain_linear(m, x)
        inside[0] += time.perf_counter() - t0
        return y

    def timing(on: bool):
        Linear.forward = timed_forward if on else plain_forward
        decode_step._linear = timed_linear if on else plain_linear

    best = {"step": float("inf"), "timed step": float("inf"), "linears": float("inf"), "copy": float("inf")}
    engine.generate([prompt], sp)  # warm-up
    copy_fn()
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            engine.generate([prompt], sp)
            best["step"] = min(best["step"], time.perf_counter() - t0)
            timing(True)
            inside[0] = 0.0
            t0 = time.perf_counter()
            engine.generate([prompt], sp)
            total = time.perf_counter() - t0
            timing(False)
            if total < best["timed step"]:
                best["timed step"], best["linears"] = total, inside[0]
            t0 = time.perf_counter()
            copy_fn()
            best["copy"] = min(best["copy"], time.perf_counter() - t0)
    finally:
        timing(False)
    forwards = tokens + 1  # the prompt's prefill reads every weight once more
    per = {k: v / forwards * 1e3 for k, v in best.items() if k != "copy"}
    bw = copy_bytes / best["copy"]
    bound_ms = weight_bytes / bw * 1e3
    print(
        f"{preset}: {weight_bytes / 1e6:.0f} MB of weights per token; copy bandwidth {bw / 1e9:.1f} GB/s "
        f"-> bound {bound_ms:.2f} ms/token"
    )
    print(
        f"  engine step {per['step']:.2f} ms/token ({bound_ms / per['step']:.0%} of the bound); "
        f"with each Linear timed: {per['timed step']:.2f} ms, of which"
    )
    print(f"    Linears   {per['linears']:6.2f} ms  ({weight_bytes / (per['linears'] / 1e3) / 1e9:.1f} GB/s)")
    print(
        f"    the rest  {per['timed step'] - per['linears']:6.2f} ms  "
        f"({(per['timed step'] - per['linears']) / per['timed step']:.0%} of the step)"
    )


def cold_ops(repeats: int, n: int = 200) -> None:
    S, C, H, hd = 40, 768, 12, 64
    weights = [torch.randn(C, 3 * C).t() for _ in range(24)]  # (out, in) views, 7 MB each, cycled
    cache = torch.zeros(12, 2, 1, H, 1024, hd)
    x = torch.randn(1, 1, C)
    h = torch.randn(1, 1, 4 * C)
    ln = torch.nn.LayerNorm(C)
    q = torch.randn(1, H, 1, hd)
    ops = {
        "LayerNorm (768)": lambda k, v: ln(x),
        "SDPA (12 heads x 40 keys)": lambda k, v: F.scaled_dot_product_attention(q, k, v),
        "GELU (3072)": lambda k, v: F.gelu(h, approximate="tanh"),
        "residual add (768)": lambda k, v: x + x,
        "KV-cache write": lambda k, v: k[:, :, -1:].copy_(q),
    }

    def run(op, after_product: bool) -> float:
        tot = 0.0
        for i in range(n):
            if after_product:
                F.linear(x, weights[i % len(weights)])
            k, v = cache[i % 12, 0, :, :, :S], cache[i % 12, 1, :, :, :S]
            t0 = time.perf_counter()
            op(k, v)
            tot += time.perf_counter() - t0
        return tot / n * 1e6

    print(f"\nsmall ops, us per call (best of {repeats}): right after a 768 -> 2304 product | warm")
    for name, op in ops.items():
        cold = min(run(op, True) for _ in range(repeats))
        warm = min(run(op, False) for _ in range(repeats))
        print(f"  {name:28s} {cold:6.1f} | {warm:6.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2", help="model config (random weights)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    step_split(args.preset, args.tokens, args.repeats)
    cold_ops(args.repeats)


if __name__ == "__main__":
    main()
