"""OpenAI-compatible HTTP server: chat/completions, completions, models, health, metrics, web pages.

    chatstack serve runs/speedrun/sft --port 8000                # loopback only by default
    chatstack serve runs/speedrun/sft --api-key sk-local --rankings runs/rankings.jsonl

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-local")
    client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "Hi"}])

The model id is the checkpoint directory's name (`GET /v1/models`); requests must name it (or the
path given to `serve`), else 404 `model_not_found` — unless `--any-model`, which accepts any id.

Everything below the HTTP layer is the engine (chatstack/infer/engine.py) driven by one scheduler thread
(chatstack/serve/scheduler.py): concurrent requests share the running batch. Every error leaves as
OpenAI's envelope {"error": {"message", "type", "param", "code"}}, never a stack trace.

Pages (no CDN, files in chatstack/serve/static/): `/` chat, `/rank` ranking K sampled answers into
the rankings JSONL that `chatstack reward` reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles

from chatstack.checkpoint import load_checkpoint
from chatstack.infer.cpu import thread_policy_summary
from chatstack.infer.engine import Engine
from chatstack.infer.quantize import QUANTIZE_KINDS
from chatstack.serve import protocol as P
from chatstack.serve.metrics import ServerMetrics
from chatstack.serve.middleware import Gate, add_error_handlers
from chatstack.serve.openai_routes import add_openai_routes
from chatstack.serve.rank_routes import add_rank_routes, read_rank_prompts
from chatstack.serve.rankings import RankingsWriter
from chatstack.serve.scheduler import Scheduler
from chatstack.vision.vlm import load_vision

log = logging.getLogger("chatstack.serve")
STATIC = Path(__file__).parent / "static"


# ----------------------------------------------------------------------------- state


def _opt(help: str, **kw):
    return field(default=kw.pop("default", None), metadata={"help": help, **kw})


@dataclass
class ServerConfig:
    """Everything the server's behaviour depends on; `chatstack serve` makes one flag per field."""

    api_keys: tuple[str, ...] = field(
        default=(),
        metadata={
            "flag": "--api-key",
            "append": True,
            "metavar": "KEY",
            "help": "require 'Authorization: Bearer KEY' on /v1 and /rank/api (repeat for several keys; "
            "also read from $CHATSTACK_API_KEY)",
        },
    )
    rankings: Optional[str] = _opt("JSONL that /rank appends rankings to", metavar="FILE")
    rank_prompts: Optional[str] = _opt(
        'JSONL of prompts for /rank ({"prompt": ...} or {"messages": [...]})', metavar="FILE"
    )
    max_queue: int = _opt("waiting rows before answering 429", default=256)
    max_batch_size: int = _opt("rows in the running batch", default=32)
    max_body_bytes: int = _opt("larger request bodies get 413", default=1 << 20)
    any_model: bool = _opt("accept any model id in requests (one model is served)", default=False)
    stream_interval_s: float = _opt(
        "hand streamed tokens to the HTTP side at most this often (first token and end at once)",
        default=0.05,
        flag="--stream-interval",
        metavar="SECONDS",
    )
    device: Optional[str] = _opt("cpu | cuda | mps (default: cpu)")
    quantize: Optional[str] = _opt(
        "int8: decode with int8 weights (CPU; fastest for one or two streams); bf16: every product on bf16 "
        "weights (CPU; fastest for many streams); the quality cost: benchmarks/quantize_quality.py",
        choices=list(QUANTIZE_KINDS),
    )
    prefix_cache_mb: float = _opt(
        "keep finished requests' keys/values up to this many MB, so a request resending the same history "
        "(multi-turn chat) prefills only what is new; 0 = off",
        default=256,
        metavar="MB",
    )
    rope_scaling: Optional[str] = _opt(
        "RoPE scaling for a longer context (rope models; default: the checkpoint's config.json): "
        "linear | ntk | yarn | none, with --rope-factor",
        choices=["none", "linear", "ntk", "yarn"],
    )
    rope_factor: float = _opt("with --rope-scaling: context = factor x the trained one", default=1.0)
    prefill_chunk: int = _opt(
        "prefill longer prompts this many tokens per engine step, so running streams keep going while a long "
        "prompt is read; 0 = whole prompts at once",
        default=256,
        metavar="TOKENS",
    )
    kv_cache_mb: Optional[float] = _opt(
        "memory for keys/values: running rows, prompts being read and the prefix cache together. The cache grows in "
        "blocks as tokens come and shrinks as rows finish; requests that do not fit wait, and the latest rows are "
        "preempted (recomputed later) if the running ones outgrow it. None = a quarter of the available memory, at "
        "most 4096, at least one full-context row",
        metavar="MB",
    )
    allowed_hosts: Optional[str] = _opt(
        "comma-separated Host header names the server answers to (others get 400), against DNS rebinding; "
        "`chatstack serve` defaults to localhost,127.0.0.1,::1 when bound to loopback without an API key; '*' = any",
        metavar="HOST,...",
    )
    docs: bool = _opt(
        "serve /docs and /redoc (their pages load Swagger UI / ReDoc from a CDN, so they are off by default; "
        "/openapi.json is always served)",
        default=False,
    )


