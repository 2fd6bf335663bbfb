"""Does anything block the server's event loop? /health latency while rankings are submitted and streams run.

    python benchmarks/serve_health.py                              # tiny model, 25 MB rankings file, 20 s
    python benchmarks/serve_health.py --checkpoint runs/smollm2 --streams 16 --submitters 4 --duration 30

It starts one `chatstack serve` process with --rankings pointing at a file pre-filled to --rankings-mb, runs
--streams streaming chat clients (max_tokens 64, back to back) and --submitters clients posting rankings back to
back (each one appended and fsynced), and meanwhile asks /health every 50 ms. Prints /health p50 / p99 / max
first with the streams alone, then with the submitters too, and how many rankings were written.
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


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def streams(c: httpx.AsyncClient, url: str, model: str, stop: asyncio.Event, n: dict) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 64,
        "stream": True,
        "temperature": 1.0,
    }
    while not stop.is_set():
        async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            async for _ in r.aiter_lines():
                pass
        n["streams"] += 1


async def submitter(c: httpx.AsyncClient, url: str, k: int, stop: asyncio.Event, n: dict) -> None:
    i = 0
    while not stop.is_set():
        body = {"prompt": [{"role": "user", "content": f"q{k}"}], "responses": [f"a{k}-{i}", f"b{k}-{i}"]}
        r = await c.post(url + "/rank/api/submit", json=body)
        n["submits" if r.status_code == 200 else "errors"] += 1
        i += 1


async def phase(url: str, model: str, n_streams: int, n_sub: int, seconds: float) -> tuple[list[float], dict]:
    stop, n = asyncio.Event(), {"streams": 0, "submits": 0, "errors": 0}
    lat = []
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n_streams + n_sub + 4)) as c:
        tasks = [asyncio.create_task(streams(c, url, model, stop, n)) for _ in range(n_streams)]
        tasks += [asyncio.create_task(submitter(c, url, k, stop, n)) for k in range(n_sub)]
        await asyncio.sleep(1.0)
        end = time.perf_counter() + seconds
        async with httpx.AsyncClient(timeout=30) as h:  # its own connection: not queued behind the others
            while time.perf_counter() < end:
                t = time.perf_counter()
                await h.get(url + "/health")
                lat.append(time.perf_counter() - t)
                await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return lat, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="default: a tiny random-weight model")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--submitters", type=int, default=4)
    ap.add_argument("--rankings-mb", type=float, default=25)
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--port", type=int, default=8433)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="serve_health_"))
    ckpt = a.checkpoint
    if ckpt is None:
        from chatstack.serve.testing import make_tiny_checkpoint  # noqa: PLC0415 (only without --checkpoint)

        ckpt = make_tiny_checkpoint(tmp / "tiny-chat", preset="tiny")
    rankings = tmp / "rankings.jsonl"
    line = json.dumps({"prompt": [{"role": "user", "content": "x" * 200}], "responses": ["a" * 200, "b" * 200]}) + "\n"
    with open(rankings, "w") as f:
        f.write(line * int(a.rankings_mb * 2**20 / len(line)))
    cmd = [
        sys.executable,
        "-m",
        "chatstack.cli",
        "serve",
        ckpt,
        "--port",
        str(a.port),
        "--rankings",
        str(rankings),
        "--log-level",
        "warning",
        "--threads",
        str(a.threads),
        "--max-queue",
        "1024",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{a.port}"
    try:
        model = wait_ready(proc, url)
        rows = []
        for label, n_sub in (("streams only", 0), ("streams + submitters", a.submitters)):
            lat, n = asyncio.run(phase(url, model, a.streams, n_sub, a.duration))
            rows.append((label, lat, n))
    finally:
        proc.terminate()
        proc.wait(10)
    size = os.path.getsize(rankings) / 2**20
    print(
        f"/health every 50 ms for {a.duration:.0f} s; {a.streams} streams (max_tokens 64); rankings file "
        f"{a.rankings_mb:.0f} -> {size:.1f} MB; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print("| phase | /health p50 ms | p99 ms | max ms | streams done | rankings written | errors |")
    print("|---|---|---|---|---|---|---|")
    for label, lat, n in rows:
        ms = [x * 1e3 for x in lat]
        print(
            f"| {label} | {statistics.median(ms):.1f} | {pct(ms, 0.99):.1f} | {max(ms):.1f} | {n['streams']} | "
            f"{n['submits']} | {n['errors']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
