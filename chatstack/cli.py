"""The `chatstack` command: one subcommand per stage.

    chatstack --help
    chatstack <command> --help

Each stage module registers its own subcommand with `register(subparsers)`; a stage's flags are
generated from its config dataclass (chatstack.args), so every config field is a flag.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from chatstack.args import CLIError

# (module, one-line summary) in pipeline order; each module defines register(subparsers).
COMMAND_MODULES = [
    "chatstack.stages.tokenize",  # tokenizer train | encode | decode
    "chatstack.stages.prepare",  # data prepare
    "chatstack.stages.pretrain",  # pretrain
    "chatstack.stages.sft",  # sft
    "chatstack.stages.label",  # label
    "chatstack.stages.reward",  # reward
    "chatstack.stages.ppo",  # ppo
    "chatstack.stages.rl",  # rl (rloo | grpo)
    "chatstack.stages.dpo",  # dpo
    "chatstack.stages.self_improve",  # self-improve
    "chatstack.stages.clip_train",  # clip-train
    "chatstack.stages.sft_vision",  # sft-vision
    "chatstack.stages.eval_vision",  # eval-vision
    "chatstack.stages.chat",  # generate, chat
    "chatstack.stages.eval",  # eval
    "chatstack.stages.compare",  # compare
    "chatstack.stages.serve",  # serve
    "chatstack.stages.interop",  # import / export
    "chatstack.stages.estimate",  # estimate
    "chatstack.stages.speedrun",  # speedrun
    "chatstack.stages.recipe",  # recipe smollm2
    "chatstack.stages.align_bench",  # align-bench
    "chatstack.stages.finetune_task",
    "chatstack.stages.eval_task",
    "chatstack.stages.eval_code",
    "chatstack.stages.eval_long",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatstack",
        description="A from-scratch ChatGPT stack: tokenizer -> pretrain -> sft -> reward -> ppo -> chat/serve.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `chatstack speedrun` for the whole pipeline on built-in data; `chatstack CMD --help` for each stage.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in COMMAND_MODULES:
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
    sys.exit(main())