class ServerState:
    """What the handlers share: the engine (once loaded), its scheduler, the model id, the config."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.metrics = ServerMetrics()
        self.engine = None
        self.vision = None  # a vision model's image encoder + projection (chatstack.vision), or None
        self.tokenizer = None
        self.scheduler: Optional[Scheduler] = None
        self.model_id = "chatstack"
        self.model_aliases: set[str] = set()
        self.context_len = 0
        self.created = P.now()
        self.load_error: Optional[str] = None
        self.rank_prompts: list[list[dict]] = []
        self.rankings = RankingsWriter(cfg.rankings) if cfg.rankings else None

    def attach(self, engine, model_id: str, aliases=()) -> None:
        self.engine = engine
        self.tokenizer = getattr(engine, "tokenizer", None) or engine.tok
        model = engine.model
        # the longest row the KV budget holds may be shorter than the model's context
        self.context_len = int(min(model.config.block_size, getattr(engine, "max_row_len", model.config.block_size)))
        self.model_id = model_id
        self.model_aliases = {model_id, *aliases}
        self.scheduler = Scheduler(
            engine,
            max_queue=self.cfg.max_queue,
            max_batch_size=self.cfg.max_batch_size,
            metrics=self.metrics,
            stream_interval_s=self.cfg.stream_interval_s,
        ).start()

    def ready(self) -> ServerState:
        if self.load_error:
            raise P.APIError(
                503, f"the model failed to load: {self.load_error}", "server_error", code="model_load_failed"
            )
        if self.scheduler is None:
            raise P.APIError(503, "the model is still loading; retry shortly", "server_error", code="model_loading")
        return self

    def check_model(self, name: str) -> None:
        if self.cfg.any_model or name in self.model_aliases:
            return
        raise P.APIError(
            404,
            f"The model `{name}` does not exist. This server serves `{self.model_id}`.",
            "invalid_request_error",
            param="model",
            code="model_not_found",
        )


def load_engine(
    ckpt_path: str,
    device: Optional[str],
    max_batch_size: int,
    quantize: Optional[str] = None,
    prefix_cache_mb: float = 0,
    prefill_chunk: int = 0,
    kv_cache_mb: Optional[float] = None,
    rope_scaling: Optional[str] = None,
    rope_factor: float = 1.0,
):
    ckpt = load_checkpoint(ckpt_path, device=device or "cpu")
    if ckpt.tokenizer is None:
        raise ValueError(f"{ckpt_path}: the checkpoint has no tokenizer.json")
    ckpt.model.eval()
    if rope_scaling:
        ckpt.model.set_rope_scaling(rope_scaling, rope_factor)
    engine = Engine(
        ckpt.model,
        ckpt.tokenizer,
        max_batch_size=max_batch_size,
        device=device,
        quantize=quantize,
        prefix_cache_mb=prefix_cache_mb,
        prefill_chunk=prefill_chunk,
        kv_cache_mb=kv_cache_mb,
    )
    engine.prepare_weights()  # before /health says ready: the first request doesn't pay for them
    return engine, ckpt.name


def create_app(
    source, model_name: Optional[str] = None, config: Optional[ServerConfig] = None, vision=None, **kw
) -> FastAPI:
    """The FastAPI app serving `source`: a checkpoint path (loaded in the background; 503 until ready; a vision
    checkpoint's image encoder comes with it) or a ready `chatstack.infer.engine.Engine` (with `vision`, its
    chatstack.vision.projection.VisionAdapter, it takes images). Keyword arguments override ServerConfig fields."""
    cfg = config or ServerConfig()
    for k, v in kw.items():
        if not hasattr(cfg, k):
            raise TypeError(f"create_app: unknown option {k!r}")
        setattr(cfg, k, v)
    cfg.api_keys = tuple(k for k in (cfg.api_keys or ()) if k)
    st = ServerState(cfg)
    if cfg.rank_prompts:
        st.rank_prompts = read_rank_prompts(cfg.rank_prompts)

    def _load():
        try:
            engine, name = load_engine(
                str(source),
                cfg.device,
                cfg.max_batch_size,
                cfg.quantize,
                cfg.prefix_cache_mb,
                cfg.prefill_chunk,
                cfg.kv_cache_mb,
                cfg.rope_scaling,
                cfg.rope_factor,
            )
            st.vision = load_vision(str(source), device=cfg.device or "cpu")
            st.attach(engine, model_name or name, aliases=(str(source), str(Path(source).resolve())))
            log.info(
                "serving %s (%s; KV cache budget %.0f MB; %s%s)",
                st.model_id,
                source,
                engine.kv_budget / 2**20,
                thread_policy_summary(),
                f"; CPU products: {engine.cpu_matmul}" if engine.cpu_matmul else "",
            )
        except Exception as e:  # reported by /health and 503s, not a crash with a stack trace
            st.load_error = f"{type(e).__name__}: {e}"
            log.error("cannot load %s: %s", source, st.load_error)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if isinstance(source, (str, os.PathLike)):
            threading.Thread(target=_load, name="chatstack-load", daemon=True).start()
        lag = asyncio.create_task(watch_loop_lag(st.metrics.loop_lag))
        yield
        lag.cancel()
        if st.scheduler is not None:
            st.scheduler.stop()
        if st.rankings is not None:
            st.rankings.close()

    if not isinstance(source, (str, os.PathLike)):
        st.vision = vision
        st.attach(source, model_name or "chatstack")

    # /docs and /redoc only when asked for: their pages load Swagger UI / ReDoc from a CDN (blank offline)
    app = FastAPI(
        title="chatstack",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible API for a chatstack checkpoint.",
        docs_url="/docs" if cfg.docs else None,
        redoc_url="/redoc" if cfg.docs else None,
    )
    app.state.chatstack = st

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            app.openapi_schema = document_statuses(schema, bool(cfg.allowed_hosts))
        return app.openapi_schema

    app.openapi = openapi

    add_error_handlers(app)
    app.add_middleware(Gate, state=st)

    @app.get("/health")
    async def health():
        if st.load_error:
            return JSONResponse({"status": "error", "error": st.load_error}, status_code=503)
        if st.scheduler is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {
            "status": "ok",
            "model": st.model_id,
            "running": st.scheduler.running,
            "waiting": st.scheduler.queue_depth,
            "weights": st.scheduler.engine.quantize or str(st.scheduler.engine.cache.dtype).removeprefix("torch."),
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        pc = st.engine.prefix_cache if st.engine is not None else None
        if pc is not None:  # read without the scheduler's lock: two ints, a moment stale at worst
            st.metrics.prefix_reused.set(pc.tokens_reused)
            st.metrics.prefix_bytes.set(pc.bytes)
        if st.engine is not None and hasattr(st.engine, "kv_bytes"):
            st.metrics.kv_bytes.set(st.engine.kv_bytes())
            st.metrics.kv_budget.set(st.engine.kv_budget)
            st.metrics.preemptions.set(st.engine.preemptions)
        return PlainTextResponse(st.metrics.render(), media_type="text/plain; version=0.0.4")

    add_openai_routes(app, st)
    add_rank_routes(app, st)

    @app.get("/", include_in_schema=False)
    async def index_page():
        return FileResponse(STATIC / "index.html")

    @app.get("/rank", include_in_schema=False)
    async def rank_page():
        return FileResponse(STATIC / "rank.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def watch_loop_lag(hist, interval: float = 0.02) -> None:
    """Observe how late a timer fires on this event loop: what every request waits on top of its own work when the
    loop is blocked by a handler, or its thread waits for the GIL or a CPU (chatstack_event_loop_lag_seconds)."""
    loop = asyncio.get_running_loop()
    while True:
        t = loop.time()
        await asyncio.sleep(interval)
        hist.observe(max(0.0, loop.time() - t - interval))


# what each endpoint can answer besides 200, as the OpenAPI document lists it (document_statuses)
_ERRORS = {
    "/v1/chat/completions": (400, 401, 404, 413, 429, 503),
    "/v1/completions": (400, 401, 404, 413, 429, 503),
    "/v1/models": (401, 503),
    "/v1/models/{model_id}": (401, 404, 503),
    "/rank/api/sample": (400, 401, 413, 429, 503),
    "/rank/api/submit": (400, 401, 413),
    "/rank/api/prompt": (400, 401, 404),
    "/rank/api/config": (401, 503),
    "/health": (503,),
}
_ERROR_TEXT = {
    400: "Invalid request (OpenAI's error envelope; `param` names the field)",
    401: "Missing or wrong API key",
    404: "Unknown model, or no such prompt",
    413: "Request body too large",
    429: "Too many rows waiting",
    503: "The model is loading, or failed to load",
}


def document_statuses(schema: dict, host_check: bool) -> dict:
    """Make the OpenAPI document list the statuses the server really answers: FastAPI's generated 422 goes (this
    server answers 400 instead), and each operation gets its error statuses with OpenAI's error envelope."""
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorResponse"] = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                    "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                },
            }
        },
    }
    for path, ops in schema.get("paths", {}).items():
        route = path.replace("{model_id:path}", "{model_id}")
        for op in ops.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            codes = set(_ERRORS.get(route, ())) | ({400} if host_check else set())
            for code in sorted(codes):
                responses[str(code)] = {
                    "description": _ERROR_TEXT[code],
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                }
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    return schema
