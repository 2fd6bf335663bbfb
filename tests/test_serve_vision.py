"""Images through the OpenAI API: image_url parts with data: URLs, on a live server, with the official client.

The answer to an image request is checked against the engine run directly in this process with the same
image embeddings (no HTTP, no scheduler); bad images, remote URLs and text-only models get 400s.

    python -m pytest tests/test_serve_vision.py -q
"""

import base64
import io

import openai
import pytest

from chatstack.checkpoint import load_checkpoint
from chatstack.infer.engine import Engine, SamplingParams
from chatstack.serve.app import create_app
from chatstack.serve.testing import LiveServer, make_tiny_checkpoint, make_tiny_vision_checkpoint
from chatstack.vision import data as D
from chatstack.vision.vlm import load_vision, render_request

KEY = "sk-vision"


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def _ask(url: str, text: str = "What digit is this?") -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}
    ]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-vision")
    return make_tiny_vision_checkpoint(root / "vis", image_tokens=4), make_tiny_checkpoint(root / "txt")


@pytest.fixture(scope="module")
def servers(ckpts):
    vis, txt = ckpts
    with (
        LiveServer(create_app(vis, api_keys=(KEY,), any_model=True)) as a,
        LiveServer(create_app(txt, api_keys=(KEY,), any_model=True)) as b,
    ):
        yield a, b


def _client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_image_url_answer_matches_the_engine(servers, ckpts):
    srv, _ = servers
    image = D.digits("test")[0][3]
    url = _data_url(_png(D.to_pil(image)))
    r = _client(srv).chat.completions.create(model="vis", messages=_ask(url), max_tokens=6, temperature=0)
    # the reference: the engine in this process with the same image (decoded from the same PNG bytes)
    ck, ad = load_checkpoint(ckpts[0]), load_vision(ckpts[0])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit is this?"}]}]
    ids, emb = render_request(ck.tokenizer, ad, msgs, [D.decode_image(_png(D.to_pil(image)))])
    ref = Engine(ck.model.eval(), ck.tokenizer).generate(
        [ids], SamplingParams(max_new_tokens=6, temperature=0), embeds=[emb]
    )[0]
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(ids)
    # streamed, the same text
    chunks = _client(srv).chat.completions.create(
        model="vis", messages=_ask(url), max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text


def _error(srv, messages) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as e:
        _client(srv).chat.completions.create(model="m", messages=messages, max_tokens=2)
    return e.value


def test_text_only_model_says_so(servers):
    _, txt = servers
    e = _error(txt, _ask(_data_url(_png(D.to_pil(D.digits("test")[0][0])))))
    assert "text only" in e.message and e.body["param"] == "messages.0.content.0.image_url.url"


def test_bad_images_get_400s(servers):
    from PIL import Image

    srv, _ = servers
    e = _error(srv, _ask("https://example.com/cat.png"))
    assert "remote image URLs are not fetched" in e.message and e.code == "remote_image_url"
    e = _error(srv, _ask(_data_url(b"this is not an image")))
    assert "not an image" in e.message and e.body["param"] == "messages.0.content.0.image_url.url"
    e = _error(srv, _ask("data:image/png;base64,@@@not-base64@@@"))
    assert "not valid base64" in e.message
    e = _error(srv, _ask("data:image/png,rawbytes"))
    assert "base64 data URL" in e.message
    big = _png(Image.new("L", (5000, 5000)))  # 25M pixels in a few KB of PNG
    e = _error(srv, _ask(_data_url(big)))
    assert "too large" in e.message
    # the server still answers after all of that
    ok = _client(srv).chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")
