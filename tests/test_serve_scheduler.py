"""The continuous-batching scheduler without HTTP, and the server's failure paths.

python -m pytest tests/test_serve_scheduler.py -q
"""

import asyncio
import shutil
import time

import pytest
from fastapi.testclient import TestClient

from chatstack.checkpoint import load_checkpoint
from chatstack.infer.engine import Engine, SamplingParams
from chatstack.serve.app import create_app
from chatstack.serve.scheduler import QueueFull, Scheduler
from chatstack.serve.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("sched") / "nano-chat", block_size=128)


@pytest.fixture
def engine(ckpt):
    ck = load_checkpoint(ckpt)
    ck.model.eval()
    return Engine(ck.model, ck.tokenizer, max_batch_size=4)


async def _collect(queue, n):
    texts, reasons, left = [""] * n, [None] * n, n
    while left:
        i, ev = await asyncio.wait_for(queue.get(), 30)
        if isinstance(ev, Exception):
            raise ev
        texts[i] += ev.text
        if ev.finished:
            reasons[i] = ev.finish_reason
            left -= 1
    return texts, reasons


def test_rows_beyond_the_batch_wait_and_match_the_engine_alone(engine, ckpt):
    """10 rows through a 4-row batch: all finish, each exactly as the engine says it alone."""
    ids = engine.tok.render_prompt([{"role": "user", "content": "Hello there"}])
    params = [SamplingParams(max_new_tokens=12, temperature=1.0, seed=s) for s in range(10)]
    ck = load_checkpoint(ckpt)
    ref = Engine(ck.model.eval(), ck.tokenizer, max_batch_size=1)
    want = [ref.generate([ids], p)[0].text for p in params]

    async def run():
        sched = Scheduler(engine, max_queue=16, max_batch_size=4, stream_interval_s=0.0).start()
        try:
            rows = sched.submit(ids, params)
            out = await _collect(rows[0].queue, 10)
            assert sched.metrics.batch.samples and max(sched.metrics.batch.samples) == 4  # never over the batch
            return out
        finally:
            sched.stop()

    texts, reasons = asyncio.run(run())
    assert texts == want
    assert all(r in ("stop", "length") for r in reasons)


def test_queue_bound_and_cancel_of_waiting_rows(engine):
    async def run():
        sched = Scheduler(engine, max_queue=3)  # not started: rows stay waiting
        ids = [1, 2, 3]
        rows = sched.submit(ids, [SamplingParams(max_new_tokens=2)] * 2)
        with pytest.raises(QueueFull):
            sched.submit(ids, [SamplingParams(max_new_tokens=2)] * 2)  # all-or-nothing: 2 + 2 > 3
        assert sched.queue_depth == 2 and sched.metrics.rejected.get() == 2
        sched.cancel(rows)
        sched.start()
        await asyncio.sleep(0.3)
        assert sched.running == 0 and not engine.has_unfinished()  # cancelled before admission: never ran
        sched.stop()

    asyncio.run(run())


def test_engine_failure_fails_its_rows_and_the_server_keeps_serving(engine):
    real_step = engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated engine fault")
        return real_step()

    engine.step = flaky_step
    msgs = [{"role": "user", "content": "Hi"}]
    with TestClient(create_app(engine, model_name="m")) as c:
        r = c.post("/v1/chat/completions", json={"model": "m", "messages": msgs, "max_tokens": 3})
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "server_error" and "Traceback" not in r.text
        r = c.post("/v1/chat/completions", json={"model": "m", "messages": msgs, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_a_checkpoint_that_fails_to_load_is_503_with_the_reason(ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "tokenizer.json").unlink()
    with TestClient(create_app(str(broken))) as c:
        deadline = time.time() + 30
        while time.time() < deadline and c.get("/health").json().get("status") == "loading":
            time.sleep(0.05)
        h = c.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "error" and "tokenizer" in h.json()["error"]
        r = c.post("/v1/chat/completions", json={"model": "broken", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_load_failed"
