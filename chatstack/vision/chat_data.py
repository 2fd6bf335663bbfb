"""Image-question-answer conversations from the built-in data, rendered and batched for vision SFT.

    python -m chatstack.vision.chat_data      # prints a few examples of each kind

An example is {"messages": [...], "images": [(3, 32, 32) tensors], "task": name, "answer": str}; the user
turn holds an image part then the question, the assistant answers in a word ("7", "red", "left"). Tasks:
digits (held-out digits: the fixed 20% split) and scene-colour / scene-shape / scene-count / scene-position
(held-out scenes: see chatstack.vision.data).

Training batches are a pure function of (seed, step, micro, rank, world), as the training loop requires:
each row draws a fresh example from a generator seeded by its global row index (digits from the train
split, scenes drawn on the fly, never a held-out one).
"""

from __future__ import annotations

import random

import torch

from chatstack.model import best_fit_rows, packed_layout
from chatstack.tokenizer import Tokenizer
from chatstack.vision import data as D

TASKS = ["digits"] + [f"scene-{q}" for q in D.QUESTION_TYPES]
AUX_TASKS = [f"scene-{q}" for q in D.AUX_QUESTION_TYPES]  # evaluated when asked for, never in the defaults


def image_message(question: str, n_images: int = 1) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": question}]}


def question_of(message: dict) -> str:
    """The text of a user message whose content may be a list of parts."""
    c = message["content"]
    return c if isinstance(c, str) else " ".join(p["text"] for p in c if p.get("type") == "text")


def digit_example(image: torch.Tensor, label: int, rng: random.Random) -> dict:
    return {
        "messages": [image_message(rng.choice(D.DIGIT_QUESTIONS)), {"role": "assistant", "content": str(label)}],
        "images": [image],
        "task": "digits",
        "answer": str(label),
    }


def scene_example(scene: D.Scene, qtype: str, rng: random.Random, image: torch.Tensor | None = None) -> dict:
    q, a = D.scene_question(scene, qtype, rng)
    return {
        "messages": [image_message(q), {"role": "assistant", "content": a}],
        "images": [scene.draw() if image is None else image],
        "task": f"scene-{qtype}",
        "answer": a,
    }


def eval_examples(tasks: list[str], n_per_task: int = 0, seed: int = 0) -> list[dict]:
    """Held-out examples: all 359 test digits (or the first n_per_task), n_per_task (default 100) questions of
    each scene type on held-out scenes."""
    out = []
    rng = random.Random(f"eval-{seed}")
    for t in tasks:
        if t == "digits":
            x, y = D.digits("test")
            n = len(x) if n_per_task <= 0 else min(n_per_task, len(x))
            out += [digit_example(x[i], int(y[i]), rng) for i in range(n)]
        elif t.startswith("scene-") and t[6:] in D.QUESTION_TYPES + D.AUX_QUESTION_TYPES:
            q = t[6:]
            n = n_per_task if n_per_task > 0 else 100
            pool = [s for s in D.scenes("test", 4 * n, seed) if q != "position" or len(s.objects) > 1][:n]
            out += [scene_example(s, q, rng) for s in pool]
        else:
            raise ValueError(f"unknown vision task {t!r} (one of {', '.join(TASKS + AUX_TASKS)})")
    return out


def _weighted_sample(types: list[str], weights: dict[str, float], k: int, rng: random.Random) -> list[str]:
    """k distinct types drawn one after another in proportion to their weights (missing: 1)."""
    pool, out = [t for t in types if weights.get(t, 1.0) > 0], []
    for _ in range(min(k, len(pool))):
        t = rng.choices(pool, weights=[weights.get(t, 1.0) for t in pool])[0]
        out.append(t)
        pool.remove(t)
    return out


def scene_conversation(
    scene: D.Scene, rng: random.Random, max_turns: int = 3, weights: dict[str, float] | None = None
) -> dict:
    """One image, then 1..max_turns questions of different types about it, each answered (LLaVA-style
    multi-turn data: every answer is a target, so one image gives several answers' worth of signal).
    `weights` (per question type, default 1; the training-only types are off unless weighted) make a
    type more or less likely to be among the questions."""
    weights = {**{t: 0.0 for t in D.AUX_QUESTION_TYPES}, **(weights or {})}
    types = D.QUESTION_TYPES + D.AUX_QUESTION_TYPES
    if len(scene.objects) < 2:
        types = [t for t in types if t != "position"]
    n_types = sum(weights.get(t, 1.0) > 0 for t in types)
    qtypes = _weighted_sample(types, weights, rng.randint(1, min(max_turns, n_types)), rng)
    # a description names every object in order: asked last, so no answer after it can be read off its text
    qtypes.sort(key=lambda t: t == "describe")
    msgs, first = [], None
    for k, qt in enumerate(qtypes):
        q, a = D.scene_question(scene, qt, rng)
        msgs += [image_message(q) if k == 0 else {"role": "user", "content": q}, {"role": "assistant", "content": a}]
        first = first or (qt, a)
    return {"messages": msgs, "images": [scene.draw()], "task": f"scene-{first[0]}", "answer": first[1]}


