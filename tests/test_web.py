"""The web pages in headless Chromium: chat on `/` streams a reply; `/rank` writes a ranking to the file.

Needs Debian's `chromium` and Playwright's Python package (no browser download: the system Chromium is
driven through executable_path). Skipped cleanly when either is missing.

    apt-get install -y chromium && pip install playwright
    python -m pytest tests/test_web.py -q
"""

import dataclasses
import json
import os
import shutil

import pytest

from chatstack.checkpoint import load_checkpoint
from chatstack.infer.engine import Engine, SamplingParams
from chatstack.serve.app import create_app
from chatstack.serve.testing import LiveServer, make_tiny_checkpoint

CHROMIUM = os.environ.get("CHATSTACK_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
if not os.path.exists(CHROMIUM):
    pytest.skip("no system chromium (apt-get install -y chromium)", allow_module_level=True)

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
    "--disable-dev-shm-usage",
]
KEY = "sk-web"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    ckpt = make_tiny_checkpoint(root / "nano-chat", block_size=2048)  # long context: a reply that runs until stopped
    ck = load_checkpoint(ckpt)
    engine = Engine(ck.model.eval(), ck.tokenizer)
    add_request = engine.add_request

    def never_stop_on_tokens(ids, params=None, **kw):
        # random weights emit <|im_end|> about every 150 tokens; the stop-button test needs a reply that
        # only ends when stopped (or at max_tokens)
        return add_request(ids, dataclasses.replace(params or SamplingParams(), stop_token_ids=[]), **kw)

    engine.add_request = never_stop_on_tokens
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "Tell me about cats"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "What is Paris?"}]})
        + "\n"
    )
    app = create_app(
        engine,
        model_name="nano-chat",
        api_keys=(KEY,),
        rankings=str(root / "rankings.jsonl"),
        rank_prompts=str(prompts),
    )
    with LiveServer(app) as srv:
        srv.rankings = root / "rankings.jsonl"
        yield srv


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        except Exception as e:  # a chromium that cannot start here is an environment problem, not a bug
            pytest.skip(f"chromium does not start: {e}")
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context()
    # the API key field is remembered in localStorage: set it before the page's scripts run
    ctx.add_init_script(f"localStorage.setItem('chatstack.apiKey', '{KEY}')")
    pg = ctx.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors: {errors}"


def test_chat_page_streams_a_reply(page, server):
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('nano-chat')")
    page.fill("#system", "You are terse.")
    page.fill("#max-tokens", "12")
    page.fill("#input", "Hello there")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant[data-finish]", timeout=30_000)
    assert page.inner_text(".msg.user .content") == "Hello there"
    finish = page.get_attribute(".msg.assistant", "data-finish")
    assert finish in ("stop", "length"), page.inner_text(".msg.assistant")
    # a second turn: the conversation grows, and the first reply went into its history
    page.fill("#input", "And then?")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant[data-finish]').length == 2", timeout=30_000)
    assert page.locator(".msg.user").count() == 2


def test_chat_stop_button(page, server):
    import time

    metrics = server.app.state.chatstack.metrics
    cancelled = metrics.cancelled.get()
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('nano-chat')")
    page.fill("#max-tokens", "2000")
    page.fill("#input", "Tell me a story")
    page.click("#send")
    page.wait_for_function("document.querySelector('.msg.assistant .content').textContent.length > 0", timeout=30_000)
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-finish]", timeout=30_000)
    assert page.get_attribute(".msg.assistant", "data-finish") == "stopped"
    assert page.is_enabled("#send")
    deadline = time.time() + 10  # the page's abort closed the stream: the server freed the row
    while time.time() < deadline and metrics.cancelled.get() == cancelled:
        time.sleep(0.05)
    assert metrics.cancelled.get() == cancelled + 1


def test_rank_page_writes_rankings(page, server):
    page.goto(server.url + "/rank")
    page.wait_for_function("document.getElementById('file-info').textContent.includes('ranking')")
    page.click("#next-prompt")
    page.wait_for_function("document.getElementById('prompt').value.includes('cats')")
    page.fill("#k", "3")
    page.fill("#max-tokens", "8")
    page.click("#sample")
    page.wait_for_selector("#answers li >> nth=2", timeout=30_000)
    shown = [t.get_attribute("data-text") for t in page.locator("#answers li .text").all()]
    # the person's order: move the last answer to the top, then the (new) second one down
    page.locator("#answers li >> nth=2").locator(".up").click()
    page.locator("#answers li >> nth=1").locator(".up").click()
    page.locator("#answers li >> nth=1").locator(".down").click()
    want = [shown[2], shown[1], shown[0]]
    assert [t.get_attribute("data-text") for t in page.locator("#answers li .text").all()] == want
    page.click("#submit")
    try:
        page.wait_for_function("document.getElementById('status').textContent.startsWith('saved')", timeout=15_000)
    except sync_api.TimeoutError:
        raise AssertionError(f"not saved; the page says: {page.inner_text('#status')!r}") from None
    lines = server.rankings.read_text().splitlines()
    rec = json.loads(lines[-1])
    assert rec == {"prompt": [{"role": "user", "content": "Tell me about cats"}], "responses": want}
    # after saving, the next prompt from the file is loaded
    page.wait_for_function("document.getElementById('prompt').value.includes('Paris')")
