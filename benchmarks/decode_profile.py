"""Where one engine decode step goes, at 1 and 16 rows: torch.profiler over the engine's phases and its ops.

    python benchmarks/decode_profile.py                           # SmolLM2-135M shape, random weights, 1 and 16 rows
    python benchmarks/decode_profile.py --checkpoint runs/smollm2 --rows 1 16 --steps 20 --threads 1
    python benchmarks/decode_profile.py --checkpoint runs/smollm2 --rows 1 16 64 --quantize bf16 --no-profile

For each row count: B rows with a 32-token prompt are prefilled, a few decode steps warm up, then --steps decode
steps are timed without the profiler (median ms per step, the number to compare) and once more under
torch.profiler. Each engine phase is labelled (decode forward, sampling + bookkeeping, weight binding, batch
compaction, admission, trim), and the table lists the phases and the costliest ops by their own time, with what
the step spends outside any op (Python between the ops). The profiler adds a few microseconds per op, so its
step is slower than the plain one; the shares are what it is for.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import torch
from decode import _IdTokenizer  # a sibling benchmark (this folder is on sys.path when run as a script)
from torch.profiler import ProfilerActivity, profile, record_function

from chatstack.checkpoint import load_checkpoint
from chatstack.infer.cpu import cpu_vendor
from chatstack.infer.engine import Engine, SamplingParams
from chatstack.infer.quantize import QUANTIZE_KINDS
from chatstack.model import GPT
from chatstack.presets import get_preset

PHASES = {  # engine method -> label
    "_decode_step": "decode forward (DecodeStep)",
    "_accept": "sampling + per-row bookkeeping",
    "_bind_weights": "bind fast weights",
    "_compact": "compact the batch",
    "_admit": "admission",
    "_trim": "trim KV memory",
}


def label_phases(engine: Engine) -> None:
    """Wrap the engine's phases in record_function ranges (instance attributes; the class is untouched)."""
    for name, label in PHASES.items():
        fn = getattr(engine, name)
        if fn is None:
            continue

        def wrapped(*a, _fn=fn, _label=label, **kw):
            with record_function(_label):
                return _fn(*a, **kw)

        setattr(engine, name, functools.wraps(fn)(wrapped))


def make_engine(model, tok, rows: int, vocab: int, quantize: str | None = None) -> Engine:
    engine = Engine(model, tok, max_batch_size=rows, prefix_cache_mb=0, quantize=quantize)
    engine.prepare_weights()
    g = torch.Generator().manual_seed(0)
    for _ in range(rows):
        prompt = torch.randint(0, vocab, (32,), generator=g).tolist()
        engine.add_request(prompt, SamplingParams(max_new_tokens=10_000, temperature=0.0))
    for _ in range(4):  # prefill + warm-up decode steps
        engine.step()
    return engine


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="default: SmolLM2-135M's shape with random weights")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: the engine's policy)")
    ap.add_argument("--top", type=int, default=12, help="ops listed per row count")
    ap.add_argument("--quantize", choices=QUANTIZE_KINDS, default=None, help="the engine's weight copies")
    ap.add_argument("--no-profile", action="store_true", help="only the plain ms per step")
    a = ap.parse_args()
    if a.threads:  # fixed: the engine's thread policy keeps it (chatstack.infer.cpu)
        os.environ["CHATSTACK_THREADS"] = str(a.threads)
        torch.set_num_threads(a.threads)
    if a.checkpoint:
        ck = load_checkpoint(a.checkpoint)
        model, tok = ck.model.eval(), ck.tokenizer
    else:
        torch.manual_seed(0)
        model = GPT(get_preset("smollm2-135m")).eval()
        tok = _IdTokenizer(model.config.vocab_size)
    vocab = model.config.vocab_size
    print(
        f"{a.checkpoint or 'smollm2-135m shape, random weights'}; {torch.get_num_threads()} threads; "
        f"{cpu_vendor() or 'unknown CPU'}; weights {a.quantize or 'fp32'}"
    )
    for rows in a.rows:
        engine = make_engine(model, tok, rows, vocab, a.quantize)
        times = []
        for _ in range(a.steps):
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
        plain = statistics.median(times) * 1e3
        if a.no_profile:
            print(f"{rows} row(s): {plain:.2f} ms per decode step ({rows / plain * 1e3:.0f} tokens/s)")
            continue
        label_phases(engine)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            for _ in range(a.steps):
                with record_function("engine step"):
                    engine.step()
            profiled = (time.perf_counter() - t) / a.steps * 1e3
        events = prof.key_averages()
        by_key = {e.key: e for e in events}
        step_total = by_key["engine step"].cpu_time_total / a.steps / 1e3
        in_ops = sum(e.self_cpu_time_total for e in events if e.key not in PHASES.values() and e.key != "engine step")
        in_ops = in_ops / a.steps / 1e3
        print(
            f"\n## {rows} row(s), {torch.get_num_threads()} thread(s): {plain:.2f} ms per decode step "
            f"({rows / plain * 1e3:.0f} tokens/s) without the profiler"
        )
        print(
            f"under the profiler {profiled:.2f} ms; inside torch ops {in_ops:.2f} ms, outside (Python) "
            f"{step_total - in_ops:.2f} ms ({(step_total - in_ops) / step_total:.0%})"
        )
        print("| phase | ms per step (incl. its ops) | share |")
        print("|---|---|---|")
        for label in PHASES.values():
            e = by_key.get(label)
            if e is not None:
                ms = e.cpu_time_total / a.steps / 1e3
                print(f"| {label} | {ms:.2f} | {ms / step_total:.0%} |")
        ops = sorted(
            (e for e in events if e.key not in PHASES.values() and e.key != "engine step"),
            key=lambda e: -e.self_cpu_time_total,
        )
        print("| op | calls per step | self ms per step | share |")
        print("|---|---|---|---|")
        for e in ops[: a.top]:
            ms = e.self_cpu_time_total / a.steps / 1e3
            print(f"| {e.key} | {e.count / a.steps:.0f} | {ms:.2f} | {ms / step_total:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
