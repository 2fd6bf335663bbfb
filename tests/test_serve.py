"""The OpenAI-compatible server against the official `openai` client, on a live loopback server.

One server per module (nano model with random weights, 300-token BPE); small max_tokens everywhere.
Outputs are checked against the engine run directly in this process (an independent path: no HTTP,
no scheduler), so batching, streaming and the protocol layer must not change what the model says.

    python -m pytest tests/test_serve.py -q
"""

import json
import threading
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from chatstack.checkpoint import load_checkpoint
from chatstack.infer.engine import Engine, SamplingParams
from chatstack.serve.app import create_app
from chatstack.serve.testing import LiveServer, make_tiny_checkpoint

KEY = "sk-test"
MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "nano-chat")


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    rankings = tmp_path_factory.mktemp("rank") / "rankings.jsonl"
    app = create_app(ckpt, api_keys=(KEY,), rankings=str(rankings), max_body_bytes=64 * 1024)
    with LiveServer(app) as srv:
        srv.rankings = rankings
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def ref(ckpt):
    """The engine alone, in this process: the reference outputs."""
    ck = load_checkpoint(ckpt)
    ck.model.eval()
    return Engine(ck.model, ck.tokenizer, max_batch_size=4)


def _ref_text(ref, messages, **kw):
    ids = ref.tok.render_prompt(messages)
    return ref.generate([ids], SamplingParams(**kw))[0]


def test_models_health_metrics(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["nano-chat"]  # the checkpoint's directory name
    assert client.models.retrieve("nano-chat").id == "nano-chat"
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == "nano-chat" and h["weights"] == "float32"
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "chatstack_requests_total",
        "chatstack_generation_tokens_total",
        "chatstack_queue_depth",
        "chatstack_time_to_first_token_seconds_bucket",
    ):
        assert name in text


