"""Load test of `chatstack serve`: N concurrent streaming clients for a fixed time, on loopback.

    python benchmarks/serve_load.py                          # tiny random-weight model, 16 and 64 clients
    python benchmarks/serve_load.py --checkpoint runs/speedrun/sft --clients 16 64 --duration 30
    python benchmarks/serve_load.py --fuzz                   # also fuzz the OpenAPI schema (schemathesis)

What it measures, all against one server process (`chatstack serve`, a separate process, so the
clients here don't share its GIL):
  * baseline: ONE client sending streaming requests back to back (the engine serving one request at
    a time, through the same HTTP stack);
  * then C concurrent clients, each sending streaming requests back to back for --duration seconds:
    total generated tokens/s (from each stream's usage), the ratio to the baseline, errors (any non-200,
    broken stream or missing `data: [DONE]`), and p50/p95 time to first token (request sent -> first
    content delta);
  * for reference, the engine alone in this process, one request at a time, no HTTP.
Goal (issue #7): 0 errors, >= 4x the baseline's tokens/s at 16 clients.

Timings on a shared CPU are noisy: compare the ratios within one run, not across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _serving import wait_ready  # noqa: E402 (a sibling module of the benchmarks)
from tqdm import tqdm

MESSAGES = [{"role": "user", "content": "Tell me a story about a cat."}]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def one_stream(client: httpx.AsyncClient, model: str, max_tokens: int, seed: int, stats: dict) -> None:
    body = {
        "model": model,
        "messages": MESSAGES,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = None
    usage = None
    done = False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                stats["errors"].append(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    stats["errors"].append(f"stream error: {obj['error']}")
                    return
                if first is None and obj["choices"] and obj["choices"][0]["delta"].get("content"):
                    first = time.perf_counter()
                if obj.get("usage"):
                    usage = obj["usage"]
    except httpx.HTTPError as e:
        stats["errors"].append(f"{type(e).__name__}: {e}")
        return
    if not done or usage is None:
        stats["errors"].append("stream ended without usage and [DONE]")
        return
    stats["tokens"] += usage["completion_tokens"]
    stats["requests"] += 1
    if first is not None:
        stats["ttft"].append(first - t0)


def batch_counters(url: str) -> tuple[float, float, float]:
    """(rows summed over steps, steps, seconds inside engine.step) from the server's metrics."""
    vals = {}
    for ln in httpx.get(url + "/metrics").text.splitlines():
        if ln.startswith(
            ("chatstack_batch_size_sum", "chatstack_batch_size_count", "chatstack_engine_step_seconds_sum")
        ):
            name, v = ln.split()
            vals[name] = float(v)
    return (
        vals.get("chatstack_batch_size_sum", 0.0),
        vals.get("chatstack_batch_size_count", 0.0),
        vals.get("chatstack_engine_step_seconds_sum", 0.0),
    )


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return 0.0


async def run_level(
    url: str, model: str, clients: int, duration: float, max_tokens: int, server_pid: int | None = None
) -> dict:
    stats = {"tokens": 0, "requests": 0, "errors": [], "ttft": []}
    rows0, steps0, busy0 = batch_counters(url)
    cpu0 = cpu_seconds(server_pid)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(300.0)) as client:
        t0 = time.perf_counter()
        deadline = t0 + duration

        async def worker(w: int):
            i = 0
            while time.perf_counter() < deadline:  # no new request after the deadline; in-flight ones finish
                await one_stream(client, model, max_tokens, seed=w * 100_000 + i, stats=stats)
                i += 1

        await asyncio.gather(*(worker(w) for w in range(clients)))
        elapsed = time.perf_counter() - t0
    stats["elapsed"] = elapsed
    rows1, steps1, busy1 = batch_counters(url)
    stats["rows"], stats["steps"], stats["busy"] = rows1 - rows0, steps1 - steps0, busy1 - busy0
    stats["cpu"] = cpu_seconds(server_pid) - cpu0
    stats["tok_s"] = stats["tokens"] / elapsed
    return stats


