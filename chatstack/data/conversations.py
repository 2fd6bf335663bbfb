"""Conversations for SFT: JSONL loading with validation, ChatML rendering, packing into rows with loss masks.

File format (OpenAI fine-tuning files, TRL "conversational" datasets), one conversation per line:

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

A bad line is an error naming the file, the line and the problem (bad JSON, unknown role, no assistant
turn, empty content). A conversation too long for the context is *truncated* at the last turn boundary
that keeps at least one assistant reply, or *dropped* when even its first reply does not fit; both are
counted in the summary (`on_long="drop"` drops them all instead).

Packing. Short conversations are packed several to a row of `block_size + 1` tokens (best-fit
decreasing). Each token carries its conversation's index in the row: the batch gets positions that
restart at 0 for every conversation and a block-diagonal causal attention mask, so a conversation never
attends to the one before it (it would see text it cannot see at inference). The loss mask keeps only
assistant content and its <|im_end|>; the first token of each conversation is never a target of the
previous one.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from chatstack.model import best_fit_rows, packed_layout
from chatstack.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
# the default training row length when --seq-len is not given: the context, capped here (an 8k-context model such
# as SmolLM2 would otherwise pack rows of 8,193 tokens, impractical on a CPU)
DEFAULT_SEQ_CAP = 1024


def resolve_seq_len(seq_len: int, block_size: int) -> int:
    """Tokens a training row feeds the model (--seq-len; 0 = min(context, DEFAULT_SEQ_CAP)); ValueError if it
    exceeds the context. Batches trim trailing padding (make_batch), so data shorter than a row costs nothing."""
    if seq_len < 0:
        raise ValueError(f"--seq-len must be positive, got {seq_len}")
    if seq_len > block_size:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's context length (block_size {block_size})")
    return seq_len or min(block_size, DEFAULT_SEQ_CAP)


class ConversationError(ValueError):
    """A conversation file has a bad line; the message starts with `file:line:`."""


@dataclass
class LoadSummary:
    conversations: int = 0  # kept
    truncated: int = 0  # too long: later turns cut off at a turn boundary
    dropped_long: int = 0  # too long even for the first assistant reply
    skipped_invalid: int = 0  # invalid lines skipped (only with strict=False)
    tokens: int = 0
    trained_tokens: int = 0  # tokens with loss mask 1
    sources: dict = field(default_factory=dict)

    def line(self) -> str:
        s = (
            f"{self.conversations:,} conversations, {self.tokens:,} tokens ({self.trained_tokens:,} trained); "
            f"{self.truncated} truncated, {self.dropped_long} dropped as too long"
        )
        if self.skipped_invalid:
            s += f", {self.skipped_invalid} invalid lines skipped"
        return s


def validate_messages(obj: object, where: str) -> list[dict]:
    """Check one record; returns its messages or raises ConversationError("{where}: problem")."""
    if not isinstance(obj, dict):
        raise ConversationError(f"{where}: expected a JSON object with a 'messages' list, got {type(obj).__name__}")
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ConversationError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ConversationError(f"{where}: messages[{i}] is not an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ConversationError(
                f"{where}: messages[{i}] has unknown role {role!r} (expected system, user or assistant)"
            )
        if not isinstance(content, str):
            raise ConversationError(f"{where}: messages[{i}] ({role}) 'content' must be a string")
        if not content.strip():
            raise ConversationError(f"{where}: messages[{i}] ({role}) has empty content")
        if role == "system" and i != 0:
            raise ConversationError(f"{where}: messages[{i}] a system message may only come first")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ConversationError(f"{where}: no assistant turn (nothing to train on)")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def read_jsonl(path: str | Path, strict: bool = True, summary: LoadSummary | None = None) -> list[list[dict]]:
    """Validated message lists from one JSONL file (blank lines ignored)."""
    path = Path(path)
    if not path.exists():
        raise ConversationError(f"{path}: no such file")
    out = []
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{ln}"
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConversationError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from e
                out.append(validate_messages(obj, where))
            except ConversationError:
                if strict:
                    raise
                if summary is not None:
                    summary.skipped_invalid += 1
    return out


def write_jsonl(path: str | Path, conversations: Iterable[list[dict]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for msgs in conversations:
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """Prepend a system prompt (replacing none that is already there)."""
    if not system or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system}] + messages


def render(
    tokenizer: Tokenizer, messages: list[dict], max_len: int, on_long: str = "truncate"
) -> tuple[list[int], list[int], bool] | None:
    """ChatML (ids, mask) of one conversation fitting `max_len` tokens, or None if it must be dropped.

    Returns (ids, mask, truncated: bool)."""
    ids, mask = [], []
    end_of_reply = 0  # length after the last complete assistant turn
    truncated = False
    for m in messages:
        t_ids, t_mask = tokenizer.render_chat([m])
        if len(ids) + len(t_ids) > max_len:
            truncated = True
            break
        ids += t_ids
        mask += t_mask
        if m["role"] == "assistant":
            end_of_reply = len(ids)
    if truncated:
        if on_long == "drop" or end_of_reply == 0:
            return None
        # end on the last assistant reply that fits, not on a dangling user message
        ids, mask = ids[:end_of_reply], mask[:end_of_reply]
    return ids, mask, truncated


def encode_conversations(
    tokenizer: Tokenizer,
    conversations: list[list[dict]],
    max_len: int,
    system: str | None = None,
    on_long: str = "truncate",
    summary: LoadSummary | None = None,
) -> tuple[list[tuple[list[int], list[int]]], LoadSummary]:
    """Render every conversation; returns [(ids, mask)] and fills `summary`."""
    if on_long not in ("truncate", "drop"):
        raise ValueError(f"on_long must be 'truncate' or 'drop', got {on_long!r}")
    summary = summary if summary is not None else LoadSummary()
    out = []
    rendered: dict[int, tuple | None] = {}  # a weighted mix repeats the same list objects: render each once
    for msgs in conversations:
        if id(msgs) not in rendered:
            rendered[id(msgs)] = render(tokenizer, with_system(msgs, system), max_len, on_long)
        r = rendered[id(msgs)]
        if r is None:
            summary.dropped_long += 1
            continue
        ids, mask, truncated = r
        summary.truncated += int(truncated)
        summary.conversations += 1
        summary.tokens += len(ids)
        summary.trained_tokens += sum(mask)
        out.append((ids, mask))
    return out, summary


@dataclass
class PackedRows:
    """Rows of `row_len` tokens: ids, loss mask (on the token itself), conversation index per token (-1 = pad)."""

    ids: torch.Tensor  # (N, L) long
    mask: torch.Tensor  # (N, L) uint8
    doc: torch.Tensor  # (N, L) int16/long

    def __len__(self) -> int:
        return self.ids.size(0)

    def fill(self) -> float:
        return float((self.doc >= 0).float().mean())


def pack(
    encoded: list[tuple[list[int], list[int]]], row_len: int, pad_id: int, seed: int = 0, packed: bool = True
) -> PackedRows:
    """Best-fit-decreasing packing of conversations into rows of `row_len` tokens (packed=False: one per row)."""
    items = list(encoded)
    random.Random(seed).shuffle(items)  # ties in length end up in random order
    for ids, _ in items:
        if len(ids) > row_len:
            raise ValueError(f"conversation of {len(ids)} tokens exceeds the row length {row_len}")
    if packed:
        rows = best_fit_rows([len(ids) for ids, _ in items], row_len)
        random.Random(seed + 1).shuffle(rows)
    else:
        rows = [[i] for i in range(len(items))]
    # fill Python lists and convert once: per-slice tensor writes cost seconds on 200k conversations
    all_ids, all_mask, all_doc = [], [], []
    for members in rows:
        r_ids, r_mask, r_doc = [], [], []
        for d, i in enumerate(members):
            t, m = items[i]
            r_ids += t
            r_mask += m
            r_doc += [d] * len(t)
        pad = row_len - len(r_ids)
        all_ids.append(r_ids + [pad_id] * pad)
        all_mask.append(r_mask + [0] * pad)
        all_doc.append(r_doc + [-1] * pad)
    N = len(rows)
    ids = torch.tensor(all_ids, dtype=torch.long).reshape(N, row_len)
    mask = torch.tensor(all_mask, dtype=torch.uint8).reshape(N, row_len)
    doc = torch.tensor(all_doc, dtype=torch.long).reshape(N, row_len)
    return PackedRows(ids, mask, doc)


def make_batch(rows: PackedRows, index: torch.Tensor, trim: bool = True) -> dict[str, torch.Tensor]:
    """A training batch from rows `index`: inputs/targets shifted by one, positions and attention per conversation.

    idx, targets, positions: (B, T) with T = row_len - 1 (or less: trailing all-pad columns are trimmed);
    attn_mask: (B, 1, T, T) bool, causal within each conversation; targets -1 where no loss."""
    ids, mask, doc = rows.ids[index], rows.mask[index], rows.doc[index]
    if trim:
        used = int((doc >= 0).sum(1).max())  # the longest row decides the width
        used = max(used, 2)
        ids, mask, doc = ids[:, :used], mask[:, :used], doc[:, :used]
    x, y = ids[:, :-1], ids[:, 1:].clone()
    d_in, d_out = doc[:, :-1], doc[:, 1:]
    # a target counts if it is assistant text and belongs to the same conversation as its input token
    keep = (mask[:, 1:] > 0) & (d_in == d_out) & (d_out >= 0)
    y[~keep] = -1
    positions, attn_mask = packed_layout(d_in)  # positions restart at every conversation
    n_tokens = torch.tensor(int((d_in >= 0).sum()))  # real (non-pad) input tokens
    return {"idx": x, "targets": y, "positions": positions, "attn_mask": attn_mask, "n_tokens": n_tokens}


def load_conversations(
    paths: list[str | Path],
    tokenizer: Tokenizer,
    max_len: int,
    system: str | None = None,
    on_long: str = "truncate",
    strict: bool = True,
) -> tuple[list[tuple[list[int], list[int]]], LoadSummary]:
    """Read, validate and render JSONL files; returns ([(ids, mask)], LoadSummary)."""
    summary = LoadSummary()
    convs = []
    for p in paths:
        c = read_jsonl(p, strict=strict, summary=summary)
        summary.sources[str(p)] = len(c)
        convs += c
    return encode_conversations(tokenizer, convs, max_len, system, on_long, summary)
