"""Held-out evaluation of a checkpoint: exact-match accuracy on the verifiable tasks, and conversation loss.

Accuracy: each task's held-out examples are answered greedily through the engine (chatstack.infer.engine), in one
of two modes, so a base model and a chat model can be compared on the same questions:
- "chat": the question rendered with the ChatML template (`render_prompt`), the reply ends at <|im_end|>;
- "fewshot": a plain-text prompt with k solved training examples (chatstack.evals.fewshot), the answer
  is the first non-empty line of the continuation. Base (pretrained-only) checkpoints are evaluated
  this way by default.
A reply is right when its extracted final answer equals the reference exactly (chatstack.data.tasks).

Conversation loss: mean cross-entropy (nats/token) on the assistant tokens of held-out conversations
(the built-in held-out split by default), with the same packing and masks as SFT.

    from chatstack.evals.tasks_eval import evaluate_tasks
    res = evaluate_tasks(model, tok, ["add", "count"], n=50, mode="chat")   # {"add": {"accuracy": .., "n": 50, ..}}
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from chatstack.data.conversations import PackedRows, make_batch
from chatstack.data.tasks import TASKS, get_task
from chatstack.evals.fewshot import STOP, fewshot_prompt, first_line
from chatstack.infer.engine import Engine, SamplingParams

CHAT_STAGES_EXCLUDED = (None, "base", "pretrain")  # stages that never saw the chat template


def default_mode(ckpt_config: dict) -> str:
    """'fewshot' for a pretrained-only model, 'chat' for anything fine-tuned on conversations."""
    return "fewshot" if ckpt_config.get("stage") in CHAT_STAGES_EXCLUDED else "chat"


def build_prompts(tokenizer, task_names, n: int, seed: int, mode: str, shots: int):
    """[(task name, example, prompt ids)] for every held-out example of every task."""
    if mode not in ("chat", "fewshot"):
        raise ValueError(f"mode must be 'chat' or 'fewshot', got {mode!r}")
    items = []
    for name in task_names:
        task = get_task(name)
        for ex in task.examples("test", n, seed):
            if mode == "chat":
                ids = tokenizer.render_prompt(ex.messages)
            else:
                ids = tokenizer.encode(fewshot_prompt(task, ex, shots, seed))
            items.append((name, ex, ids))
    return items


@torch.no_grad()
def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    task_names=None,
    n: int = 100,
    seed: int = 0,
    mode: str = "chat",
    shots: int = 3,
    max_new_tokens: int = 48,
    batch_size: int = 64,
    progress: bool = False,
    n_samples: int = 3,
    quantize: Optional[str] = None,
) -> dict[str, dict]:
    """{task: {"accuracy", "n", "well_formed", "samples"}} from greedy generation on held-out examples.
    quantize="int8" | "bf16": generate with those weights (chatstack.infer.quantize), to measure what they cost on
    tasks."""

    names = list(task_names or TASKS)
    items = build_prompts(tokenizer, names, n, seed, mode, shots)
    was_training = model.training
    model.eval()
    engine = Engine(model, tokenizer, max_batch_size=batch_size, quantize=quantize)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=STOP if mode == "fewshot" else [])
    outs = engine.generate([ids for _, _, ids in items], params, progress=progress)
    model.train(was_training)
    res: dict[str, dict] = {}
    for (name, ex, _), out in zip(items, outs):
        task = get_task(name)
        r = res.setdefault(name, {"accuracy": 0.0, "n": 0, "well_formed": 0.0, "samples": []})
        reply = first_line(out.text) if mode == "fewshot" else out.text.strip()
        ok = task.check(reply, ex)
        r["n"] += 1
        r["accuracy"] += ok
        r["well_formed"] += task.well_formed(reply)
        if len(r["samples"]) < n_samples:
            r["samples"].append({"prompt": ex.prompt, "reply": reply, "expected": ex.final, "correct": ok})
    for r in res.values():
        r["accuracy"] = round(r["accuracy"] / max(r["n"], 1), 4)
        r["well_formed"] = round(r["well_formed"] / max(r["n"], 1), 4)
    return res


def mean_accuracy(results: dict[str, dict]) -> float:
    accs = [r["accuracy"] for r in results.values()]
    return round(sum(accs) / len(accs), 4) if accs else 0.0


@torch.no_grad()
def conversation_loss(model: nn.Module, rows: PackedRows, batch_size: int = 16) -> tuple[float, int]:
    """(mean cross-entropy in nats/token, number of tokens) over the assistant tokens of packed rows."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        b = make_batch(rows, torch.arange(i, min(i + batch_size, len(rows))))
        b = {k: v.to(dev) for k, v in b.items()}
        logits = model(b["idx"], positions=b["positions"], attn_mask=b["attn_mask"])  # (B, T, V)
        y = b["targets"]
        keep = y >= 0
        if keep.any():
            total += float(torch.nn.functional.cross_entropy(logits[keep].float(), y[keep], reduction="sum"))
            count += int(keep.sum())
    model.train(was_training)
    return total / max(count, 1), count
