"""The chunked linear + cross-entropy (chatstack/train/fused_loss.py) against the plain product and
F.cross_entropy, forward + backward at the tiny preset's output layer (16 x 256 rows, 128 -> 4096), interleaved.

    python benchmarks/fused_loss.py
"""

import time

import torch
import torch.nn.functional as F

from chatstack.train.fused_loss import linear_cross_entropy


def main(reps: int = 10):
    torch.manual_seed(0)
    N, C, V = 16 * 256, 128, 4096
    h = torch.randn(N, C, requires_grad=True)
    w = (torch.randn(V, C) * 0.02).requires_grad_()
    t = torch.randint(0, V, (N,))
    plain = lambda: F.cross_entropy(h @ w.t(), t).backward()
    fused = {c: (lambda c=c: linear_cross_entropy(h, w, t, c).backward()) for c in (256, 512, 1024, 2048)}
    res = {"plain": [], **{f"fused/{c}": [] for c in fused}}
    for _ in range(reps):  # interleaved, so machine load hits all variants alike
        for name, fn in [("plain", plain), *[(f"fused/{c}", f) for c, f in fused.items()]]:
            h.grad = w.grad = None
            t0 = time.perf_counter()
            fn()
            res[name].append(time.perf_counter() - t0)
    for name, ts in res.items():
        print(f"{name:12s} {sorted(ts)[len(ts) // 2] * 1e3:8.1f} ms (median)")


if __name__ == "__main__":
    main()
