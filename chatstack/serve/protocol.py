"""The OpenAI API's shapes as pydantic models: requests (validated) and responses (what we emit).

Field names, defaults and ranges follow OpenAI's chat/completions and legacy completions
endpoints (and vLLM / llama.cpp where OpenAI is silent). A request that fails validation is
answered 400 in OpenAI's error envelope with `param` naming the offending field
(see `error_body` and chatstack/serve/app.py).

Accepted but ignored (as llama.cpp does): presence_penalty, frequency_penalty, logit_bias, user,
response_format {"type": "text"}. Extensions (as vLLM): top_k.

Strict types, as OpenAI: `"stream": "yes"` or `"max_tokens": "5"` is a 400, not coerced. Tool calling is not
implemented: a request carrying `tools` or `functions`, or a `tool_choice` / `function_call` other than "none",
is a 400 naming the field (answering without the tools would mislead the client). Text that is not valid Unicode
(a lone UTF-16 surrogate such as "\\ud800", which JSON can spell) is a 400 naming where it is, wherever it
appears in a request body.

Images (a vision model from `chatstack sft-vision`): a user message's content may hold
{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}} parts, as OpenAI's API takes them.
Only data: URLs are read (the server fetches nothing remote); `image_from_data_url` decodes one with Pillow
and answers a bad one with a 400 naming the part.

    GET /openapi.json on a running server  # the JSON schema of every request
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from chatstack.vision.data import decode_image

# torch.Generator.manual_seed accepts this range; outside it the engine would raise
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_N = 16  # choices per request (each one is a row in the batch)
MAX_STOP = 16  # stop strings per request
MAX_TOP_LOGPROBS = 20


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


# ----------------------------------------------------------------------------- errors


def error_body(
    message: str, type_: str = "invalid_request_error", param: Optional[str] = None, code: Optional[str] = None
) -> dict:
    """OpenAI's error envelope. Messages may quote client input: what is not valid Unicode (a lone surrogate) is
    escaped, so the envelope can always be encoded."""
    return {"error": {"message": _printable(message), "type": type_, "param": _printable(param), "code": code}}


def _printable(s: Optional[str]) -> Optional[str]:
    return s if s is None else s.encode("utf-8", "backslashreplace").decode("utf-8")


def find_surrogate(obj: Any, path: str = "") -> Optional[tuple[str, str]]:
    """(where, the character) of the first lone UTF-16 surrogate in a decoded JSON value (keys included), or None.
    JSON's \\ud800 escapes decode to such characters; they are not Unicode text and cannot be encoded to UTF-8,
    so every use of the text would fail later (tokenizer, rankings file, response)."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")  # (at C speed; only surrogates fail to encode)
        except UnicodeEncodeError as e:
            return path, obj[e.start]
        return None
    if isinstance(obj, dict):
        for k, v in obj.items():
            sub = _printable(f"{path}.{k}" if path else str(k))
            hit = find_surrogate(k, sub) or find_surrogate(v, sub)
            if hit:
                return hit
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            hit = find_surrogate(v, f"{path}.{i}" if path else str(i))
            if hit:
                return hit
    return None


class APIError(Exception):
    """Raised anywhere in request handling; app.py turns it into the OpenAI envelope with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


# ----------------------------------------------------------------------------- requests


class _Lenient(BaseModel):
    # unknown fields are ignored rather than rejected, as vLLM and llama.cpp do: newer clients send new knobs;
    # known ones are strict, as OpenAI's: "stream": "yes" or "n": "2" is a 400, not coerced
    model_config = ConfigDict(extra="ignore", strict=True)


class _Request(_Lenient):
    """A request body: text that is not valid Unicode anywhere in it is a 400 naming where."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        hit = find_surrogate(data)
        if hit:
            where, ch = hit
            raise PydanticCustomError(
                "lone_surrogate",
                "{where}: text holds a lone UTF-16 surrogate ({char}), which is not valid Unicode; send UTF-8 text "
                "(in JSON, a \\u surrogate escape must be one half of a pair)",
                {"where": where or "body", "char": f"\\u{ord(ch):04x}", "param": where or None},
            )
        return data


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageURL(_Lenient):
    url: str
    detail: Optional[Literal["auto", "low", "high"]] = None  # accepted; every image becomes the same n tokens


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(_Lenient):
    # "developer" is OpenAI's newer name for system; tool/function roles are not supported (400)
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[Union[TextPart, ImagePart]], None] = None
    name: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(isinstance(p, ImagePart) for p in self.content)


class StreamOptions(_Lenient):
    include_usage: bool = False


class ResponseFormat(_Lenient):
    type: Literal["text"] = "text"  # json modes are not supported: say so with a 400 rather than ignore


