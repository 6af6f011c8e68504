"""OpenAI-compatible schemas: models, embeddings, completions, chat completions.

Field names, types, defaults and bounds follow the OpenAI API reference (checked field by
field against the ``openai`` package's request types, ``completion_create_params``,
``chat/completion_create_params``, ``embedding_create_params``), so every value and ``null``
OpenAI accepts for a field parses here: ``null`` means the field's default, as OpenAI treats it
(some proxies send ``"encoding_format": null``), ``top_p: 0`` keeps only the most likely token
(the same text as greedy). Each request converts itself into the internal per-request params
(``to_params``), so routes never dig in raw dicts.

Fields the service does not implement are handled in one of two ways:

* **optional hints** (:data:`HINT_FIELDS`: ``user``, ``metadata``, ``store``, ``service_tier``,
  ``prompt_cache_key``, ``prompt_cache_retention``, ``prompt_cache_options``,
  ``safety_identifier``, ``parallel_tool_calls``): accepted, ignored, and named in one log
  line per request (``ignored_hints``);
* **behaviour** (``logprobs``, ``echo``, penalties, ``logit_bias``, ``tools``, ``functions``,
  ``response_format`` other than text, audio, predictions, reasoning effort, web search …):
  accepted at their no-op values (``null`` included); any other value is a 400 that names the
  field and says what this server supports. Values inside OpenAI's bounds that exceed this
  server's (``n`` above 8) get the same kind of 400. Unknown fields are 400s too.

Each request converts itself into the operation request of :mod:`maas.dataplane.types`
(``to_operation``); :mod:`maas.protocol.openai_render` renders the results. Every response also
carries ``demo_weights`` (true when the model's weights are ``random``) and ``model_version``;
OpenAI clients ignore unknown fields.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from maas.dataplane.types import EmbedRequest, GenerateRequest
from maas.errors import InvalidRequest
from maas.protocol import StrictRequest, value_error

HINT_FIELDS = ("metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention",
               "prompt_cache_options", "safety_identifier", "parallel_tool_calls")
#: Choices per prompt this server generates at most (OpenAI allows up to 128).
MAX_N = 8


class _OpenAIRequest(StrictRequest):
    user: str | None = Field(default=None, description="End-user id: the sticky routing key among a model's "
                             "versions when no X-Maas-Routing-Key header is sent (maas.dataplane.traffic).")
    metadata: dict[str, Any] | None = Field(default=None, description="Optional hint; ignored.")
    store: bool | None = Field(default=None, description="Optional hint; ignored.")
    service_tier: str | None = Field(default=None, description="Optional hint; ignored.")
    prompt_cache_key: str | None = Field(default=None, description="Optional hint; ignored.")
    safety_identifier: str | None = Field(default=None, description="Optional hint; ignored.")
    parallel_tool_calls: bool | None = Field(default=None, description="Optional hint; ignored.")

    #: field → (predicate that its value is a no-op we accept, what this server supports, in words).
    NOOP_DEFAULTS: ClassVar[dict[str, tuple[Any, str]]] = {}

    @model_validator(mode="after")
    def _unsupported(self):
        for name, (ok, supported) in self.NOOP_DEFAULTS.items():
            value = getattr(self, name, None)
            if not ok(value):
                # InvalidRequest (not ValueError) passes through pydantic, keeping the field name.
                shown = repr(value) if len(repr(value)) < 80 else repr(value)[:77] + "..."
                raise InvalidRequest(f"{name}={shown} is not supported by this server: {supported}", param=name)
        return self

    def ignored_hints(self) -> list[str]:
        """Names of optional hint fields the caller set (for one log line)."""
        return [f for f in HINT_FIELDS if f in self.model_fields_set and getattr(self, f, None) is not None]


def _homogeneous_list(v, field: str):
    """A list input must be all strings, all token ids, or all token arrays; a token id is an integer, never
    ``true``/``false`` (which pydantic's lax mode would read as 1 and 0)."""
    if not isinstance(v, list) or not v:
        return v
    kinds = {type(x) for x in v}  # one pass; a list of texts pays nothing more
    if len(kinds) > 1:
        raise value_error(f"{field} must be all strings, all token ids, or all token arrays, not a mix")
    if bool in kinds or (list in kinds and any(type(y) is bool for x in v for y in x)):
        raise value_error(f"{field} holds true/false where a token id (an integer) or a text is expected")
    return v


def _texts(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


class EmbeddingRequest(_OpenAIRequest):
    """``POST /v1/embeddings``."""

    model: str = Field(description="Name of a model with the embeddings task.")
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A text, a list of texts, a token array, or a list of token arrays."
    )
    encoding_format: Literal["float", "base64"] | None = Field(
        default="float", description="'base64' = little-endian float32 bytes, base64-encoded; null = 'float'."
    )
    dimensions: int | None = Field(default=None, ge=1, description="Must equal the model's size if given.")

    @field_validator("encoding_format")
    @classmethod
    def _default_format(cls, v):
        return v or "float"

    _homogeneous = field_validator("input", mode="before")(lambda v: _homogeneous_list(v, "input"))

    def texts(self) -> list[str] | None:
        """The texts, or None when the input is token arrays."""
        if isinstance(self.input, list) and self.input and not isinstance(self.input[0], str):
            return None
        return _texts(self.input)  # type: ignore[arg-type]

    def token_arrays(self) -> list[list[int]]:
        """Token-array input as a list of rows."""
        assert isinstance(self.input, list)
        return [self.input] if isinstance(self.input[0], int) else list(self.input)  # type: ignore[list-item]

    def to_operation(self, routing_key: str | None = None, latency_budget_ms: float | None = None) -> EmbedRequest:
        """The embeddings operation's request (``routing_key``: the header's, else ``user``)."""
        texts = self.texts()
        return EmbedRequest(self.model, texts=texts, token_ids=None if texts is not None else self.token_arrays(),
                            dimensions=self.dimensions, routing_key=routing_key or self.user,
                            latency_budget_ms=latency_budget_ms, hints=self.ignored_hints())


class StreamOptions(StrictRequest):
    include_usage: bool | None = Field(default=False, description="Send a last chunk with usage and no choices.")
    include_obfuscation: bool | None = Field(default=None, description="Optional hint; ignored.")


class _SamplingRequest(_OpenAIRequest):
    model: str
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0, description="0 = greedy decoding; null = 1.")
    top_p: float | None = Field(default=1.0, ge=0.0, le=1.0,
                                description="Nucleus mass; 0 keeps only the most likely token (greedy); null = 1.")
    n: int | None = Field(default=1, ge=1, le=128, description=f"Choices per prompt; this server allows {MAX_N}.")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 stop strings; empty ones are ignored.")
    seed: int | None = Field(default=None, description="Makes sampling repeatable.")
    stream: bool | None = Field(default=False, description="Server-sent events, one chunk per burst of tokens.")
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise value_error("at most 4 stop strings")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v is not None and v > MAX_N:
            raise InvalidRequest(f"n={v} is more choices than this server generates per prompt; send n ≤ {MAX_N}",
                                 param="n")
        return v

    @property
    def choices(self) -> int:
        """``n`` with null as 1."""
        return self.n or 1

    def sampling_params(self, max_tokens: int | None) -> dict:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return {"max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed, "stop": [s for s in stop if s], "n": self.choices}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


_ZERO = lambda v: v in (None, 0, 0.0)  # noqa: E731
_EMPTY = lambda v: not v  # noqa: E731
_NULL = lambda v: v is None  # noqa: E731
_PENALTY = (_ZERO, "penalties are not applied; omit it or send 0")
_BIAS = (_EMPTY, "logit biases are not applied; omit it or send {}")


class CompletionRequest(_SamplingRequest):  # noqa: D101
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A prompt, a list of prompts, a token array or a list of token arrays; n choices per prompt, "
        "prompt-major."
    )
    max_tokens: int | None = Field(default=16, ge=0, description="New tokens per choice at most (default 16; 0 "
                                   "generates nothing; null = up to the context window).")
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    best_of: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None

    NOOP_DEFAULTS = {
        "echo": (_EMPTY, "the prompt is never echoed; omit it or send false"),
        "logprobs": (_NULL, "log probabilities are not returned; omit it or send null"),
        "suffix": (_EMPTY, "insertion (suffix) is not supported; omit it or send null"),
        "presence_penalty": _PENALTY, "frequency_penalty": _PENALTY, "logit_bias": _BIAS,
    }

    _homogeneous = field_validator("prompt", mode="before")(lambda v: _homogeneous_list(v, "prompt"))

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of not in (None, 0, self.choices):
            raise InvalidRequest(f"best_of={self.best_of} is not supported by this server: it returns every "
                                 "choice it generates; omit best_of or set it equal to n", param="best_of")
        return self

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts as texts, or as token-id rows when the prompt was given as tokens."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return _texts(p)  # type: ignore[arg-type]

    @property
    def prompt_is_tokens(self) -> bool:
        return isinstance(self.prompt, list) and bool(self.prompt) and not isinstance(self.prompt[0], str)

    def to_params(self) -> dict:
        """Internal sampling params for the generator (see ``SamplingParams``)."""
        return self.sampling_params(self.max_tokens)

    def to_operation(self, routing_key: str | None = None, latency_budget_ms: float | None = None) -> GenerateRequest:
        """The generation operation's request (task ``completion``)."""
        return GenerateRequest(self.model, task="completion", prompts=self.prompts(),
                               prompt_is_tokens=self.prompt_is_tokens, sampling=self.to_params(),
                               routing_key=routing_key or self.user, latency_budget_ms=latency_budget_ms,
                               hints=self.ignored_hints())


