"""OpenAI-compatible HTTP server: chat/completions, completions, models, health, metrics, web pages.

    chatstack serve runs/speedrun/sft --port 8000                # loopback only by default
    chatstack serve runs/speedrun/sft --api-key sk-local --rankings runs/rankings.jsonl

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-local")
    client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "Hi"}])

The model id is the checkpoint directory's name (`GET /v1/models`); requests must name it (or the
path given to `serve`), else 404 `model_not_found` — unless `--any-model`, which accepts any id.

Everything below the HTTP layer is the engine (chatstack/engine.py) driven by one scheduler thread
(chatstack/serve/scheduler.py): concurrent requests share the running batch. Every error leaves as
OpenAI's envelope {"error": {"message", "type", "param", "code"}}, never a stack trace.

Pages (no CDN, files in chatstack/serve/static/): `/` chat, `/rank` ranking K sampled answers into
the rankings JSONL that `chatstack reward` reads.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatstack.serve import protocol as P
from chatstack.serve.metrics import ServerMetrics
from chatstack.serve.scheduler import QueueFull, Scheduler

log = logging.getLogger("chatstack.serve")
STATIC = Path(__file__).parent / "static"
API_PREFIXES = ("/v1/", "/rank/api/")


# ----------------------------------------------------------------------------- state


@dataclass
class ServerConfig:
    api_keys: tuple[str, ...] = ()
    rankings: Optional[str] = None          # JSONL the /rank page appends to
    rank_prompts: Optional[str] = None      # JSONL of {"prompt": str | [messages]} or {"messages": [...]}
    max_queue: int = 256                    # waiting rows before 429
    max_batch_size: int = 32                # rows in the running batch
    max_body_bytes: int = 1 << 20           # 413 above this
    any_model: bool = False                 # accept any model id (only one model is served)
    stream_interval_s: float = 0.05         # tokens between a row's first and last go out at most this often
    device: Optional[str] = None
    quantize: Optional[str] = None          # "int8": decode with int8 weights (CPU; chatstack.quantize)
    prefix_cache_mb: float = 256            # finished requests' keys/values kept for reuse (chatstack.prefix_cache)
    prefill_chunk: int = 256                # longer prompts prefill a chunk per step; running streams go on


class ServerState:
    """What the handlers share: the engine (once loaded), its scheduler, the model id, the config."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.metrics = ServerMetrics()
        self.engine = None
        self.tokenizer = None
        self.scheduler: Optional[Scheduler] = None
        self.model_id = "chatstack"
        self.model_aliases: set[str] = set()
        self.context_len = 0
        self.created = P.now()
        self.load_error: Optional[str] = None
        self.rank_prompts: list[list[dict]] = []
        self.rank_lock = threading.Lock()

    def attach(self, engine, model_id: str, aliases=()) -> None:
        self.engine = engine
        self.tokenizer = getattr(engine, "tokenizer", None) or engine.tok
        model = engine.model
        self.context_len = int(model.config.block_size)
        self.model_id = model_id
        self.model_aliases = {model_id, *aliases}
        self.scheduler = Scheduler(engine, max_queue=self.cfg.max_queue, max_batch_size=self.cfg.max_batch_size,
                                   metrics=self.metrics, stream_interval_s=self.cfg.stream_interval_s).start()

    def ready(self) -> "ServerState":
        if self.load_error:
            raise P.APIError(503, f"the model failed to load: {self.load_error}", "server_error", code="model_load_failed")
        if self.scheduler is None:
            raise P.APIError(503, "the model is still loading; retry shortly", "server_error", code="model_loading")
        return self

    def check_model(self, name: str) -> None:
        if self.cfg.any_model or name in self.model_aliases:
            return
        raise P.APIError(404, f"The model `{name}` does not exist. This server serves `{self.model_id}`.",
                         "invalid_request_error", param="model", code="model_not_found")


