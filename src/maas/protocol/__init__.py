"""Request/response schemas, one module per protocol (``openai``, ``maas``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictRequest(BaseModel):
    """Base of every request schema: unknown fields are 400 errors that name the field."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class Usage(BaseModel):
    """Token counts of a request without generation (OpenAI embeddings ``usage``)."""

    prompt_tokens: int
    total_tokens: int


class CompletionUsage(Usage):
    """Token counts of a generating request (OpenAI completions ``usage``)."""

    completion_tokens: int