class TextPart(StrictRequest):
    type: Literal["text"]
    text: str


class _OtherPart(BaseModel):
    """A content part of a type this server cannot read (image_url, input_audio, file, refusal)."""

    model_config = ConfigDict(extra="allow")
    type: str


class ChatMessage(StrictRequest):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart | _OtherPart] | None = None
    name: str | None = None
    # What an assistant message of an earlier turn may carry, as the API returns it.
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``. Prompt = the tokenizer's chat template over ``messages``
    (or the documented plain template, see ``maas.preprocess.text.render_chat``)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=0, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: int | None = Field(default=None, ge=0, description="Default: the rest of the context.")
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    prompt_cache_retention: str | None = Field(default=None, description="Optional hint; ignored.")
    prompt_cache_options: dict[str, Any] | None = Field(default=None, description="Optional hint; ignored.")

    NOOP_DEFAULTS = {
        "logprobs": (_EMPTY, "log probabilities are not returned; omit it or send false"),
        "top_logprobs": (_ZERO, "log probabilities are not returned; omit it or send null"),
        "tools": (_EMPTY, "tool calling is not supported; omit tools"),
        "tool_choice": (lambda v: v in (None, "none", "auto"), "tool calling is not supported; omit tool_choice"),
        "functions": (_EMPTY, "function calling is not supported; omit functions"),
        "function_call": (lambda v: v in (None, "none", "auto"), "function calling is not supported; omit it"),
        "response_format": (lambda v: not v or v.get("type") == "text",
                            "only text responses; omit response_format or send {\"type\": \"text\"}"),
        "modalities": (lambda v: not v or v == ["text"], "only text output; omit it or send [\"text\"]"),
        "audio": (_NULL, "only text output; omit audio"),
        "prediction": (_NULL, "predicted outputs are not used; omit prediction"),
        "reasoning_effort": (lambda v: v in (None, "none"), "the models here do not reason; omit reasoning_effort"),
        "verbosity": (lambda v: v in (None, "medium"), "verbosity is not adjustable; omit it or send \"medium\""),
        "web_search_options": (_NULL, "web search is not available; omit web_search_options"),
        "moderation": (_NULL, "moderation is not applied; omit moderation"),
        "presence_penalty": _PENALTY, "frequency_penalty": _PENALTY, "logit_bias": _BIAS,
    }

    @model_validator(mode="after")
    def _readable_messages(self):
        for i, m in enumerate(self.messages):
            if m.role in ("tool", "function"):
                raise InvalidRequest(f"messages[{i}].role={m.role!r}: tool results are not supported by this server "
                                     "(it has no tool calling); send system, developer, user and assistant messages",
                                     param=f"messages.{i}.role")
            if isinstance(m.content, list):
                for j, part in enumerate(m.content):
                    if not isinstance(part, TextPart):
                        raise InvalidRequest(f"messages[{i}].content[{j}] is a {part.type!r} part; the models here "
                                             "read text only: send text parts", param=f"messages.{i}.content.{j}")
            if m.content is None and m.role != "assistant":
                raise InvalidRequest(f"messages[{i}].content is missing; send the message's text",
                                     param=f"messages.{i}.content")
        return self

    def to_params(self) -> dict:
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling_params(limit)

    def plain_messages(self) -> list[dict]:
        """``[{"role", "content"}]`` with content as one string (``developer`` → ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def to_operation(self, routing_key: str | None = None, latency_budget_ms: float | None = None) -> GenerateRequest:
        """The generation operation's request (task ``chat``)."""
        return GenerateRequest(self.model, task="chat", messages=self.plain_messages(), sampling=self.to_params(),
                               routing_key=routing_key or self.user, latency_budget_ms=latency_budget_ms,
                               hints=self.ignored_hints())
