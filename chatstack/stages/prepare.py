"""`chatstack data prepare`: text corpora -> token shards (see chatstack/data/shards.py for the layout).

    chatstack data prepare --builtin shakespeare --tokenizer runs/tok --out runs/data/shakespeare
    chatstack data prepare --input notes/ book.txt web.jsonl --tokenizer runs/tok --out runs/data/mine
    chatstack data prepare --input train.jsonl --val-input val.jsonl --tokenizer runs/tok --out DATA

Inputs: text files (one document each), folders of them (searched recursively; `*.jsonl` inside are read
as JSONL), and JSONL files with a `text` field per line (one document a line). Validation is held out by
document: the built-in corpus holds out whole plays; other inputs use --val-input, or else every k-th
document (--val-fraction); a single-document corpus gives its last --val-fraction of lines.
Documents are tokenized in parallel (the Rust tokenizer's thread pool, batches of documents) and each
document is followed by <|endoftext|>. Any bad input stops the run with its file and line named, before
anything is written; the output directory is replaced atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from chatstack.args import CLIError
from chatstack.data.builtin import builtin_documents
from chatstack.data.shards import FORMAT, META, DataError, ShardWriter, dtype_for_vocab, tokenizer_fingerprint
from chatstack.tokenizer import Tokenizer

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst", ""}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
CHUNK_CHARS = 1 << 20  # documents longer than this are encoded in paragraph-aligned pieces (parallelism)


# ---- reading inputs -------------------------------------------------------------------------------------
def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: undecodable bytes at offset {e.start} ({e.reason}); the corpus must be UTF-8 text"
        ) from None


def read_text_file(path: Path) -> str:
    return _decode(path, path.read_bytes()).replace("\r\n", "\n")


def read_jsonl(path: Path, field: str = "text") -> Iterator[tuple[str, str]]:
    text = _decode(path, path.read_bytes())
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict) or field not in row:
            raise DataError(f"{path}:{lineno}: no {field!r} field")
        if not isinstance(row[field], str):
            raise DataError(f"{path}:{lineno}: field {field!r} must be a string, got {type(row[field]).__name__}")
        yield f"{path}:{lineno}", row[field]


def iter_documents(paths: Iterable[str | os.PathLike], field: str = "text") -> Iterator[tuple[str, str]]:
    """(name, text) for every document under `paths` (files, folders, JSONL), in a stable order."""
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"{p}: no such file or directory")
        if p.is_dir():
            files = sorted(
                f
                for f in p.rglob("*")
                if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES
            )
            if not files:
                raise DataError(f"{p}: folder holds no text (.txt/.md) or .jsonl files")
        else:
            files = [p]
        for f in files:
            if f.suffix.lower() in JSONL_SUFFIXES:
                yield from read_jsonl(f, field)
            else:
                yield str(f), read_text_file(f)


def split_documents(docs: list[tuple[str, str]], val_fraction: float) -> tuple[list, list]:
    """Hold out every k-th document (k = 1/val_fraction), or the tail of a lone document."""
    if val_fraction <= 0:
        return docs, []
    if len(docs) == 1:
        name, text = docs[0]
        lines = text.splitlines(keepends=True)
        cut = max(1, int(len(lines) * (1 - val_fraction)))
        if cut >= len(lines):
            raise DataError(
                f"{name}: too short to hold out {val_fraction:.0%} for validation; pass --val-input or --val-fraction 0"
            )
        return [(name, "".join(lines[:cut]))], [(name + "#val", "".join(lines[cut:]))]
    k = max(2, round(1 / val_fraction))
    train = [d for i, d in enumerate(docs) if i % k != k - 1]
    val = [d for i, d in enumerate(docs) if i % k == k - 1]
    if not val:  # fewer than k documents: the last one is the validation set
        train, val = docs[:-1], docs[-1:]
    return train, val


def _pieces(text: str) -> list[str]:
    """Cut a very long document at paragraph breaks so the encoder threads share it."""
    if len(text) <= CHUNK_CHARS:
        return [text]
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + CHUNK_CHARS)
        if end < len(text):
            brk = text.rfind("\n\n", start, end)
            if brk > start:
                end = brk + 2
        out.append(text[start:end])
        start = end
    return out


# ---- tokenizing -----------------------------------------------------------------------------------------
def _utf8_chars(b: bytes) -> int:
    return sum(1 for x in b if x & 0xC0 != 0x80)  # one lead byte per character


def tokenize_split(tok, docs: list[tuple[str, str]], writer: ShardWriter, desc: str, batch_docs: int = 16) -> dict:
    n_bytes = n_chars = 0
    total = sum(len(t) for _, t in docs)
    with tqdm(total=total, desc=f"tokenize {desc}", unit="char", unit_scale=True, dynamic_ncols=True) as bar:
        for i in range(0, len(docs), batch_docs):
            batch = docs[i : i + batch_docs]
            pieces, owners = [], []
            for j, (_, text) in enumerate(batch):
                for piece in _pieces(text):
                    pieces.append(piece)
                    owners.append(j)
            encoded = tok.encode_batch(pieces)  # the Rust encoder runs the batch on all cores
            for j, (name, text) in enumerate(batch):
                ids = [t for piece_ids, o in zip(encoded, owners) if o == j for t in piece_ids]
                writer.add(ids + [tok.eot_id])
                b = text.encode("utf-8")
                n_bytes += len(b)
                n_chars += len(text)
                bar.update(len(text))
    return {"documents": len(docs), "bytes": n_bytes, "chars": n_chars}


def load_tokenizer_arg(path: str):
    p = Path(path)
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.exists():
        raise DataError(f"{f}: no tokenizer here (train one with `chatstack tokenizer train`)")
    try:
        return Tokenizer.load(f)
    except Exception as e:
        raise DataError(f"{f}: cannot load tokenizer ({type(e).__name__}: {e})") from e


def prepare(
    out: str | os.PathLike, tok, train_docs: list, val_docs: list, sources: list[dict], shard_tokens: int = 1 << 26
) -> Path:
    """Tokenize the documents and write the dataset directory `out` atomically."""
    out = Path(out)
    if not train_docs or sum(len(t) for _, t in train_docs) == 0:
        raise DataError(f"empty corpus: no training text in {', '.join(s['name'] for s in sources)}")
    dtype = dtype_for_vocab(tok.vocab_size)
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        splits = {}
        for name, docs in (("train", train_docs), ("val", val_docs)):
            if not docs:
                continue
            w = ShardWriter(tmp, name, dtype, shard_tokens)
            stats = tokenize_split(tok, docs, w, name)
            splits[name] = {"shards": w.close(), "tokens": w.tokens, **stats}
        tok.save(tmp / "tokenizer.json")
        meta = {
            "format": FORMAT,
            "dtype": dtype.name,
            "tokenizer": {
                "fingerprint": tokenizer_fingerprint(tok),
                "vocab_size": tok.vocab_size,
                "eot_id": tok.eot_id,
                **(tok.info() if hasattr(tok, "info") else {}),
            },
            "splits": splits,
            "sources": sources,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave half a dataset behind
        raise
    old = out.parent / f".{out.name}.old"
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def _cmd_prepare(args) -> int:
    try:
        tok = load_tokenizer_arg(args.tokenizer)
        if args.builtin:
            try:
                train_docs = list(builtin_documents(args.builtin, "train"))
                val_docs = list(builtin_documents(args.builtin, "val"))
            except (ValueError, FileNotFoundError) as e:
                raise DataError(str(e)) from None
            sources = [{"name": f"builtin:{args.builtin}", "split": "by document (held-out plays)"}]
        elif args.input:
            train_docs = list(iter_documents(args.input, args.field))
            if args.val_input:
                val_docs = list(iter_documents(args.val_input, args.field))
            else:
                train_docs, val_docs = split_documents(train_docs, args.val_fraction)
            sources = [{"name": str(p)} for p in args.input]
        else:
            raise CLIError("give --builtin NAME or --input FILE/DIR ...")
        if not train_docs:
            raise DataError(f"empty corpus: {', '.join(args.input or [args.builtin])} holds no documents")
        path = prepare(args.out, tok, train_docs, val_docs, sources, args.shard_tokens)
    except DataError as e:
        raise CLIError(str(e)) from None
    meta = json.loads((path / META).read_text())
    for name, s in meta["splits"].items():
        print(
            f"{name:5s} {s['documents']:6,} docs {s['chars']:>12,} chars {s['tokens']:>11,} tokens "
            f"({s['chars'] / max(1, s['tokens']):.2f} chars/token) in {len(s['shards'])} shard(s)"
        )
    print(f"wrote {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("data", help="prepare token shards from text corpora")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    pp = dsub.add_parser(
        "prepare",
        help="tokenize corpora into shards",
        description=__doc__,
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
    )
    src = pp.add_argument_group("sources")
    src.add_argument("--builtin", help="a built-in corpus: shakespeare")
    src.add_argument("--input", nargs="+", help="text files, folders, JSONL files (one document a line)")
    src.add_argument("--val-input", nargs="+", help="held-out validation documents (else --val-fraction)")
    src.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents held out (default 0.05)")
    src.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    pp.add_argument("--tokenizer", required=True, help="tokenizer.json, or a directory holding one")
    pp.add_argument("--out", required=True, help="dataset directory to write")
    pp.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard file (default 2^26)")
    pp.set_defaults(func=_cmd_prepare)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
