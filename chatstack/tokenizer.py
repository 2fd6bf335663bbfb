"""Byte-level BPE tokenizer (Hugging Face `tokenizers` underneath) and the ChatML chat renderer.

    from chatstack.tokenizer import Tokenizer
    tok = Tokenizer.gpt2(); tok.encode("Hello world")   # [15496, 995]

The `chatstack tokenizer` command (train / encode / decode) is chatstack/stages/tokenize.py.
Trained vocabularies split digits one per token (arithmetic sees every digit) and reserve three special
tokens: <|endoftext|> between documents, <|im_start|> / <|im_end|> around ChatML turns:

    <|im_start|>system\n...<|im_end|>\n<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n...<|im_end|>\n

`render_chat` returns (ids, loss_mask) with 1 only on assistant content and its <|im_end|>: SFT trains on
what the assistant says, never on what the user says. `render_multimodal` does the same for messages whose
content holds image parts: each image becomes n placeholder ids where it stands, and their positions come
back, for the image's embeddings to take their place (chatstack.vision). GPT-2's own 50,257 ranks load offline from the
`openai-whisper` package's asset (`Tokenizer.gpt2()`), converted once to a `tokenizers` file and cached.
"""

from __future__ import annotations

import base64
import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOT, IM_START, IM_END]
# texts longer than this are encoded through `encode_batch`, which releases the GIL (`encode` holds it for the whole
# call: ~0.15 s of CPU for 200 KB, during which no other thread of the process, a server's event loop, can run)
GIL_FREE_CHARS = 4096
ROLES = ("system", "user", "assistant")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    # GPT-2's printable stand-ins for the 256 byte values (what ByteLevel BPE tokens are made of)
    return {v: k for k, v in enumerate_bytes_to_unicode().items()}


