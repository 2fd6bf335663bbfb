"""Which kernel runs the engine's matrix products on a CPU, and the weight copies that kernel wants.

PyTorch's CPU build hands every F.linear to MKL. MKL is tuned for Intel's CPUs; on others it takes slower code
paths. Measured on a 2-vCPU AMD EPYC (Zen 5, AVX-512), 2 threads, GPT-2 small's weights cycled as a decode
step reads them (`python -m chatstack.cpu_matmul` reruns a short version of this):

    GPT-2 3072x768 (out x in)     MKL, (in, out) copy    oneDNN, packed copy    two-chunk bmm
      1 row                       17.6 GB/s              25.5 GB/s              39.0 GB/s
      4 rows                       9.0                   36.3                   29.1
      16 rows                      6.4                   19.6                   10.1
    output layer 50257x768
      1 row                       22.0                   27.3                   32.1
      16 rows                      7.7 (26.9 ms)         25.4 (6.2 ms)           9.1
      256 rows (a prefill)        167 ms                 72 ms
    tiny preset, output layer 4096x128, 16 rows: 214 us (MKL) vs 63 us (oneDNN)

  * One row: MKL's matrix-vector product runs on one core here (the same time at 1 and 2 threads), so a
    weight that streams from memory is read at one core's bandwidth. `torch.bmm` over the weight split into
    one chunk per thread (a view, no copy) runs the chunks on all cores.
  * Two rows and more: oneDNN's JIT kernels (chosen by instruction set, not by vendor) on a weight packed once
    into its blocked layout run 2-4x faster than MKL from 2 to 256 rows.
  * Small weights (under 1 MiB) at few rows: oneDNN's ~20 us per call costs more than the product, so they keep
    the engine's usual MKL path on an (in, out) copy (tiny preset 384x128, 1 row: 5.2 vs 20 us), up to 32 rows.

So `cpu_matmul_backend()` is "onednn" on x86 CPUs that are not Intel's (when torch has oneDNN), and "mkl"
otherwise: on Intel CPUs the engine keeps the MKL path its earlier measurements chose. `CHATSTACK_CPU_MATMUL`
= auto | mkl | onednn overrides it. The engine (chatstack.engine) binds a `CPUWeight` as each Linear's
fast_weight under "onednn"; the results equal F.linear's to float rounding (different summation order).

    python -m chatstack.cpu_matmul          # which backend this CPU gets, and a quick timing of each kernel
"""
from __future__ import annotations

import functools
import os
import platform
import warnings

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "mkl", "onednn")
SMALL_BYTES = 1 << 20      # weights below this keep MKL (from an (in, out) copy) at few rows
SMALL_MAX_ROWS = 32        # ... up to this many rows; from here oneDNN is faster for them too
PACK_ROWS = 16             # the row count oneDNN packs for (measured: as fast as packing per row count, 1-256)


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
    except Exception:   # an older or differently built torch: stay with MKL
        return False


def cpu_matmul_backend(choice: str | None = None) -> str:
    """"onednn" or "mkl": the kernel family for the engine's CPU products. choice (default: the
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
    (and chatstack.decode_step) call `linear(x, bias)` when the engine binds one as its fast_weight.

    weight: the Linear's (out, in) parameter (kept by reference: the one-row path reads it). streaming: the
    model's weights don't fit in the caches (the engine decides), so a one-row product is bound by memory
    bandwidth and is split over the threads."""

    __slots__ = ("w", "t", "packed", "chunks", "main", "small")

    def __init__(self, weight: torch.Tensor, streaming: bool, threads: int | None = None):
        w = weight.detach()
        self.w = w
        out, d_in = w.shape
        self.small = w.numel() * w.element_size() < SMALL_BYTES
        # MKL's path for one row of a weight that stays in cache and for small weights at few rows
        self.t = w.t().contiguous().t() if self.small or not streaming else None   # (out, in) view of (in, out)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)
        n = threads or torch.get_num_threads()
        self.chunks = self.main = None
        if streaming and not self.small and n > 1 and out >= 2 * n:
            self.main = out - out % n
            self.chunks = w[:self.main].view(n, self.main // n, d_in)       # (n, out // n, in): a view
        # (bmm runs one chunk per thread; rows past the last whole chunk, fewer than n, are one small product)

    def linear(self, x: torch.Tensor, bias) -> torch.Tensor:
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

    def _one_row(self, x: torch.Tensor, bias) -> torch.Tensor:
        out = self.w.size(0)
        n, c, d_in = self.chunks.shape
        x1 = x.reshape(1, d_in)
        y = torch.empty(1, out, dtype=x.dtype, device=x.device)
        torch.bmm(self.chunks, x1.t().unsqueeze(0).expand(n, d_in, 1), out=y[0, :self.main].view(n, c, 1))
        if self.main < out:
            y[:, self.main:] = F.linear(x1, self.w[self.main:])
        if bias is not None:
            y += bias
        return y.view(*x.shape[:-1], out)


def _main():
    import time

    torch.set_grad_enabled(False)
    print(f"CPU vendor {cpu_vendor() or '(unknown)'}, {platform.machine()}, {torch.get_num_threads()} threads; "
          f"oneDNN linear works: {onednn_linear_works()}; backend: {cpu_matmul_backend()}")
    if not onednn_linear_works():
        return

    def best(fn, reps):
        fn()
        t = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            t = min(t, time.perf_counter() - t0)
        return t

    # GPT-2 small's 3072 x 768 product, 12 copies cycled (as a decode step streams them), and its output layer
    for out, d_in, copies in ((3072, 768, 12), (50257, 768, 1)):
        ws = [torch.randn(out, d_in) for _ in range(copies)]
        b = torch.randn(out)
        mkl = [w.t().contiguous().t() for w in ws]
        ours = [CPUWeight(w, streaming=True) for w in ws]
        gb = copies * out * d_in * 4 / 1e9
        for rows in (1, 4, 16):
            x = torch.randn(rows, d_in)
            t_mkl = best(lambda: [F.linear(x, w, b) for w in mkl], 5)
            t_ours = best(lambda: [cw.linear(x, b) for cw in ours], 5)
            print(f"  {out}x{d_in}, {rows:2d} rows: MKL (in, out) {gb / t_mkl:5.1f} GB/s, CPUWeight "
                  f"{gb / t_ours:5.1f} GB/s -> {t_mkl / t_ours:.2f}x")


if __name__ == "__main__":
    _main()
