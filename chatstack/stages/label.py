"""`chatstack label`: sample K answers per prompt from a checkpoint and rank them (a person, or a judge).

    chatstack label runs/x/sft --judge builtin --k 4 --out runs/x/ranks.jsonl --prompts 600
    chatstack label runs/x/sft --judge human --k 4 --out my_ranks.jsonl --prompts-file prompts.jsonl

Sampling: K *distinct* answers per prompt, drawn through the engine at temperature > 0 (extra draws are
made for prompts that repeat themselves; a prompt left with fewer than 2 distinct answers is skipped).

Ranking:
- `--judge human`: the K answers are shown in the terminal; type an order such as `3 1 4 2` (best first;
  `=` joins ties, e.g. `3 1=4 2`), `s` to skip a prompt, `q` to stop and save what is done.
- `--judge builtin`: a programmatic judge for the built-in verifiable tasks (chatstack.data.tasks). Its rule:
  correct answers first, then by well-formedness (the task's answer format), so the classes are
  correct+well-formed > correct+malformed > wrong+well-formed > wrong+malformed; within a class the
  shorter answer ranks higher (then sampling order). Answers of one class are marked as ties ("scores"), so only
  comparisons the judge can actually check become training pairs. The judge stands in for human
  labellers ONLY because these answers can be checked exactly; it says nothing about open-ended chat.

Output: JSONL rankings `{"prompt": [messages], "responses": [best, ..., worst], "scores": [...], "task": ...,
"judge": ...}` (the format chatstack.data.preferences reads; "scores" marks ties).
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field

import torch

from chatstack.args import CLIError, add_dataclass_args, dataclass_from_args
from chatstack.checkpoint import load_checkpoint
from chatstack.data.jsonl import iter_jsonl
from chatstack.data.preferences import write_rankings
from chatstack.data.tasks import TASKS
from chatstack.infer.engine import Engine, SamplingParams

JUDGE_NOTE = (
    "builtin judge: programmatic ranking of verifiable tasks (correct first, then well-formed, "
    "then shorter); it stands in for human labellers only where answers can be checked"
)


@dataclass
class LabelConfig:
    k: int = field(default=4, metadata={"help": "answers per prompt (InstructGPT used 4-9)"})
    prompts: int = field(default=400, metadata={"help": "number of prompts to label"})
    judge: str = field(
        default="builtin",
        metadata={"help": "builtin (verifiable tasks) | human (terminal)", "choices": ["builtin", "human"]},
    )
    tasks: str = field(default="", metadata={"help": "comma-separated built-in tasks (default: all)"})
    split: str = field(
        default="train", metadata={"help": "task split the prompts come from", "choices": ["train", "test"]}
    )
    prompts_file: str = field(default="", metadata={"help": "JSONL of {'prompt'} or {'messages'} (instead of tasks)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (> 0)"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling (0 = off)"})
    max_new_tokens: int = field(default=48, metadata={"help": "answer length cap"})
    max_tries: int = field(default=4, metadata={"help": "sampling rounds to find K distinct answers"})
    batch_size: int = field(default=64, metadata={"help": "engine batch size"})
    seed: int = field(default=0, metadata={"help": "seed for prompts and sampling"})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda | ..."})
    ties: str = field(
        default="tie",
        metadata={
            "help": "builtin judge, answers of one class: 'tie' (not compared: only checkable comparisons train "
            "the RM) | 'shorter' (the tie-break order counts as a preference; for smoke runs of untrained models)",
            "choices": ["tie", "shorter"],
        },
    )


# ---- prompts ------------------------------------------------------------------------------------------
def task_prompts(n: int, split: str, seed: int, names: list[str] | None = None) -> list[tuple[list[dict], object]]:
    """n (messages, Example) pairs spread evenly over the built-in tasks."""

    names = names or list(TASKS)
    for name in names:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; choose from: {', '.join(TASKS)}")
    per = -(-n // len(names))
    out = []
    for name in names:
        out += [(ex.messages, ex) for ex in TASKS[name].examples(split, per, seed)]
    random.Random(seed).shuffle(out)
    return out[:n]


def file_prompts(path: str) -> list[tuple[list[dict], None]]:
    out = []
    for lineno, obj in iter_jsonl(path):
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            msgs = [{"role": "user", "content": obj["prompt"]}]
        elif isinstance(obj, dict) and isinstance(obj.get("prompt") or obj.get("messages"), list):
            msgs = obj.get("prompt") or obj["messages"]
            if msgs and msgs[-1].get("role") == "assistant":
                msgs = msgs[:-1]  # a conversation: label a fresh answer to its last user turn
        else:
            raise ValueError(f"{path}:{lineno}: expected {{'prompt': str | [messages]}} or {{'messages': [...]}}")
        out.append((msgs, None))
    return out


# ---- sampling -----------------------------------------------------------------------------------------
def sample_distinct(
    engine,
    tokenizer,
    prompts: list[list[dict]],
    k: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    max_tries: int = 4,
    top_k: int = 0,
    progress: bool = True,
) -> list[list[str]]:
    """Up to k distinct answers (texts, in sampling order) per prompt, sampled through the engine."""

    if temperature <= 0:
        raise ValueError("label needs temperature > 0 to get distinct answers")
    ids = [tokenizer.render_prompt(m) for m in prompts]
    found: list[list[str]] = [[] for _ in prompts]
    draw = 0
    for attempt in range(max_tries):
        need = [i for i in range(len(prompts)) if len(found[i]) < k]
        if not need:
            break
        # first round: exactly k each; later rounds oversample the prompts that repeated themselves
        reps = {i: (k if attempt == 0 else 2 * (k - len(found[i]))) for i in need}
        batch_ids, params, owner = [], [], []
        for i in need:
            for _ in range(reps[i]):
                batch_ids.append(ids[i])
                params.append(
                    SamplingParams(
                        max_new_tokens=max_new_tokens,
                        temperature=temperature,
                        top_k=top_k,
                        seed=seed * 1_000_003 + draw,
                    )
                )
                owner.append(i)
                draw += 1
        outs = engine.generate(batch_ids, params, progress=progress)
        for i, c in zip(owner, outs):
            if len(found[i]) < k and c.text not in found[i]:
                found[i].append(c.text)
    return found


# ---- judging ------------------------------------------------------------------------------------------
def judge_score(answer: str, example) -> float:
    """2 correct and well-formed, 1 correct but malformed, 0 wrong but well-formed, -1 wrong and malformed."""

    task = TASKS[example.task]
    return 2.0 * task.check(answer, example) + 1.0 * task.well_formed(answer) - 1.0


def judge_builtin(answers: list[str], example) -> tuple[list[str], list[float]]:
    """Rank by correctness, then well-formedness (judge_score), then shorter, then sampling order."""
    scored = [(judge_score(a, example), len(a), i, a) for i, a in enumerate(answers)]
    scored.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [t[3] for t in scored], [t[0] for t in scored]


def parse_order(text: str, k: int) -> tuple[list[int], list[float]] | None:
    """'3 1=4 2' -> (indices best first, 0-based; scores with ties equal). None if it is not a full order."""
    groups = text.replace(",", " ").split()
    order, scores = [], []
    for gi, g in enumerate(groups):
        for part in g.split("="):
            if not part.isdigit():
                return None
            order.append(int(part) - 1)
            scores.append(float(len(groups) - gi))
    if sorted(order) != list(range(k)):
        return None
    return order, scores


def judge_human(messages: list[dict], answers: list[str], ask=input, show=print) -> tuple[list[str], list[float]] | str:
    """Show a prompt and its answers; read an order. Returns (ranked answers, scores), 'skip' or 'quit'."""
    show("\n" + "=" * 72)
    for m in messages:
        show(f"[{m['role']}] {m['content']}")
    show("-" * 72)
    for i, a in enumerate(answers, 1):
        show(f"({i}) {a}")
    while True:
        text = (
            ask(
                f"order best->worst, e.g. '{' '.join(str(i) for i in range(1, len(answers) + 1))}' "
                "('=' for ties, s = skip, q = quit): "
            )
            .strip()
            .lower()
        )
        if text in ("s", "skip"):
            return "skip"
        if text in ("q", "quit"):
            return "quit"
        parsed = parse_order(text, len(answers))
        if parsed is None:
            show(f"  need each of 1..{len(answers)} exactly once")
            continue
        order, scores = parsed
        return [answers[i] for i in order], scores


def label(ckpt: str, out: str, cfg: LabelConfig, ask=input, show=print) -> dict:
    """Sample, rank, write. Returns a summary dict."""

    if not 2 <= cfg.k <= 16:
        raise ValueError(f"--k must be between 2 and 16 (InstructGPT used 4-9), got {cfg.k}")
    torch.manual_seed(cfg.seed)
    ck = load_checkpoint(ckpt, device=cfg.device)
    if ck.tokenizer is None:
        raise ValueError(f"{ckpt}: checkpoint has no tokenizer.json")
    model = ck.model.eval()
    engine = Engine(model, ck.tokenizer, max_batch_size=cfg.batch_size)
    if cfg.prompts_file:
        items = file_prompts(cfg.prompts_file)[: cfg.prompts]
        if cfg.judge == "builtin":
            raise ValueError(
                "--judge builtin checks answers of the built-in tasks; with --prompts-file use --judge human"
            )
    else:
        names = [t.strip() for t in cfg.tasks.split(",") if t.strip()] or None
        items = task_prompts(cfg.prompts, cfg.split, cfg.seed, names)
    answers = sample_distinct(
        engine,
        ck.tokenizer,
        [m for m, _ in items],
        cfg.k,
        cfg.temperature,
        cfg.max_new_tokens,
        cfg.seed,
        cfg.max_tries,
        cfg.top_k,
        progress=True,
    )
    rows, stats = (
        [],
        {
            "prompts": len(items),
            "written": 0,
            "too_few_distinct": 0,
            "all_tied": 0,
            "skipped": 0,
            "pairs": 0,
            "correct_frac": 0.0,
        },
    )
    n_correct = n_answers = 0
    for (messages, ex), ans in zip(items, answers):
        if len(ans) < 2:
            stats["too_few_distinct"] += 1
            continue
        if cfg.judge == "builtin":
            ranked, scores = judge_builtin(ans, ex)
            n_correct += sum(1 for s in scores if s >= 1.0)
            n_answers += len(scores)
            if cfg.ties == "shorter":
                scores = [float(len(scores) - i) for i in range(len(scores))]  # the full order, no ties
        else:
            res = judge_human(messages, ans, ask, show)
            if res == "quit":
                break
            if res == "skip":
                stats["skipped"] += 1
                continue
            ranked, scores = res
        pairs = sum(1 for i in range(len(scores)) for j in range(i + 1, len(scores)) if scores[i] > scores[j])
        if pairs == 0:
            stats["all_tied"] += 1  # the judge cannot tell these answers apart: no comparison to learn
            continue
        stats["pairs"] += pairs
        row = {"prompt": messages, "responses": ranked, "scores": scores, "judge": cfg.judge}
        if ex is not None:
            row["task"] = ex.task
        rows.append(row)
    stats["written"] = len(rows)
    stats["correct_frac"] = round(n_correct / n_answers, 4) if n_answers else None
    write_rankings(out, rows)
    stats["out"] = str(out)
    stats["judge"] = JUDGE_NOTE if cfg.judge == "builtin" else "human (terminal)"
    return stats


def _cmd(args) -> int:
    cfg = dataclass_from_args(LabelConfig, args)
    try:
        stats = label(args.ckpt, args.out, cfg)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    print(json.dumps(stats, indent=2))
    if stats["written"] == 0 and cfg.judge == "builtin":
        raise CLIError(
            f"no rankings written: the judge could not tell any prompt's answers apart "
            f"({stats['all_tied']} all tied, {stats['too_few_distinct']} with < 2 distinct answers); "
            "more prompts, a better-trained model, or --ties shorter"
        )
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "label",
        help="sample K answers per prompt and rank them (human or built-in judge)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("ckpt", help="checkpoint to sample from (usually the SFT model)")
    p.add_argument("--out", required=True, help="rankings JSONL to write")
    add_dataclass_args(p, LabelConfig)
    p.set_defaults(func=_cmd)
