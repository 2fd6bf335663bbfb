"""Token shards on disk: flat binary files of token ids plus one `meta.json` index per prepared dataset.

    DATA/
      meta.json          {"format": 1, "dtype": "uint16", "tokenizer": {"fingerprint", "vocab_size", "eot_id"},
                          "splits": {"train": {"shards": [{"file", "tokens"}], "tokens", "documents", "bytes",
                          "chars"}, "val": {...}}, "sources": [...]}
      tokenizer.json     the tokenizer the shards were made with (pretraining reads it from here)
      train_000.bin ...  uint16 when the vocabulary fits in 65,536 ids, else uint32; documents end in <|endoftext|>


A dataset directory is written whole into a temporary sibling and renamed into place, so a crash never
leaves a half-written shard or an index that points at one. The tokenizer fingerprint (a hash of every
token's bytes and the specials) is checked whenever shards are read with a tokenizer: ids from one
tokenizer mean nothing to another.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chatstack.tokenizer import Tokenizer

META = "meta.json"
FORMAT = 1


class DataError(Exception):
    """A dataset directory or input file is missing, malformed, or does not match; the message names it."""


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """sha256 over the bytes of every token id plus the special ids: equal iff the id -> bytes maps agree."""
    h = hashlib.sha256()
    h.update(f"{tok.vocab_size}:{tok.eot_id}".encode())
    for i in range(tok.vocab_size):
        b = tok.token_bytes(i)
        h.update(len(b).to_bytes(4, "little") + b)
    return h.hexdigest()[:16]


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_array_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        arr.tofile(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Append token arrays of one split; cut into shards of `shard_tokens` ids."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.dir, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.buf: list[np.ndarray] = []
        self.n_buf = 0
        self.shards: list[dict] = []
        self.tokens = 0

    def add(self, ids: list[int] | np.ndarray) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self.buf.append(arr)
        self.n_buf += arr.size
        self.tokens += arr.size
        while self.n_buf >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        flat = np.concatenate(self.buf) if len(self.buf) > 1 else self.buf[0]
        head, rest = flat[:n], flat[n:]
        name = f"{self.split}_{len(self.shards):03d}.bin"
        write_array_atomic(self.dir / name, head)
        self.shards.append({"file": name, "tokens": int(head.size)})
        self.buf, self.n_buf = ([rest] if rest.size else []), int(rest.size)

    def close(self) -> list[dict]:
        if self.n_buf:
            self._flush(self.n_buf)
        return self.shards


@dataclass
class Split:
    """One split of a prepared dataset, memory-mapped: `tokens` is a flat read-only array of all shards."""

    name: str
    tokens: np.ndarray
    info: dict

    def __len__(self) -> int:
        return int(self.tokens.size)


class TokenDataset:
    """A prepared dataset directory (see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_path = self.path / META
        if not self.path.is_dir():
            raise DataError(f"{self.path}: no such dataset directory (make one with `chatstack data prepare`)")
        if not meta_path.exists():
            raise DataError(f"{meta_path}: missing (is {self.path} a prepared dataset?)")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{meta_path}: corrupt JSON ({e})") from e
        for key in ("dtype", "tokenizer", "splits"):
            if key not in self.meta:
                raise DataError(f"{meta_path}: no {key!r} field")
        self.dtype = np.dtype(self.meta["dtype"])
        self._splits: dict[str, Split] = {}

    @property
    def fingerprint(self) -> str:
        return self.meta["tokenizer"]["fingerprint"]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["tokenizer"]["vocab_size"])

    def check_tokenizer(self, tok: Tokenizer, where: str = "tokenizer") -> None:
        fp = tokenizer_fingerprint(tok)
        if fp != self.fingerprint:
            raise DataError(
                f"{self.path / META}: shards were made with tokenizer {self.fingerprint} "
                f"(vocab {self.vocab_size}) but {where} is {fp} (vocab {tok.vocab_size}); "
                f"re-run `chatstack data prepare` with this tokenizer"
            )

    def tokenizer(self) -> Tokenizer:
        p = self.path / "tokenizer.json"
        if not p.exists():
            raise DataError(f"{p}: missing (pass --tokenizer)")
        tok = Tokenizer.load(p)
        self.check_tokenizer(tok, str(p))
        return tok

    def split(self, name: str) -> Split:
        if name in self._splits:
            return self._splits[name]
        splits = self.meta["splits"]
        if name not in splits:
            raise DataError(f"{self.path / META}: no {name!r} split (has: {', '.join(splits) or 'none'})")
        info = splits[name]
        parts = []
        for sh in info["shards"]:
            f = self.path / sh["file"]
            if not f.exists():
                raise DataError(f"{f}: missing shard listed in {self.path / META}")
            expect = int(sh["tokens"]) * self.dtype.itemsize
            if f.stat().st_size != expect:
                raise DataError(f"{f}: {f.stat().st_size} bytes, expected {expect} (truncated or foreign shard)")
            parts.append(np.memmap(f, dtype=self.dtype, mode="r"))
        if not parts or sum(p.size for p in parts) == 0:
            raise DataError(f"{self.path / META}: split {name!r} holds no tokens")
        # one shard (the usual case for small corpora) stays a zero-copy memmap; several are joined once
        tokens = parts[0] if len(parts) == 1 else np.concatenate(parts)
        s = Split(name, tokens, info)
        self._splits[name] = s
        return s
