"""Platform-specific CPU code, in one place: which kernel runs the engine's matrix products (and the weight
copies it wants), whether the CPU has AMX for bf16 training, and the allocator settings training runs with.

  * `cpu_matmul_backend()`: "onednn" on x86 CPUs that are not Intel's (MKL takes slower code paths there: its
    one-row product runs on one core and its few-row products run 2-4x slower than oneDNN's on a packed weight),
    "mkl" elsewhere. `CHATSTACK_CPU_MATMUL` = auto | mkl | onednn overrides it.
  * `CPUWeight`: what the engine (chatstack.infer.engine) binds as a Linear's fast_weight under "onednn": a
    oneDNN-packed copy for 2+ rows; for one row of a weight that streams from memory, `torch.bmm` over the weight
    split into one chunk per thread; small weights at few rows keep an (in, out) copy. Results equal F.linear's
    to float rounding.
  * `cpu_has_amx()`: bf16 matrix instructions (the training loop's --dtype auto uses bf16 matmuls only with AMX).
  * `tune_malloc()`: glibc malloc thresholds that keep freed activations in the heap (called by the loop).
  * `zeros_unpooled()`, `release_free_memory()`, `available_memory_bytes()`: the engine's KV cache memory (pages
    of its own, resident when written, returned on free) and its default budget.
  * `apply_thread_policy()`: torch's thread count capped at the CPUs this process may use and idle, with OpenMP
    threads that spin only briefly before they sleep (GOMP_SPINCOUNT, set in chatstack/__init__.py), so speed on a
    busy machine falls in proportion to the CPU share instead of collapsing (called by the engine and the training
    loop).

Measured by benchmarks/cpu_matmul.py and benchmarks/train_throughput.py; numbers in docs/benchmarks.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
import platform
import time
import warnings

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "mkl", "onednn")
SMALL_BYTES = 1 << 20  # weights below this keep MKL (from an (in, out) copy) at few rows
SMALL_MAX_ROWS = 32  # ... up to this many rows; from here oneDNN is faster for them too
PACK_ROWS = 16  # the row count oneDNN packs for (measured: as fast as packing per row count, 1-256)


@functools.lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """The CPU's vendor string ("GenuineIntel", "AuthenticAMD", ...), or "" where it can't be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.lru_cache(maxsize=1)
def onednn_linear_works() -> bool:
    """torch has oneDNN's linear ops and they give F.linear's result (checked once on a small product)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        w, x = torch.randn(48, 32), torch.randn(3, 32)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.allclose(y, F.linear(x, w), atol=1e-5))
    except Exception:  # an older or differently built torch: stay with MKL
        return False


@functools.lru_cache(maxsize=1)
def onednn_bf16_linear_works() -> bool:
    """oneDNN's linear also packs bf16 weights: it needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT, so an AVX2-only CPU
    (AMD Zen 3, say) has fp32 packing but not this."""
    if not onednn_linear_works():
        return False
    try:
        w, x = torch.randn(48, 32).bfloat16(), torch.randn(3, 32).bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.allclose(y.float(), F.linear(x, w).float(), atol=1e-2, rtol=1e-2))
    except Exception:  # "bf16 path needs the cpu support ...": F.linear on bf16 tensors instead
        return False


def cpu_matmul_backend(choice: str | None = None) -> str:
    """ "onednn" or "mkl": the kernel family for the engine's CPU products. choice (default: the
    CHATSTACK_CPU_MATMUL environment variable, else "auto"): auto = oneDNN on x86 CPUs that are not Intel's."""
    choice = (choice if choice is not None else os.environ.get("CHATSTACK_CPU_MATMUL", "auto")).strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"CHATSTACK_CPU_MATMUL={choice!r}: choose one of {', '.join(BACKENDS)}")
    if choice == "mkl":
        return "mkl"
    if not onednn_linear_works():
        if choice == "onednn":
            warnings.warn("CHATSTACK_CPU_MATMUL=onednn, but this torch has no working oneDNN linear; using MKL")
        return "mkl"
    if choice == "onednn":
        return "onednn"
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return "onednn" if x86 and cpu_vendor() not in ("GenuineIntel", "") else "mkl"