def load_engine(ckpt_path: str, device: Optional[str], max_batch_size: int, quantize: Optional[str] = None,
                prefix_cache_mb: float = 0, prefill_chunk: int = 0):
    from chatstack.checkpoint import load_checkpoint
    from chatstack.engine import Engine

    ckpt = load_checkpoint(ckpt_path, device=device or "cpu")
    if ckpt.tokenizer is None:
        raise ValueError(f"{ckpt_path}: the checkpoint has no tokenizer.json")
    ckpt.model.eval()
    engine = Engine(ckpt.model, ckpt.tokenizer, max_batch_size=max_batch_size, device=device, quantize=quantize,
                    prefix_cache_mb=prefix_cache_mb, prefill_chunk=prefill_chunk)
    engine.prepare_weights()     # before /health says ready: the first request doesn't pay for them
    return engine, ckpt.name


def read_rank_prompts(path: str) -> list[list[dict]]:
    """Prompts for /rank: JSONL lines {"prompt": str | [messages]} or {"messages": [...]}; plain text lines too."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                obj = line      # a plain-text prompt per line
            msgs = obj
            if isinstance(obj, dict):
                msgs = obj.get("messages", obj.get("prompt"))
            if isinstance(msgs, str):
                msgs = [{"role": "user", "content": msgs}]
            if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m for m in msgs)):
                raise ValueError(f"{path}:{lineno}: expected {{\"prompt\": str | [messages]}} or {{\"messages\": [...]}}")
            # a conversation ending with the assistant's turn: rank alternatives to that turn
            if msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
            if msgs:
                out.append([{"role": m["role"], "content": str(m.get("content", ""))} for m in msgs])
    return out


# ----------------------------------------------------------------------------- helpers


def _sampling_params(temperature, top_p, top_k, max_new, stops, seed, logprobs, top_logprobs):
    from chatstack.engine import SamplingParams

    temperature = 1.0 if temperature is None else temperature
    top_p = 1.0 if top_p is None else top_p
    if top_p == 0.0:          # OpenAI accepts top_p=0: only the most likely token survives, i.e. greedy
        temperature, top_p = 0.0, 1.0
    return SamplingParams(max_new_tokens=max_new, temperature=temperature, top_k=top_k or 0, top_p=top_p,
                          stop=list(stops), seed=seed, logprobs=bool(logprobs), top_logprobs=top_logprobs or 0)


def _seed_for(seed: Optional[int], i: int) -> Optional[int]:
    # n choices from one seeded request must differ from each other, yet repeat across requests
    if seed is None:
        return None
    s = seed + i
    return s if s <= P.SEED_MAX else s - 2 ** 64


def _token_text(tok, tid: int) -> tuple[str, list[int]]:
    b = tok.token_bytes(tid)
    return b.decode("utf-8", errors="backslashreplace"), list(b)


async def _watch_disconnect(request: Request, task: asyncio.Task) -> bool:
    """Wait for `task`; if the client goes away first, cancel it and return True."""
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return False
        if await request.is_disconnected():
            task.cancel()
            return True


class _Choice:
    """Accumulates one row's events."""

    def __init__(self):
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[tuple[int, float, Any]] = []   # (token id, logprob, top list)
        self.finish_reason: Optional[str] = None

    def add(self, ev, special: set[int]) -> None:
        if ev.token_id is not None:
            self.token_ids.append(ev.token_id)
            if ev.logprob is not None and ev.token_id not in special:
                self.logprobs.append((ev.token_id, ev.logprob, ev.top_logprobs))
        if ev.text:
            self.text.append(ev.text)
        if ev.finished:
            self.finish_reason = ev.finish_reason if ev.finish_reason in ("stop", "length") else "stop"


def _raise_row_error(err: Exception) -> None:
    if isinstance(err, P.APIError):
        raise err
    if isinstance(err, ValueError):
        raise P.APIError(400, str(err), code="context_length_exceeded" if "context" in str(err) else None)
    raise P.APIError(500, "the engine failed while generating this request", "server_error")


async def _collect(queue: asyncio.Queue, n: int, special: set[int]) -> list[_Choice]:
    choices = [_Choice() for _ in range(n)]
    left = n
    while left:
        idx, ev = await queue.get()
        if isinstance(ev, Exception):
            _raise_row_error(ev)
        choices[idx].add(ev, special)
        if ev.finished:
            left -= 1
    return choices