def enumerate_bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class Tokenizer:
    """A byte-level BPE vocabulary plus the ChatML renderer. Build with `train`, `load` or `gpt2`."""

    def __init__(self, hf: HFTokenizer, name: str = "bpe") -> None:
        self.hf = hf
        self.name = name
        # special-token strings typed by a user are plain text, never control tokens
        self.hf.encode_special_tokens = True
        self._specials = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in self._specials.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks special token(s) {missing}")
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self._token_bytes = self._build_token_bytes()

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, show_progress: bool = True) -> Tokenizer:
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(
                f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + specials), got {vocab_size}"
            )
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            min_frequency=2,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf, name=f"bpe-{vocab_size}")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        hf = HFTokenizer.from_file(str(path))
        return cls(hf, name=path.parent.name or "bpe")

    @classmethod
    def gpt2(cls) -> Tokenizer:
        """GPT-2's 50,257-token vocabulary (offline), with <|im_start|>/<|im_end|> appended as 50257/50258."""
        return cls(HFTokenizer.from_str(_gpt2_tokenizer_json()), name="gpt2")

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.suffix != ".json":
            path.mkdir(parents=True, exist_ok=True)
            path = path / "tokenizer.json"
        self.hf.save(str(path))

    # ---- ids <-> text -------------------------------------------------------------------------------
    @property
    def eot_id(self) -> int:
        return self._specials[EOT]

    @property
    def im_start_id(self) -> int:
        return self._specials[IM_START]

    @property
    def im_end_id(self) -> int:
        return self._specials[IM_END]

    @property
    def special_ids(self) -> set[int]:
        return set(self._specials.values())

    def encode(self, text: str) -> list[int]:
        if len(text) > GIL_FREE_CHARS:  # the same ids; other threads keep running meanwhile
            return self.hf.encode_batch([text], add_special_tokens=False)[0].ids
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a special token's are its UTF-8 text)."""
        return self._token_bytes[token_id]

    def _build_token_bytes(self) -> list[bytes]:
        dec = _byte_decoder()
        table = [b""] * self.vocab_size
        added = {t.content for t in self.hf.get_added_tokens_decoder().values()}
        for tok, i in self.hf.get_vocab(with_added_tokens=True).items():
            if tok in added or any(ch not in dec for ch in tok):
                table[i] = tok.encode("utf-8")
            else:
                table[i] = bytes(dec[ch] for ch in tok)
        return table

    # ---- ChatML ------------------------------------------------------------------------------------
    def _check_messages(self, messages: Sequence[dict]) -> None:
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {role, content}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i}: expected an object with 'role' and 'content'")
            if m["role"] not in ROLES:
                raise ValueError(f"message {i}: unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
            if not isinstance(m["content"], str):
                raise ValueError(f"message {i}: content must be a string")

    def _turn(self, role: str, content: str, train: bool) -> tuple[list[int], list[int]]:
        head = [self.im_start_id] + self.encode(role + "\n")
        body = self.encode(content) + [self.im_end_id]
        tail = self.encode("\n")
        m = 1 if (train and role == "assistant") else 0
        return head + body + tail, [0] * len(head) + [m] * len(body) + [0] * len(tail)

    def render_chat(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        """ChatML ids for a whole conversation and a loss mask (1 = assistant content and its <|im_end|>)."""
        self._check_messages(messages)
        ids, mask = [], []
        for m in messages:
            t, k = self._turn(m["role"], m["content"], train=True)
            ids += t
            mask += k
        return ids, mask

    def render_prompt(self, messages: Sequence[dict]) -> list[int]:
        """ChatML ids of the conversation so far, ending in `<|im_start|>assistant\\n` for generation."""
        self._check_messages(messages)
        ids = []
        for m in messages:
            ids += self._turn(m["role"], m["content"], train=False)[0]
        return ids + [self.im_start_id] + self.encode("assistant\n")

    # ---- images in ChatML -----------------------------------------------------------------------------------
    @property
    def image_placeholder_id(self) -> int:
        """The id at image positions: <|endoftext|>, which typed text can never produce (special tokens typed by
        a user are plain text); the model never reads it there, the image's embeddings replace it."""
        return self.eot_id

    def render_multimodal(
        self, messages: Sequence[dict], image_tokens: int, generation_prompt: bool = False
    ) -> tuple[list[int], list[int], list[int]]:
        """ChatML with images: (ids, loss_mask, image_positions).

        A message's content is a string or a list of parts {"type": "text", "text": ...} and {"type": "image"}
        (also "image_url", as OpenAI's API names it); each image part becomes `image_tokens` placeholder ids where
        it stands, and their positions (all images, in order) come back in image_positions. The loss mask is
        render_chat's (assistant content and its <|im_end|>), or all zeros with generation_prompt, where the
        ids end in `<|im_start|>assistant\\n` as render_prompt's do."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {role, content}")
        ids, mask, pos = [], [], []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i}: expected an object with 'role' and 'content'")
            if m["role"] not in ROLES:
                raise ValueError(f"message {i}: unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
            content = m["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list):
                raise ValueError(f"message {i}: content must be a string or a list of parts")
            train = m["role"] == "assistant" and not generation_prompt
            head = [self.im_start_id] + self.encode(m["role"] + "\n")
            ids += head
            mask += [0] * len(head)
            for j, p in enumerate(parts):
                kind = p.get("type") if isinstance(p, dict) else None
                if kind == "text" and isinstance(p.get("text"), str):
                    t = self.encode(p["text"])
                    ids += t
                    mask += [int(train)] * len(t)
                elif kind in ("image", "image_url"):
                    if m["role"] == "assistant":
                        raise ValueError(f"message {i}: an assistant message cannot hold an image")
                    if image_tokens <= 0:
                        raise ValueError(f"message {i}: this model takes no images (text only)")
                    pos += range(len(ids), len(ids) + image_tokens)
                    ids += [self.image_placeholder_id] * image_tokens
                    mask += [0] * image_tokens
                else:
                    raise ValueError(
                        f"message {i}: part {j} must be {{'type': 'text', 'text': str}} or {{'type': 'image'}}"
                    )
            ids += [self.im_end_id]
            mask += [int(train)]
            tail = self.encode("\n")
            ids += tail
            mask += [0] * len(tail)
        if generation_prompt:
            ids += [self.im_start_id] + self.encode("assistant\n")
            mask += [0] * (len(ids) - len(mask))
        return ids, mask, pos

    def info(self) -> dict:
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "eot_id": self.eot_id,
            "im_start_id": self.im_start_id,
            "im_end_id": self.im_end_id,
            "chat_format": "chatml",
        }


# ---- GPT-2's vocabulary, offline ----------------------------------------------------------------------
def _gpt2_ranks_path() -> Path:
    spec = importlib.util.find_spec("whisper")  # only locates the package; whisper itself is never imported
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "GPT-2's vocabulary needs `pip install --no-deps openai-whisper==20250625` "
            "(it ships whisper/assets/gpt2.tiktoken)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "assets" / "gpt2.tiktoken"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing from the openai-whisper package")
    return path


def _gpt2_tokenizer_json() -> str:
    cache = Path(os.environ.get("CHATSTACK_CACHE", Path.home() / ".cache" / "chatstack")) / "gpt2-tokenizer.json"
    if cache.exists():
        return cache.read_text()

    ranks: dict[bytes, int] = {}
    with open(_gpt2_ranks_path(), "rb") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    b2u = enumerate_bytes_to_unicode()
    to_str = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {to_str(t): r for t, r in ranks.items()}
    # recover the merge list: each multi-byte token is the merge of the two parts BPE reaches just before it
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) == 1:
            continue
        parts = [bytes([b]) for b in tok]
        while len(parts) > 2:
            best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], 1 << 30))
            if ranks.get(parts[best] + parts[best + 1], 1 << 30) >= rank:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        assert len(parts) == 2, tok
        merges.append((to_str(parts[0]), to_str(parts[1])))
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(SPECIAL_TOKENS)  # <|endoftext|> is already 50256; the ChatML pair become 50257, 50258
    text = hf.to_str()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(cache)
    return text
