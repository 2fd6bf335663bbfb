"""Helpers for testing and benchmarking the server: a tiny checkpoint and a live server on loopback.

    from chatstack.serve.testing import make_tiny_checkpoint, LiveServer
    ckpt = make_tiny_checkpoint("/tmp/nano-chat")                 # random weights, 300-token BPE
    with LiveServer(create_app(ckpt, api_keys=("sk-test",))) as srv:
        print(srv.url)                                            # http://127.0.0.1:PORT

The server runs uvicorn in a background thread of this process (tests) — the benchmark starts a
separate `chatstack serve` process instead, so the clients don't share the server's GIL.
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
import torch

from chatstack.checkpoint import save_checkpoint
from chatstack.model import GPT
from chatstack.presets import get_preset
from chatstack.tokenizer import Tokenizer
from chatstack.vision.encoder import CLIPConfig
from chatstack.vision.projection import VisionAdapter, VisionConfig
from chatstack.vision.vlm import VisionChatModel

_TEXT = (
    "Hello there, how are you today? I am fine, thank you. The quick brown fox jumps over the lazy dog. "
    "What is the capital of France? Paris is the capital of France. Tell me a story about a cat. "
)


def make_tiny_checkpoint(path, preset: str = "nano", block_size: int = 256, seed: int = 0, **overrides) -> str:
    """A checkpoint with random weights and a small BPE tokenizer trained on a few sentences (~50 ms)."""

    tok = Tokenizer.train([_TEXT] * 20, vocab_size=300, show_progress=False)
    torch.manual_seed(seed)
    cfg = get_preset(preset, vocab_size=tok.vocab_size, block_size=block_size, **overrides)
    model = GPT(cfg)
    save_checkpoint(
        path,
        model,
        {"model": cfg.to_dict(), "stage": "test", "parent": None, "tokenizer": {"vocab_size": tok.vocab_size}},
        tokenizer=tok,
    )
    return str(path)


# a CLIP encoder small enough for tests: three 8/8/16-wide conv stages, a one-layer text encoder
TINY_CLIP = dict(channels=[8, 8, 16], embed_dim=16, text_width=16, text_layers=1, text_heads=2)


def make_tiny_vision_checkpoint(
    path, image_tokens: int = 4, vision: bool = True, block_size: int = 256, seed: int = 0, global_token: bool = False
) -> str:
    """make_tiny_checkpoint's GPT with a random image encoder + projection next to it (vision.safetensors and
    config.json's "vision" field, as chatstack sft-vision writes them); vision=False: the text-only checkpoint."""
    if not vision:
        return make_tiny_checkpoint(path, block_size=block_size, seed=seed)
    tok = Tokenizer.train([_TEXT] * 20, vocab_size=300, show_progress=False)
    torch.manual_seed(seed)
    cfg = get_preset("nano", vocab_size=tok.vocab_size, block_size=block_size)
    vcfg = VisionConfig(
        clip=CLIPConfig(**TINY_CLIP), n_embd=cfg.n_embd, image_tokens=image_tokens, global_token=global_token
    )
    model = VisionChatModel(GPT(cfg), VisionAdapter(vcfg))
    config = {
        "model": cfg.to_dict(),
        "stage": "test",
        "parent": None,
        "tokenizer": {"vocab_size": tok.vocab_size},
        "vision": vcfg.to_dict(),
    }
    save_checkpoint(path, model, config, tokenizer=tok)
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread; waits until /health says ok."""

    def __init__(self, app, port: int | None = None, ready_timeout: float = 60.0):
        import uvicorn  # noqa: PLC0415 (only a running server needs it)

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=2)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="chatstack-test-server")
        self.ready_timeout = ready_timeout

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + self.ready_timeout
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"server on {self.url} not healthy after {self.ready_timeout}s")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