async def _drain(queue: asyncio.Queue) -> list:
    """Wait for one item, then take everything else already queued."""
    items = [await queue.get()]
    while True:
        try:
            items.append(queue.get_nowait())
        except asyncio.QueueEmpty:
            return items


def _sse(obj: Union[dict, Any]) -> str:
    if hasattr(obj, "model_dump_json"):
        return f"data: {obj.model_dump_json(exclude_none=False)}\n\n"
    return f"data: {json.dumps(obj)}\n\n"


# ----------------------------------------------------------------------------- app


def create_app(source, model_name: Optional[str] = None, config: Optional[ServerConfig] = None, **kw) -> FastAPI:
    """The FastAPI app serving `source`: a checkpoint path (loaded in the background; 503 until ready)
    or a ready `chatstack.engine.Engine`. Keyword arguments override ServerConfig fields."""
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
            engine, name = load_engine(str(source), cfg.device, cfg.max_batch_size, cfg.quantize, cfg.prefix_cache_mb,
                                       cfg.prefill_chunk)
            st.attach(engine, model_name or name, aliases=(str(source), str(Path(source).resolve())))
            log.info("serving %s (%s%s)", st.model_id, source,
                     f"; CPU products: {engine.cpu_matmul}" if engine.cpu_matmul else "")
        except Exception as e:   # reported by /health and 503s, not a crash with a stack trace
            st.load_error = f"{type(e).__name__}: {e}"
            log.error("cannot load %s: %s", source, st.load_error)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if isinstance(source, (str, os.PathLike)):
            threading.Thread(target=_load, name="chatstack-load", daemon=True).start()
        yield
        if st.scheduler is not None:
            st.scheduler.stop()

    if not isinstance(source, (str, os.PathLike)):
        st.attach(source, model_name or "chatstack")

    app = FastAPI(title="chatstack", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for a chatstack checkpoint.")
    app.state.chatstack = st

    # ---------------------------------------------------------------- errors: always OpenAI's envelope

    @app.exception_handler(P.APIError)
    async def _api_error(request: Request, exc: P.APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        e = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = str(e.get("msg", "invalid request")).removeprefix("Value error, ")
        if e.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        elif e.get("type") == "missing":
            msg = f"missing required field '{param}'"
        else:
            msg = f"{param}: {msg}" if param else msg
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})"
        return JSONResponse(P.error_body(msg, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                429: "rate_limit_error"}.get(exc.status_code, "invalid_request_error")
        code = {413: "request_too_large"}.get(exc.status_code)
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.method} {request.url.path}"
        return JSONResponse(P.error_body(detail, kind, None, code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(P.error_body("internal server error", "server_error"), status_code=500)

    # ---------------------------------------------------------------- auth, body size, request metrics

    app.add_middleware(_Gate, state=st)

    # ---------------------------------------------------------------- info endpoints

    @app.get("/health")
    async def health():
        if st.load_error:
            return JSONResponse({"status": "error", "error": st.load_error}, status_code=503)
        if st.scheduler is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "model": st.model_id, "running": st.scheduler.running,
                "waiting": st.scheduler.queue_depth}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        pc = st.engine.prefix_cache if st.engine is not None else None
        if pc is not None:    # read without the scheduler's lock: two ints, a moment stale at worst
            st.metrics.prefix_reused.set(pc.tokens_reused)
            st.metrics.prefix_bytes.set(pc.bytes)
        return PlainTextResponse(st.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=P.ModelList)
    async def list_models():
        st.ready()
        return P.ModelList(data=[P.ModelCard(id=st.model_id, created=st.created, max_model_len=st.context_len)])

    @app.get("/v1/models/{model_id:path}", response_model=P.ModelCard)
    async def get_model(model_id: str):
        st.ready().check_model(model_id)
        return P.ModelCard(id=st.model_id, created=st.created, max_model_len=st.context_len)

    # ---------------------------------------------------------------- generation

    def _check_context(prompt_ids: list[int], param: str) -> None:
        if len(prompt_ids) >= st.context_len:
            raise P.APIError(400, f"This model's maximum context length is {st.context_len} tokens, and the prompt "
                                  f"has {len(prompt_ids)} tokens, leaving no room for a reply. Shorten the {param}.",
                             param=param, code="context_length_exceeded")

    def _submit(prompt_ids: list[int], params: list, queue=None):
        try:
            return st.scheduler.submit(prompt_ids, params, queue)
        except QueueFull as e:
            raise P.APIError(429, f"the server is busy: {e}", "rate_limit_error", code="queue_full")

    @app.post("/v1/chat/completions", response_model=P.ChatCompletion,
              responses={400: {}, 401: {}, 404: {}, 413: {}, 429: {}, 503: {}})
    async def chat_completions(req: P.ChatCompletionRequest, request: Request):
        st.ready().check_model(req.model)
        tok = st.tokenizer
        try:
            prompt_ids = tok.render_prompt(req.chat_messages())
        except ValueError as e:
            raise P.APIError(400, str(e), param="messages")
        _check_context(prompt_ids, "messages")
        n = req.n or 1
        room = st.context_len - len(prompt_ids)
        max_new = min(req.max_new_tokens or room, room)
        params = [_sampling_params(req.temperature, req.top_p, req.top_k, max_new, req.stops, _seed_for(req.seed, i),
                                   req.logprobs, req.top_logprobs) for i in range(n)]
        rows = _submit(prompt_ids, params)
        queue = rows[0].queue
        special = set(getattr(tok, "special_ids", ()) or ())
        rid, created = P.new_id("chatcmpl"), P.now()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_chat_stream(rows, queue, n, rid, created, req.logprobs, len(prompt_ids),
                                                  include_usage, special),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        task = asyncio.create_task(_collect(queue, n, special))
        try:
            if await _watch_disconnect(request, task):
                return JSONResponse(P.error_body("client disconnected"), status_code=499)
            choices = task.result()
        finally:
            st.scheduler.cancel(rows)
        out = [P.ChatChoice(index=i, message=P.AssistantMessage(content="".join(c.text)),
                            logprobs=_chat_logprobs(c.logprobs) if req.logprobs else None,
                            finish_reason=c.finish_reason) for i, c in enumerate(choices)]
        completion = sum(len(c.token_ids) for c in choices)
        return P.ChatCompletion(id=rid, created=created, model=st.model_id, choices=out,
                                usage=P.Usage.of(len(prompt_ids), completion, _cached(rows)))

    def _cached(rows, per_row: bool = False) -> int:
        """usage.prompt_tokens_details.cached_tokens: chat counts its prompt once (the most any choice reused);
        completions count the prompt once per choice, so the reuse is summed."""
        got = [r.cached_tokens for r in rows]
        return sum(got) if per_row else max(got, default=0)

    def _chat_logprobs(items) -> P.ChoiceLogprobs:
        content = []
        for tid, lp, top in items:
            text, b = _token_text(st.tokenizer, tid)
            tops = []
            for t2, lp2 in (top or []):
                s2, b2 = _token_text(st.tokenizer, t2)
                tops.append(P.TopLogprob(token=s2, logprob=lp2, bytes=b2))
            content.append(P.TokenLogprob(token=text, logprob=lp, bytes=b, top_logprobs=tops))
        return P.ChoiceLogprobs(content=content)

    async def _chat_stream(rows, queue, n, rid, created, want_logprobs, n_prompt, include_usage, special
                           ) -> AsyncIterator[str]:
        # chunks are built as dicts and dumped with json (C) rather than through pydantic: this runs once
        # per token per client, and it is the server's hot path
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": st.model_id,
                "system_fingerprint": None}

        def chunk(choices, usage=None):
            return "data: " + json.dumps({**head, "choices": choices, "usage": usage}) + "\n\n"

        def choice(idx, delta, logprobs=None, finish=None):
            return {"index": idx, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        try:
            yield "".join(chunk([choice(i, {"role": "assistant", "content": ""})]) for i in range(n))
            left, completion = n, 0
            texts: dict[int, list[str]] = {}

            def flush_text(i):
                if texts.get(i):
                    out.append(chunk([choice(i, {"content": "".join(texts.pop(i))})]))
            while left:
                out = []
                for idx, ev in await _drain(queue):   # everything that arrived since the last write, in one write
                    if isinstance(ev, Exception):
                        err = P.APIError(400, str(ev)) if isinstance(ev, ValueError) else \
                            P.APIError(500, "the engine failed", "server_error")
                        out.append(_sse(err.body()))
                        left = 0
                        break
                    if ev.token_id is not None:
                        completion += 1
                    lp = None
                    if want_logprobs and ev.token_id is not None and ev.logprob is not None \
                            and ev.token_id not in special:
                        lp = _chat_logprobs([(ev.token_id, ev.logprob, ev.top_logprobs)]).model_dump()
                    if lp is not None:          # one chunk per token when logprobs are asked for
                        flush_text(idx)
                        out.append(chunk([choice(idx, {"content": ev.text}, lp)]))
                    elif ev.text:               # otherwise the tokens that came together form one delta
                        texts.setdefault(idx, []).append(ev.text)
                    if ev.finished:
                        flush_text(idx)
                        left -= 1
                        reason = ev.finish_reason if ev.finish_reason in ("stop", "length") else "stop"
                        out.append(chunk([choice(idx, {}, None, reason)]))
                for i in list(texts):
                    flush_text(i)
                if out:
                    yield "".join(out)
            if include_usage:
                yield chunk([], P.Usage.of(n_prompt, completion, _cached(rows)).model_dump())
            yield "data: [DONE]\n\n"
        finally:   # normal end, or the client went away (the generator is closed): free the rows
            st.scheduler.cancel(rows)

    @app.post("/v1/completions", response_model=P.TextCompletion,
              responses={400: {}, 401: {}, 404: {}, 413: {}, 429: {}, 503: {}})
    async def completions(req: P.CompletionRequest, request: Request):
        st.ready().check_model(req.model)
        tok = st.tokenizer
        vocab = int(st.engine.model.config.vocab_size)
        prompts = []
        for j, p in enumerate(req.prompts()):
            if isinstance(p, str):
                ids = tok.encode(p)
                if not ids:
                    raise P.APIError(400, "prompt is empty: a base model needs at least one token to continue",
                                     param="prompt")
            else:
                bad = [t for t in p if not 0 <= t < vocab]
                if bad:
                    raise P.APIError(400, f"prompt[{j}] has token id {bad[0]} outside the vocabulary [0, {vocab})",
                                     param="prompt")
                ids = list(p)
            _check_context(ids, "prompt")
            prompts.append(ids)
        n = req.n or 1
        queue: asyncio.Queue = asyncio.Queue()
        all_rows, idx_prompt = [], []
        try:
            for j, ids in enumerate(prompts):
                room = st.context_len - len(ids)
                max_new = min(req.max_tokens or room, room)
                params = [_sampling_params(req.temperature, req.top_p, req.top_k, max_new, req.stops,
                                           _seed_for(req.seed, i), req.logprobs is not None, req.logprobs)
                          for i in range(n)]
                rows = _submit(ids, params, queue)
                for r in rows:   # one shared queue: renumber rows as choice indices
                    r.index = j * n + r.index
                all_rows += rows
                idx_prompt += [j] * n
        except P.APIError:
            st.scheduler.cancel(all_rows)
            raise
        total = len(all_rows)
        special = set(getattr(tok, "special_ids", ()) or ())
        rid, created = P.new_id("cmpl"), P.now()
        n_prompt = sum(len(p) for p in prompts) * n
        echo_text = [tok.decode(p) if req.echo else "" for p in prompts]
        if req.stream:
            return StreamingResponse(_completion_stream(all_rows, queue, total, rid, created, req, idx_prompt,
                                                        echo_text, n_prompt, special),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        task = asyncio.create_task(_collect(queue, total, special))
        try:
            if await _watch_disconnect(request, task):
                return JSONResponse(P.error_body("client disconnected"), status_code=499)
            choices = task.result()
        finally:
            st.scheduler.cancel(all_rows)
        out = []
        for i, c in enumerate(choices):
            prefix = echo_text[idx_prompt[i]]
            out.append(P.CompletionChoice(index=i, text=prefix + "".join(c.text), finish_reason=c.finish_reason,
                                          logprobs=_completion_logprobs(c.logprobs, len(prefix))
                                          if req.logprobs is not None else None))
        completion = sum(len(c.token_ids) for c in choices)
        return P.TextCompletion(id=rid, created=created, model=st.model_id, choices=out,
                                usage=P.Usage.of(n_prompt, completion, _cached(all_rows, per_row=True)))

    def _completion_logprobs(items, offset0: int) -> P.CompletionLogprobs:
        out = P.CompletionLogprobs(top_logprobs=[])
        off = offset0
        for tid, lp, top in items:
            text, _ = _token_text(st.tokenizer, tid)
            out.tokens.append(text)
            out.token_logprobs.append(lp)
            out.top_logprobs.append({_token_text(st.tokenizer, t)[0]: l for t, l in (top or [])})
            out.text_offset.append(off)
            off += len(text)
        return out

    async def _completion_stream(rows, queue, total, rid, created, req, idx_prompt, echo_text, n_prompt, special):
        head = {"id": rid, "object": "text_completion", "created": created, "model": st.model_id,
                "system_fingerprint": None}

        def chunk(choices, usage=None):
            return "data: " + json.dumps({**head, "choices": choices, "usage": usage}) + "\n\n"

        def choice(idx, text, logprobs=None, finish=None):
            return {"index": idx, "text": text, "logprobs": logprobs, "finish_reason": finish}
        offsets = [len(echo_text[idx_prompt[i]]) for i in range(total)]
        try:
            echoed = [chunk([choice(i, echo_text[idx_prompt[i]])]) for i in range(total) if echo_text[idx_prompt[i]]]
            if echoed:
                yield "".join(echoed)
            left, completion = total, 0
            while left:
                out = []
                for idx, ev in await _drain(queue):
                    if isinstance(ev, Exception):
                        bad = isinstance(ev, ValueError)
                        out.append(_sse(P.error_body(str(ev) if bad else "the engine failed",
                                                     "invalid_request_error" if bad else "server_error")))
                        left = 0
                        break
                    if ev.token_id is not None:
                        completion += 1
                    lp = None
                    if req.logprobs is not None and ev.token_id is not None and ev.logprob is not None \
                            and ev.token_id not in special:
                        lp = _completion_logprobs([(ev.token_id, ev.logprob, ev.top_logprobs)],
                                                  offsets[idx]).model_dump()
                    offsets[idx] += len(ev.text)
                    reason = None
                    if ev.finished:
                        left -= 1
                        reason = ev.finish_reason if ev.finish_reason in ("stop", "length") else "stop"
                    if ev.text or lp is not None or reason:
                        out.append(chunk([choice(idx, ev.text, lp, reason)]))
                if out:
                    yield "".join(out)
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], P.Usage.of(n_prompt, completion, _cached(rows, per_row=True)).model_dump())
            yield "data: [DONE]\n\n"
        finally:
            st.scheduler.cancel(rows)

    # ---------------------------------------------------------------- the ranking page's API

    @app.get("/rank/api/config")
    async def rank_config():
        st.ready()
        return {"model": st.model_id, "rankings": cfg.rankings, "prompts": len(st.rank_prompts),
                "ranked": _count_lines(cfg.rankings)}

    @app.get("/rank/api/prompt")
    async def rank_prompt(index: int = 0):
        if not st.rank_prompts:
            raise P.APIError(404, "no prompts file: start the server with --rank-prompts FILE, or type a prompt",
                             "not_found_error", param="index", code="no_prompts")
        i = index % len(st.rank_prompts)
        return {"index": i, "total": len(st.rank_prompts), "messages": st.rank_prompts[i]}

    @app.post("/rank/api/sample")
    async def rank_sample(req: P.RankSampleRequest, request: Request):
        st.ready()
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            prompt_ids = st.tokenizer.render_prompt(messages)
        except ValueError as e:
            raise P.APIError(400, str(e), param="messages")
        _check_context(prompt_ids, "messages")
        room = st.context_len - len(prompt_ids)
        params = [_sampling_params(req.temperature, req.top_p, 0, min(req.max_tokens, room), [], None, False, 0)
                  for _ in range(req.k)]
        rows = _submit(prompt_ids, params)
        task = asyncio.create_task(_collect(rows[0].queue, req.k, set()))
        try:
            if await _watch_disconnect(request, task):
                return JSONResponse(P.error_body("client disconnected"), status_code=499)
            choices = task.result()
        finally:
            st.scheduler.cancel(rows)
        # a ranking needs distinct answers (the reward data reader rejects duplicates): drop repeats
        texts = ["".join(c.text) for c in choices]
        distinct = list(dict.fromkeys(texts))
        return {"prompt": messages, "responses": distinct, "duplicates": len(texts) - len(distinct)}

    @app.post("/rank/api/submit")
    async def rank_submit(req: P.RankSubmitRequest):
        if not cfg.rankings:
            raise P.APIError(400, "this server has no rankings file: start it with --rankings FILE",
                             code="no_rankings_file")
        record = {"prompt": [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                             for m in req.prompt],
                  "responses": list(req.responses)}
        if len(set(record["responses"])) != len(record["responses"]):
            raise P.APIError(400, "responses holds duplicate answers; a ranking needs distinct ones",
                             param="responses")
        try:   # the same check `chatstack reward` applies when it reads the file
            from chatstack.data.preferences import PreferenceError, parse_record
        except ImportError:
            pass
        else:
            try:
                parse_record(record, "ranking")
            except PreferenceError as e:
                raise P.APIError(400, str(e), param="responses")
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with st.rank_lock:   # one writer at a time: lines never interleave
            path = Path(cfg.rankings)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        return {"ok": True, "rankings": cfg.rankings, "ranked": _count_lines(cfg.rankings)}

    # ---------------------------------------------------------------- pages

    @app.get("/", include_in_schema=False)
    async def index_page():
        return FileResponse(STATIC / "index.html")

    @app.get("/rank", include_in_schema=False)
    async def rank_page():
        return FileResponse(STATIC / "rank.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _count_lines(path: Optional[str]) -> int:
    if not path or not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


KNOWN_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/rank/api/sample", "/rank/api/submit",
               "/rank/api/prompt", "/rank/api/config")


