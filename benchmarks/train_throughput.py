"""Training-step throughput: chatstack's pretraining step (GPT, fused output-layer loss, fused AdamW) vs Hugging Face `GPT2LMHeadModel` + torch AdamW,
same config, batch, thread count and process, measured in interleaved rounds (so machine load hits all alike).

    python benchmarks/train_throughput.py                       # the tiny preset, B=16, T=256
    python benchmarks/train_throughput.py --dtype fp32          # fp32 only, on both sides
    python benchmarks/train_throughput.py --malloc both         # also: default glibc malloc vs tuned (2 runs)
    python benchmarks/train_throughput.py --n-layer 6 --n-embd 256 --threads 2 --rounds 5
    python benchmarks/train_throughput.py --runs 3               # three whole measurements, then each ratio's
                                                                 # median, range and how many runs met 1.3x

Precision: chatstack runs its step as `chatstack pretrain` would (--dtype auto: on a CPU with AMX, bf16 matmuls
with everything else fp32; see chatstack.train.loop.resolve_dtype). When that is bf16, the same-precision
comparison is HF under torch.autocast(bf16), its own mixed-precision route, and both sides are also measured
in fp32. Prints tokens/s of each, the ratios (goal >= 1.3x), the measured peak matmul FLOP/s of this machine
in fp32 (and bf16), and each run's MFU against the peak of its precision (FLOPs per token from
chatstack.estimate: 6N + 12*L*h*T).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def build(args):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from chatstack.model import GPTConfig
    from chatstack.stages.pretrain import PretrainGPT  # the model `chatstack pretrain` trains
    from chatstack.train.optim import build_adamw

    cfg = GPTConfig(
        vocab_size=args.vocab,
        block_size=args.T,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        dropout=0.0,
    )
    torch.manual_seed(0)
    ours = PretrainGPT(cfg)
    ours_opt = build_adamw(ours, 1e-3, 0.1, (0.9, 0.95), impl=args.optimizer)
    hf_cfg = GPT2Config(
        vocab_size=args.vocab,
        n_positions=args.T,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        activation_function="gelu_new",
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    hf = GPT2LMHeadModel(hf_cfg)
    try:
        hf.config._attn_implementation = "sdpa"  # HF's fastest attention on CPU
    except Exception:
        pass
    hf.train()
    # torch AdamW as a user would write it: same decay split, library default implementation (foreach)
    decay = [p for p in hf.parameters() if p.dim() >= 2]
    no_decay = [p for p in hf.parameters() if p.dim() < 2]
    hf_opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.95)
    )
    return cfg, ours, ours_opt, hf, hf_opt


def make_steps(args, ours, ours_opt, hf, hf_opt):
    """{name: step function}: chatstack and HF in fp32, and in bf16 when args.dtype resolves to it."""
    import contextlib

    import torch

    from chatstack.model import cpu_bf16_matmuls

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.B, args.T + 1), generator=g)
    idx, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def ours_step(ctx):
        with ctx():
            _, loss = ours(idx, tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)

    def hf_step(ctx):
        with ctx():
            loss = hf(input_ids=idx, labels=idx).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    fp32 = contextlib.nullcontext
    steps = {"chatstack fp32": lambda: ours_step(fp32), "hf fp32": lambda: hf_step(fp32)}
    if args._dtype == torch.bfloat16:
        steps["chatstack bf16"] = lambda: ours_step(cpu_bf16_matmuls)
        steps["hf bf16"] = lambda: hf_step(lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    return steps


def measure(args) -> dict:
    import torch

    from chatstack.estimate import flops_per_token
    from chatstack.stages.report import measure_peak_flops

    torch.set_num_threads(args.threads)
    cfg, ours, ours_opt, hf, hf_opt = build(args)
    steps = make_steps(args, ours, ours_opt, hf, hf_opt)
    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    rates = {name: [] for name in steps}
    tokens = args.B * args.T
    order = list(steps.items())
    for rnd in range(args.rounds):
        # alternate the order: on this 2-core box the later slots of a round measured a few % faster
        for name, fn in order if rnd % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            for _ in range(args.steps):
                fn()
            rates[name].append(tokens * args.steps / (time.perf_counter() - t))
    peak = measure_peak_flops(dtype=torch.float32)
    peak16 = measure_peak_flops(dtype=torch.bfloat16) if "chatstack bf16" in rates else None
    fpt = flops_per_token(cfg)
    res = {
        "threads": args.threads,
        "malloc_tuned": args._tuned,
        "peak_flops": peak,
        "peak_flops_bf16": peak16,
        "flops_per_token": fpt,
        "dtype": str(args._dtype).replace("torch.", ""),
        "runs": {},
        "ratios": {},
    }
    for name, r in rates.items():
        med = statistics.median(r)
        res["runs"][name] = {
            "tokens_per_s": med,
            "rounds": [round(v) for v in r],
            "mfu": med * fpt / (peak16 if name.endswith("bf16") else peak),
        }
    pairs = [("fp32 vs fp32", "chatstack fp32", "hf fp32")]
    if "chatstack bf16" in rates:
        pairs += [
            ("bf16 vs bf16 (HF autocast)", "chatstack bf16", "hf bf16"),
            ("as shipped: chatstack auto (bf16) vs HF default (fp32)", "chatstack bf16", "hf fp32"),
        ]
    for label, a, b in pairs:
        # the median of tokens/s, and the median of the same-round ratios (each pair ran back to back)
        res["ratios"][label] = {
            "ratio": res["runs"][a]["tokens_per_s"] / res["runs"][b]["tokens_per_s"],
            "round_median": statistics.median(x / y for x, y in zip(rates[a], rates[b])),
        }
    return res


def report(res: dict) -> None:
    bf16 = f", bf16 {res['peak_flops_bf16'] / 1e9:.0f}" if res.get("peak_flops_bf16") else ""
    print(
        f"threads {res['threads']}, malloc tuned: {res['malloc_tuned']}, chatstack --dtype auto = {res['dtype']}, "
        f"peak matmul fp32 {res['peak_flops'] / 1e9:.0f}{bf16} GFLOP/s (MFU denominators), "
        f"{res['flops_per_token'] / 1e6:.2f} MFLOP/token"
    )
    for name, r in res["runs"].items():
        print(f"  {name:15s} {r['tokens_per_s']:>10,.0f} tokens/s  MFU {r['mfu']:.1%}  rounds {r['rounds']}")
    for label, r in res["ratios"].items():
        print(
            f"  ratio {label}: {r['ratio']:.2f}x  (median of per-round ratios {r['round_median']:.2f}x; goal >= 1.3x)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--steps", type=int, default=5, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--optimizer", default="auto", help="chatstack's AdamW kernel: auto | fused | foreach")
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="chatstack's precision, resolved as `chatstack pretrain --dtype` does (auto: bf16 matmuls on a "
        "CPU with AMX, else fp32); with bf16, HF is also measured under autocast bf16",
    )
    ap.add_argument(
        "--malloc",
        default="tuned",
        choices=["tuned", "default", "both"],
        help="glibc malloc: chatstack's tuning (as the training loop applies it), the default, or both",
    )
    ap.add_argument(
        "--runs",
        type=int,
        default=1,
        help="repeat the whole measurement (new models, new rounds); with more than one, end with each "
        "ratio's median, range and how many runs met the goal (single runs swing with machine load)",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON line (used by --malloc both)")
    args = ap.parse_args()

    if args.malloc == "both":
        results = []
        for mode in ("default", "tuned"):
            cmd = [
                sys.executable,
                __file__,
                *[a for a in sys.argv[1:] if a not in ("both", "--malloc")],
                "--malloc",
                mode,
                "--json",
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
        for r in results:
            report(r)
        d, t = results
        print(
            "malloc tuning: "
            + ", ".join(
                f"{name} x{t['runs'][name]['tokens_per_s'] / d['runs'][name]['tokens_per_s']:.2f}" for name in t["runs"]
            )
            + " tokens/s"
        )
        return

    import torch

    from chatstack.train.loop import resolve_dtype

    args._dtype = resolve_dtype(args.dtype, torch.device("cpu"), args.n_embd)
    args._tuned = False
    if args.malloc == "tuned":
        from chatstack.infer.cpu import tune_malloc

        args._tuned = tune_malloc()
    results = []
    for r in range(args.runs):
        if args.runs > 1 and not args.json:
            print(f"=== run {r + 1} of {args.runs}")
        results.append(measure(args))
        if args.json:
            print(json.dumps(results[-1]))
        else:
            report(results[-1])
    if args.runs > 1 and not args.json:
        print(f"over {args.runs} runs: median (range) of each ratio, runs meeting 1.3x; [median of per-round ratios]")
        for label in results[0]["ratios"]:
            vals = sorted(res["ratios"][label]["ratio"] for res in results)
            rounds = sorted(res["ratios"][label]["round_median"] for res in results)
            print(
                f"  {label}: {statistics.median(vals):.2f}x ({vals[0]:.2f}-{vals[-1]:.2f}x), "
                f"{sum(v >= 1.3 for v in vals)}/{len(vals)}  [{statistics.median(rounds):.2f}x]"
            )


if __name__ == "__main__":
    main()
