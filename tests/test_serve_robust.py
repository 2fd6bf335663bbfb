"""What a hostile or careless client sends gets a 4xx, never a 5xx: text that is not valid Unicode anywhere a string
enters (a property test over arbitrary strings), tool calling, non-strict types, empty bodies, foreign Host headers;
the OpenAPI document lists the statuses really answered; /docs is off by default; ranking submissions are written
off the event loop.

    python -m pytest tests/test_serve_robust.py -q              # + -m slow: kill -9 of a `chatstack serve` process
"""

import json
import threading

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatstack.serve import rankings as rankings_mod
from chatstack.serve.app import create_app
from chatstack.serve.testing import LiveServer, make_tiny_checkpoint
from chatstack.stages.serve import allowed_hosts_for

MODEL = "nano-chat"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("robust") / MODEL, block_size=96)


@pytest.fixture(scope="module")
def client(ckpt, tmp_path_factory):
    rankings = tmp_path_factory.mktemp("rank") / "rankings.jsonl"
    app = create_app(ckpt, rankings=str(rankings))
    with TestClient(app, raise_server_exceptions=False) as c:
        for _ in range(600):
            if c.get("/health").status_code == 200:
                break
            threading.Event().wait(0.05)
        yield c


def _post(client, path, body):
    # json.dumps escapes a lone surrogate as \udXXX: what a client sends
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def _bodies(s: str):
    """(path, body) with the string `s` in every place text enters."""
    msg = [{"role": "user", "content": s}]
    chat = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    yield "/v1/chat/completions", {**chat, "messages": msg}
    yield "/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": [{"type": "text", "text": s}]}]}
    yield "/v1/chat/completions", {**chat, "model": s}
    yield "/v1/chat/completions", {**chat, "stop": [s or "x"], "user": s, "logit_bias": {s: 1.0}}
    yield "/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "hi", "name": s}], "stream": True}
    yield "/v1/completions", {"model": MODEL, "max_tokens": 1, "prompt": s or "x"}
    yield "/v1/completions", {"model": MODEL, "max_tokens": 1, "prompt": ["a", s or "x"]}
    yield "/rank/api/sample", {"messages": msg, "k": 2, "max_tokens": 1}
    yield "/rank/api/submit", {"prompt": msg, "responses": [s + "a", s + "b"]}
    yield "/rank/api/submit", {"prompt": [{"role": "user", "content": "q"}], "responses": ["a", s + "b"]}


_surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
_text = st.lists(st.one_of(st.characters(), _surrogates), max_size=12).map("".join)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(_text)
def test_any_string_anywhere_is_never_a_5xx(client, s):
    # what the server decodes: a high + low surrogate escaped side by side is one valid character in JSON
    bad = any(0xD800 <= ord(c) <= 0xDFFF for c in json.loads(json.dumps(s)))
    for path, body in _bodies(s):
        r = _post(client, path, body)
        assert r.status_code < 500, (path, body, r.text)
        err = r.json().get("error") if r.headers["content-type"].startswith("application/json") else None
        if bad:
            assert r.status_code == 400 and "surrogate" in err["message"] and err["param"], (path, r.text)


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"logprobs": "true"}, "logprobs"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"n": 1.5}, "n"),
    ],
)
def test_tools_and_loose_types_are_400(client, extra, param):
    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}], **extra}
    r = _post(client, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_empty_tools_and_tool_choice_none_are_accepted(client):
    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    assert _post(client, "/v1/chat/completions", {**body, "tools": [], "tool_choice": "none"}).status_code == 200


@pytest.mark.parametrize("path, first", [("/v1/chat/completions", "model"), ("/rank/api/submit", "prompt")])
def test_empty_body_names_the_missing_fields(client, path, first):
    r = client.post(path)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == first
    assert "None" not in err["message"] and f"'{first}'" in err["message"]


def test_openapi_lists_the_statuses_answered(client):
    doc = client.get("/openapi.json").json()
    ops = {(p, m): op for p, methods in doc["paths"].items() for m, op in methods.items()}
    assert all("422" not in op["responses"] for op in ops.values())  # the server answers 400, never 422
    chat = ops[("/v1/chat/completions", "post")]["responses"]
    assert {"200", "400", "401", "404", "413", "429", "503"} <= set(chat)
    assert chat["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    # what the tests above really got back is documented
    for path, status in [("/v1/chat/completions", 400), ("/rank/api/submit", 400), ("/v1/models/{model_id}", 404)]:
        assert str(status) in next(op for (p, _), op in ops.items() if p.startswith(path))["responses"]


def test_docs_are_off_by_default_and_on_when_asked(ckpt):
    with TestClient(create_app(ckpt)) as c:
        assert c.get("/docs").status_code == 404
        assert c.get("/openapi.json").status_code == 200
    with TestClient(create_app(ckpt, docs=True)) as c:
        assert c.get("/docs").status_code == 200


def test_allowed_hosts(ckpt):
    with TestClient(create_app(ckpt, allowed_hosts="localhost,127.0.0.1,::1"), raise_server_exceptions=False) as c:
        r = c.get("/health", headers={"host": "evil.example:8000"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed"
        for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
            assert c.get("/health", headers={"host": host}).status_code in (200, 503), host
    assert allowed_hosts_for("127.0.0.1", [], None) == "127.0.0.1,localhost,::1"  # loopback, no key: checked
    assert allowed_hosts_for("127.0.0.1", ["sk"], None) is None  # a key guards it
    assert allowed_hosts_for("0.0.0.0", [], None) is None
    assert allowed_hosts_for("127.0.0.1", [], "*") == "*"


def test_ranking_submit_does_not_block_the_event_loop(ckpt, tmp_path, monkeypatch):
    """While a submission's fsync is stuck (a slow disk), /health still answers: the write runs on a worker thread;
    the submission returns once its line is on disk, with the count kept without re-reading the file."""
    path = tmp_path / "rankings.jsonl"
    path.write_text("".join(json.dumps({"prompt": "p", "responses": [f"a{i}", "b"]}) + "\n" for i in range(500)))
    gate, entered = threading.Event(), threading.Event()
    real_fsync = rankings_mod.os.fsync

    def slow_fsync(fd):
        entered.set()
        gate.wait(30)
        real_fsync(fd)

    monkeypatch.setattr(rankings_mod.os, "fsync", slow_fsync)
    with LiveServer(create_app(ckpt, rankings=str(path))) as srv:
        got = {}
        body = {"prompt": [{"role": "user", "content": "q"}], "responses": ["best", "worst"]}
        t = threading.Thread(
            target=lambda: got.update(r=httpx.post(srv.url + "/rank/api/submit", json=body, timeout=60))
        )
        t.start()
        assert entered.wait(30)
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200  # answered while the write waits
        assert t.is_alive()  # the submission waits for its fsync
        gate.set()
        t.join(60)
    assert got["r"].status_code == 200 and got["r"].json()["ranked"] == 501
    assert json.loads(path.read_text().splitlines()[-1])["responses"] == ["best", "worst"]


def test_torn_last_line_does_not_swallow_the_next_record(tmp_path):
    import asyncio

    path = tmp_path / "r.jsonl"
    path.write_text('{"prompt": "p", "responses": ["a", "b"]}\n{"prompt": "p", "resp')  # a crash mid-line
    w = rankings_mod.RankingsWriter(str(path))
    n = asyncio.run(w.append({"prompt": "q", "responses": ["c", "d"]}))
    w.close()
    lines = path.read_text().splitlines()
    assert n == 3 and json.loads(lines[-1]) == {"prompt": "q", "responses": ["c", "d"]}


@pytest.mark.slow
def test_kill_9_loses_no_acknowledged_ranking(ckpt, tmp_path):
    """`chatstack serve --rankings F`, four clients submitting, SIGKILL mid-stream: every submission the server
    acknowledged is in the file, and every line in it is a whole JSON record."""
    import subprocess
    import sys
    import time

    from chatstack.serve.testing import free_port

    path = tmp_path / "rankings.jsonl"
    port = free_port()
    cmd = [sys.executable, "-m", "chatstack.cli", "serve", ckpt, "--port", str(port), "--rankings", str(path)]
    proc = subprocess.Popen(cmd + ["--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    acked, stop = [], threading.Event()

    def client(k):
        i = 0
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                body = {"prompt": [{"role": "user", "content": f"q{k}"}], "responses": [f"{k}-{i}-best", f"{k}-{i}"]}
                try:
                    if c.post(url + "/rank/api/submit", json=body).status_code == 200:
                        acked.append(body["responses"][0])
                except httpx.HTTPError:
                    return
                i += 1

    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        while len(acked) < 40 and time.time() < deadline:
            time.sleep(0.01)
        proc.kill()  # SIGKILL: no shutdown handlers run
        proc.wait(10)
        stop.set()
        for t in threads:
            t.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    records = [json.loads(line) for line in path.read_text().splitlines()]  # no torn line
    on_disk = {r["responses"][0] for r in records}
    assert len(acked) >= 40 and set(acked) <= on_disk
