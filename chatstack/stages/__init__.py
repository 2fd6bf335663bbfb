"""One module per `chatstack` subcommand: its config dataclass, its orchestration and `register(subparsers)`.
Stages import the core modules (model, data, train, infer, rlhf, evals, interop, serve), never the reverse."""
