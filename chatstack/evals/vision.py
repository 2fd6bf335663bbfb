"""Vision evals: CLIP zero-shot classification, and exact-match answers of a vision chat model.

    chatstack eval-vision runs/clip --json         # {"zero_shot_accuracy", "n", ...}
    chatstack eval-vision runs/vision_sft --json   # {"tasks": {NAME: {"accuracy", "n", "interval"}}, ...}

Zero-shot: each held-out image goes to the prompt it is most similar to among one prompt per class
("a photo of the digit seven"; scenes with one shape: "a red circle", all 12 colour x shape pairs).
Chat: every held-out question is answered greedily by the one engine (chatstack.infer.engine) with the
image's projected tokens at its placeholder positions; the answer counts when, lower-cased and stripped of
surrounding punctuation, it equals the expected word. `zero_images=True` is the ablation: the same model
and questions with every image token zeroed.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from chatstack.infer.engine import Engine, SamplingParams
from chatstack.vision import data as D
from chatstack.vision.chat_data import eval_examples, question_of
from chatstack.vision.encoder import CLIP, zero_shot_classify
from chatstack.vision.vlm import render_request


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of k successes in n."""
    if n == 0:
        return [0.0, 0.0]
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(max(0.0, c - h), 4), round(min(1.0, c + h), 4)]


@torch.no_grad()
def clip_metrics(model: CLIP, sources: list[str], folder_test: Optional[list] = None) -> dict:
    """Zero-shot accuracy on the held-out digits (and one-shape held-out scenes); with a caption folder,
    image -> caption retrieval top-1 among its held-out pairs."""
    was = model.training
    model.eval()
    out: dict = {}
    try:
        if folder_test is not None:
            imgs = torch.stack([p for p, _ in folder_test])
            pred = zero_shot_classify(model, imgs, [c for _, c in folder_test])
            k = int((pred == torch.arange(len(folder_test))).sum())
            out.update(
                zero_shot_accuracy=round(k / len(folder_test), 4),
                n=len(folder_test),
                task="caption retrieval among the held-out pairs",
            )
        if "digits" in sources:
            x, y = D.digits("test")
            pred = zero_shot_classify(model, x, [D.zero_shot_prompt(c) for c in range(10)])
            k = int((pred == y).sum())
            out.update(
                zero_shot_accuracy=round(k / len(y), 4),
                n=len(y),
                interval=wilson(k, len(y)),
                per_class={D.DIGIT_WORDS[c]: round(float((pred[y == c] == c).float().mean()), 3) for c in range(10)},
            )
        if "scenes" in sources:
            ss = [s for s in D.scenes("test", 400, 0) if len(s.objects) == 1][:100]
            labels = [(c, s) for c in D.COLOURS for s in D.SHAPES]
            prompts = [f"a {c} {s}" for c, s in labels]
            truth = torch.tensor([labels.index((s.objects[0].colour, s.objects[0].shape)) for s in ss])
            pred = zero_shot_classify(model, torch.stack([s.draw() for s in ss]), prompts)
            k = int((pred == truth).sum())
            key = "scenes_zero_shot_accuracy" if "digits" in sources else "zero_shot_accuracy"
            out[key] = round(k / len(ss), 4)
            if "digits" not in sources:
                out.update(n=len(ss), interval=wilson(k, len(ss)))
            else:
                out["scenes_n"] = len(ss)
    finally:
        model.train(was)
    return out


@torch.no_grad()
def answer_questions(
    engine: Engine, adapter, examples: list[dict], zero_images: bool = False, max_new_tokens: int = 8, batch: int = 64
) -> list[str]:
    """The model's greedy answer to each example's conversation (its last assistant turn left out)."""
    answers = []
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    for i in range(0, len(examples), batch):
        prompts, embeds = [], []
        for ex in examples[i : i + batch]:
            ids, emb = render_request(engine.tok, adapter, ex["messages"][:-1], ex["images"], zero=zero_images)
            prompts.append(ids)
            embeds.append(emb)
        answers += [c.text for c in engine.generate(prompts, params, embeds=embeds)]
    return answers


def chat_metrics(
    engine: Engine, adapter, tasks: list[str], n_per_task: int = 0, zero_images: bool = False, seed: int = 0
) -> dict:
    """{"tasks": {name: {accuracy, n, interval}}, "scenes_mean", "examples": a few (question, expected, got)}."""
    exs = eval_examples(tasks, n_per_task, seed)
    # answers are a word, a description up to 15 tokens
    got = answer_questions(engine, adapter, exs, zero_images, max_new_tokens=32 if "scene-describe" in tasks else 8)
    per: dict[str, list[int]] = {}
    shown = []
    for ex, a in zip(exs, got):
        ok = D.normalize_answer(a) == D.normalize_answer(ex["answer"])
        per.setdefault(ex["task"], []).append(int(ok))
        if len(shown) < 8 and sum(1 for s in shown if s["task"] == ex["task"]) < 2:
            shown.append(
                {
                    "task": ex["task"],
                    "question": question_of(ex["messages"][0]),
                    "expected": ex["answer"],
                    "answer": a,
                }
            )
    res = {
        "tasks": {
            t: {"accuracy": round(sum(v) / len(v), 4), "n": len(v), "interval": wilson(sum(v), len(v))}
            for t, v in per.items()
        }
    }
    # the mean of the four question types (the training-only "where" type is reported, not averaged in)
    scene = [res["tasks"][t]["accuracy"] for t in res["tasks"] if t.startswith("scene-") and t[6:] in D.QUESTION_TYPES]
    if scene:
        res["scenes_mean"] = round(sum(scene) / len(scene), 4)
    res["examples"] = shown
    return res
