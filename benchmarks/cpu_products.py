"""The single products behind the engine's CPU matmul backend (chatstack/infer/cpu.py): which backend this CPU
gets, and GPT-2 small's 3072 x 768 product (12 copies cycled, as a decode step streams them) and output layer at
1, 4 and 16 rows, MKL on an (in, out) copy against a CPUWeight.

    python benchmarks/cpu_products.py
"""

import platform
import time

import torch
import torch.nn.functional as F

from chatstack.infer.cpu import CPUWeight, cpu_matmul_backend, cpu_vendor, onednn_linear_works


def best(fn, reps):
    fn()
    t = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def main():
    torch.set_grad_enabled(False)
    print(
        f"CPU vendor {cpu_vendor() or '(unknown)'}, {platform.machine()}, {torch.get_num_threads()} threads; "
        f"oneDNN linear works: {onednn_linear_works()}; backend: {cpu_matmul_backend()}"
    )
    if not onednn_linear_works():
        return
    for out, d_in, copies in ((3072, 768, 12), (50257, 768, 1)):
        ws = [torch.randn(out, d_in) for _ in range(copies)]
        b = torch.randn(out)
        mkl = [w.t().contiguous().t() for w in ws]
        ours = [CPUWeight(w, streaming=True) for w in ws]
        gb = copies * out * d_in * 4 / 1e9
        for rows in (1, 4, 16):
            x = torch.randn(rows, d_in)
            t_mkl = best(lambda: [F.linear(x, w, b) for w in mkl], 5)  # noqa: B023 (called at once)
            t_ours = best(lambda: [cw.linear(x, b) for cw in ours], 5)  # noqa: B023
            print(
                f"  {out}x{d_in}, {rows:2d} rows: MKL (in, out) {gb / t_mkl:5.1f} GB/s, CPUWeight "
                f"{gb / t_ours:5.1f} GB/s -> {t_mkl / t_ours:.2f}x"
            )


if __name__ == "__main__":
    main()
