"""Tensors on transparent huge pages (2 MiB), for the weight copies that every decode step streams.

    from chatstack import hugepages
    w_t = hugepages.empty((768, 3072), torch.float32).copy_(w.t())   # same values, 2 MiB pages where possible

Why: a batch-1 decode step reads every weight once (GPT-2 small: ~500 MB of fp32 per token), so it runs at the
speed memory streams into the cores, and with ordinary pages that stream needs a new address translation
every 4 KiB. `python -m chatstack.hugepages` runs GPT-2 small's 49 decode matrix-vector products (the engine's
(in, out) copies) from each kind of page in alternating rounds. On the 2-vCPU Xeon this project is measured on,
huge pages were faster in all 5 runs, by a median of 1.01-1.06x (best rates e.g. 33.2 vs 30.6 GB/s). The price
is paid once per copy: GPT-2 small's Engine.prepare_weights() takes 0.61-0.85 s instead of 0.45 s, since the
kernel clears and assembles 2 MiB pages at first touch.

How: Linux backs an anonymous region with huge pages when the kernel's THP mode is `always`, or `madvise` and the
region was marked with madvise(MADV_HUGEPAGE) before it is first written. torch's CPU allocator does neither, so
`empty` over-allocates by 2 MiB, marks the 2 MiB-aligned part and returns a view that starts on it. The partly
covered tail stays on 4 KiB pages (so no huge page is half wasted) and the slack before the start is never
written, so it takes no memory.

Where it is not used, `empty` is plain torch.empty: tensors under 2 MiB, THP mode `never` or no THP (other
systems), an madvise that fails (then never tried again), or CHATSTACK_HUGEPAGES=0.
"""
from __future__ import annotations

import ctypes
import math
import os
import sys
from typing import Optional, Sequence

import torch

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14          # <sys/mman.h>, Linux
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"

_madvise = None              # libc's madvise once found; False when huge pages are off for this process


def thp_mode(path: str = _THP_ENABLED) -> Optional[str]:
    """The kernel's THP mode ("always", "madvise" or "never"), or None where there is no THP."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _get_madvise():
    global _madvise
    if _madvise is None:
        _madvise = False
        if (sys.platform.startswith("linux") and os.environ.get("CHATSTACK_HUGEPAGES", "1") != "0"
                and thp_mode() in ("always", "madvise")):
            try:
                fn = ctypes.CDLL(None, use_errno=True).madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
                _madvise = fn
            except (OSError, AttributeError):
                pass
    return _madvise


def enabled() -> bool:
    """Whether `empty` asks for huge pages in this process."""
    return bool(_get_madvise())


def empty(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor whose memory starts on a 2 MiB boundary and is marked for huge pages
    (see the module docstring for when it falls back to torch.empty). Write it before the pages matter: the
    kernel picks the page size when memory is first touched."""
    global _madvise
    shape = tuple(int(s) for s in shape)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    madvise = _get_madvise()
    if not madvise or nbytes < HUGE_PAGE:
        return torch.empty(shape, dtype=dtype)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    addr = raw.data_ptr()
    offset = -addr % HUGE_PAGE                             # bytes to the first 2 MiB boundary
    if madvise(addr + offset, nbytes // HUGE_PAGE * HUGE_PAGE, _MADV_HUGEPAGE) != 0:
        _madvise = False                                   # e.g. a kernel without THP: don't try again
        return torch.empty(shape, dtype=dtype)
    return raw[offset:offset + nbytes].view(dtype).view(shape)   # the view keeps `raw` alive


def copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of a CPU tensor, on huge pages where `empty` gives them (values, shape, dtype kept)."""
    return empty(t.shape, t.dtype).copy_(t)


def _anon_huge_mb() -> float:
    """MB of this process's anonymous memory on huge pages (Linux's /proc/self/smaps_rollup), or nan."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            return int(f.read().split("AnonHugePages:")[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        return float("nan")


def _benchmark(rounds: int = 10) -> None:
    """GPT-2 small's decode matrix-vector products from 4 KiB pages and from huge pages, alternating."""
    import statistics
    import time

    import torch.nn.functional as F

    print(f"THP mode: {thp_mode()}; huge pages in this process: {enabled()}")
    if not enabled():
        return
    torch.manual_seed(0)
    shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12 + [(768, 50257)]   # (in, out)
    weights = [torch.randn(i, o) * 0.02 for i, o in shapes]
    plain = [w.t() for w in weights]                                  # (out, in) views of (in, out) copies
    huge = [copy(w).t() for w in weights]
    nbytes = sum(w.numel() * 4 for w in weights)
    print(f"this process's memory on huge pages after the copies: {_anon_huge_mb():.0f} MB")
    xs = {i: torch.randn(1, i) for i, _ in shapes}

    def run(ws):
        t0 = time.perf_counter()
        for w in ws:
            F.linear(xs[w.size(1)], w)
        return time.perf_counter() - t0

    torch.set_grad_enabled(False)
    run(plain), run(huge)
    ratios, best = [], [float("inf")] * 2
    for _ in range(rounds):
        t = [min(run(ws) for _ in range(3)) for ws in (plain, huge)]
        best = [min(b, x) for b, x in zip(best, t)]
        ratios.append(t[0] / t[1])
    print(f"{len(shapes)} products, {nbytes / 1e6:.0f} MB, {torch.get_num_threads()} threads, best of {rounds} rounds: "
          f"4 KiB pages {nbytes / best[0] / 1e9:.1f} GB/s, huge pages {nbytes / best[1] / 1e9:.1f} GB/s; "
          f"speed-up median {statistics.median(ratios):.3f}x (range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    _benchmark()
