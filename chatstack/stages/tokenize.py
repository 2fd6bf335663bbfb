"""`chatstack tokenizer`: train a byte-level BPE vocabulary, encode and decode.

chatstack tokenizer train --builtin shakespeare --vocab-size 4096 --out runs/tok
chatstack tokenizer train --input corpus.txt more.jsonl --vocab-size 8192 --out runs/tok
chatstack tokenizer encode --gpt2 "Write a story about number 1234567."
chatstack tokenizer decode --gpt2 "[16594, 257, 1621]"
chatstack tokenizer encode --tokenizer runs/tok "Hello there"
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable

from chatstack.args import CLIError
from chatstack.data.builtin import builtin_texts
from chatstack.data.jsonl import iter_jsonl
from chatstack.tokenizer import Tokenizer


def _read_texts(paths: list[str]) -> Iterable[str]:
    """Documents from text files, folders of them, and JSONL files with a "text" field."""
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or directory")
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        for f in files:
            try:
                if f.suffix == ".jsonl":
                    for ln, obj in iter_jsonl(f):
                        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                            raise ValueError(f"{f}:{ln}: expected an object with a string 'text' field")
                        yield obj["text"]
                else:
                    yield f.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{f}: not valid UTF-8 text (byte {e.start})") from e


def _get_tokenizer(args) -> Tokenizer:
    if args.gpt2:
        return Tokenizer.gpt2()
    if not args.tokenizer:
        raise ValueError("give --gpt2 or --tokenizer DIR")
    return Tokenizer.load(args.tokenizer)


def _cmd_train(args) -> int:

    if not args.builtin and not args.input:
        raise CLIError("give --builtin NAME or --input FILE/DIR ...")
    try:
        if args.builtin:
            texts = list(builtin_texts(args.builtin, split="train"))
        else:
            texts = list(_read_texts(args.input))
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise CLIError(str(e)) from e
    if not any(t.strip() for t in texts):
        raise CLIError("the corpus is empty")
    tok = Tokenizer.train(texts, vocab_size=args.vocab_size, show_progress=sys.stderr.isatty())
    out = Path(args.out)
    tok.save(out)
    n_chars = sum(len(t) for t in texts[:50])
    n_toks = sum(len(tok.encode(t)) for t in texts[:50])
    print(
        f"saved {out / 'tokenizer.json'}: vocab {tok.vocab_size}, {n_chars / max(n_toks, 1):.2f} chars/token on a sample"
    )
    return 0


def _cmd_encode(args) -> int:

    try:
        tok = _get_tokenizer(args)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    print(json.dumps(tok.encode(args.text)))
    return 0


def _cmd_decode(args) -> int:

    try:
        tok = _get_tokenizer(args)
        ids = json.loads(args.ids)
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise ValueError("ids must be a JSON list of integers, e.g. [15496, 995]")
        bad = [i for i in ids if not 0 <= i < tok.vocab_size]
        if bad:
            raise ValueError(f"id(s) out of range for a vocabulary of {tok.vocab_size}: {bad[:5]}")
    except json.JSONDecodeError as e:
        raise CLIError(f"ids must be a JSON list of integers ({e.msg})") from e
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    sys.stdout.write(tok.decode(ids) + "\n")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "tokenizer",
        help="train a byte-level BPE, encode and decode",
        description="Byte-level BPE tokenizer: train on a corpus, or use GPT-2's vocabulary (--gpt2).",
    )
    tsub = p.add_subparsers(dest="tok_command", metavar="ACTION", required=True)
    t = tsub.add_parser("train", help="train a BPE vocabulary on text/JSONL files or a built-in corpus")
    t.add_argument("--builtin", help="a built-in corpus, e.g. shakespeare")
    t.add_argument("--input", nargs="*", default=[], help="text files, folders of them, or JSONL with a 'text' field")
    t.add_argument(
        "--vocab-size", type=int, default=4096, help="vocabulary size including 256 bytes and 3 specials (default 4096)"
    )
    t.add_argument("--out", required=True, help="output directory (gets tokenizer.json)")
    t.set_defaults(func=_cmd_train)
    for name, fn, arg, helptext in (
        ("encode", _cmd_encode, "text", "text to encode"),
        ("decode", _cmd_decode, "ids", "JSON list of token ids"),
    ):
        e = tsub.add_parser(name, help=f"{name} with --gpt2 or a trained --tokenizer")
        e.add_argument(arg, help=helptext)
        g = e.add_mutually_exclusive_group(required=True)
        g.add_argument("--gpt2", action="store_true", help="GPT-2's 50,257-token vocabulary (offline)")
        g.add_argument("--tokenizer", help="a directory with tokenizer.json (or the file itself)")
        e.set_defaults(func=fn)
