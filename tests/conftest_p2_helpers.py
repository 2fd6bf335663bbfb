"""Shared helpers for the data/loop/pretrain tests: a tiny tokenizer and a tiny prepared dataset."""
from __future__ import annotations

import functools
from pathlib import Path

LINES = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
    "And by opposing end them. To die: to sleep;",
    "No more; and by a sleep to say we end",
    "The heart-ache and the thousand natural shocks",
    "That flesh is heir to, 'tis a consummation",
    "Devoutly to be wish'd. To die, to sleep;",
    "To sleep: perchance to dream: ay, there's the rub;",
]


def doc(i: int, n_lines: int = 40) -> str:
    """A deterministic pseudo-document: the lines above in a document-specific order."""
    return "\n".join(LINES[(i * 7 + j * (i + 3)) % len(LINES)] for j in range(n_lines)) + "\n"


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(vocab_size: int = 300):
    from chatstack.tokenizer import Tokenizer

    return Tokenizer.train([doc(i) for i in range(6)], vocab_size=vocab_size, show_progress=False)


def make_dataset(tmp: Path, name: str = "data", n_docs: int = 12, vocab_size: int = 300) -> Path:
    """Text files in a folder -> a prepared dataset (every 4th document held out)."""
    from chatstack.data.prepare import iter_documents, prepare, split_documents

    src = tmp / f"{name}_src"
    src.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (src / f"doc{i:02d}.txt").write_text(doc(i))
    tok = tiny_tokenizer(vocab_size)
    train, val = split_documents(list(iter_documents([src])), 0.25)
    return prepare(tmp / name, tok, train, val, [{"name": str(src)}])