class CPUWeight:
    """One Linear's weight as the engine's CPU products want it under the "onednn" backend; chatstack.model.Linear
    (and chatstack.infer.decode_step) call `linear(x, bias)` when the engine binds one as its fast_weight.

    weight: the Linear's (out, in) parameter (kept by reference: the one-row path reads it). streaming: the
    model's weights don't fit in the caches (the engine decides), so a one-row product is bound by memory
    bandwidth and is split over the threads."""

    __slots__ = ("w", "t", "packed", "chunks", "main", "small")

    def __init__(self, weight: torch.Tensor, streaming: bool, threads: int | None = None) -> None:
        w = weight.detach()
        self.w = w
        out, d_in = w.shape
        self.small = w.numel() * w.element_size() < SMALL_BYTES
        # MKL's path for one row of a weight that stays in cache and for small weights at few rows
        self.t = w.t().contiguous().t() if self.small or not streaming else None  # (out, in) view of (in, out)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)
        n = threads or torch.get_num_threads()
        self.chunks = self.main = None
        if streaming and not self.small and n > 1 and out >= 2 * n:
            self.main = out - out % n
            self.chunks = w[: self.main].view(n, self.main // n, d_in)  # (n, out // n, in): a view
        # (bmm runs one chunk per thread; rows past the last whole chunk, fewer than n, are one small product)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        d_in = x.size(-1)
        rows = x.numel() // d_in
        if rows == 1:
            if self.chunks is not None:
                return self._one_row(x, bias)
            if self.t is not None:
                return F.linear(x, self.t, bias)
        elif self.small and rows < SMALL_MAX_ROWS:
            return F.linear(x, self.t, bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")

    def _one_row(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = self.w.size(0)
        n, c, d_in = self.chunks.shape
        x1 = x.reshape(1, d_in)
        y = torch.empty(1, out, dtype=x.dtype, device=x.device)
        torch.bmm(self.chunks, x1.t().unsqueeze(0).expand(n, d_in, 1), out=y[0, : self.main].view(n, c, 1))
        if self.main < out:
            y[:, self.main :] = F.linear(x1, self.w[self.main :])
        if bias is not None:
            y += bias
        return y.view(*x.shape[:-1], out)


# ---- training precision: AMX


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (bf16 matrix instructions): Intel Sapphire Rapids and later."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # an older torch without the probe
        return False


# ---- the allocator


# glibc malloc: the default trims and mmaps large blocks eagerly, so every training step page-faults its
# activations back in. Raising the thresholds keeps freed memory in the heap. Measured by
# benchmarks/train_throughput.py --malloc both (docs/benchmarks.md).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def tune_malloc() -> bool:
    """Apply the allocator settings through mallopt (glibc only). Returns True if applied.

    Same effect as MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824
    in the environment, but works from inside an already-running process (for allocations from now on).
    Set CHATSTACK_NO_MALLOC_TUNING=1 to skip it.
    """
    if os.environ.get("CHATSTACK_NO_MALLOC_TUNING") == "1":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS): nothing to do
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # int: the largest value mallopt takes (~2 GiB)
    ok &= mallopt(_M_TOP_PAD, 1024 * 1024 * 1024)
    return bool(ok)


# ---- memory: the engine's KV budget and giving freed memory back


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), or None where it can't be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to trim
        return None


def release_free_memory() -> bool:
    """Return freed heap memory to the OS (glibc's malloc_trim). glibc keeps freed blocks below its mmap threshold
    (which grows to 32 MB as large blocks are freed, and tune_malloc raises) in its heaps, so without this a
    server's resident size stays at its peak after its KV cache shrinks. False where there is no glibc."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


UNPOOLED_MIN_BYTES = 1 << 20  # smaller tensors come from malloc as usual


def zeros_unpooled(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero CPU tensor in pages of its own (an anonymous mmap), for the engine's KV cache: its pages become resident
    only when written, and all of them go back to the OS when the tensor is freed. From malloc, blocks of a few MB
    (a layer of a KV cache) land in glibc's heaps (its mmap threshold grows to 32 MB), where re-sizing the cache
    leaves holes that a larger block can't reuse: measured, a server with a 256 MB KV budget peaked 612 MB above its
    idle size. Tensors under UNPOOLED_MIN_BYTES come from torch.zeros."""
    n = 1
    for d in shape:
        n *= d
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    if nbytes < UNPOOLED_MIN_BYTES:
        return torch.zeros(shape, dtype=dtype)
    # the tensor keeps the mmap object alive; when the tensor goes, the mapping is unmapped
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype, count=n).view(shape)


# ---- threads: speed in proportion to the CPU share on a busy machine
#
# torch runs each op's parallel region on its OpenMP threads and waits at a barrier for all of them. When other
# processes keep the cores busy, one of the threads is often descheduled, and each of the hundreds of regions in a
# step waits a scheduler time slice for it: measured on a 2-core host at load average 16-31
# (`python benchmarks/contention.py`, docs/benchmarks.md), a SmolLM2-135M engine step took 3.8 s with torch's 2
# threads and 0.23 s with one. GNU OpenMP's default wait also spins (300,000 rounds) before it sleeps, burning the
# core the late thread needs; chatstack/__init__.py bounds the spin to 10,000 rounds (GOMP_SPINCOUNT) before torch
# loads, unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set or CHATSTACK_THREAD_POLICY=0: sleeping at once
# (OMP_WAIT_POLICY=PASSIVE) misses the next op and halved one-stream decode on an idle machine.
# apply_thread_policy() then runs as many threads as there are idle CPUs: the CPUs this
# process may use (affinity, cgroup quota) minus what other processes use of them right now. "Right now" is
# measured from /proc/stat over a short window (or since the previous look), less this process's own CPU time:
# the 1-minute load average lags by a minute, so a stage started just after another (the speedrun's pretraining
# after its data stage) saw the finished stage's load and ran on one thread of an idle 2-core machine. Processes
# at a higher nice value than ours yield their CPU to us and are not counted. Where /proc/stat is missing, the
# load average (less this process's own busy threads) stands in. The engine re-applies it every
# THREAD_POLICY_INTERVAL_S of stepping, so a server follows the machine's load; the training loop applies it at
# start-up.

