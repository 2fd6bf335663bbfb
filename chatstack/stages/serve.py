"""`chatstack serve`: the OpenAI-compatible HTTP server with the web chat and ranking pages.

    chatstack serve runs/speedrun/sft --port 8000                # loopback only by default
    chatstack serve runs/speedrun/sft --api-key sk-local --rankings runs/rankings.jsonl

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-local")
    client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "Hi"}])

The model id is the checkpoint directory's name (`GET /v1/models`). The server itself is chatstack/serve/.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch

from chatstack.args import CLIError, add_dataclass_args, dataclass_from_args
from chatstack.checkpoint import CheckpointError, read_config
from chatstack.serve.app import ServerConfig, create_app

log = logging.getLogger("chatstack.serve")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server with a web chat page",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory (its name is the model id)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="model id to serve under (default: the checkpoint's name)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads, fixed (default: as many as CPUs are idle, re-checked as the load changes: "
        "chatstack/infer/cpu.py)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_dataclass_args(p, ServerConfig, group="server")
    p.set_defaults(func=_cmd_serve)


def allowed_hosts_for(host: str, keys, given: str | None) -> str | None:
    """--allowed-hosts as given, else the loopback names when the server binds loopback without an API key: then
    only a web page on another origin whose name resolves to 127.0.0.1 (DNS rebinding) could reach it, through the
    user's browser, and its Host header names that origin."""
    if given is None and host in LOOPBACK and not keys:
        return ",".join(LOOPBACK)
    return given


def _cmd_serve(args) -> int:
    import uvicorn  # noqa: PLC0415 (only a running server needs it)

    try:
        read_config(args.checkpoint)  # fail fast on a wrong path; the weights load in the background
    except CheckpointError as e:
        raise CLIError(str(e)) from e
    if args.rank_prompts and not os.path.exists(args.rank_prompts):
        raise CLIError(f"{args.rank_prompts}: no such file")
    if args.quantize and (args.device or "cpu") != "cpu":
        raise CLIError(
            f"--quantize {args.quantize} makes weight copies for CPU kernels (got --device {args.device}); drop it on a GPU"
        )
    if args.threads:  # a fixed count: the engine's thread policy keeps it (chatstack.infer.cpu)
        os.environ["CHATSTACK_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    if args.kv_cache_mb is not None and not args.kv_cache_mb > 0:
        raise CLIError(f"--kv-cache-mb must be > 0, got {args.kv_cache_mb}")
    keys = list(args.api_keys) + [k for k in os.environ.get("CHATSTACK_API_KEY", "").split(",") if k]
    hosts = allowed_hosts_for(args.host, keys, args.allowed_hosts)
    cfg = dataclass_from_args(ServerConfig, args, api_keys=tuple(keys), allowed_hosts=hosts)
    try:
        app = create_app(args.checkpoint, model_name=args.model_name, config=cfg)
    except ValueError as e:
        raise CLIError(str(e)) from e
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.host not in LOOPBACK:
        log.warning(
            "binding to %s: the server is reachable from other machines%s",
            args.host,
            "" if keys else " and has no API key",
        )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