def engine_alone(ckpt: str, duration: float, max_tokens: int, threads: int) -> float:
    """Tokens/s of the engine in this process, one request at a time, no HTTP (a reference point)."""
    import torch

    from chatstack.checkpoint import load_checkpoint
    from chatstack.infer.engine import Engine, SamplingParams

    if threads:
        torch.set_num_threads(threads)
    ck = load_checkpoint(ckpt)
    ck.model.eval()
    eng = Engine(ck.model, ck.tokenizer, max_batch_size=1)
    ids = ck.tokenizer.render_prompt(MESSAGES)
    tokens, t0, i = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < duration:
        out = eng.generate([ids], SamplingParams(max_new_tokens=max_tokens, temperature=1.0, seed=i))[0]
        tokens += len(out.token_ids)
        i += 1
    return tokens / (time.perf_counter() - t0)


def start_server(ckpt: str, port: int, max_batch_size: int, threads: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "chatstack.cli",
        "serve",
        ckpt,
        "--port",
        str(port),
        "--max-batch-size",
        str(max_batch_size),
        "--max-queue",
        "1024",
        "--log-level",
        "warning",
        "--threads",
        str(threads),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_ready(proc, f"http://127.0.0.1:{port}", timeout=120)
    return proc


def fuzz(url: str, max_examples: int) -> int:
    """schemathesis against the server's OpenAPI schema: any 5xx fails. Returns its exit code."""
    exe = Path(sys.executable).parent / "schemathesis"
    if not exe.exists():
        print("fuzz: schemathesis is not installed (pip install schemathesis); skipped")
        return 0
    cmd = [
        str(exe),
        "run",
        url + "/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        str(max_examples),
        "--workers",
        "1",
        "--phases",
        "examples,coverage,fuzzing",
    ]
    print("fuzz:", " ".join(cmd))
    return subprocess.call(cmd)


def _merge(total: dict, s: dict) -> None:
    for k in ("tokens", "requests", "elapsed", "steps", "rows", "busy", "cpu"):
        total[k] = total.get(k, 0) + s[k]
    total.setdefault("errors", []).extend(s["errors"])
    total.setdefault("ttft", []).extend(s["ttft"])
    total.setdefault("round_tok_s", []).append(s["tok_s"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="checkpoint to serve (default: a random-weight 'tiny' model)")
    ap.add_argument("--preset", default="tiny", help="preset of the default random-weight model")
    ap.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per load level (over all rounds)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleave the levels in this many rounds, so a change in machine load hits all alike",
    )
    ap.add_argument("--max-tokens", type=int, default=128, help="max_tokens per request (a typical reply)")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in the server and the engine-alone reference (0 = torch's default); "
        "1 avoids thread thrashing on a small shared CPU",
    )
    ap.add_argument("--fuzz", action="store_true", help="also run schemathesis on /openapi.json")
    ap.add_argument("--fuzz-examples", type=int, default=30)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    from chatstack.serve.testing import free_port, make_tiny_checkpoint

    tmp = tempfile.TemporaryDirectory()
    ckpt = args.checkpoint or make_tiny_checkpoint(Path(tmp.name) / "bench-model", preset=args.preset, block_size=256)
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    levels = [1] + [c for c in args.clients if c != 1]
    per_round = args.duration / args.rounds
    print(
        f"checkpoint {ckpt}; server {url}; {args.duration:.0f} s per level in {args.rounds} interleaved rounds; "
        f"max_tokens {args.max_tokens}; server threads {args.threads or 'default'}; {os.cpu_count()} CPUs "
        f"(load average {os.getloadavg()[0]:.1f})"
    )
    proc = start_server(ckpt, port, args.max_batch_size, args.threads)
    results = {
        "checkpoint": ckpt,
        "duration": args.duration,
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "levels": {},
    }
    totals: dict[int, dict] = {c: {} for c in levels}
    failed = False
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        asyncio.run(run_level(url, model, 2, 2.0, 8, proc.pid))  # warm-up (first allocations, connection setup)
        for r in tqdm(range(args.rounds), desc="rounds", leave=False):
            for c in levels:
                _merge(totals[c], asyncio.run(run_level(url, model, c, per_round, args.max_tokens, proc.pid)))
        print(
            f"{'clients':>8} {'requests':>9} {'tokens':>8} {'tok/s':>8} {'x base':>7} {'median x':>9} "
            f"{'errors':>7} {'TTFT p50':>9} {'TTFT p95':>9} {'steps/s':>8} {'rows/step':>9} {'in step':>8} "
            f"{'srv CPU':>8} {'tok/CPU-s':>10} {'x base':>7}"
        )
        base = totals[1]
        base_tok_s = base["tokens"] / base["elapsed"]
        for c in levels:
            t = totals[c]
            tok_s = t["tokens"] / t["elapsed"]
            ratio = tok_s / max(base_tok_s, 1e-9)
            # per-round ratios against the baseline of the same round: robust to load drifting between rounds
            med = statistics.median(a / max(b, 1e-9) for a, b in zip(t["round_tok_s"], base["round_tok_s"]))
            lv = {
                "requests": t["requests"],
                "tokens": t["tokens"],
                "tok_s": tok_s,
                "ratio": ratio,
                "median_round_ratio": med,
                "errors": len(t["errors"]),
                "ttft_p50": percentile(t["ttft"], 0.5),
                "ttft_p95": percentile(t["ttft"], 0.95),
                "steps_s": t["steps"] / t["elapsed"],
                "mean_batch": t["rows"] / max(t["steps"], 1),
                "engine_busy": t["busy"] / t["elapsed"],
                "server_cpu": t["cpu"] / t["elapsed"],
                "tok_per_cpu_s": t["tokens"] / max(t["cpu"], 1e-9),
            }
            # tokens per CPU-second of the server process: what batching buys, whatever share of the
            # (shared) CPU the server happened to get
            lv["cpu_ratio"] = lv["tok_per_cpu_s"] / max(base["tokens"] / max(base["cpu"], 1e-9), 1e-9)
            results["levels"][c] = lv
            print(
                f"{c:>8} {lv['requests']:>9} {lv['tokens']:>8} {tok_s:>8.0f} {ratio:>6.2f}x {med:>8.2f}x "
                f"{lv['errors']:>7} {lv['ttft_p50'] * 1000:>7.0f}ms {lv['ttft_p95'] * 1000:>7.0f}ms "
                f"{lv['steps_s']:>8.1f} {lv['mean_batch']:>9.1f} {lv['engine_busy']:>7.0%} "
                f"{lv['server_cpu']:>7.0%} {lv['tok_per_cpu_s']:>10.0f} {lv['cpu_ratio']:>6.2f}x"
            )
            for e in t["errors"][:5]:
                print("   error:", e)
            failed |= bool(t["errors"])
        if args.fuzz:
            rc = fuzz(url, args.fuzz_examples)
            results["fuzz_rc"] = rc
            failed |= rc != 0
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    alone = engine_alone(ckpt, min(per_round, 10.0), args.max_tokens, args.threads)
    results["engine_alone_tok_s"] = alone
    print(
        f"reference: engine alone, one request at a time, no HTTP: {alone:.0f} tok/s "
        f"(the HTTP baseline is {base_tok_s / alone:.2f}x of it)"
    )
    if 16 in results["levels"]:
        r16 = results["levels"][16]
        ok = min(r16["ratio"], r16["median_round_ratio"]) >= 4
        print(
            f"goal >= 4x at 16 clients: {'MET' if ok else 'NOT MET'} "
            f"({r16['ratio']:.2f}x overall, {r16['median_round_ratio']:.2f}x median of rounds)"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
