"""The engine with each CPU matmul backend (chatstack.infer.cpu), same model, same prompts, interleaved rounds.

    python benchmarks/cpu_matmul.py                 # tiny preset and GPT-2 small (random weights), ~2 minutes
    python benchmarks/cpu_matmul.py --presets gpt2 --rounds 5

For each preset it times greedy generation at 1, 4 and 16 rows (prompts of 4-11 tokens, --tokens new tokens
each, prefill included) and the time to first token of one --prompt-len-token prompt (at most the context less one), with
Engine(cpu_matmul="mkl") and Engine(cpu_matmul="onednn") taking turns in every round (load on a shared machine
then hits both alike). It prints the best tokens/s of each, the median and range of the per-round ratios
onednn / mkl, whether both gave the same tokens, and each backend's 16-row / batch-1 ratio (benchmarks/decode.py's
goal 4). Which backend the engine takes by default on this CPU is printed first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from decode import _IdTokenizer

from chatstack.infer.cpu import cpu_matmul_backend, cpu_vendor, onednn_linear_works
from chatstack.infer.engine import Engine, SamplingParams
from chatstack.model import GPT
from chatstack.presets import get_preset

BACKENDS = ("mkl", "onednn")


def bench(preset: str, tokens: int, rounds: int, prompt_len: int) -> None:
    torch.manual_seed(0)
    model = GPT(get_preset(preset)).eval()
    V = model.config.vocab_size
    prompt_len = min(prompt_len, model.config.block_size - 1)
    engines = {b: Engine(model, _IdTokenizer(V), max_batch_size=16, cpu_matmul=b) for b in BACKENDS}
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, V, (4 + i % 8,), generator=g).tolist() for i in range(16)]
    long_prompt = torch.randint(0, V, (prompt_len,), generator=g).tolist()
    sp = SamplingParams(max_new_tokens=tokens, temperature=0, stop_token_ids=[])
    sp1 = SamplingParams(max_new_tokens=1, temperature=0, stop_token_ids=[])
    cases = [
        ("1 row", prompts[:1], sp),
        ("4 rows", prompts[:4], sp),
        ("16 rows", prompts, sp),
        (f"first token of {prompt_len}", [long_prompt], sp1),
    ]
    times = {(b, c): [] for b in BACKENDS for c, _, _ in cases}
    outs = {}
    for b, e in engines.items():  # warm-up: weight copies, caches; and the outputs
        for c, p, s in cases:
            outs[(b, c)] = [x.token_ids for x in e.generate(p, s)]
    for _ in range(rounds):
        for c, p, s in cases:
            for b, e in engines.items():
                t0 = time.perf_counter()
                e.generate(p, s)
                times[(b, c)].append(time.perf_counter() - t0)
    print(f"{preset}: best of {rounds} rounds; ratio = per-round onednn / mkl speed, median (range)")
    for c, p, s in cases:
        n = len(p) * s.max_new_tokens
        rate = {b: n / min(times[(b, c)]) for b in BACKENDS}
        ratios = [m / o for m, o in zip(times[("mkl", c)], times[("onednn", c)])]
        unit = "tok/s" if s.max_new_tokens > 1 else "per s"
        same = outs[("mkl", c)] == outs[("onednn", c)]
        print(
            f"  {c:18s} mkl {rate['mkl']:9.1f} {unit}  onednn {rate['onednn']:9.1f} {unit}   "
            f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})   same tokens: {same}"
        )
    for b in BACKENDS:
        r = 16 * min(times[(b, "1 row")]) / min(times[(b, "16 rows")])
        print(f"  {b:6s} 16 rows / 1 row: {r:.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "gpt2"])
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per row")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=256, help="prompt tokens for the time-to-first-token case")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU vendor {cpu_vendor() or '(unknown)'}; "
        f"the engine's default here: {cpu_matmul_backend()}"
    )
    if not onednn_linear_works():
        print("this torch has no working oneDNN linear: nothing to compare")
        return
    for preset in args.presets:
        bench(preset, args.tokens, args.rounds, args.prompt_len)


if __name__ == "__main__":
    main()
