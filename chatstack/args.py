"""Command-line plumbing shared by every stage: the user-error type and config dataclass -> argparse flags.

Each stage's flags are generated from its config dataclass with `add_dataclass_args`, so every config field
is a flag and the help text is the field's `metadata={"help": ...}`.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _unwrap_optional(tp: typing.Any) -> tuple[typing.Any, bool]:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_dataclass_args(
    parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (), group: str | None = None
) -> argparse.ArgumentParser:
    """One `--field-name` flag per dataclass field, typed, defaulting to the field's default."""
    hints = typing.get_type_hints(cls)
    target = parser.add_argument_group(group) if group else parser
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        help_ = f"{help_} (default: {default!r})" if help_ else f"default: {default!r}"
        if tp is bool:
            target.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif typing.get_origin(tp) in (list, tuple):
            (inner,) = typing.get_args(tp)[:1]
            if f.metadata.get("append"):  # a repeatable flag: --api-key A --api-key B
                target.add_argument(
                    flag,
                    dest=f.name,
                    type=inner,
                    action="append",
                    default=list(default or ()),
                    metavar=f.metadata.get("metavar"),
                    help=help_,
                )
            else:
                target.add_argument(flag, dest=f.name, type=inner, nargs="*", default=default, help=help_)
        else:
            conv = tp if tp in (int, float, str) else str
            if conv is int:
                conv = _int_like
            target.add_argument(
                flag,
                dest=f.name,
                type=conv,
                default=default,
                help=help_,
                choices=f.metadata.get("choices"),
                metavar=f.metadata.get("metavar"),
            )
    return parser


def _int_like(s: str) -> int:
    """Ints also as 1e6 / 300e9 (so token counts read naturally)."""
    try:
        return int(s)
    except ValueError:
        v = float(s)
        if not v.is_integer():
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        return int(v)


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides: typing.Any) -> typing.Any:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    kw.update(overrides)
    return cls(**kw)
