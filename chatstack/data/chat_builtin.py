"""Built-in SFT data: real human chit-chat, chatterbot Q&A, identity conversations, verifiable tasks.

Sources (all install offline from PyPI, see docs/data.md; their licences travel with the packages):
- `chitchat-dataset` (MIT): 7,168 human-to-human conversations; the first speaker becomes "user", the
  second "assistant"; consecutive messages of one speaker are joined. Subsampled and cut to a few turns
  so a tiny model's 256-token context holds them.
- `chatterbot-corpus` (BSD-3), English YAML files: ~2,000 short question/answer conversations, ~900
  distinct (duplicates across files are dropped).
- identity: a few dozen conversations about who the assistant is (written here).
- verifiable tasks from `chatstack.data.tasks` (generated, with held-out splits).

Every source has a deterministic train / test split (a hash of the conversation's id), so held-out
conversation loss is measured on conversations SFT never saw.

    from chatstack.data.chat_builtin import builtin_mix
    convs = builtin_mix("train", seed=0)    # [{"messages": [...], "source": "chitchat"}, ...]
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from functools import lru_cache
from pathlib import Path

from chatstack.data.tasks import task_conversations

# defaults sized for a ~4-minute CPU SFT of the tiny model (see docs/sft.md)
# Tasks dominate by design: a ~1M-parameter model needs ~7k examples of a skill to learn it in a 4-minute
# run (docs/sft.md has the measurements); the chat sources are a small share that keeps the assistant role.
DEFAULT_MIX = {"chitchat": 0.3, "chatterbot": 0.5, "identity": 2.0, "tasks": 6.0}
DEFAULT_SIZES = {"chitchat": 2000, "tasks_per_task": 4000}
# Per-task shares of the task examples (train split only). The column-addition chain of thought (add3) rests on
# 100 single-digit sums and needs the most: at equal shares it reached 2-68% over seven runs, at 2x 94-97%.
# Halving compare and count cost them 10-50 points, so they stay at 1 (docs/sft.md).
DEFAULT_TASK_WEIGHTS = {
    "add": 1.0,
    "sub": 1.0,
    "compare": 1.0,
    "reverse": 1.5,
    "count": 1.0,
    "add3": 2.0,
    "word_problem": 1.5,
}
TEST_TASK_CAP = 300  # held-out examples per task at most (held-out loss is measured at every eval)
TEST_FRACTION = 10  # 1 in 10 conversations (by id hash) is held out


def _split(name: str, key: str) -> str:
    h = hashlib.blake2b(f"{name}|{key}".encode(), digest_size=8).digest()
    return "test" if int.from_bytes(h, "little") % TEST_FRACTION == 0 else "train"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the built-in chat data needs the `{name.replace('_', '-')}` package "
            f"(pip install -e .[data], see the README)"
        )
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=1)
def _chitchat_raw() -> dict:
    path = _package_dir("chitchat_dataset") / "dataset.json"
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def chitchat(
    split: str, n: int | None = None, max_turns: int = 6, max_chars: int = 300, seed: int = 0
) -> list[list[dict]]:
    """Chit-chat conversations: speaker 1 -> user, speaker 2 -> assistant; first `max_turns` turns.

    Turns longer than `max_chars` end the conversation there (keeps rows short for a 256-token context)."""
    out = []
    for cid, conv in sorted(_chitchat_raw().items()):
        if _split("chitchat", cid) != split:
            continue
        groups = conv.get("messages") or []
        if not groups:
            continue
        first = groups[0][0]["sender"]
        msgs = []
        for g in groups[:max_turns]:
            text = " ".join(u["text"].strip() for u in g if u.get("text", "").strip())
            if not text or len(text) > max_chars:
                break
            role = "user" if g[0]["sender"] == first else "assistant"
            if msgs and msgs[-1]["role"] == role:  # the grouping already merges these; be safe
                msgs[-1]["content"] += " " + text
            else:
                msgs.append({"role": role, "content": text})
        if msgs and msgs[-1]["role"] == "user":
            msgs.pop()  # end on an assistant reply
        if any(m["role"] == "assistant" for m in msgs):
            out.append(msgs)
    random.Random(f"chitchat|{split}|{seed}").shuffle(out)
    return out[:n] if n else out


def chatterbot(split: str) -> list[list[dict]]:
    """English chatterbot-corpus conversations: alternate user / assistant, starting with the user."""
    try:
        import yaml  # noqa: PLC0415 (an optional dependency: only this source needs it)
    except ImportError:
        raise FileNotFoundError(
            "the chatterbot corpus is YAML: pip install pyyaml (or pip install -e .[data])"
        ) from None

    root = _package_dir("chatterbot_corpus") / "data" / "english"
    out, seen = [], set()
    for f in sorted(root.glob("*.yml")):
        with open(f, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        for conv in data.get("conversations") or []:
            if not isinstance(conv, list) or len(conv) < 2:
                continue
            turns = [str(t).strip() for t in conv if isinstance(t, (str, int, float)) and str(t).strip()]
            # split (and deduplicate) by content: some Q&A pairs occur in several files
            key = json.dumps(turns)
            if key in seen or _split("chatterbot", key) != split:
                continue
            seen.add(key)
            msgs = [{"role": "user" if j % 2 == 0 else "assistant", "content": t} for j, t in enumerate(turns)]
            if msgs and msgs[-1]["role"] == "user":
                msgs.pop()
            if len(msgs) >= 2:
                out.append(msgs)
    return out


IDENTITY_QUESTIONS = [
    "Who are you?",
    "What are you?",
    "What is your name?",
    "What's your name?",
    "Are you a person?",
    "Who made you?",
    "Who trained you?",
    "Where do you run?",
    "Are you ChatGPT?",
    "Tell me about yourself.",
    "Introduce yourself.",
    "Are you a robot?",
    "What can you do?",
    "Who created you?",
    "hi, who am I talking to?",
    "Do you have a name?",
]
IDENTITY_ANSWERS = {
    "name": [
        "I am chatstack, a small assistant.",
        "My name is chatstack.",
        "I'm chatstack, a small language model trained by my user on their own machine.",
    ],
    "maker": [
        "I was trained by my user, on their own machine, with the chatstack code.",
        "My user trained me on their own computer: pretraining on Shakespeare, then chat fine-tuning.",
    ],
    "where": [
        "I run on my user's own machine; I do not need the internet.",
        "I run locally, on the computer of the person who trained me.",
    ],
    "what": [
        "I am chatstack, a tiny language model. I can chat a little and do simple sums.",
        "I can chat a little, add and subtract small numbers, compare numbers and count letters.",
    ],
    "person": [
        "No, I am chatstack, a small language model, not a person.",
        "No. I'm chatstack, a program trained by my user on their machine.",
    ],
    "chatgpt": ["No, I am chatstack, a much smaller model trained by my user on their own machine."],
}
_Q_KIND = {
    "Who made you?": "maker",
    "Who trained you?": "maker",
    "Who created you?": "maker",
    "Where do you run?": "where",
    "What can you do?": "what",
    "Are you a person?": "person",
    "Are you a robot?": "person",
    "Are you ChatGPT?": "chatgpt",
}


def identity(split: str) -> list[list[dict]]:
    """A few dozen identity conversations ("Who are you?" -> chatstack, trained by its user)."""
    out = []
    for q in IDENTITY_QUESTIONS:
        for a in IDENTITY_ANSWERS[_Q_KIND.get(q, "name")]:
            for greet in ("", "Hello! "):
                msgs = [{"role": "user", "content": greet + q}, {"role": "assistant", "content": a}]
                if _split("identity", greet + q + a) == split:
                    out.append(msgs)
    return out


def builtin_mix(
    split: str,
    seed: int = 0,
    mix: dict[str, float] | None = None,
    sizes: dict[str, int] | None = None,
    tasks: list[str] | None = None,
    task_weights: dict[str, float] | None = None,
) -> list[dict]:
    """The default SFT data: [{"messages", "source"}]; weights repeat a source (2.0 = twice, 0.5 = half).

    `task_weights` overrides DEFAULT_TASK_WEIGHTS (the share of each verifiable task in the train split)."""
    tw = {**DEFAULT_TASK_WEIGHTS, **(task_weights or {})}
    mix = {**DEFAULT_MIX, **(mix or {})}
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    unknown = set(mix) - set(DEFAULT_MIX)
    if unknown:
        raise ValueError(f"unknown built-in source(s) {sorted(unknown)}; choose from {', '.join(DEFAULT_MIX)}")
    test = split == "test"
    n_chat = sizes["chitchat"] // (TEST_FRACTION - 1) if test else sizes["chitchat"]
    n_task = min(max(sizes["tasks_per_task"] // 8, 20), TEST_TASK_CAP) if test else sizes["tasks_per_task"]
    pools = {
        "chitchat": lambda: chitchat(split, n_chat, seed=seed),
        "chatterbot": lambda: chatterbot(split),
        "identity": lambda: identity(split),
        "tasks": lambda: [c["messages"] for c in task_conversations(split, n_task, seed, tasks, None if test else tw)],
    }
    rng = random.Random(f"mix|{split}|{seed}")
    out = []
    for name, w in mix.items():
        if w <= 0:
            continue
        convs = pools[name]()
        # held-out data is measured once, not weighted
        reps = 1.0 if test else w
        whole, frac = int(reps), reps - int(reps)
        chosen = convs * whole + [c for c in convs if rng.random() < frac]
        out += [{"messages": c, "source": name} for c in chosen]
    rng.shuffle(out)
    return out
