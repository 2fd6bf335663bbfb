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

from chatstack.tokenizer import Tokenizer
from chatstack.vision import data as D

TASKS = ["digits"] + [f"scene-{q}" for q in D.QUESTION_TYPES]


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
        elif t.startswith("scene-") and t[6:] in D.QUESTION_TYPES:
            q = t[6:]
            n = n_per_task if n_per_task > 0 else 100
            pool = [s for s in D.scenes("test", 4 * n, seed) if q != "position" or len(s.objects) > 1][:n]
            out += [scene_example(s, q, rng) for s in pool]
        else:
            raise ValueError(f"unknown vision task {t!r} (one of {', '.join(TASKS)})")
    return out


def scene_conversation(scene: D.Scene, rng: random.Random, max_turns: int = 3) -> dict:
    """One image, then 1..max_turns questions of different types about it, each answered (LLaVA-style
    multi-turn data: every answer is a target, so one image gives several answers' worth of signal)."""
    types = D.QUESTION_TYPES if len(scene.objects) > 1 else D.QUESTION_TYPES[:3]
    qtypes = rng.sample(types, rng.randint(1, min(max_turns, len(types))))
    msgs, first = [], None
    for k, qt in enumerate(qtypes):
        q, a = D.scene_question(scene, qt, rng)
        msgs += [image_message(q) if k == 0 else {"role": "user", "content": q}, {"role": "assistant", "content": a}]
        first = first or (qt, a)
    return {"messages": msgs, "images": [scene.draw()], "task": f"scene-{first[0]}", "answer": first[1]}


class TrainExamples:
    """Training examples by global index: a digit question with probability digit_share, else a scene
    conversation (1-3 questions about one scene)."""

    def __init__(self, seed: int, digit_share: float = 0.4) -> None:
        self.seed, self.digit_share = seed, digit_share
        self.x, self.y = D.digits("train")

    def __call__(self, i: int) -> dict:
        rng = random.Random(f"{self.seed}-{i}")
        if rng.random() < self.digit_share:
            j = rng.randrange(len(self.x))
            return digit_example(self.x[j], int(self.y[j]), rng)
        while True:
            s = D.random_scene(rng)
            if not s.held_out():
                return scene_conversation(s, rng)


def collate(examples: list[dict], tokenizer: Tokenizer, image_tokens: int, max_len: int) -> dict:
    """Right-padded rows: idx/targets (B, T) with targets -1 off the assistant's tokens, images (N, 3, 32, 32),
    and img_row / img_start (N,): where each image's `image_tokens` positions begin."""
    rows, imgs, img_row, img_start = [], [], [], []
    for b, ex in enumerate(examples):
        ids, mask, pos = tokenizer.render_multimodal(ex["messages"], image_tokens)
        if len(ids) > max_len + 1:
            raise ValueError(f"a {ex['task']} conversation of {len(ids)} tokens exceeds the context {max_len}")
        rows.append((ids, mask))
        for k, im in enumerate(ex["images"]):
            imgs.append(im)
            img_row.append(b)
            img_start.append(pos[k * image_tokens])
    T = max(len(ids) for ids, _ in rows) - 1
    idx = torch.full((len(rows), T), tokenizer.eot_id, dtype=torch.long)
    tgt = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        idx[b, :n] = torch.tensor(ids[:-1])
        t = torch.tensor(ids[1:])
        tgt[b, :n] = torch.where(torch.tensor(mask[1:]) > 0, t, torch.full_like(t, -1))
    return {
        "idx": idx,
        "targets": tgt,
        "images": torch.stack(imgs) if imgs else torch.zeros(0, 3, D.SIZE, D.SIZE),
        "img_row": torch.tensor(img_row, dtype=torch.long),
        "img_start": torch.tensor(img_start, dtype=torch.long),
        "n_tokens": torch.tensor(sum(len(ids) - 1 for ids, _ in rows)),
    }


if __name__ == "__main__":
    ex = TrainExamples(0)
    for i in range(6):
        e = ex(i)
        print(e["task"], "|", question_of(e["messages"][0]), "->", e["answer"])
