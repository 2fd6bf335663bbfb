"""Decode speed of chatstack's engine against Hugging Face `generate()` on the same weights, in one run.

    python benchmarks/decode.py                 # ~1-2 minutes on a 2-core CPU
    python benchmarks/decode.py --tokens 64 --repeats 5 --threads 2
    python benchmarks/decode.py --runs 5         # five full runs, then each ratio's median and range

What it prints (each as a ratio, goals from issue #4):
  1. batch-1 greedy decode tokens/s, tiny preset (4 layers, 128 wide, random weights): engine / HF  (goal >= 1.5x)
  2. the same for the GPT-2 small config (124M, random weights):                   engine / HF  (goal >= 1.0x)
  3. GPT-2 small engine tokens/s against the memory-bandwidth bound, where the bound is measured copy
     bandwidth (STREAM convention: 2 x bytes / time for a 512 MB copy) / fp32 bytes of weights read per
     token (goal >= 85%); a read-only bandwidth (a 512 MB sum) is printed alongside for reference. Both
     are timed in the same rounds as the decodes (interleaved), like every other ratio here
  4. batched throughput at 16 rows / batch-1 tokens/s on the tiny preset                     (goal >= 8x);
     alongside (no goal), the same 16 prompts through HF generate() as one left-padded batch
  5. (no goal) GPT-2 small with int8 weights for decoding (Engine(quantize="int8"), chatstack.infer.quantize),
     timed in the same rounds: tokens/s against the fp32 engine and HF. Its quality cost on trained models
     is measured by benchmarks/quantize_quality.py

Both sides get the same prompt, generate exactly --tokens new tokens greedily with a KV cache (HF:
use_cache=True, do_sample=False, no EOS), and the outputs are checked to be identical tokens. Each timing
is the best of --repeats runs after a warm-up (other processes on a shared machine only ever slow a run
down, so the minimum is the least noisy estimate). Timings include the short prompt's prefill on both sides.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from chatstack.infer.cpu import cpu_matmul_backend, cpu_vendor
from chatstack.infer.engine import Engine, SamplingParams
from chatstack.model import GPT
from chatstack.presets import get_preset


class _IdTokenizer:
    """Just enough tokenizer for the engine: no stop tokens, bytes of no interest."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size
        self.eot_id = self.im_end_id = None

    def token_bytes(self, i):
        return b"x"


