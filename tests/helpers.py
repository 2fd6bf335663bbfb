"""The tests' one place for tiny models, tokenizers, datasets and checkpoints.

from helpers import nano_model, small_tokenizer, ByteTokenizer, reference_greedy, make_dataset
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn as nn

from chatstack.infer.kv_cache import KVCache
from chatstack.model import GPT, GPTConfig
from chatstack.presets import get_preset

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be, that is the question.",
    "What is 12 plus 30? The answer is 42.",
    "héllo wörld, ça va? 世界 🙂",
    "User asks, assistant answers. Then the user asks again.",
] * 8


@functools.lru_cache(maxsize=1)
def small_tokenizer():
    """A 320-token byte-level BPE (the real chatstack Tokenizer) trained on a few sentences."""
    from chatstack.tokenizer import Tokenizer

    return Tokenizer.train(SENTENCES, vocab_size=320, show_progress=False)


def nano_model(family: str = "nano", vocab_size: int = 320, seed: int = 0, **over) -> GPT:
    torch.manual_seed(seed)
    return GPT(get_preset(family, vocab_size=vocab_size, **over)).eval()


class ByteTokenizer:
    """Ids 0..255 are raw bytes; 256/257/258 are <|endoftext|>/<|im_start|>/<|im_end|>. Independent of BPE,
    so tests can control exactly which bytes (e.g. halves of multi-byte characters) each token carries."""

    vocab_size = 259
    eot_id, im_start_id, im_end_id = 256, 257, 258
    _special = {256: b"<|endoftext|>", 257: b"<|im_start|>", 258: b"<|im_end|>"}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def token_bytes(self, i: int) -> bytes:
        return self._special.get(i, bytes([i]) if i < 256 else b"")

    def decode(self, ids) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def render_prompt(self, messages) -> list[int]:
        ids = []
        for m in messages:
            ids += [257] + self.encode(m["role"] + "\n" + m["content"]) + [258] + self.encode("\n")
        return ids + [257] + self.encode("assistant\n")


class ScriptedLM(nn.Module):
    """A fake LM whose next token after absolute position p is script[p % len(script)] (one-hot logits).

    It speaks the model interface the engine uses (config, hidden_states, lm_head, forward with
    cache/positions/attn_mask/last_only), so tests can make the engine emit chosen byte sequences."""

    def __init__(self, script: list[int], vocab_size: int = 259, block_size: int = 256):
        super().__init__()
        self.config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=1, n_embd=4)
        self.script = torch.tensor(script)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.lm_head = nn.Identity()

    def hidden_states(self, idx, cache=None, positions=None, attn_mask=None):
        B, T = idx.shape
        if positions is None:
            positions = torch.arange(T)[None]
        pos = positions.expand(B, T)
        nxt = self.script[pos % len(self.script)]  # (B, T)
        return torch.nn.functional.one_hot(nxt, self.config.vocab_size).float() * 10.0

    def forward(self, idx, cache=None, positions=None, attn_mask=None, last_only=False):
        h = self.hidden_states(idx, cache, positions, attn_mask)
        return h[:, -1:] if last_only else h


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by full forward passes (no cache): the independent reference."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def reference_logprobs(model, prompt: list[int], out: list[int]) -> list[float]:
    """log p(out[t] | prompt + out[:t]) from one full forward pass."""
    ids = torch.tensor([list(prompt) + list(out)])
    with torch.no_grad():
        logp = model(ids)[0].float().log_softmax(-1)
    P = len(prompt)
    return [float(logp[P - 1 + t, tok]) for t, tok in enumerate(out)]


def make_checkpoint(path, family: str = "nano", seed: int = 0, **over):
    """A random nano checkpoint with the small tokenizer, saved in chatstack's format."""
    from chatstack.checkpoint import save_checkpoint

    tok = small_tokenizer()
    model = nano_model(family, vocab_size=tok.vocab_size, seed=seed, **over)
    save_checkpoint(path, model, {"model": model.config.to_dict(), "stage": "test", "tokenizer": tok.info()}, tok)
    return model, tok


# ---- a tiny text corpus and prepared dataset (data, loop and pretraining tests)
LINES = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
    "And by opposing end them. To die: to sleep;",
    "No more; and by a sleep to say we end",
    "The heart-ache and the thousand natural shocks",
    "That flesh is heir to, 'tis a consummation",
    "Devoutly to be wish'd. To die, to sleep;",
    "To sleep: perchance to dream: ay, there's the rub;",
]


def doc(i: int, n_lines: int = 40) -> str:
    """A deterministic pseudo-document: the lines above in a document-specific order."""
    return "\n".join(LINES[(i * 7 + j * (i + 3)) % len(LINES)] for j in range(n_lines)) + "\n"


@functools.cache
def tiny_tokenizer(vocab_size: int = 300):
    from chatstack.tokenizer import Tokenizer

    return Tokenizer.train([doc(i) for i in range(6)], vocab_size=vocab_size, show_progress=False)


def make_dataset(tmp: Path, name: str = "data", n_docs: int = 12, vocab_size: int = 300) -> Path:
    """Text files in a folder -> a prepared dataset (every 4th document held out)."""
    from chatstack.stages.prepare import iter_documents, prepare, split_documents

    src = tmp / f"{name}_src"
    src.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (src / f"doc{i:02d}.txt").write_text(doc(i))
    tok = tiny_tokenizer(vocab_size)
    train, val = split_documents(list(iter_documents([src])), 0.25)
    return prepare(tmp / name, tok, train, val, [{"name": str(src)}])


def cached_forward(model, batch: int, max_len: int):
    """A function feeding `model` successive chunks of `batch` rows through the engine's KV cache, as one long
    sequence: chunks of several tokens prefill, single tokens decode. Returns (forward, cache)."""
    p = next(model.parameters())
    cache = KVCache(model.config, p.device, p.dtype, max_slots=batch)
    cache.reserve(batch, max_len)
    pos = 0

    def forward(x, **kw):
        nonlocal pos
        T = x.size(1)
        if T == 1 and pos > 0:
            cache.decode(batch, pos, pos + 1)
        else:
            cache.prefill(0, batch, start=pos)
        out = model(x, cache=cache, **kw)
        pos += T
        return out

    return forward, cache
