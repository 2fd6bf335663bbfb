"""Speed under CPU contention: an engine step and a training step, alone and next to busy processes.

    python benchmarks/contention.py                     # 2 competing busy processes, 2 rounds, 4 s per measurement
    python benchmarks/contention.py --busy 4 --rounds 3 --seconds 6

Each measurement is a fresh process (the OpenMP wait policy is fixed when torch loads) timing one workload for
--seconds and printing its median step:
  * engine: one decode step of one row through chatstack.infer.engine on a SmolLM2-135M-shaped model (random
    weights, 30 layers x 576, 64 cached positions);
  * train: one forward + backward + AdamW step of the `tiny` preset (4 x 128) on 8 x 256 tokens.
Three thread policies:
  * torch defaults: CHATSTACK_THREAD_POLICY=0 and OMP_WAIT_POLICY unset (GNU OpenMP spins before it sleeps), all
    of torch's threads;
  * all CPUs, passive waits: OMP_WAIT_POLICY=PASSIVE (threads sleep at once when they wait), one thread per CPU;
  * chatstack's policy: what the engine and the training loop apply (chatstack/infer/cpu.py: a spin bounded to
    GOMP_SPINCOUNT=10000 rounds, set by the `chatstack` package, and as many threads as CPUs are idle given the
    other processes' load: 1 on a loaded machine).
"busy" runs --busy processes spinning in Python beside it. The ratio busy/idle is the slowdown; with T threads
and K busy processes on N CPUs a fair scheduler leaves this process T/(T+K) of the machine, so speed in
proportion to the CPU share means a ratio near (T+K)/N for T <= N (2.0 for 2 threads, 2 busy, 2 CPUs).
On a machine that other jobs already load, "idle" is not idle: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def child(workload: str, seconds: float) -> None:
    # the parent never loads torch: each child's environment decides its policy
    import chatstack  # noqa: F401, I001, PLC0415 (first: it sets the OpenMP spin count before torch loads)
    import torch  # noqa: PLC0415
    from chatstack.model import GPT  # noqa: PLC0415
    from chatstack.presets import get_preset  # noqa: PLC0415

    torch.manual_seed(0)
    if workload == "engine":
        from chatstack.infer.engine import Engine, SamplingParams  # noqa: PLC0415

        class Tok:  # the engine needs token bytes for its text; ids are random here
            vocab_size = 49152
            eot_id = im_end_id = None

            def token_bytes(self, t):
                return b"a"

        model = GPT(get_preset("smollm2-135m")).eval()
        eng = Engine(model, Tok(), max_batch_size=4, kv_cache_mb=512)
        eng.add_request(list(range(1, 65)), SamplingParams(max_new_tokens=100_000, temperature=0, stop_token_ids=[]))
        eng.step()
        step = eng.step
    else:
        from chatstack.infer.cpu import apply_thread_policy  # noqa: PLC0415

        apply_thread_policy()  # as the training loop does at start-up
        model = GPT(get_preset("tiny")).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        idx = torch.randint(0, model.config.vocab_size, (8, 256))

        def step():
            _, loss = model(idx, idx)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    print(f"{statistics.median(times) * 1e3:.3f} {torch.get_num_threads()}")


def measure(workload: str, policy: str, seconds: float) -> tuple[float, int]:
    env = dict(os.environ)
    env.pop("CHATSTACK_THREADS", None)
    env.pop("GOMP_SPINCOUNT", None)
    if policy == "torch":
        env.pop("OMP_WAIT_POLICY", None)
        env["CHATSTACK_THREAD_POLICY"] = "0"
    else:
        env.pop("CHATSTACK_THREAD_POLICY", None)
        if policy == "passive":  # every CPU, threads that sleep as soon as they wait
            env["OMP_WAIT_POLICY"] = "PASSIVE"
            env["CHATSTACK_THREADS"] = str(len(os.sched_getaffinity(0)))
        else:
            env.pop("OMP_WAIT_POLICY", None)
    out = subprocess.run(
        [sys.executable, __file__, "--child", workload, "--seconds", str(seconds)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    ms, threads = out.stdout.split()[-2:]
    return float(ms), int(threads)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--busy", type=int, default=2, help="competing busy processes")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    ap.add_argument("--workloads", nargs="+", default=["engine", "train"], choices=["engine", "train"])
    ap.add_argument("--child", choices=["engine", "train"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.seconds)
        return 0
    policies = ["torch", "passive", "chatstack"]
    res: dict[tuple, list[float]] = {}
    threads: dict[tuple, int] = {}
    loads = []
    for r in range(a.rounds):
        for cond in ("idle", "busy"):
            hogs = []
            if cond == "busy":
                hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.busy)]
                time.sleep(0.5)
            try:
                for w in a.workloads:
                    for p in policies:
                        ms, t = measure(w, p, a.seconds)
                        res.setdefault((w, p, cond), []).append(ms)
                        threads[(w, p)] = t
                        loads.append(os.getloadavg()[0])
                        print(f"round {r + 1} {cond:4} {w:6} {p:9} {ms:9.2f} ms", file=sys.stderr)
            finally:
                for h in hogs:
                    h.kill()
                    h.wait()
    n = len(os.sched_getaffinity(0))
    print(
        f"\n{n} CPUs; {a.busy} busy processes; load average during the run {min(loads):.1f}-{max(loads):.1f} "
        f"(other jobs included); median over {a.rounds} rounds of each measurement's median step"
    )
    print("| workload | policy | threads | idle ms | busy ms | busy/idle | fair-share ratio |")
    print("|---|---|---|---|---|---|---|")
    for w in a.workloads:
        for p in policies:
            idle = statistics.median(res[(w, p, "idle")])
            busy = statistics.median(res[(w, p, "busy")])
            t = threads[(w, p)]
            fair = (t + a.busy) / n if t <= n else float("nan")
            name = {"torch": "torch defaults", "passive": "all CPUs, passive waits", "chatstack": "chatstack's policy"}[
                p
            ]
            print(f"| {w} | {name} | {t} | {idle:.1f} | {busy:.1f} | {busy / idle:.2f} | {fair:.1f} |")
    for w in a.workloads:
        tb = statistics.median(res[(w, "torch", "busy")])
        cb = statistics.median(res[(w, "chatstack", "busy")])
        pb = statistics.median(res[(w, "passive", "busy")])
        print(
            f"{w}, busy: chatstack's policy {tb / cb:.2f}x torch's defaults' speed; passive waits alone {tb / pb:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
