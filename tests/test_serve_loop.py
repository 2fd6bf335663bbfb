"""What runs on the server's event loop thread, and what never does: engine steps, request admission and
cancellation, ranking writes and counts, and the tokenizing of long request text run on other threads; a submission
does not re-read the rankings file. Structural checks, no clocks (benchmarks/serve_health.py measures the latency).

    python -m pytest tests/test_serve_loop.py -q
"""

import asyncio
import builtins
import json

import pytest
from fastapi.testclient import TestClient

from chatstack.checkpoint import load_checkpoint
from chatstack.infer.engine import Engine
from chatstack.serve import rankings as rankings_mod
from chatstack.serve.app import create_app
from chatstack.serve.openai_routes import OFF_LOOP_CHARS
from chatstack.serve.testing import make_tiny_checkpoint

MODEL = "m"


def on_event_loop_thread() -> bool:
    """True when the calling thread is running an asyncio event loop (a handler, or anything called from one)."""
    return asyncio._get_running_loop() is not None


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("loop") / "nano-chat", block_size=96)


def test_engine_calls_ranking_writes_and_long_prompts_run_off_the_event_loop(ckpt, tmp_path):
    ck = load_checkpoint(ckpt)
    engine = Engine(ck.model.eval(), ck.tokenizer, max_batch_size=4)
    calls: list[tuple[str, bool]] = []

    def spy(obj, name):
        real = getattr(obj, name)

        def wrapped(*a, **kw):
            calls.append((name, on_event_loop_thread()))
            return real(*a, **kw)

        setattr(obj, name, wrapped)

    for name in ("step", "add_request", "cancel"):
        spy(engine, name)
    tok = engine.tok
    real_render, real_encode = tok.render_prompt, tok.encode
    tokenized: list[tuple[int, bool]] = []  # (characters, on the loop thread)

    def render_prompt(messages):
        tokenized.append((sum(len(m["content"]) for m in messages), on_event_loop_thread()))
        return real_render(messages)

    def encode(text):
        tokenized.append((len(text), on_event_loop_thread()))
        return real_encode(text)

    tok.render_prompt, tok.encode = render_prompt, encode
    rankings = tmp_path / "rankings.jsonl"
    rankings.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"]}) + "\n")
    app = create_app(engine, model_name=MODEL, rankings=str(rankings))
    writer = app.state.chatstack.rankings
    for name in ("_append", "_count_lines"):
        spy(writer, name)
    msgs = [{"role": "user", "content": "Hi"}]
    with TestClient(app) as c:
        chat = {"model": MODEL, "messages": msgs, "max_tokens": 4}
        assert c.post("/v1/chat/completions", json=chat).status_code == 200
        with c.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
            assert r.status_code == 200 and "[DONE]" in r.read().decode()
        assert c.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3}).status_code == 200
        body = {"prompt": msgs, "responses": ["one", "two"]}
        assert c.post("/rank/api/submit", json=body).json()["ranked"] == 2
        assert c.get("/rank/api/config").json()["ranked"] == 2
        long = "word " * (OFF_LOOP_CHARS // 5 + 100)  # longer than the model's context: read, then refused
        r = c.post("/v1/chat/completions", json={**chat, "messages": [{"role": "user", "content": long}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": long, "max_tokens": 3})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = c.post("/rank/api/sample", json={"messages": [{"role": "user", "content": long}], "k": 2})
        assert r.status_code == 400
    names = {n for n, _ in calls}
    assert {"step", "add_request", "_append", "_count_lines"} <= names  # (cancel: only if a client leaves early)
    assert [n for n, on_loop in calls if on_loop] == []  # none of them ran on the event loop's thread
    long_ones = [on_loop for n, on_loop in tokenized if n > OFF_LOOP_CHARS]
    assert len(long_ones) >= 3 and not any(long_ones)  # chat, completions, rank sample: tokenized off the loop
    assert any(on_loop for n, on_loop in tokenized if n <= OFF_LOOP_CHARS)  # short text stays inline (cheaper)


def test_submissions_do_not_reread_the_rankings_file(tmp_path, monkeypatch):
    """The count is read once; later submissions append without reading the file (it may be tens of MB)."""
    path = tmp_path / "rankings.jsonl"
    path.write_text("".join(json.dumps({"prompt": "p", "responses": [f"a{i}", "b"]}) + "\n" for i in range(300)))
    reads = []

    def counting_open(file, mode="r", *a, **kw):
        if "r" in mode:
            reads.append((str(file), on_event_loop_thread()))
        return builtins.open(file, mode, *a, **kw)

    monkeypatch.setattr(rankings_mod, "open", counting_open, raising=False)
    writer = rankings_mod.RankingsWriter(str(path))

    async def submit_many():
        return [await writer.append({"prompt": "q", "responses": [f"x{i}", "y"]}) for i in range(20)]

    try:
        counts = asyncio.run(submit_many())
    finally:
        writer.close()
    assert counts == list(range(301, 321))
    assert len(path.read_text().splitlines()) == 320
    # one read to count the lines, one to check the last byte for a torn line: not one per submission
    assert len(reads) <= 2 and not any(on_loop for _, on_loop in reads)