class TrainExamples:
    """Training examples by global index: a digit question with probability digit_share, else a scene
    conversation (1 to max_turns questions about one scene, their types drawn by `weights`)."""

    def __init__(
        self, seed: int, digit_share: float = 0.4, weights: dict[str, float] | None = None, max_turns: int = 3
    ) -> None:
        self.seed, self.digit_share, self.weights, self.max_turns = seed, digit_share, weights, max_turns
        self.x, self.y = D.digits("train")

    def __call__(self, i: int) -> dict:
        rng = random.Random(f"{self.seed}-{i}")
        if rng.random() < self.digit_share:
            j = rng.randrange(len(self.x))
            return digit_example(self.x[j], int(self.y[j]), rng)
        while True:
            s = D.random_scene(rng)
            if not s.held_out():
                return scene_conversation(s, rng, self.max_turns, self.weights)


def collate(
    examples: list[dict], tokenizer: Tokenizer, image_tokens: int, max_len: int, packed: bool = True, row_len: int = 128
) -> dict:
    """Rows for the GPT: idx/targets (B, T) with targets -1 off the assistant's tokens, images (N, 3, 32, 32),
    and img_row / img_start (N,): where each image's `image_tokens` positions begin.

    packed: several conversations share a row of `row_len` tokens (more if one conversation is longer; at most
    max_len + 1), with positions restarting at each and attention kept inside each (`positions`, `attn_mask`), so
    each is computed as if alone; the batch's loss is the same, and the padding (about 40% of a batch of one
    conversation per row) is not computed. Short rows keep the attention's T x T small."""
    enc = []
    for ex in examples:
        ids, mask, pos = tokenizer.render_multimodal(ex["messages"], image_tokens)
        if len(ids) > max_len + 1:
            raise ValueError(f"a {ex['task']} conversation of {len(ids)} tokens exceeds the context {max_len}")
        enc.append((ids, mask, [pos[k * image_tokens] for k in range(len(ex["images"]))]))
    lengths = [len(e[0]) for e in enc]
    rows = (
        best_fit_rows(lengths, min(max_len + 1, max(row_len, *lengths))) if packed else [[i] for i in range(len(enc))]
    )
    T = max(sum(len(enc[i][0]) for i in row) for row in rows) - 1
    idx = torch.full((len(rows), T + 1), tokenizer.eot_id, dtype=torch.long)
    keep = torch.zeros(len(rows), T + 1, dtype=torch.bool)
    doc = torch.full((len(rows), T + 1), -1, dtype=torch.long)
    imgs, img_row, img_start = [], [], []
    for b, row in enumerate(rows):
        at = 0
        for d, i in enumerate(row):
            ids, mask, starts = enc[i]
            n = len(ids)
            idx[b, at : at + n] = torch.tensor(ids)
            keep[b, at : at + n] = torch.tensor(mask) > 0
            doc[b, at : at + n] = d
            imgs += examples[i]["images"]
            img_row += [b] * len(starts)
            img_start += [at + p for p in starts]
            at += n
    tgt = idx[:, 1:].clone()
    # a target counts if it is the assistant's and belongs to the same conversation as its input token
    tgt[~(keep[:, 1:] & (doc[:, 1:] == doc[:, :-1]) & (doc[:, 1:] >= 0))] = -1
    out = {
        "idx": idx[:, :-1],
        "targets": tgt,
        "images": torch.stack(imgs) if imgs else torch.zeros(0, 3, D.SIZE, D.SIZE),
        "img_row": torch.tensor(img_row, dtype=torch.long),
        "img_start": torch.tensor(img_start, dtype=torch.long),
        "n_tokens": torch.tensor(int((doc[:, :-1] >= 0).sum())),
    }
    if packed:
        out["positions"], out["attn_mask"] = packed_layout(doc[:, :-1])
    return out


if __name__ == "__main__":
    ex = TrainExamples(0)
    for i in range(6):
        e = ex(i)
        print(e["task"], "|", question_of(e["messages"][0]), "->", e["answer"])
