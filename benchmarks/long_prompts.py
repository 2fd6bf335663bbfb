"""Long prompts in the engine: what prefix caching and chunked prefill buy, measured in one run.

    python benchmarks/long_prompts.py                         # GPT-2 small config, random weights (~1-2 min)
    python benchmarks/long_prompts.py --checkpoint runs/smollm2 --prompt-tokens 2000

Prints:
  1. prefix caching: a conversation of --turns turns on a --prompt-tokens history (each turn resends the whole
     history plus the reply and a new message): time to first token per turn, with the cache and without;
  2. chunked prefill: one row is decoding when a --prompt-tokens prompt arrives: that row's longest wait for
     a token, and the long prompt's time to its first token, for each --chunks size (0 = whole prompt at once).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatstack.infer.engine import Engine, SamplingParams  # noqa: E402


def load(args):
    if args.checkpoint:
        from chatstack.checkpoint import load_checkpoint

        ck = load_checkpoint(args.checkpoint)
        return ck.model.eval(), ck.tokenizer
    from decode import _IdTokenizer

    from chatstack.model import GPT
    from chatstack.presets import get_preset

    torch.manual_seed(0)
    model = GPT(get_preset("gpt2")).eval()
    return model, _IdTokenizer(model.config.vocab_size)


def ids_of(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def ttft(engine, prompt, params) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    first, out = None, []
    for ev in engine.stream(prompt, params):
        if first is None:
            first = time.perf_counter() - t0
        out.append(ev.token_id)
    return first, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="", help="a chatstack checkpoint (default: GPT-2 small, random weights)")
    ap.add_argument("--prompt-tokens", type=int, default=800)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--chunks", type=int, nargs="*", default=[0, 512, 256])
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model, tok = load(args)
    V = min(model.config.vocab_size, getattr(tok, "vocab_size", model.config.vocab_size))
    n = min(args.prompt_tokens, model.config.block_size - 64 * (args.turns + 1))
    sp = SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=[])

    print(f"{args.checkpoint or 'gpt2 (random weights)'}: {n}-token history, {torch.get_num_threads()} threads")
    print("1. prefix caching: time to first token per turn")
    for mb in (256, 0):
        eng = Engine(model, tok, prefix_cache_mb=mb)
        eng.prepare_weights()
        history, times = ids_of(n, V, 1), []
        for turn in range(args.turns):
            t, out = ttft(eng, history, sp)
            times.append(t)
            history = history + out + ids_of(16, V, 10 + turn)  # the reply and the next message
        print(
            f"   prefix cache {'on ' if mb else 'off'}: "
            + "  ".join(f"turn {i + 1} {t * 1e3:7.0f} ms" for i, t in enumerate(times))
        )

    print(f"2. chunked prefill: a {n}-token prompt arrives while one row decodes")
    for chunk in args.chunks:
        eng = Engine(model, tok, prefill_chunk=chunk)
        eng.prepare_weights()
        a = eng.add_request(ids_of(8, V, 2), SamplingParams(max_new_tokens=200, temperature=0, stop_token_ids=[]))
        for _ in range(3):
            eng.step()
        b = eng.add_request(ids_of(n, V, 3), sp)
        gaps, t0 = [], time.perf_counter()
        last, first_b = t0, None
        while first_b is None:
            evs = eng.step()
            now = time.perf_counter()
            if any(e.request_id == a for e in evs):
                gaps.append(now - last)
                last = now
            if any(e.request_id == b for e in evs):
                first_b = now - t0
        eng.cancel(a)
        eng.cancel(b)
        print(
            f"   prefill_chunk {chunk:4d}: decoding row's longest wait {max(gaps) * 1e3:6.0f} ms "
            f"({len(gaps)} tokens meanwhile); the long prompt's first token after {first_b * 1e3:6.0f} ms"
        )


if __name__ == "__main__":
    main()
