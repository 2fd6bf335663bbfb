"""The `chatstack` command: one subcommand per stage.

    chatstack --help
    chatstack <command> --help

Each stage module registers its own subcommand with `register(subparsers)`; a stage's flags are
generated from its config dataclass with `add_dataclass_args`, so every config field is a flag and
the help text is the field's comment-free docstring entry (`metadata={"help": ...}`).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import sys
import typing

# (module, one-line summary) in pipeline order; each module defines register(subparsers).
COMMAND_MODULES = [
    "chatstack.tokenizer",        # tokenizer train | encode | decode
    "chatstack.data.prepare",     # data prepare
    "chatstack.train.pretrain",   # pretrain
    "chatstack.train.sft",        # sft
    "chatstack.data.label",       # label
    "chatstack.train.reward",     # reward
    "chatstack.train.ppo",        # ppo
    "chatstack.chat",             # generate, chat
    "chatstack.evals.run",        # eval
    "chatstack.serve.app",        # serve
    "chatstack.interop.cli",      # import / export
    "chatstack.estimate",         # estimate
    "chatstack.speedrun",         # speedrun
]


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _unwrap_optional(tp):
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), group: str | None = None):
    """One `--field-name` flag per dataclass field, typed, defaulting to the field's default."""
    hints = typing.get_type_hints(cls)
    target = parser.add_argument_group(group) if group else parser
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        help_ = f"{help_} (default: {default!r})" if help_ else f"default: {default!r}"
        if tp is bool:
            target.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif typing.get_origin(tp) in (list, tuple):
            (inner,) = typing.get_args(tp)[:1]
            target.add_argument(flag, dest=f.name, type=inner, nargs="*", default=default, help=help_)
        else:
            conv = tp if tp in (int, float, str) else str
            if conv is int:
                conv = _int_like
            target.add_argument(flag, dest=f.name, type=conv, default=default, help=help_,
                                choices=f.metadata.get("choices"))
    return parser


def _int_like(s: str) -> int:
    """Ints also as 1e6 / 300e9 (so token counts read naturally)."""
    try:
        return int(s)
    except ValueError:
        v = float(s)
        if not v.is_integer():
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}")
        return int(v)


def dataclass_from_args(cls, args: argparse.Namespace, **overrides):
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    kw.update(overrides)
    return cls(**kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatstack",
        description="A from-scratch ChatGPT stack: tokenizer -> pretrain -> sft -> reward -> ppo -> chat/serve.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `chatstack speedrun` for the whole pipeline on built-in data; `chatstack CMD --help` for each stage.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in COMMAND_MODULES:
        if importlib.util.find_spec(mod_name) is None:
            continue  # a stage not built yet
        mod = importlib.import_module(mod_name)
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except CLIError as e:
        print(f"chatstack {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    # `python -m chatstack.cli`: call the imported module's main, so stage modules raise the same CLIError class
    from chatstack.cli import main as _main

    sys.exit(_main())
