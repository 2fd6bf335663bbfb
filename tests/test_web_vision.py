"""The chat page's image attach in headless Chromium: file picker and paste, shown in the conversation and
sent as image_url parts; a text-only model's refusal reaches the page. Skipped without Chromium/Playwright
(see tests/test_web.py).

    python -m pytest tests/test_web_vision.py -q
"""

import base64
import os
import shutil

import pytest

from chatstack.serve.app import create_app
from chatstack.serve.testing import LiveServer, make_tiny_checkpoint, make_tiny_vision_checkpoint
from chatstack.vision import data as D

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


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "digit.png"
    D.to_pil(D.digits("test")[0][0]).save(p)
    return p


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("web-vision")
    vis = make_tiny_vision_checkpoint(root / "vis-chat", image_tokens=4)
    txt = make_tiny_checkpoint(root / "text-chat")
    with LiveServer(create_app(vis)) as a, LiveServer(create_app(txt)) as b:
        yield a, b


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
def page(browser):
    ctx = browser.new_context()
    pg = ctx.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    sent = []
    pg.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    pg.sent = sent
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors: {errors}"


def _open(page, srv, name):
    page.goto(srv.url + "/")
    page.wait_for_function(f"document.getElementById('model').textContent.includes('{name}')", timeout=60_000)


def test_attach_with_the_file_picker(page, servers, png):
    srv, _ = servers
    _open(page, srv, "vis-chat")
    page.fill("#max-tokens", "4")
    page.set_input_files("#image-file", str(png))
    page.wait_for_selector(".attachments img")
    page.fill("#input", "What digit is this?")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant[data-finish]", timeout=60_000)
    assert page.get_attribute(".msg.assistant", "data-finish") in ("stop", "length"), page.inner_text(".msg.assistant")
    src = page.get_attribute(".msg.user img.thumb", "src")
    assert src.startswith("data:image/png;base64,") and base64.b64decode(src.split(",", 1)[1]) == png.read_bytes()
    content = page.sent[-1]["messages"][-1]["content"]
    assert content == [
        {"type": "image_url", "image_url": {"url": src}},
        {"type": "text", "text": "What digit is this?"},
    ]
    assert page.locator(".attachments img").count() == 0  # sent: the composer is empty again


def test_attach_by_pasting(page, servers, png):
    srv, _ = servers
    _open(page, srv, "vis-chat")
    b64 = base64.b64encode(png.read_bytes()).decode()
    page.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "pasted.png", { type: "image/png" }));
            document.getElementById("input").dispatchEvent(
                new ClipboardEvent("paste", { clipboardData: dt, bubbles: true, cancelable: true }));
        }""",
        b64,
    )
    page.wait_for_selector(".attachments img")
    page.fill("#max-tokens", "4")
    page.fill("#input", "And this?")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant[data-finish]", timeout=60_000)
    assert page.locator(".msg.user img.thumb").count() == 1
    assert page.sent[-1]["messages"][-1]["content"][0]["image_url"]["url"] == f"data:image/png;base64,{b64}"


def test_text_only_model_refuses_on_the_page(page, servers, png):
    _, txt = servers
    _open(page, txt, "text-chat")
    page.set_input_files("#image-file", str(png))
    page.wait_for_selector(".attachments img")
    page.fill("#input", "What is this?")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant[data-finish]", timeout=60_000)
    assert page.get_attribute(".msg.assistant", "data-finish") == "error"
    assert "text only" in page.inner_text(".msg.assistant")
