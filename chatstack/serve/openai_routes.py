"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions and /v1/completions (streamed or not).

Every route reads the shared ServerState (chatstack/serve/app.py); generation goes through its scheduler
(chatstack/serve/scheduler.py). Every error leaves as OpenAI's envelope (chatstack/serve/protocol.py).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from chatstack.infer.engine import SamplingParams
from chatstack.serve import protocol as P
from chatstack.serve.scheduler import QueueFull
from chatstack.vision.vlm import render_request


def _sampling_params(temperature, top_p, top_k, max_new, stops, seed, logprobs, top_logprobs):
    temperature = 1.0 if temperature is None else temperature
    top_p = 1.0 if top_p is None else top_p
    if top_p == 0.0:  # OpenAI accepts top_p=0: only the most likely token survives, i.e. greedy
        temperature, top_p = 0.0, 1.0
    return SamplingParams(
        max_new_tokens=max_new,
        temperature=temperature,
        top_k=top_k or 0,
        top_p=top_p,
        stop=list(stops),
        seed=seed,
        logprobs=bool(logprobs),
        top_logprobs=top_logprobs or 0,
    )


def _seed_for(seed: Optional[int], i: int) -> Optional[int]:
    # n choices from one seeded request must differ from each other, yet repeat across requests
    if seed is None:
        return None
    s = seed + i
    return s if s <= P.SEED_MAX else s - 2**64


# request text longer than this (characters) is tokenized on a worker thread: the tokenizer reads ~1 MB/s of CPU, so
# a 1 MB prompt tokenized on the event loop's thread held up every other request (and /health) for a second or more
OFF_LOOP_CHARS = 4096


async def off_loop_if_long(n_chars: int, fn, *args):
    """fn(*args), on a worker thread when the text it reads is long (chatstack.tokenizer releases the GIL for long
    texts, so the event loop runs meanwhile); short texts inline (a thread hop costs more than they do)."""
    if n_chars > OFF_LOOP_CHARS:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


class ClosingStream(StreamingResponse):
    """A StreamingResponse that closes its generator when the response ends, however it ends.

    When a client goes away while the generator waits at a `yield` (its chunk is being written), Starlette
    cancels the writer but leaves the generator suspended. Without the close, its `finally`, which frees the rows'
    batch slots, would wait for the garbage collector while the rows keep generating for nobody."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


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
        self.logprobs: list[tuple[int, float, Any]] = []  # (token id, logprob, top list)
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
    """One server-sent event. Chunks are dicts dumped with json (C) rather than through pydantic: this runs once
    per token per client, the server's hot path."""
    if hasattr(obj, "model_dump_json"):
        return f"data: {obj.model_dump_json(exclude_none=False)}\n\n"
    return f"data: {json.dumps(obj)}\n\n"