def to_hf_gpt2(model: GPT):
    """The same weights as a transformers GPT2LMHeadModel (its Conv1D stores weights as (in, out))."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf_cfg = GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=c.ffn_hidden,
        activation_function="gelu_new",
        layer_norm_epsilon=c.norm_eps,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    hf = GPT2LMHeadModel(hf_cfg).eval()
    sd = {
        "transformer.wte.weight": model.tok_emb.weight,
        "transformer.wpe.weight": model.pos_emb.weight,
        "transformer.ln_f.weight": model.norm_f.weight,
        "transformer.ln_f.bias": model.norm_f.bias,
    }
    for i, b in enumerate(model.blocks):
        p = f"transformer.h.{i}."
        sd.update(
            {
                p + "ln_1.weight": b.norm1.weight,
                p + "ln_1.bias": b.norm1.bias,
                p + "ln_2.weight": b.norm2.weight,
                p + "ln_2.bias": b.norm2.bias,
                p + "attn.c_attn.weight": b.attn.qkv.weight.t(),
                p + "attn.c_attn.bias": b.attn.qkv.bias,
                p + "attn.c_proj.weight": b.attn.proj.weight.t(),
                p + "attn.c_proj.bias": b.attn.proj.bias,
                p + "mlp.c_fc.weight": b.mlp.fc.weight.t(),
                p + "mlp.c_fc.bias": b.mlp.fc.bias,
                p + "mlp.c_proj.weight": b.mlp.proj.weight.t(),
                p + "mlp.c_proj.bias": b.mlp.proj.bias,
            }
        )
    missing, unexpected = hf.load_state_dict({k: v.detach().contiguous() for k, v in sd.items()}, strict=False)
    assert not unexpected and all(k == "lm_head.weight" or "attn.bias" in k or "masked_bias" in k for k in missing), (
        missing,
        unexpected,
    )
    hf.tie_weights()
    return hf


def best_times(fns: list, repeats: int) -> tuple[list[float], list[float], list]:
    """(best wall time, best CPU time, last output) of each fn over `repeats` rounds, the fns interleaved
    within each round so that load from other processes hits all of them alike (it can only slow a run
    down: the minimum is the least noisy estimate). One warm-up call each first. CPU time (this process,
    all threads) is printed too: on a shared machine it excludes time spent waiting for a core, but
    with several threads it includes their spin-waits, so read it with --threads 1."""
    outs = [fn() for fn in fns]
    wall = [float("inf")] * len(fns)
    cpu = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0, c0 = time.perf_counter(), time.process_time()
            outs[i] = fn()
            wall[i] = min(wall[i], time.perf_counter() - t0)
            cpu[i] = min(cpu[i], time.process_time() - c0)
    return wall, cpu, outs


def bandwidth_fns(mb: int = 512):
    """Two timed functions and the bytes each moves, for (copy, read) memory bandwidth in bytes/s.
    copy: a large tensor copy counted STREAM's way (each element read once and written once: 2 x size
    bytes; a write-allocate read, where the CPU does one, is not counted); read: a large sum (size bytes).
    They are timed in the same rounds as the GPT-2 decodes, so background load that comes and goes on a
    shared machine hits the bound and the engine alike (timed minutes apart, the ratio swung 78-113%)."""
    n = mb * 2**20 // 4
    src = torch.randn(n)
    dst = torch.empty_like(src)
    return [lambda: dst.copy_(src), lambda: src.sum()], [2 * n * 4, n * 4]


def bench_model(name: str, preset: str, tokens: int, repeats: int, prompt_len: int = 8, extra=(), int8=False):
    """extra: more functions timed in the same rounds; their best wall times come back last (after the int8
    engine's, with int8=True)."""
    torch.manual_seed(0)
    model = GPT(get_preset(preset)).eval()
    hf = to_hf_gpt2(model)
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():  # same weights: same logits
        x = torch.tensor([prompt])
        diff = (model(x) - hf(x).logits).abs().max().item()
    engine = Engine(model, _IdTokenizer(V), max_batch_size=16)
    sp = SamplingParams(max_new_tokens=tokens, temperature=0, stop_token_ids=[])

    def ours():
        return engine.generate([prompt], sp)[0].token_ids

    def theirs():
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, prompt_len, dtype=torch.long),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                use_cache=True,
                eos_token_id=None,
                pad_token_id=0,
            )
        return out[0, prompt_len:].tolist()

    more = list(extra)
    if int8:
        engine8 = Engine(model, _IdTokenizer(V), max_batch_size=16, quantize="int8")
        more.insert(0, lambda: engine8.generate([prompt], sp)[0].token_ids)
    wall, cpu, outs = best_times([ours, theirs, *more], repeats)
    (t_ours, t_hf), (c_ours, c_hf), (ids_ours, ids_hf) = wall[:2], cpu[:2], outs[:2]
    same = ids_ours == ids_hf
    print(f"{name}: max |logit diff| vs HF {diff:.2e}; identical greedy tokens: {same}")
    print(
        f"  engine {tokens / t_ours:8.1f} tok/s   HF generate {tokens / t_hf:8.1f} tok/s   "
        f"(per CPU second: {tokens / c_ours:.1f} vs {tokens / c_hf:.1f})"
    )
    if int8:
        t8 = wall[2]
        agree = sum(a == b for a, b in zip(outs[2], ids_ours))
        print(
            f"  engine, int8 weights {tokens / t8:8.1f} tok/s: {t_ours / t8:.2f}x the fp32 engine, "
            f"{t_hf / t8:.2f}x HF (greedy tokens equal to fp32: {agree}/{tokens}; random weights, so the "
            f"quality cost is measured elsewhere)"
        )
    return model, engine, prompt, (tokens / t_ours, tokens / c_ours), (tokens / t_hf, tokens / c_hf), same, wall[2:], hf


GOALS = [
    ("tiny batch-1 engine / HF", 1.5, "x"),
    ("gpt2 small batch-1 engine / HF", 1.0, "x"),
    ("gpt2 small engine / bandwidth bound", 0.85, "%"),
    ("tiny batched / batch-1", 8.0, "x"),
    ("gpt2 small engine / read-only bound", None, "%"),
]  # no goal: a 512 MB sum's bandwidth


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per measurement (each timing is the best)")
    ap.add_argument(
        "--runs",
        type=int,
        default=1,
        help="repeat the whole measurement; with more than one, end with each ratio's median, range "
        "and how many runs met its goal (single runs swing with load on a shared machine)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU vendor {cpu_vendor() or '(unknown)'}, "
        f"the engine's CPU matmul backend: {cpu_matmul_backend()} (chatstack.infer.cpu)"
    )
    torch.set_grad_enabled(False)
    runs = []
    for r in range(args.runs):
        if args.runs > 1:
            print(f"\n=== run {r + 1} of {args.runs}")
        runs.append(measure(args))
    if args.runs > 1:
        print(f"\nover {args.runs} runs: median (range), runs meeting the goal")
        for i, (name, goal, unit) in enumerate(GOALS):
            vals = sorted(run[i] for run in runs)
            fmt = (lambda v: f"{v:.0%}") if unit == "%" else (lambda v: f"{v:.2f}x")
            met = f"{sum(v >= goal for v in vals)}/{len(vals)}   (>= {fmt(goal)})" if goal else "(no goal)"
            print(f"  {name:38s} {fmt(statistics.median(vals)):>6s} ({fmt(vals[0])}-{fmt(vals[-1])})  {met}")