class _Gate:
    """Pure ASGI middleware (a BaseHTTPMiddleware would copy every streamed chunk through an extra task):
    body-size limit (413), API keys on /v1 and /rank/api (401), and per-endpoint request counts."""

    def __init__(self, app, state: ServerState):
        self.app, self.st = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cfg, path = self.st.cfg, scope["path"]
        is_api = path.startswith(API_PREFIXES)
        label = path if path in KNOWN_PATHS else ("/v1/models/*" if path.startswith("/v1/models/") else "other")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

        def count(status: int):
            if is_api:
                self.st.metrics.requests.inc(1, label, str(status))

        async def reject(status: int, body: dict):
            count(status)
            await JSONResponse(body, status_code=status)(scope, receive, send)

        if scope["method"] in ("POST", "PUT", "PATCH"):
            cl = headers.get("content-length")
            if cl is not None and (not cl.isdigit() or int(cl) > cfg.max_body_bytes):
                return await reject(413, P.error_body(
                    f"request body of {cl} bytes exceeds the limit of {cfg.max_body_bytes} bytes",
                    "invalid_request_error", None, "request_too_large"))
            if cl is None:    # chunked upload: count bytes as they arrive
                receive = _limited_receive(receive, cfg.max_body_bytes)
        if is_api and cfg.api_keys:
            auth = headers.get("authorization", "")
            key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if key not in cfg.api_keys:
                why = "missing API key (send 'Authorization: Bearer KEY')" if not key else "incorrect API key provided"
                return await reject(401, P.error_body(why, "invalid_request_error", None, "invalid_api_key"))
        if not is_api:
            return await self.app(scope, receive, send)

        async def counting_send(msg):
            if msg["type"] == "http.response.start":
                count(msg["status"])
            await send(msg)
        await self.app(scope, receive, counting_send)


