"""Does anything block the server's event loop? /health latency while rankings are submitted and streams run.

    python benchmarks/serve_health.py                              # tiny model, 25 MB rankings file, 20 s a phase
    python benchmarks/serve_health.py --checkpoint runs/smollm2 --streams 16 --submitters 4 --duration 30
    python benchmarks/serve_health.py --only-both --long-prompt-kb 256  # + a client sending 256 KB prompts

It starts one `chatstack serve` process with --rankings pointing at a file pre-filled to --rankings-mb, runs
--streams streaming chat clients (max_tokens 64, back to back) and --submitters clients posting rankings back to
back (each one appended and fsynced), and meanwhile a separate probe process asks /health every 50 ms on a
keep-alive connection of its own (in its own process, so the clients' parsing of 16 streams never delays the probe's
clock). Prints /health p50 / p95 / p99 / max first with the streams alone, then with the submitters too, with the
server's own event-loop lag (chatstack_event_loop_lag_seconds: how late a 10 ms timer fires on its loop), how many
streams and rankings finished, and the load average before and after. With --long-prompt-kb, a third phase adds
one client posting chat requests with a prompt that long, back to back (the server reads it, then refuses it: it is
longer than the context), which blocked the event loop while the prompt was tokenized on it.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing as mp
import os
import re
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


def probe(port: int, seconds: float, interval: float, out) -> None:
    """GET /health every `interval` s for `seconds` s on one keep-alive connection; sends the latencies (s)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    lat, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        conn.request("GET", "/health")
        r = conn.getresponse()
        r.read()
        lat.append(time.perf_counter() - t)
        if r.status != 200:
            lat[-1] = float("inf")
        time.sleep(interval)
    conn.close()
    out.send(lat)


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
            async for _ in r.aiter_raw():
                pass
        n["streams"] += 1


async def submitter(c: httpx.AsyncClient, url: str, k: int, stop: asyncio.Event, n: dict) -> None:
    i = 0
    while not stop.is_set():
        body = {"prompt": [{"role": "user", "content": f"q{k}"}], "responses": [f"a{k}-{i}", f"b{k}-{i}"]}
        r = await c.post(url + "/rank/api/submit", json=body)
        n["submits" if r.status_code == 200 else "errors"] += 1
        i += 1


def loop_lag(url: str) -> dict[float, int]:
    """The server's chatstack_event_loop_lag_seconds histogram: {bucket bound: cumulative count}."""
    text = httpx.get(url + "/metrics", timeout=30).text
    out = {}
    for m in re.finditer(r'chatstack_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\d+)', text):
        out[float(m.group(1))] = int(m.group(2))
    return out


def lag_quantile(before: dict, after: dict, q: float) -> str:
    """The bucket bound holding quantile q of the lags observed between two scrapes, as '<= X ms'."""
    if not after:
        return "-"
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0) for b in bounds]
    total = counts[-1]
    if not total:
        return "-"
    for b, c in zip(bounds, counts):
        if c >= q * total:
            return f"<= {b * 1e3:g}" if b != float("inf") else f"> {bounds[-2] * 1e3:g}"
    return "-"


async def long_prompts(c: httpx.AsyncClient, url: str, model: str, kb: float, stop: asyncio.Event, n: dict) -> None:
    words = "lorem ipsum dolor sit amet " * int(kb * 1024 / 27 + 1)
    body = {"model": model, "messages": [{"role": "user", "content": words[: int(kb * 1024)]}], "max_tokens": 8}
    while not stop.is_set():
        r = await c.post(url + "/v1/chat/completions", json=body)
        n["long"] += 1
        n["errors"] += r.status_code >= 500


async def load(
    url: str, model: str, n_streams: int, n_sub: int, stop: asyncio.Event, n: dict, long_kb: float = 0
) -> None:
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n_streams + n_sub + 4)) as c:
        tasks = [asyncio.create_task(streams(c, url, model, stop, n)) for _ in range(n_streams)]
        tasks += [asyncio.create_task(submitter(c, url, k, stop, n)) for k in range(n_sub)]
        if long_kb:
            tasks.append(asyncio.create_task(long_prompts(c, url, model, long_kb, stop, n)))
        await stop.wait()
        await asyncio.gather(*tasks, return_exceptions=True)


async def phase(url: str, port: int, model: str, n_streams: int, n_sub: int, seconds: float, long_kb: float = 0):
    stop, n = asyncio.Event(), {"streams": 0, "submits": 0, "errors": 0, "long": 0}
    task = asyncio.create_task(load(url, model, n_streams, n_sub, stop, n, long_kb))
    await asyncio.sleep(1.0)  # the streams are running
    lag0 = await asyncio.to_thread(loop_lag, url)
    recv, send = mp.Pipe(duplex=False)
    p = mp.get_context("spawn").Process(target=probe, args=(port, seconds, 0.05, send))
    p.start()
    lat = await asyncio.to_thread(recv.recv)
    await asyncio.to_thread(p.join)
    lag1 = await asyncio.to_thread(loop_lag, url)
    stop.set()
    await task
    return lat, n, (lag0, lag1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="default: a tiny random-weight model")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--submitters", type=int, default=4)
    ap.add_argument("--rankings-mb", type=float, default=25)
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--port", type=int, default=8433)
    ap.add_argument("--only-both", action="store_true", help="skip the streams-only phase")
    ap.add_argument("--long-prompt-kb", type=float, default=0, help="add a phase with a client sending such prompts")
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
    cmd = [sys.executable, "-m", "chatstack.cli", "serve", ckpt, "--port", str(a.port), "--rankings", str(rankings)]
    cmd += ["--log-level", "warning", "--threads", str(a.threads), "--max-queue", "1024"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{a.port}"
    load0 = os.getloadavg()
    try:
        model = wait_ready(proc, url)
        rows = []
        phases = [("streams + submitters", a.submitters, 0)]
        if not a.only_both:
            phases.insert(0, ("streams only", 0, 0))
        if a.long_prompt_kb:
            phases.append((f"streams + submitters + {a.long_prompt_kb:g} KB prompts", a.submitters, a.long_prompt_kb))
        for label, n_sub, kb in phases:
            lat, n, lags = asyncio.run(phase(url, a.port, model, a.streams, n_sub, a.duration, kb))
            rows.append((label, lat, n, lags))
    finally:
        proc.terminate()
        proc.wait(10)
    size = os.path.getsize(rankings) / 2**20
    load1 = os.getloadavg()
    print(
        f"/health every 50 ms for {a.duration:.0f} s from its own process; {a.streams} streams (max_tokens 64) on "
        f"{a.checkpoint or 'a tiny random-weight model'}; rankings file {a.rankings_mb:.0f} -> {size:.1f} MB; "
        f"{os.cpu_count()} CPUs, nice {os.nice(0)}, load average {load0[0]:.1f} before, {load1[0]:.1f} after"
    )
    print(
        "| phase | /health p50 ms | p95 ms | p99 ms | max ms | loop lag p99 ms | streams done | rankings written "
        "| long prompts read | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, lat, n, (lag0, lag1) in rows:
        ms = [x * 1e3 for x in lat]
        print(
            f"| {label} | {statistics.median(ms):.1f} | {pct(ms, 0.95):.1f} | {pct(ms, 0.99):.1f} | {max(ms):.1f} | "
            f"{lag_quantile(lag0, lag1, 0.99)} | {n['streams']} | {n['submits']} | {n['long']} | {n['errors']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