def test_multi_turn_reuses_cached_history(server, client, ref):
    """The prefix cache (on by default): a second turn that resends the first reuses its keys/values, and the
    answer is still the reference engine's (which has no prefix cache)."""

    def reused():
        text = httpx.get(server.url + "/metrics").text
        return float(
            next(ln.split()[-1] for ln in text.splitlines() if ln.startswith("chatstack_prefix_cache_reused_tokens "))
        )

    before = reused()
    turn1 = MSGS + [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. Say it back."}]
    r1 = client.chat.completions.create(model="nano-chat", messages=turn1, max_tokens=6, temperature=0)
    turn2 = turn1 + [
        {"role": "assistant", "content": r1.choices[0].message.content},
        {"role": "user", "content": "Again, please."},
    ]
    r2 = client.chat.completions.create(model="nano-chat", messages=turn2, max_tokens=6, temperature=0)
    assert r2.choices[0].message.content == _ref_text(ref, turn2, max_new_tokens=6, temperature=0).text
    assert reused() - before >= len(ref.tok.render_prompt(turn1)) - 1
    # OpenAI's usage field for it, as the official client reads it
    assert r1.usage.prompt_tokens_details.cached_tokens < len(ref.tok.render_prompt(turn1))
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert len(ref.tok.render_prompt(turn1)) <= cached < r2.usage.prompt_tokens
    # streaming, with include_usage: the last chunk carries the same count
    turn3 = turn2 + [
        {"role": "assistant", "content": r2.choices[0].message.content},
        {"role": "user", "content": "Once more."},
    ]
    chunks = list(
        client.chat.completions.create(
            model="nano-chat",
            messages=turn3,
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens >= cached and usage.prompt_tokens == len(
        ref.tok.render_prompt(turn3)
    )
    # legacy completions, n=2: the prompt counts once per choice, and so does its reuse
    prompt = "The quick brown fox jumps over the lazy dog. To be, or not to be, that is the question."
    client.completions.create(model="nano-chat", prompt=prompt, max_tokens=3, temperature=0)
    c = client.completions.create(model="nano-chat", prompt=prompt, max_tokens=3, temperature=0, n=2)
    n_ids = len(ref.tok.encode(prompt))
    assert c.usage.prompt_tokens == 2 * n_ids and c.usage.prompt_tokens_details.cached_tokens == 2 * (n_ids - 1)


def test_chat_non_streaming_matches_engine(client, ref):
    r = client.chat.completions.create(model="nano-chat", messages=MSGS, max_tokens=8, temperature=0)
    want = _ref_text(ref, MSGS, max_new_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "nano-chat"
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(ref.tok.render_prompt(MSGS))
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_max_completion_tokens_and_length(client):
    r = client.chat.completions.create(
        model="nano-chat", messages=MSGS, max_completion_tokens=3, temperature=0, stop=None
    )
    assert r.usage.completion_tokens <= 3
    if r.usage.completion_tokens == 3:
        assert r.choices[0].finish_reason == "length"


def test_streaming_matches_non_streaming(client):
    kw = dict(model="nano-chat", messages=MSGS, max_tokens=12, temperature=0.9, seed=7)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_stream_ends_with_done(server):
    body = {"model": "nano-chat", "messages": MSGS, "max_tokens": 3, "stream": True}
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)
    json.loads(lines[0][6:])


def test_n_choices(client):
    r = client.chat.completions.create(model="nano-chat", messages=MSGS, max_tokens=10, temperature=1.0, n=3, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1  # seeds differ per choice
    chunks = list(
        client.chat.completions.create(
            model="nano-chat", messages=MSGS, max_tokens=10, temperature=1.0, n=3, seed=3, stream=True
        )
    )
    texts = ["", "", ""]
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == [c.message.content for c in r.choices]


def test_seed_reproducible(client):
    kw = dict(model="nano-chat", messages=MSGS, max_tokens=12, temperature=1.0)
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=4321, **kw).choices[0].message.content
    assert a == b and a != c


def test_stop_strings(client, ref):
    kw = dict(max_tokens=20, temperature=1.0, seed=5)
    base = _ref_text(ref, MSGS, max_new_tokens=20, temperature=1.0, seed=5).text
    # a 2-character stop string taken from the middle of what the model says unstopped
    stop = next(
        base[i : i + 2]
        for i in range(3, len(base) - 2)
        if base[i : i + 2].isprintable() and "\ufffd" not in base[i : i + 2]
    )
    r = client.chat.completions.create(model="nano-chat", messages=MSGS, stop=[stop], **kw)
    assert r.choices[0].message.content == base[: base.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model="nano-chat", messages=MSGS, stop=stop, stream=True, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == base[: base.index(stop)]


def test_logprobs(client):
    r = client.chat.completions.create(
        model="nano-chat",
        messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    # every generated token has an entry, except a final stop token (<|im_end|>), as OpenAI reports it
    assert len(content) + (r.choices[0].finish_reason == "stop") == r.usage.completion_tokens
    assert len(content) > 0
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5)
        assert bytes(t.bytes).decode("utf-8", errors="backslashreplace") == t.token


def test_completions_endpoint(client, ref):
    ids = ref.tok.encode("The quick brown")
    want = ref.generate([ids], SamplingParams(max_new_tokens=6, temperature=0))[0]
    r = client.completions.create(model="nano-chat", prompt="The quick brown", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == want.text
    assert r.usage.prompt_tokens == len(ids)
    r2 = client.completions.create(model="nano-chat", prompt=ids, max_tokens=6, temperature=0, echo=True, logprobs=2)
    assert r2.choices[0].text == "The quick brown" + want.text
    assert len(r2.choices[0].logprobs.tokens) == len(want.token_ids)
    r3 = client.completions.create(model="nano-chat", prompt=["a b", "c d"], n=2, max_tokens=2, temperature=1, seed=0)
    assert [c.index for c in r3.choices] == [0, 1, 2, 3]
    s = client.completions.create(model="nano-chat", prompt="The quick brown", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in s if c.choices) == want.text


@pytest.mark.parametrize(
    "kw, param",
    [
        (dict(messages=[{"role": "tool", "content": "x"}]), "messages.0.role"),
        (dict(messages=[]), "messages"),
        (dict(messages=MSGS, temperature=2.5), "temperature"),
        (dict(messages=MSGS, top_p=1.5), "top_p"),
        (dict(messages=MSGS, n=0), "n"),
        (dict(messages=MSGS, max_tokens=0), "max_tokens"),
        (dict(messages=MSGS, top_logprobs=3), None),
        (dict(messages=MSGS, stop=[""]), "stop"),
    ],
)
def test_bad_requests_are_400(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="nano-chat", **kw)
    assert e.value.status_code == 400
    err = e.value.body
    assert set(err) >= {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param


def test_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="nano-chat", messages=[{"role": "user", "content": "fox " * 400}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="nano-chat", prompt="fox " * 400)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="nano-chat", prompt=[999999])


def test_auth_and_unknown_model(server, client):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="nano-chat", messages=MSGS)
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "nano-chat", "messages": MSGS})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=2)
    assert e.value.code == "model_not_found"
    # pages and health are open; only the API needs the key
    assert httpx.get(server.url + "/health").status_code == 200


def test_malformed_bodies_never_500(server):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = server.url + "/v1/chat/completions"
    for body in [
        b"{not json",
        b"[]",
        b"null",
        b'{"model": 1}',
        b'{"model": "nano-chat", "messages": "hi"}',
        b'{"model": "nano-chat", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
        b'{"model": "nano-chat", "messages": [{"role": "user"}], "seed": 1e30}',
        b"",
    ]:
        r = httpx.post(url, content=body, headers=h)
        assert r.status_code == 400, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(url, content=b'{"x": "' + b"a" * 70_000 + b'"}', headers=h)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(server.url + "/v1/nope", headers=h)
    assert r.status_code == 404 and "error" in r.json()


def test_concurrent_requests_share_the_batch(server, client):
    """8 seeded requests at once: they run batched, and each says exactly what it says alone."""
    kw = dict(model="nano-chat", messages=MSGS, max_tokens=16, temperature=1.0)
    alone = [client.chat.completions.create(seed=s, **kw).choices[0].message.content for s in range(8)]
    st = server.app.state.chatstack
    batches_before = st.metrics.batch.count
    batch_sum_before = st.metrics.batch.sum
    results = [None] * 8

    def run(i):
        results[i] = client.chat.completions.create(seed=i, **kw).choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone
    steps = st.metrics.batch.count - batches_before
    mean_batch = (st.metrics.batch.sum - batch_sum_before) / steps
    assert mean_batch > 1.5, f"requests did not share the batch (mean rows per step {mean_batch:.2f})"


def test_disconnect_cancels_row(server, ref, monkeypatch):
    st = server.app.state.chatstack
    before = st.metrics.cancelled.get()
    # each engine step takes at least 20 ms, so the row is still running when the disconnect arrives
    # (the tiny model can otherwise make all 100 tokens before the server notices the client left)
    step = st.scheduler.engine.step

    def slow_step():
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(st.scheduler.engine, "step", slow_step)
    # a seed whose reply runs the full 100 tokens (random weights often emit <|im_end|> early); 16 seeds
    # in one batched call, each runs to the end with probability ~0.5
    ids = ref.tok.render_prompt(MSGS)
    outs = ref.generate([ids] * 16, [SamplingParams(max_new_tokens=100, temperature=1.0, seed=s) for s in range(16)])
    seed = next(s for s, o in enumerate(outs) if o.finish_reason == "length")
    body = {"model": "nano-chat", "messages": MSGS, "max_tokens": 100, "stream": True, "temperature": 1.0, "seed": seed}
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as r:
        it = r.iter_lines()
        next(it), next(it)  # the row is running
    deadline = time.time() + 10
    while time.time() < deadline and (st.metrics.cancelled.get() == before or st.scheduler.running):
        time.sleep(0.05)
    assert st.metrics.cancelled.get() == before + 1
    assert st.scheduler.running == 0


def test_rank_api_appends_rankings(server):
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(
        server.url + "/rank/api/sample",
        headers=h,
        timeout=30,
        json={"messages": [{"role": "user", "content": "Tell me a story"}], "k": 3, "max_tokens": 6},
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["responses"]) == 3
    ranked = list(reversed(out["responses"]))
    r = httpx.post(server.url + "/rank/api/submit", headers=h, json={"prompt": out["prompt"], "responses": ranked})
    assert r.status_code == 200 and r.json()["ranked"] >= 1
    last = json.loads(server.rankings.read_text().splitlines()[-1])
    assert last == {"prompt": [{"role": "user", "content": "Tell me a story"}], "responses": ranked}
    r = httpx.post(server.url + "/rank/api/submit", headers=h, json={"prompt": out["prompt"], "responses": ["one"]})
    assert r.status_code == 400
    r = httpx.post(server.url + "/rank/api/submit", headers=h, json={"prompt": out["prompt"], "responses": ["a", "a"]})
    assert r.status_code == 400 and "duplicate" in r.json()["error"]["message"]
    # what the page wrote is what the reward model's reader accepts
    from chatstack.data.preferences import load_preferences

    groups = load_preferences(str(server.rankings))
    assert groups and groups[-1].responses == ranked and len(groups[-1].pairs) == 3


def test_loading_is_503_and_queue_full_is_429(ckpt):
    app = create_app(ckpt)  # lifespan not run: the weights never load
    c = TestClient(app)
    r = c.post("/v1/chat/completions", json={"model": "nano-chat", "messages": MSGS})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
    assert c.get("/health").status_code == 503
    ck = load_checkpoint(ckpt)
    app = create_app(Engine(ck.model, ck.tokenizer), model_name="nano-chat", max_queue=0)
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json={"model": "nano-chat", "messages": MSGS, "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"


def test_any_model_flag(ckpt):
    ck = load_checkpoint(ckpt)
    with TestClient(create_app(Engine(ck.model, ck.tokenizer), model_name="nano-chat", any_model=True)) as c:
        r = c.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MSGS, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "nano-chat"


@pytest.mark.slow  # a fresh interpreter importing torch: ~5-12 s on a busy machine
def test_cli_serve_contract(ckpt, tmp_path):
    """`chatstack serve CKPT --port P --api-key KEY`: the exact command users run."""
    import subprocess
    import sys

    from chatstack.serve.testing import free_port

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chatstack.cli",
            "serve",
            ckpt,
            "--port",
            str(port),
            "--api-key",
            "sk-cli",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        c = openai.OpenAI(base_url=url + "/v1", api_key="sk-cli", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["nano-chat"]
        r = c.chat.completions.create(model="nano-chat", messages=MSGS, max_tokens=3)
        assert r.choices[0].message.role == "assistant"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(10)


def test_cli_serve_bad_checkpoint(tmp_path):
    from chatstack.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2


def test_bf16_server_answers_as_the_bf16_engine(ckpt):
    """`chatstack serve --quantize bf16`: the server's greedy reply is the bf16 engine's."""
    app = create_app(ckpt, quantize="bf16")
    with LiveServer(app) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=30)
        got = c.chat.completions.create(model="nano-chat", messages=MSGS, max_tokens=12, temperature=0)
        assert httpx.get(srv.url + "/health").json()["weights"] == "bf16"
    ck = load_checkpoint(ckpt)
    ck.model.eval()
    want = _ref_text(Engine(ck.model, ck.tokenizer, quantize="bf16"), MSGS, max_new_tokens=12, temperature=0.0)
    assert got.choices[0].message.content == want.text