class _BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


def _limited_receive(receive, limit: int):
    seen = 0

    async def wrapped():
        nonlocal seen
        msg = await receive()
        if msg.get("type") == "http.request":
            seen += len(msg.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge(limit)   # FastAPI re-raises HTTPExceptions from body reading
        return msg
    return wrapped


# ----------------------------------------------------------------------------- CLI


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat page",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory (its name is the model id)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 (repeat for several keys; "
                        "also read from $CHATSTACK_API_KEY)")
    p.add_argument("--model-name", default=None, help="model id to serve under (default: the checkpoint's name)")
    p.add_argument("--any-model", action="store_true", help="accept any model id in requests (one model served)")
    p.add_argument("--rankings", default=None, metavar="FILE", help="JSONL that /rank appends rankings to")
    p.add_argument("--rank-prompts", default=None, metavar="FILE",
                   help="JSONL of prompts for /rank ({\"prompt\": ...} or {\"messages\": [...]})")
    p.add_argument("--max-batch-size", type=int, default=32, help="rows in the running batch")
    p.add_argument("--max-queue", type=int, default=256, help="waiting rows before answering 429")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--stream-interval", type=float, default=0.05, metavar="SECONDS",
                   help="hand streamed tokens to the HTTP side at most this often (first token and end at once)")
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default: cpu)")
    p.add_argument("--quantize", default=None, choices=["int8"],
                   help="decode with int8 weights (CPU; faster where decoding is bound by weight bytes; "
                        "see chatstack/quantize.py for the measured quality cost)")
    p.add_argument("--prefix-cache-mb", type=float, default=256, metavar="MB",
                   help="keep finished requests' keys/values up to this many MB, so a request resending the same "
                        "history (multi-turn chat) prefills only what is new; 0 = off (default 256)")
    p.add_argument("--prefill-chunk", type=int, default=256, metavar="TOKENS",
                   help="prefill longer prompts this many tokens per engine step, so running streams keep going "
                        "while a long prompt is read; 0 = whole prompts at once (default 256)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: torch's choice); 1 is often fastest on a busy, small CPU")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    import uvicorn

    from chatstack.checkpoint import CheckpointError, read_config
    from chatstack.cli import CLIError

    try:
        read_config(args.checkpoint)   # fail fast on a wrong path; the weights load in the background
    except CheckpointError as e:
        raise CLIError(str(e))
    for f in (args.rank_prompts,):
        if f and not os.path.exists(f):
            raise CLIError(f"{f}: no such file")
    if args.quantize and (args.device or "cpu") != "cpu":
        raise CLIError(f"--quantize {args.quantize} is for CPU decoding (got --device {args.device}); on a GPU use bf16")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    keys = list(args.api_key) + [k for k in os.environ.get("CHATSTACK_API_KEY", "").split(",") if k]
    try:
        app = create_app(args.checkpoint, model_name=args.model_name, api_keys=tuple(keys), rankings=args.rankings,
                         rank_prompts=args.rank_prompts, max_queue=args.max_queue,
                         max_batch_size=args.max_batch_size, max_body_bytes=args.max_body_bytes,
                         any_model=args.any_model, device=args.device, stream_interval_s=args.stream_interval,
                         quantize=args.quantize, prefix_cache_mb=args.prefix_cache_mb,
                         prefill_chunk=args.prefill_chunk)
    except ValueError as e:
        raise CLIError(str(e))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding to %s: the server is reachable from other machines%s", args.host,
                    "" if keys else " and has no API key")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
