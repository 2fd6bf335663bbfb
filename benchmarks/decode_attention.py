"""Grouped-query decode attention on CPU: SDPA's kernel against two batched products and a softmax.

One new query per row over that row's cached keys, at the engine's shapes (default: SmolLM2-135M's 9 query
heads over 3 kv heads of 64; keys are views into a longer cache, as the engine's are; half the rows masked
to half their keys, as rows of different lengths are). Interleaved rounds; median microseconds per layer and
the range over rounds. chatstack.model.decode_attention takes the products from MATMUL_ATTENTION_ROWS rows up while
rows x keys is at most MATMUL_ATTENTION_ROW_KEYS.

    python benchmarks/decode_attention.py
    python benchmarks/decode_attention.py --rows 8 16 64 --keys 400 1024 2048 --rounds 3 --reps 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from chatstack.infer.cpu import cpu_vendor
from chatstack.model import MATMUL_ATTENTION_ROW_KEYS, MATMUL_ATTENTION_ROWS, attention_products


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def time_us(f, reps: int) -> float:
    for _ in range(5):
        f()
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t0) / reps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    ap.add_argument("--keys", type=int, nargs="+", default=[48, 96, 160, 512])
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = a.heads // a.kv_heads
    print(f"{cpu_vendor()}; {a.threads} threads; {a.heads} heads over {a.kv_heads} kv heads of {a.head_dim}")
    print(
        f"(the engine uses the products from {MATMUL_ATTENTION_ROWS} rows, up to {MATMUL_ATTENTION_ROW_KEYS} rows x keys)\n"
    )
    print("| rows | keys | SDPA us | products us | products / SDPA |")
    print("|---|---|---|---|---|")
    for B in a.rows:
        for S in a.keys:
            kv = torch.randn(2, B, a.kv_heads, max(a.keys) * 2, a.head_dim)
            k, v = kv[0, :, :, :S], kv[1, :, :, :S]
            q = torch.randn(B, a.kv_heads, g, a.head_dim)
            mask = torch.zeros(B, 1, 1, S)
            mask[::2, ..., S // 2 :] = float("-inf")
            torch.testing.assert_close(attention_products(q, k, v, mask), sdpa(q, k, v, mask), atol=1e-5, rtol=1e-4)
            ts = {"sdpa": [], "products": []}
            for _ in range(a.rounds):
                for name, f in (("sdpa", sdpa), ("products", attention_products)):
                    ts[name].append(time_us(lambda f=f: f(q, k, v, mask), a.reps))
            s, p = statistics.median(ts["sdpa"]), statistics.median(ts["products"])
            ratios = [pp / ss for pp, ss in zip(ts["products"], ts["sdpa"])]
            print(
                f"| {B} | {S} | {s:.0f} ({min(ts['sdpa']):.0f}-{max(ts['sdpa']):.0f}) | "
                f"{p:.0f} ({min(ts['products']):.0f}-{max(ts['products']):.0f}) | "
                f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |"
            )


if __name__ == "__main__":
    main()
