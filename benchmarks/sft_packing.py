"""Packing benchmark for SFT: real (non-pad) tokens per second, packed rows vs one conversation per row.

    python benchmarks/sft_packing.py --tokenizer runs/base --steps 8

Three ways to batch the same built-in conversations through the tiny model (forward + backward + AdamW):
  unpacked      one conversation per row, the batch trimmed to its longest conversation (the usual padding)
  packed        several conversations per row, positions restarting and attention kept inside each one
  packed-cross  packed, plain causal attention (conversations see the ones before them; no mask cost)
Runs are interleaved (A B C A B C ...) so load from other processes hits all three alike. Prints tokens/s
of real tokens and of trained (assistant) tokens, and the ratios against `unpacked`.
"""

from __future__ import annotations

import argparse
import time

import torch

from chatstack.data.chat_builtin import builtin_mix
from chatstack.data.conversations import encode_conversations, make_batch, pack
from chatstack.model import GPT
from chatstack.presets import get_preset
from chatstack.tokenizer import Tokenizer


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, help="dir with tokenizer.json (e.g. a base checkpoint)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    tok = Tokenizer.load(a.tokenizer)
    cfg = get_preset(a.preset, vocab_size=tok.vocab_size)
    L = cfg.block_size + 1
    convs = [c["messages"] for c in builtin_mix("train")]
    enc, summ = encode_conversations(tok, convs, L)
    rows = {"unpacked": pack(enc, L, tok.eot_id, packed=False), "packed": pack(enc, L, tok.eot_id)}
    print(
        f"{summ.conversations:,} conversations, {summ.tokens:,} tokens: unpacked {len(rows['unpacked']):,} rows "
        f"({rows['unpacked'].fill():.1%} of a full row used), packed {len(rows['packed']):,} rows "
        f"({rows['packed'].fill():.1%})"
    )
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def step(variant):
        r = rows["unpacked" if variant == "unpacked" else "packed"]
        b = make_batch(r, torch.randint(0, len(r), (a.batch_size,), generator=g))
        kw = {} if variant == "packed-cross" else {"positions": b["positions"], "attn_mask": b["attn_mask"]}
        _, loss = model(b["idx"], b["targets"], **kw)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(b["n_tokens"]), int((b["targets"] >= 0).sum())

    variants = ["unpacked", "packed", "packed-cross"]
    stats = {v: [0.0, 0, 0] for v in variants}  # seconds, real tokens, trained tokens
    for v in variants:
        step(v)  # warm-up
    for _ in range(a.rounds):
        for v in variants:
            t = time.perf_counter()
            for _ in range(a.steps):
                n, k = step(v)
                stats[v][1] += n
                stats[v][2] += k
            stats[v][0] += time.perf_counter() - t
    base = stats["unpacked"][2] / stats["unpacked"][0]
    print(f"{'variant':14s} {'real tok/s':>11s} {'trained tok/s':>14s} {'vs unpacked':>12s}")
    for v in variants:
        s, n, k = stats[v]
        print(f"{v:14s} {n / s:>11,.0f} {k / s:>14,.0f} {k / s / base:>11.2f}x")


if __name__ == "__main__":
    main()