class _Chunks:
    """The SSE chunks of one streamed response: chat.completion.chunk (deltas) or text_completion (text)."""

    def __init__(self, obj: str, rid: str, created: int, model: str):
        self.head = {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": None}
        self.field = "delta" if obj == "chat.completion.chunk" else "text"

    def __call__(self, choices: list, usage: Optional[dict] = None) -> str:
        return _sse({**self.head, "choices": choices, "usage": usage})

    def choice(self, idx: int, content, logprobs=None, finish: Optional[str] = None) -> dict:
        return {"index": idx, self.field: content, "logprobs": logprobs, "finish_reason": finish}


def check_context(st, prompt_ids: list[int], param: str) -> None:
    if len(prompt_ids) >= st.context_len:
        raise P.APIError(
            400,
            f"This model's maximum context length is {st.context_len} tokens, and the prompt "
            f"has {len(prompt_ids)} tokens, leaving no room for a reply. Shorten the {param}.",
            param=param,
            code="context_length_exceeded",
        )


def submit(st, prompt_ids: list[int], params: list, queue=None, embeds=None):
    try:
        return st.scheduler.submit(prompt_ids, params, queue, **({} if embeds is None else {"embeds": embeds}))
    except QueueFull as e:
        raise P.APIError(429, f"the server is busy: {e}", "rate_limit_error", code="queue_full") from e


async def _render(st, req: P.ChatCompletionRequest):
    """(prompt ids, image embeddings for the engine or None) of a chat request; image_url parts need a vision
    model (st.vision) and data: URLs, else a 400 naming the part."""
    urls = req.image_urls()
    if not urls:
        messages = req.chat_messages()
        try:
            return await off_loop_if_long(_chars(messages), st.tokenizer.render_prompt, messages), None
        except ValueError as e:
            raise P.APIError(400, str(e), param="messages") from e
    if st.vision is None:
        raise P.APIError(
            400,
            f"the model `{st.model_id}` is text only: it takes no image_url parts (serve a checkpoint from "
            f"chatstack sft-vision)",
            param=urls[0][0],
            code="images_not_supported",
        )
    images = [P.image_from_data_url(url, param) for param, url in urls]
    try:
        # the encoder's forward runs off the event loop
        return await asyncio.to_thread(render_request, st.tokenizer, st.vision, req.multimodal_messages(), images)
    except ValueError as e:
        raise P.APIError(400, str(e), param="messages") from e


def _chars(messages: list[dict]) -> int:
    return sum(len(m["content"]) if isinstance(m.get("content"), str) else 0 for m in messages)


def add_openai_routes(app: FastAPI, st) -> None:
    """Register the /v1 routes on `app`; `st` is the ServerState they serve from."""

    @app.get("/v1/models", response_model=P.ModelList)
    async def list_models():
        st.ready()
        return P.ModelList(data=[P.ModelCard(id=st.model_id, created=st.created, max_model_len=st.context_len)])

    @app.get("/v1/models/{model_id:path}", response_model=P.ModelCard)
    async def get_model(model_id: str):
        st.ready().check_model(model_id)
        return P.ModelCard(id=st.model_id, created=st.created, max_model_len=st.context_len)

    @app.post(
        "/v1/chat/completions",
        response_model=P.ChatCompletion,
        responses={400: {}, 401: {}, 404: {}, 413: {}, 429: {}, 503: {}},
    )
    async def chat_completions(req: P.ChatCompletionRequest, request: Request):
        st.ready().check_model(req.model)
        tok = st.tokenizer
        prompt_ids, embeds = await _render(st, req)
        check_context(st, prompt_ids, "messages")
        n = req.n or 1
        room = st.context_len - len(prompt_ids)
        max_new = min(req.max_new_tokens or room, room)
        params = [
            _sampling_params(
                req.temperature,
                req.top_p,
                req.top_k,
                max_new,
                req.stops,
                _seed_for(req.seed, i),
                req.logprobs,
                req.top_logprobs,
            )
            for i in range(n)
        ]
        rows = submit(st, prompt_ids, params, embeds=embeds)
        queue = rows[0].queue
        special = set(getattr(tok, "special_ids", ()) or ())
        rid, created = P.new_id("chatcmpl"), P.now()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return ClosingStream(
                _chat_stream(rows, queue, n, rid, created, req.logprobs, len(prompt_ids), include_usage, special),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        task = asyncio.create_task(_collect(queue, n, special))
        try:
            if await _watch_disconnect(request, task):
                return JSONResponse(P.error_body("client disconnected"), status_code=499)
            choices = task.result()
        finally:
            st.scheduler.cancel(rows)
        out = [
            P.ChatChoice(
                index=i,
                message=P.AssistantMessage(content="".join(c.text)),
                logprobs=_chat_logprobs(c.logprobs) if req.logprobs else None,
                finish_reason=c.finish_reason,
            )
            for i, c in enumerate(choices)
        ]
        completion = sum(len(c.token_ids) for c in choices)
        return P.ChatCompletion(
            id=rid,
            created=created,
            model=st.model_id,
            choices=out,
            usage=P.Usage.of(len(prompt_ids), completion, _cached(rows)),
        )

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
            for t2, lp2 in top or []:
                s2, b2 = _token_text(st.tokenizer, t2)
                tops.append(P.TopLogprob(token=s2, logprob=lp2, bytes=b2))
            content.append(P.TokenLogprob(token=text, logprob=lp, bytes=b, top_logprobs=tops))
        return P.ChoiceLogprobs(content=content)

    async def _chat_stream(
        rows, queue, n, rid, created, want_logprobs, n_prompt, include_usage, special
    ) -> AsyncIterator[str]:
        chunk = _Chunks("chat.completion.chunk", rid, created, st.model_id)
        choice = chunk.choice

        try:
            yield "".join(chunk([choice(i, {"role": "assistant", "content": ""})]) for i in range(n))
            left, completion = n, 0
            texts: dict[int, list[str]] = {}

            def flush_text(i):
                if texts.get(i):
                    out.append(chunk([choice(i, {"content": "".join(texts.pop(i))})]))

            while left:
                out = []
                for idx, ev in await _drain(queue):  # everything that arrived since the last write, in one write
                    if isinstance(ev, Exception):
                        err = (
                            P.APIError(400, str(ev))
                            if isinstance(ev, ValueError)
                            else P.APIError(500, "the engine failed", "server_error")
                        )
                        out.append(_sse(err.body()))
                        left = 0
                        break
                    if ev.token_id is not None:
                        completion += 1
                    lp = None
                    if (
                        want_logprobs
                        and ev.token_id is not None
                        and ev.logprob is not None
                        and ev.token_id not in special
                    ):
                        lp = _chat_logprobs([(ev.token_id, ev.logprob, ev.top_logprobs)]).model_dump()
                    if lp is not None:  # one chunk per token when logprobs are asked for
                        flush_text(idx)
                        out.append(chunk([choice(idx, {"content": ev.text}, lp)]))
                    elif ev.text:  # otherwise the tokens that came together form one delta
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
        finally:  # normal end, or the client went away (the generator is closed): free the rows
            st.scheduler.cancel(rows)

    @app.post(
        "/v1/completions",
        response_model=P.TextCompletion,
        responses={400: {}, 401: {}, 404: {}, 413: {}, 429: {}, 503: {}},
    )
    async def completions(req: P.CompletionRequest, request: Request):
        st.ready().check_model(req.model)
        tok = st.tokenizer
        vocab = int(st.engine.model.config.vocab_size)
        prompts = []
        for j, p in enumerate(req.prompts()):
            if isinstance(p, str):
                ids = await off_loop_if_long(len(p), tok.encode, p)
                if not ids:
                    raise P.APIError(
                        400, "prompt is empty: a base model needs at least one token to continue", param="prompt"
                    )
            else:
                bad = [t for t in p if not 0 <= t < vocab]
                if bad:
                    raise P.APIError(
                        400, f"prompt[{j}] has token id {bad[0]} outside the vocabulary [0, {vocab})", param="prompt"
                    )
                ids = list(p)
            check_context(st, ids, "prompt")
            prompts.append(ids)
        n = req.n or 1
        queue: asyncio.Queue = asyncio.Queue()
        all_rows, idx_prompt = [], []
        try:
            for j, ids in enumerate(prompts):
                room = st.context_len - len(ids)
                max_new = min(req.max_tokens or room, room)
                params = [
                    _sampling_params(
                        req.temperature,
                        req.top_p,
                        req.top_k,
                        max_new,
                        req.stops,
                        _seed_for(req.seed, i),
                        req.logprobs is not None,
                        req.logprobs,
                    )
                    for i in range(n)
                ]
                rows = submit(st, ids, params, queue)
                for r in rows:  # one shared queue: renumber rows as choice indices
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
            return ClosingStream(
                _completion_stream(all_rows, queue, total, rid, created, req, idx_prompt, echo_text, n_prompt, special),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
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
            out.append(
                P.CompletionChoice(
                    index=i,
                    text=prefix + "".join(c.text),
                    finish_reason=c.finish_reason,
                    logprobs=_completion_logprobs(c.logprobs, len(prefix)) if req.logprobs is not None else None,
                )
            )
        completion = sum(len(c.token_ids) for c in choices)
        return P.TextCompletion(
            id=rid,
            created=created,
            model=st.model_id,
            choices=out,
            usage=P.Usage.of(n_prompt, completion, _cached(all_rows, per_row=True)),
        )

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
        chunk = _Chunks("text_completion", rid, created, st.model_id)
        choice = chunk.choice

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
                        out.append(
                            _sse(
                                P.error_body(
                                    str(ev) if bad else "the engine failed",
                                    "invalid_request_error" if bad else "server_error",
                                )
                            )
                        )
                        left = 0
                        break
                    if ev.token_id is not None:
                        completion += 1
                    lp = None
                    if (
                        req.logprobs is not None
                        and ev.token_id is not None
                        and ev.logprob is not None
                        and ev.token_id not in special
                    ):
                        lp = _completion_logprobs(
                            [(ev.token_id, ev.logprob, ev.top_logprobs)], offsets[idx]
                        ).model_dump()
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
