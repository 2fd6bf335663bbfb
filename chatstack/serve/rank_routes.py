"""The ranking page's API (/rank/api/*): a labeller samples K answers to a prompt and submits their order,
appended to the rankings JSONL that `chatstack reward` reads (chatstack/serve/rankings.py writes it off the event
loop)."""

from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from chatstack.data.preferences import PreferenceError, parse_record
from chatstack.serve import protocol as P
from chatstack.serve.openai_routes import (
    _chars,
    _collect,
    _sampling_params,
    _watch_disconnect,
    check_context,
    off_loop_if_long,
    submit,
)


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
                obj = line  # a plain-text prompt per line
            msgs = obj
            if isinstance(obj, dict):
                msgs = obj.get("messages", obj.get("prompt"))
            if isinstance(msgs, str):
                msgs = [{"role": "user", "content": msgs}]
            if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m for m in msgs)):
                raise ValueError(f'{path}:{lineno}: expected {{"prompt": str | [messages]}} or {{"messages": [...]}}')
            # a conversation ending with the assistant's turn: rank alternatives to that turn
            if msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
            if msgs:
                out.append([{"role": m["role"], "content": str(m.get("content", ""))} for m in msgs])
    return out


def add_rank_routes(app: FastAPI, st) -> None:
    """Register /rank/api/* on `app`; `st` is the ServerState."""

    @app.get("/rank/api/config")
    async def rank_config():
        st.ready()
        return {
            "model": st.model_id,
            "rankings": st.cfg.rankings,
            "prompts": len(st.rank_prompts),
            "ranked": await st.rankings.count_async() if st.rankings is not None else 0,
        }

    @app.get("/rank/api/prompt")
    async def rank_prompt(index: int = 0):
        if not st.rank_prompts:
            raise P.APIError(
                404,
                "no prompts file: start the server with --rank-prompts FILE, or type a prompt",
                "not_found_error",
                param="index",
                code="no_prompts",
            )
        i = index % len(st.rank_prompts)
        return {"index": i, "total": len(st.rank_prompts), "messages": st.rank_prompts[i]}

    @app.post("/rank/api/sample")
    async def rank_sample(req: P.RankSampleRequest, request: Request):
        st.ready()
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            prompt_ids = await off_loop_if_long(_chars(messages), st.tokenizer.render_prompt, messages)
        except ValueError as e:
            raise P.APIError(400, str(e), param="messages") from e
        check_context(st, prompt_ids, "messages")
        room = st.context_len - len(prompt_ids)
        params = [
            _sampling_params(req.temperature, req.top_p, 0, min(req.max_tokens, room), [], None, False, 0)
            for _ in range(req.k)
        ]
        rows = submit(st, prompt_ids, params)
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
        if not st.cfg.rankings:
            raise P.APIError(
                400, "this server has no rankings file: start it with --rankings FILE", code="no_rankings_file"
            )
        record = {
            "prompt": [
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.prompt
            ],
            "responses": list(req.responses),
        }
        if len(set(record["responses"])) != len(record["responses"]):
            raise P.APIError(400, "responses holds duplicate answers; a ranking needs distinct ones", param="responses")
        try:  # the same check `chatstack reward` applies when it reads the file
            parse_record(record, "ranking")
        except PreferenceError as e:
            raise P.APIError(400, str(e), param="responses") from e
        ranked = await st.rankings.append(record)  # on disk when it returns; written by a worker thread
        return {"ok": True, "rankings": st.cfg.rankings, "ranked": ranked}