THREAD_POLICY_INTERVAL_S = 30.0
LOAD_WINDOW_S = 0.25  # the shortest window a fresh look at /proc/stat measures over
_max_threads: int | None = None  # torch's count when the policy first ran: the most it ever sets
_last_look: tuple[float, float, float] | None = None  # (monotonic time, others' busy CPU-s, own CPU-s) at the last look


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (containers) if one is set."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def busy_cpu_seconds(stat_line: str | None = None, count_niced: bool | None = None) -> float | None:
    """CPU-seconds the whole machine has spent busy since boot, from the "cpu" line of /proc/stat (None where there
    is none). The "nice" column (processes at a positive nice value) counts only when this process is niced
    itself: at nice 0 they yield their CPU to us."""
    if stat_line is None:
        try:
            with open("/proc/stat") as f:
                stat_line = f.readline()
        except OSError:
            return None
    parts = stat_line.split()
    if len(parts) < 9 or parts[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (float(x) for x in parts[1:9])
    if count_niced is None:
        count_niced = os.getpriority(os.PRIO_PROCESS, 0) > 0
    busy = user + system + irq + softirq + steal + (nice if count_niced else 0.0)
    return busy / os.sysconf("SC_CLK_TCK")


def others_load(window_s: float = LOAD_WINDOW_S) -> float | None:
    """CPUs' worth of work other processes are doing now: the machine's busy CPU-time less this process's own,
    per second, since the previous look if that was between `window_s` and 60 s ago, else over a fresh
    `window_s` (this call then sleeps that long). None where /proc/stat is missing."""
    global _last_look

    def look() -> tuple[float, float, float] | None:
        busy = busy_cpu_seconds()
        return None if busy is None else (time.monotonic(), busy, time.process_time())

    now = look()
    if now is None:
        return None
    prev = _last_look
    if prev is None or not window_s <= now[0] - prev[0] <= 60.0:
        prev = now
        time.sleep(window_s)
        now = look()
        if now is None:
            return None
    _last_look = now
    dt = now[0] - prev[0]
    # our own CPU time shows in the nice column when we are niced: it is counted there, so subtract it either way
    return max(0.0, ((now[1] - prev[1]) - (now[2] - prev[2])) / max(dt, 1e-6))


def idle_cpus(own_busy_threads: float = 0.0) -> float:
    """CPUs not used by other processes: available_cpus() minus their current load (others_load); without
    /proc/stat, minus the 1-minute load average, of which `own_busy_threads` is this process's own share."""
    n = available_cpus()
    others = others_load()
    if others is None:
        try:
            others = max(0.0, os.getloadavg()[0] - own_busy_threads)
        except (AttributeError, OSError):
            return float(n)
    return max(0.0, n - others)


def apply_thread_policy(threads: int | None = None, own_busy_threads: float = 0.0) -> int:
    """Set torch's intra-op threads: `threads`, else $CHATSTACK_THREADS, else the idle CPUs (rounded, at least 1)
    capped at torch's count when this first ran (so an explicit torch.set_num_threads(1) before it stays). Called
    when the engine and the training loop start, and by the engine as it runs. Returns the count.
    CHATSTACK_THREAD_POLICY=0 leaves torch as it is."""
    global _max_threads
    if os.environ.get("CHATSTACK_THREAD_POLICY") == "0":
        return torch.get_num_threads()
    if threads is None and os.environ.get("CHATSTACK_THREADS", "").strip():
        try:
            threads = int(os.environ["CHATSTACK_THREADS"])
        except ValueError:
            raise ValueError(f"CHATSTACK_THREADS={os.environ['CHATSTACK_THREADS']!r}: expected an integer") from None
    if not threads:
        if _max_threads is None:
            _max_threads = min(torch.get_num_threads(), available_cpus())
        threads = max(1, min(_max_threads, int(idle_cpus(own_busy_threads) + 0.5)))
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads


def thread_policy_summary() -> str:
    """One line for logs: threads, CPUs available, the load, and the OpenMP wait policy in force."""
    wait = os.environ.get("OMP_WAIT_POLICY") or (
        f"unset, GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}" if os.environ.get("GOMP_SPINCOUNT") else "unset"
    )
    try:
        load = f"load average {os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):
        load = "load unknown"
    return f"{torch.get_num_threads()} threads on {available_cpus()} available CPUs ({load}), OMP_WAIT_POLICY={wait}"
