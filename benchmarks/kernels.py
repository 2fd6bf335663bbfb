"""The fused tanh-GELU (chatstack/kernels.py) against aten's: the kernel alone, then a whole tiny-preset
training step (B=16, T=256, AdamW) with and without it, in interleaved rounds.

    python benchmarks/kernels.py
"""

import os
import statistics
import time

import torch

from chatstack import kernels as K
from chatstack.model import cpu_bf16_matmuls
from chatstack.presets import get_preset
from chatstack.stages.pretrain import PretrainGPT
from chatstack.train.optim import build_adamw


def main(reps: int = 50, rounds: int = 10) -> None:
    """The kernel alone against aten, then a whole tiny-preset training step (B=16, T=256, AdamW) with and
    without it, interleaved rounds of 3 steps, in fp32 and (with AMX) in bf16-matmul mode."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    x = torch.randn(4096, 512)
    g = torch.randn_like(x)

    def t(f):
        for _ in range(5):
            f()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2] * 1e3

    def fwd(xd):
        return K._run("gelu_fwd", K._gelu_fwd, K._aten_gelu, xd)

    def bwd(gd, xd):
        return K._run("gelu_bwd", K._gelu_bwd, K._aten_gelu_bwd, gd, xd)

    for dtype in (torch.float32, torch.bfloat16):
        xd, gd = x.to(dtype), g.to(dtype)
        t0 = time.perf_counter()
        fwd(xd), bwd(gd, xd)
        print(
            f"{str(dtype):15s} compile {time.perf_counter() - t0:.1f} s | forward: aten "
            f"{t(lambda: K._aten_gelu(xd)):.2f} ms, fused {t(lambda: fwd(xd)):.2f} ms"
            f" | backward: aten {t(lambda: K._aten_gelu_bwd(gd, xd)):.2f} ms, fused "
            f"{t(lambda: bwd(gd, xd)):.2f} ms  (4096 x 512, median of {reps})"
        )

    torch.manual_seed(0)
    cfg = get_preset("tiny")
    model = PretrainGPT(cfg)
    opt = build_adamw(model, 1e-3, 0.1, (0.9, 0.95))
    idx = torch.randint(0, cfg.vocab_size, (16, cfg.block_size + 1))
    x_, y_ = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    modes = [("fp32", False)] + ([("bf16 matmuls", True)] if torch.cpu._is_amx_tile_supported() else [])
    for label, bf16 in modes:

        def step():
            with cpu_bf16_matmuls(bf16):
                _, loss = model(x_, y_)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        times = {True: [], False: []}
        for on in (True, False):
            K._enabled = on
            step()
        for r in range(rounds):
            for on in (True, False) if r % 2 == 0 else (False, True):
                K._enabled = on
                t0 = time.perf_counter()
                for _ in range(3):
                    step()
                times[on].append((time.perf_counter() - t0) / 3 * 1e3)
        K._enabled = True
        ratio = statistics.median(a / b for a, b in zip(times[False], times[True]))
        print(
            f"training step, tiny preset, {label}: aten GELU {statistics.median(times[False]):.0f} ms, fused "
            f"{statistics.median(times[True]):.0f} ms; median of per-round ratios {ratio:.3f}x ({rounds} rounds)"
        )


if __name__ == "__main__":
    main()
