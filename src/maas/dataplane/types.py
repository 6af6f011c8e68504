"""The service's own types: what operations take and return, whatever protocol carried the request.

Protocol modules (:mod:`maas.protocol.openai`, :mod:`maas.protocol.v2`, :mod:`maas.protocol.maas`)
build these from their wire formats and render the results back; handles build them from the
same request dicts as HTTP. Nothing here knows an OpenAI id, ``object`` name or chunk rule, or a
v2 tensor.

Requests name the model as the caller did: ``name``, ``name@version`` (a pinned version) or
``auto`` (the router chooses; see :mod:`maas.dataplane.routing`). Results carry :class:`Answered`:
the address that answered and why it was chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np


@dataclass
class Routed:
    """What every operation request carries for the router.

    Attributes:
        model: ``name``, ``name@version`` or ``auto``.
        routing_key: The sticky key among a name's versions (``X-Maas-Routing-Key``, OpenAI
            ``user``, a handle's ``routing_key``), or None (the API key, else random).
        latency_budget_ms: With ``auto``: the latency budget, ms (the body's field, else the
            ``X-Maas-Latency-Budget-Ms`` header's, else none).
        hints: Names of optional request fields the service accepts and ignores (one log line
            names them, never their values).
    """

    model: str
    routing_key: str | None = field(default=None, kw_only=True)
    latency_budget_ms: float | None = field(default=None, kw_only=True)
    hints: list[str] = field(default_factory=list, kw_only=True)


@dataclass
class EmbedRequest(Routed):
    """Embeddings of texts or of token-id rows (exactly one of the two is set).

    Attributes:
        texts: Non-empty texts; longer than the model's limit → truncated.
        token_ids: Token-id rows (int), when the caller tokenized.
        dimensions: Must equal the model's size when set (models here cannot shorten vectors).
    """

    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    dimensions: int | None = None


@dataclass
class ClassifyTextsRequest(Routed):
    """Text classification: ``top_k`` labels per text. ``cascade_threshold`` (with ``auto``):
    ask the next better model while the lowest top-1 score is below it."""

    texts: list[str] = field(default_factory=list)
    top_k: int = 1
    cascade_threshold: float | None = None


@dataclass
class ClassifyImagesRequest(Routed):
    """Image classification of encoded files (``bytes``) or decoded ``uint8`` (H, W, 3) arrays."""

    images: list[Any] = field(default_factory=list)
    top_k: int | None = None  # None: 5, or the class count when smaller
    cascade_threshold: float | None = None


#: Generation tasks: a completion of prompts, a chat over messages, an encoder–decoder text2text.
GenerationTask = Literal["completion", "chat", "text2text"]


@dataclass
class GenerateRequest(Routed):
    """One generation request.

    Attributes:
        task: ``completion`` (``prompts``), ``chat`` (``messages``) or ``text2text`` (``prompts``).
        prompts: Texts, or token-id rows when ``prompt_is_tokens``.
        messages: Chat messages ``[{"role", "content"}]`` (content one string).
        sampling: ``{"max_tokens", "temperature", "top_p", "seed", "stop", "n"}`` (see
            ``maas.models.text_generator.SamplingParams``).
    """

    task: GenerationTask = "completion"
    prompts: list[Any] | None = None
    prompt_is_tokens: bool = False
    messages: list[dict] | None = None
    sampling: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Choices per prompt (``sampling["n"]``, default 1)."""
        return int(self.sampling.get("n") or 1)


@dataclass
class ExplainImageRequest(Routed):
    """Grad-CAM of one image (``bytes`` or ``uint8`` (H, W, 3)) for ``target`` (label or index;
    None = top-1), over the ``full`` image or the ``served`` crop."""

    image: Any = None
    target: str | int | None = None
    view: str = "full"
    seed: int = 0
    overlay: bool = True


@dataclass
class ExplainTextRequest(Routed):
    """Token attributions: one text (a classifier's ``target``) or two (an embedder's similarity)."""

    texts: list[str] = field(default_factory=list)
    target: str | int | None = None
    seed: int = 0


# ---------------------------------------------------------------------------- results


@dataclass
class Answered:
    """Who answered a request, and, for ``auto``, why it was chosen.

    Attributes:
        address: ``name`` or ``name@version`` of the spec that answered.
        name: The model name. version: Its version (``"1"`` for an unversioned model).
        demo_weights: Whether its weights are a labelled random demo.
        route_reason: Why ``auto`` chose it (``budget=…;predicted=…``), or None.
        cascade: A confidence cascade's steps ``[{"model", "top1_score", "latency_ms"}]``, or None.
    """

    address: str
    name: str
    version: str
    demo_weights: bool
    route_reason: str | None = None
    cascade: list[dict] | None = None


@dataclass
class Embeddings:
    """``vectors``: ``float32`` (N, D), one row per input, in order; ``prompt_tokens``: tokens used."""

    answered: Answered
    vectors: np.ndarray
    prompt_tokens: int


@dataclass
class Classifications:
    """``rows``: per input, its top-k ``[{"index", "label", "score"}]`` best first;
    ``prompt_tokens``: tokens read (texts), None for images."""

    answered: Answered
    rows: list[list[dict]]
    prompt_tokens: int | None = None

    def min_top1(self) -> float:
        """The lowest top-1 score over the inputs (what a confidence cascade compares)."""
        return min(float(r[0]["score"]) for r in self.rows)


@dataclass
class GeneratedChoice:
    """One generated text: ``finish_reason`` ``stop`` (end of sequence or a stop string) or
    ``length`` (``max_tokens`` or the context); ``completion_tokens`` counted up to the stop."""

    text: str
    finish_reason: str
    completion_tokens: int


@dataclass
class Generation:
    """Choices prompt-major (``n`` per prompt); ``prompt_tokens``: all prompts' tokens."""

    answered: Answered
    choices: list[GeneratedChoice]
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)


@dataclass
class TextDelta:
    """A stream event: new text per choice (``[{"index", "text", "finish_reason"}]``)."""

    choices: list[dict]


@dataclass
class StreamEnd:
    """The last stream event: token counts of the whole request."""

    prompt_tokens: int
    completion_tokens: int


@dataclass
class Explanation:
    """An explanation's content (method, target, map or token attributions, faithfulness; see
    :mod:`maas.dataplane.explain`) as plain data, and how long it took, ms."""

    answered: Answered
    content: dict
    latency_ms: float