def _stop_list(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    return v


class _SamplingFields(_Request):
    model: str = Field(min_length=1, max_length=512)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=0, le=1_000_000)
    n: Optional[int] = Field(None, ge=1, le=MAX_N)
    max_tokens: Optional[int] = Field(None, ge=1, le=10_000_000)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # tool calling is not implemented: these are checked (400), not ignored
    tools: Optional[Any] = None
    tool_choice: Optional[Any] = None
    functions: Optional[Any] = None
    function_call: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, v, info):
        if v is not None and v != []:  # an empty list asks for nothing
            raise ValueError("tool/function calling is not supported by this server; omit the field")
        return v

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, v, info):
        if v is not None and v != "none":
            raise ValueError('tool/function calling is not supported by this server; omit the field or send "none"')
        return v

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        stops = _stop_list(v)
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    @property
    def stops(self) -> list[str]:
        return _stop_list(self.stop)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=10_000_000)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: Optional[ResponseFormat] = None

    @model_validator(mode="after")
    def _check(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    @property
    def max_new_tokens(self) -> Optional[int]:
        # max_completion_tokens is the newer name; it wins when both are given
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def image_urls(self) -> list[tuple[str, str]]:
        """(param path, url) of every image_url part, in order."""
        return [
            (f"messages.{i}.content.{j}.image_url.url", p.image_url.url)
            for i, m in enumerate(self.messages)
            if isinstance(m.content, list)
            for j, p in enumerate(m.content)
            if isinstance(p, ImagePart)
        ]

    def multimodal_messages(self) -> list[dict]:
        """Messages for Tokenizer.render_multimodal: image parts become {"type": "image"} where they stand."""
        out = []
        for m in self.messages:
            role = "system" if m.role == "developer" else m.role
            if m.has_images():
                content = [
                    {"type": "image"} if isinstance(p, ImagePart) else {"type": "text", "text": p.text}
                    for p in m.content
                ]
            else:
                content = m.text()
            out.append({"role": role, "content": content})
        return out


def image_from_data_url(url: str, param: str):
    """A data: URL's image as the encoder's (3, 32, 32) input; APIError 400 for a remote URL, a malformed
    data URL, bad base64, or bytes Pillow cannot read (or too many pixels)."""
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if ":" in url else "no scheme"
        raise APIError(
            400,
            f"{param}: remote image URLs are not fetched by this server (remote fetching is off; "
            f"got {scheme!r}); send the image inline as a data URL: data:image/png;base64,...",
            param=param,
            code="remote_image_url",
        )
    head, sep, data = url[5:].partition(",")
    if not sep or not head.endswith(";base64"):
        raise APIError(
            400, f"{param}: expected a base64 data URL (data:image/png;base64,...)", param=param, code="invalid_image"
        )
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(
            400, f"{param}: the data URL's payload is not valid base64", param=param, code="invalid_image"
        ) from None
    try:
        return decode_image(raw, param)
    except ValueError as e:
        raise APIError(400, str(e), param=param, code="invalid_image") from None


class CompletionRequest(_SamplingFields):
    # str | [str, ...] | [token ids] | [[token ids], ...], as OpenAI's legacy endpoint
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=1, le=10_000_000)  # the legacy endpoint's default is 16
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: Optional[bool] = False
    best_of: Optional[int] = Field(None, ge=1, le=1)  # only best_of == n == 1 semantics; larger is refused
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and len(v) == 0:
            raise ValueError("prompt must not be an empty list")
        if isinstance(v, list) and v and isinstance(v[0], list) and any(len(p) == 0 for p in v):
            raise ValueError("token-id prompts must not be empty")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix (fill-in-the-middle) is not supported")
        return v

    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)


# ----------------------------------------------------------------------------- rank page


class RankSampleRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    k: int = Field(4, ge=2, le=8)
    temperature: float = Field(1.0, gt=0.0, le=2.0)  # > 0: K greedy answers would all be the same
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(128, ge=1, le=4096)

    @model_validator(mode="after")
    def _ends_with_user(self):
        if self.messages[-1].role == "assistant":
            raise ValueError("the last message must not be from the assistant: it is what is being sampled")
        return self


class RankSubmitRequest(_Request):
    prompt: list[ChatMessage] = Field(min_length=1)
    responses: list[str] = Field(min_length=2)  # best first


# ----------------------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int = 0) -> Usage:
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: Optional[list[TokenLogprob]] = None
    refusal: Optional[list[TokenLogprob]] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    refusal: Optional[str] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: Optional[str] = None
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: Optional[str] = None
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[Optional[float]] = []
    top_logprobs: Optional[list[Optional[dict[str, float]]]] = None
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: Optional[str] = None
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "chatstack"
    max_model_len: Optional[int] = None  # vLLM's extension: the context length


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
