"""Protocols: pydantic schemas and thin routes, one module per protocol (``openai``, ``v2``, ``maas``),
plus :mod:`maas.protocol.http` (responses, errors, streaming) shared by all of them."""

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


def value_error(message: str):
    """What a request schema's validator raises for a bad value (pydantic reports it as ``value_error`` with
    ``message``), instead of ``ValueError``.

    Why: pydantic keeps a raised ``ValueError`` in the error's ``ctx``, and its traceback holds the validator's
    frame, whose caller (FastAPI's body validation) holds the list of errors: a reference cycle keeping the
    request body until Python's collector runs. Measured over HTTP: 150 such requests of 2 MB grew the ingress
    by ~500 MB. A ``PydanticCustomError`` carries only the message.
    """
    from pydantic_core import PydanticCustomError

    return PydanticCustomError("value_error", message)  # no context: the message is not formatted, braces stay


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "list", "dict", "none"} or "[" in part)


def first_validation_error(errors: list[dict]):
    """One :class:`~maas.errors.InvalidRequest` (400) that names the first bad field
    (pydantic's location, minus the ``body`` prefix and union-member tags)."""
    from maas.errors import InvalidRequest

    if not errors:
        return InvalidRequest("invalid request")
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body" and not _is_type_tag(p)]
    param = ".".join(loc) or None
    msg = e.get("msg", "invalid value")
    if e.get("type") == "extra_forbidden":
        msg = "unknown field; remove it (see the route's schema in /docs)"
    elif e.get("type") == "json_invalid":
        return InvalidRequest("request body is not valid JSON", param=None, code="invalid_json")
    return InvalidRequest(f"{param or 'body'}: {msg}", param=param)


def parse(schema: type[BaseModel], request):
    """Validate a handle caller's dict (or pass an already-built schema object through).

    Raises:
        InvalidRequest: naming the first bad field.
    """
    from pydantic import ValidationError

    if isinstance(request, schema):
        return request
    try:
        return schema.model_validate(request)
    except ValidationError as exc:
        raise first_validation_error(exc.errors(include_url=False)) from None