def measure(args) -> list[float]:
    """One full measurement; prints it and returns the ratios of GOALS (wall clock), in its order."""
    model, engine, prompt, tiny_ours, tiny_hf, same_tiny, _, hf = bench_model("tiny", "tiny", args.tokens, args.repeats)
    # batched: B different prompts (different lengths), all greedy, same number of new tokens
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, V, (4 + i % 8,), generator=g).tolist() for i in range(args.batch)]
    sp = SamplingParams(max_new_tokens=args.tokens, temperature=0, stop_token_ids=[])
    sp1 = SamplingParams(max_new_tokens=args.tokens, temperature=0, stop_token_ids=[])
    # the same batch with equal prompt lengths: what the per-row positions + key mask of mixed lengths cost
    even = [torch.randint(0, V, (8,), generator=g).tolist() for _ in range(args.batch)]
    (t_1, t_b, t_even, t_hfb), (c_1, c_b, _, _), outs = best_times(
        [
            lambda: engine.generate(prompts[:1], sp1),
            lambda: engine.generate(prompts, sp),
            lambda: engine.generate(even, sp),
            lambda: hf_batched(hf, prompts, args.tokens),
        ],
        args.repeats,
    )
    batched, single = args.batch * args.tokens / t_b, args.tokens / t_1
    batched_cpu, single_cpu = args.batch * args.tokens / c_b, args.tokens / c_1
    same_b = [c.token_ids for c in outs[1]] == outs[3]
    print(
        f"  engine batched x{args.batch}: {batched:8.1f} tok/s, prompts of 4-11 tokens "
        f"(equal 8-token prompts: {args.batch * args.tokens / t_even:.1f}; batch-1 alongside: {single:.1f})"
    )
    print(
        f"  HF generate, the same {args.batch} prompts left-padded: {args.batch * args.tokens / t_hfb:8.1f} tok/s "
        f"-> engine {t_hfb / t_b:.2f}x (no goal; identical greedy tokens: {same_b})"
    )

    bw_fns, bw_bytes = bandwidth_fns()
    _, _, _, g_ours, g_hf, same_g, more_times, _ = bench_model(
        "gpt2 small", "gpt2", args.tokens, args.repeats, extra=bw_fns, int8=True
    )
    bw_times = more_times[1:]
    bw, read_bw = (b / t for b, t in zip(bw_bytes, bw_times))
    cfg = get_preset("gpt2")
    weight_bytes = _weights_read_per_token(cfg)
    bound = bw / weight_bytes
    print(
        f"  copy bandwidth {bw / 1e9:.1f} GB/s (read-only {read_bw / 1e9:.1f} GB/s); weights read per token "
        f"{weight_bytes / 1e6:.0f} MB -> bound {bound:.1f} tok/s (read-only bound {read_bw / weight_bytes:.1f})"
    )

    print("\nratios (goal)                            wall clock   per CPU second")
    print(
        f"  tiny batch-1 engine / HF generate      {tiny_ours[0] / tiny_hf[0]:5.2f}x      {tiny_ours[1] / tiny_hf[1]:5.2f}x"
        f"   (>= 1.5x)"
    )
    print(
        f"  gpt2 small batch-1 engine / HF         {g_ours[0] / g_hf[0]:5.2f}x      {g_ours[1] / g_hf[1]:5.2f}x"
        f"   (>= 1.0x)"
    )
    print(
        f"  gpt2 small engine / bandwidth bound    {g_ours[0] / bound:5.0%}                   (>= 85%)"
        f"   (read-only bound: {g_ours[0] * weight_bytes / read_bw:.0%})"
    )
    print(
        f"  tiny batched x{args.batch} / batch-1           {batched / single:5.2f}x      "
        f"{batched_cpu / single_cpu:5.2f}x   (>= 8x)"
    )
    if not (same_tiny and same_g):
        print("  WARNING: engine and HF produced different greedy tokens")
    return [
        tiny_ours[0] / tiny_hf[0],
        g_ours[0] / g_hf[0],
        g_ours[0] / bound,
        batched / single,
        g_ours[0] * weight_bytes / read_bw,
    ]


def hf_batched(hf, prompts: list, tokens: int) -> list:
    """HF generate() over all prompts at once, left-padded (GPT-2 then takes positions from the attention mask):
    the peer for the engine's batched throughput. Returns each row's new tokens."""
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p)
        mask[i, T - len(p) :] = 1
    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[:, T:].tolist()


def _weights_read_per_token(cfg) -> int:
    """fp32 bytes a decode step must read: every weight once (tied embedding once), one position row."""
    with torch.device("meta"):
        m = GPT(cfg)
    n = m.num_params(exclude_positions=True) + cfg.n_embd
    return 4 * n


if __name__ == "__main__":
    main()
