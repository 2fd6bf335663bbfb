"""Preference data: rankings and pairs, loaded, validated and grouped into comparison groups.

Two JSONL formats are accepted everywhere (one object per line):

    rankings  {"prompt": [messages] | "text", "responses": ["best", ..., "worst"], "scores": [optional]}
    pairs     {"prompt": [messages] | "text", "chosen": "...", "rejected": "..."}     (TRL's format)

`messages` are ChatML messages [{"role": "system"|"user"|"assistant", "content": str}] ending before the
answer. TRL's conversational variants are accepted too: "chosen"/"rejected" as message lists whose last
message is the assistant's answer (and, without "prompt", the earlier messages are the prompt).

An optional "scores" list (non-increasing, one per response) marks ties: responses with equal scores are
not compared with each other. Without it, a ranking of K responses yields all C(K,2) ordered pairs.

Everything is grouped per prompt into one `Comparison` (responses + the (winner, loser) index pairs among
them): the reward model's batch element, so a prompt's comparisons are never split across batches
(InstructGPT, Ouyang et al. 2022, section 3.5). Pairs lines that share a prompt join one group.

"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant")


class PreferenceError(ValueError):
    """Bad preference data; the message names the file, line and field."""


@dataclass
class Comparison:
    prompt: list[dict]  # ChatML messages before the answer
    responses: list[str]  # distinct answers
    pairs: list[tuple[int, int]]  # (preferred index, dispreferred index) into responses
    source: str = ""  # "file:line" of the (first) record
    task: str = ""  # the record's "task" field, if any (built-in judge rankings)

    @property
    def key(self) -> str:
        return prompt_key(self.prompt)


def prompt_key(prompt: list[dict]) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def _where(path: str | os.PathLike, lineno: int) -> str:
    return f"{path}:{lineno}"


def _messages(value: object, where: str, fld: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise PreferenceError(f"{where}: field '{fld}' is empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise PreferenceError(f"{where}: field '{fld}' must be a string or a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise PreferenceError(f"{where}: {fld}[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise PreferenceError(f"{where}: {fld}[{i}].role {m['role']!r} is not one of {ROLES}")
        if not isinstance(m["content"], str):
            raise PreferenceError(f"{where}: {fld}[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _answer(value: object, where: str, fld: str) -> tuple[str, list[dict] | None]:
    """An answer as text; a TRL conversational answer (message list) also returns its leading messages."""
    if isinstance(value, str):
        return value, None
    msgs = _messages(value, where, fld)
    if msgs[-1]["role"] != "assistant":
        raise PreferenceError(f"{where}: the last message of '{fld}' must be the assistant's answer")
    return msgs[-1]["content"], msgs[:-1]


def parse_record(obj: object, where: str) -> tuple[list[dict], list[str], list[tuple[int, int]]]:
    """One JSON line -> (prompt messages, responses, pairs)."""
    if not isinstance(obj, dict):
        raise PreferenceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "responses" in obj:
        if "prompt" not in obj:
            raise PreferenceError(f"{where}: missing field 'prompt'")
        prompt = _messages(obj["prompt"], where, "prompt")
        resp = obj["responses"]
        if not isinstance(resp, list) or len(resp) < 2:
            raise PreferenceError(f"{where}: field 'responses' must be a list of at least 2 answers (best first)")
        texts = []
        for i, r in enumerate(resp):
            t, _ = _answer(r, where, f"responses[{i}]")
            texts.append(t)
        if len(set(texts)) != len(texts):
            raise PreferenceError(f"{where}: field 'responses' holds duplicate answers; a ranking needs distinct ones")
        scores = obj.get("scores")
        if scores is not None:
            if (
                not isinstance(scores, list)
                or len(scores) != len(texts)
                or not all(isinstance(s, (int, float)) for s in scores)
            ):
                raise PreferenceError(f"{where}: field 'scores' must be a list of {len(texts)} numbers")
            if any(scores[i] < scores[i + 1] for i in range(len(scores) - 1)):
                raise PreferenceError(f"{where}: field 'scores' must be non-increasing (responses are best first)")
        pairs = [
            (i, j)
            for i in range(len(texts))
            for j in range(i + 1, len(texts))
            if scores is None or scores[i] > scores[j]
        ]
        return prompt, texts, pairs
    if "chosen" in obj or "rejected" in obj:
        for f in ("chosen", "rejected"):
            if f not in obj:
                raise PreferenceError(f"{where}: missing field '{f}'")
        chosen, c_prefix = _answer(obj["chosen"], where, "chosen")
        rejected, r_prefix = _answer(obj["rejected"], where, "rejected")
        if "prompt" in obj:
            prompt = _messages(obj["prompt"], where, "prompt")
        elif c_prefix:
            if r_prefix != c_prefix:
                raise PreferenceError(
                    f"{where}: without 'prompt', 'chosen' and 'rejected' must share their leading messages"
                )
            prompt = c_prefix
        else:
            raise PreferenceError(f"{where}: missing field 'prompt'")
        if chosen == rejected:
            raise PreferenceError(f"{where}: 'chosen' and 'rejected' are the same answer")
        return prompt, [chosen, rejected], [(0, 1)]
    raise PreferenceError(
        f"{where}: neither a ranking ('prompt', 'responses') nor a pair ('prompt', 'chosen', 'rejected')"
    )


def group_records(records: list[tuple]) -> list[Comparison]:
    """Merge records (prompt, texts, pairs, where[, task]) sharing a prompt into one Comparison
    (responses de-duplicated, pairs re-indexed)."""
    groups: dict[str, Comparison] = {}
    for prompt, texts, pairs, where, *rest in records:
        key = prompt_key(prompt)
        g = groups.get(key)
        if g is None:
            g = groups[key] = Comparison(
                prompt=prompt, responses=[], pairs=[], source=where, task=rest[0] if rest else ""
            )
        index = {t: i for i, t in enumerate(g.responses)}
        local = []
        for t in texts:
            if t not in index:
                index[t] = len(g.responses)
                g.responses.append(t)
            local.append(index[t])
        seen = set(g.pairs)
        for i, j in pairs:
            p = (local[i], local[j])
            if p not in seen:
                g.pairs.append(p)
                seen.add(p)
    return [g for g in groups.values() if g.pairs]


def load_preferences(paths: str | os.PathLike | list) -> list[Comparison]:
    """Read rankings and/or pairs JSONL file(s) into comparison groups (one per distinct prompt)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    records = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise PreferenceError(f"{path}: no such file")
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = _where(path, lineno)
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PreferenceError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None
                prompt, texts, pairs = parse_record(obj, where)
                task = obj.get("task") if isinstance(obj.get("task"), str) else ""
                records.append((prompt, texts, pairs, where, task))
    groups = group_records(records)
    if not groups:
        raise PreferenceError(f"{', '.join(map(str, paths))}: no comparisons found")
    return groups


def split_by_prompt(
    groups: list[Comparison], val_frac: float, seed: int = 0
) -> tuple[list[Comparison], list[Comparison]]:
    """Deterministic train/held-out split by a hash of the prompt (a prompt never lands on both sides)."""
    train, val = [], []
    for g in groups:
        h = hashlib.sha256(f"{seed}:{g.key}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2**64
        (val if u < val_frac else train).append(g)
    if val_frac > 0 and not val and len(train) > 1:
        val.append(train.pop())  # tiny sets: keep at least one held-out prompt
    return train, val


def write_rankings(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write ranking records atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def summary(groups: list[Comparison]) -> dict:
    return {
        "prompts": len(groups),
        "responses": sum(len(g.responses) for g in groups),
        "pairs": sum(len(g.pairs) for g in groups),
    }
