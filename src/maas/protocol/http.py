"""What every protocol's routes share: JSON responses, the one error mapping, server-sent events.

* :func:`json_response` encodes with orjson (numpy arrays included: an embedding's 384
  float32 values encode in ~7 µs against ~170 µs through ``json.dumps(v.tolist())``, measured
  here), returning a ready ``Response`` so FastAPI does no second validation pass.
* :func:`error_response` is the one place an error becomes a response; :func:`install` adds
  the exception handlers to an app.
* :func:`stream_response` answers server-sent events, pulling the first event before the
  status line so request errors still get their 4xx.
* :func:`routed` reads what routing takes from the headers (``X-Maas-Routing-Key``,
  ``X-Maas-Latency-Budget-Ms``, the API key as the last routing key); :func:`answer_headers` says
  who answered (``X-Maas-Model-Version``; for ``auto`` ``X-Maas-Routed-Model`` and
  ``X-Maas-Route-Reason``), on every protocol.
* :func:`dataplane` is the FastAPI dependency routes use to reach the operations.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from maas.errors import (
    InvalidRequest,
    MaasError,
    MethodNotAllowed,
    ModelNotReady,
    ModelTimeout,
    NotFoundRoute,
    PayloadTooLarge,
    ServiceOverloaded,
    error_body,
)
from maas.protocol import first_validation_error

logger = logging.getLogger("ray.serve.maas.ingress")

#: Seconds a client should wait before retrying a 503 (sent as ``Retry-After``).
RETRY_AFTER_S = 1

_ERROR_SCHEMA = {
    "content": {"application/json": {"example": error_body("what to fix", "invalid_request_error", "field", None)}}
}
#: OpenAPI error responses every model route declares.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid request; the message says what to fix.", **_ERROR_SCHEMA},
    404: {"description": "Unknown model.", **_ERROR_SCHEMA},
    413: {"description": "Request carries more than the configured limits.", **_ERROR_SCHEMA},
    503: {"description": "Model not ready, or at capacity (with Retry-After).", **_ERROR_SCHEMA},
    504: {"description": "The model did not answer within model_call_timeout_s.", **_ERROR_SCHEMA},
}

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def dumps(body: Any) -> bytes:
    """JSON bytes of ``body`` (numpy arrays as lists; float32 values in their shortest form,
    which parse back to the same float32)."""
    return orjson.dumps(body, option=_JSON_OPTIONS)


def json_response(body: Any, status_code: int = 200, headers: dict | None = None) -> Response:
    return Response(dumps(body), status_code=status_code, headers=headers, media_type="application/json")


def answer_headers(answered) -> dict[str, str]:
    """Who answered (a :class:`~maas.dataplane.types.Answered`), as response headers."""
    headers = {"X-Maas-Model-Version": answered.version}
    if answered.route_reason is not None:
        headers["X-Maas-Routed-Model"] = answered.address
        headers["X-Maas-Route-Reason"] = answered.route_reason
    return headers


def answer_response(body: Any, answered) -> Response:
    """A JSON answer with the headers that say who answered."""
    return json_response(body, headers=answer_headers(answered))


def routed(request: Request, routing_key: str | None = None, latency_budget_ms: float | None = None) -> dict:
    """Routing fields of an operation request from the HTTP request: ``routing_key`` = the
    ``X-Maas-Routing-Key`` header, else the body's (``routing_key``), else the API key (only ever
    hashed, never logged); ``latency_budget_ms`` = the body's, else the
    ``X-Maas-Latency-Budget-Ms`` header.

    Raises:
        InvalidRequest: the budget header is not a positive number of milliseconds.
    """
    headers = request.headers
    key = (headers.get("x-maas-routing-key") or "").strip() or routing_key
    if key is None:
        from maas.security import presented_key

        presented = presented_key({n.encode(): headers[n].encode("latin-1") for n in ("authorization", "x-api-key")
                                   if n in headers})
        key = presented.decode("latin-1") if presented else None
    if latency_budget_ms is None and (raw := headers.get("x-maas-latency-budget-ms")) is not None:
        try:
            latency_budget_ms = float(raw)
        except ValueError:
            latency_budget_ms = -1.0
        if not latency_budget_ms > 0 or latency_budget_ms == float("inf"):
            raise InvalidRequest(f"X-Maas-Latency-Budget-Ms must be a positive number of milliseconds, got {raw!r}",
                                 param="X-Maas-Latency-Budget-Ms")
    return {"routing_key": key, "latency_budget_ms": latency_budget_ms}


async def dataplane():
    """FastAPI dependency: this replica's :class:`~maas.dataplane.Dataplane`.

    ``async`` on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, which
    measured as 18 % of the ingress's CPU samples under load (a thread hand-off per request).
    """
    from maas.dataplane import current

    return current()


def error_response(request: Request, exc: MaasError) -> Response:
    """The one place an error becomes a response.

    OpenAI shape everywhere except under ``/v2``, where the Open Inference Protocol's
    ``{"error": "message"}`` is used. 5xx bodies hide internals (logged with the request id);
    429/503/504 carry ``Retry-After`` so clients' built-in retries back off.
    """
    status = int(exc.status_code)
    message = exc.message
    if status >= 500:
        logger.error("request %s failed: %s", request.headers.get("x-request-id", "-"), exc.message)
        if not isinstance(exc, (ModelNotReady, ModelTimeout, ServiceOverloaded)):
            message = "the service could not answer this request; retry later"
    headers = {"Retry-After": str(exc.retry_after_s or RETRY_AFTER_S)} if status in (429, 503, 504) else None
    extra = getattr(exc, "headers", None)  # a 429's RateLimit-Policy / RateLimit (maas.tenants.RateLimited)
    if extra:
        headers = {**(headers or {}), **extra}
    path, root = request.url.path, request.scope.get("root_path", "")
    if root and path.startswith(root):  # an app under a route prefix (/repo/v2/...) speaks v2 there too
        path = path[len(root):]
    if path.startswith("/v2"):
        return json_response({"error": message}, status, headers)
    return json_response(error_body(message, exc.error_type, exc.param if status < 500 else None, exc.code),
                         status, headers)


def drop_tracebacks(exc: BaseException) -> None:
    """Clear the tracebacks of ``exc`` and of the exceptions it chains (``__cause__``, ``__context__``).

    An exception raised inside a frame that also holds it in a local (FastAPI's request handler keeps its
    ``RequestValidationError`` in one and the ``JSONDecodeError`` in another) forms a reference cycle with
    its traceback, which holds every local of those frames: for a body that is not JSON, the raw body. A
    cycle is freed only by Python's collector, so a run of such requests kept their bodies (up to
    ``max_body_bytes`` each) until the next collection; measured: 66 objects and ten references to the
    body left per bad-JSON request. Once an error is answered nothing reads its traceback (an unexpected
    error is logged first), so the handlers below drop it and the request is freed at once.
    """
    seen: set[int] = set()
    todo: list = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        todo += (e.__cause__, e.__context__)
        if isinstance(e, (RequestValidationError, ValidationError)):  # a validator's own exception, kept in ctx
            found = [(d.get("ctx") or {}).get("error") for d in e.errors() if isinstance(d, dict)]
            todo += [x for x in found if isinstance(x, BaseException)]  # ctx "error" may also be a string


def install(app: FastAPI) -> None:
    """Add the exception handlers that give every error the one shape (each drops the error's tracebacks
    once answered: :func:`drop_tracebacks`)."""

    @app.exception_handler(MaasError)
    async def _maas_error(request: Request, exc: MaasError) -> Response:
        drop_tracebacks(exc)
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        drop_tracebacks(exc)
        return error_response(request, first_validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """Framework errors (unknown route, wrong method, unparsable body or form) in our shape."""
        cause = exc.__cause__
        drop_tracebacks(exc)
        if isinstance(cause, MaasError):  # e.g. the body limit tripped while the body was parsed
            return error_response(request, cause)
        detail = str(exc.detail)
        if exc.status_code == 404:
            err: MaasError = NotFoundRoute(f"no route {request.method} {request.url.path}; see /docs")
        elif exc.status_code == 405:
            err = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
        elif "Too many files" in detail or "Too many fields" in detail:
            err = PayloadTooLarge(f"{detail.rstrip('.')}; split the request")
        else:
            err = InvalidRequest(f"{detail.rstrip('.')}; check the body against the route's schema in /docs")
        response = error_response(request, err)
        if exc.headers:
            response.headers.update(exc.headers)  # e.g. Allow on a 405
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("request %s failed with an internal error", request.headers.get("x-request-id", "-"))
        drop_tracebacks(exc)  # logged above with its traceback
        return error_response(request, MaasError("internal error"))


async def _sse(first: list[dict], rest: AsyncIterator[list[dict]], request_id: str) -> AsyncIterator[bytes]:
    """Server-sent events: ``data: {json}`` + blank line per chunk, then ``data: [DONE]``.
    An error after the stream started is sent as one ``data: {"error": ...}`` event."""
    try:
        for chunk in first:
            yield b"data: " + dumps(chunk) + b"\n\n"
        async for chunks in rest:
            for chunk in chunks:
                yield b"data: " + dumps(chunk) + b"\n\n"
    except MaasError as exc:
        logger.error("stream %s failed: %s", request_id, exc.message)
        body = error_body(exc.message if exc.status_code < 500 else "generation failed", exc.error_type)
        yield b"data: " + dumps(body) + b"\n\n"
    yield b"data: [DONE]\n\n"


async def stream_response(stream, render, request: Request) -> StreamingResponse:
    """Server-sent events of an operation's stream (``maas.dataplane.operations.Stream``), each
    event rendered by ``render(event) -> chunks``. The first event is pulled before the status
    line, so a request the generator refuses still gets its 4xx; headers say who answers."""
    async def rendered():
        async for event in stream.events:
            yield list(render(event))

    chunks = rendered()
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        first = []
    return StreamingResponse(_sse(first, chunks, request.headers.get("x-request-id", "-")),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **answer_headers(stream.answered)})


#: JSON routes that :class:`FastJson` answers without FastAPI's router: path → (body schema,
#: ``handler(body, request, dataplane) -> Response``), registered with :func:`fast_json`.
FAST_JSON: dict[str, tuple[Any, Any]] = {}


def fast_json(path: str, schema):
    """Register ``handler(body, request, dp) -> Response`` as the fast path of the JSON route
    ``POST path`` whose FastAPI endpoint calls the same handler (see :class:`FastJson`)."""
    def register(handler):
        FAST_JSON[path] = (schema, handler)
        return handler
    return register


class FastJson:
    """Pure ASGI middleware, innermost: the hot JSON routes without FastAPI's per-request work.

    For ``POST`` to a path in :data:`FAST_JSON` with a JSON content type it reads the body,
    parses it with orjson and validates it with the route's own schema, then calls the route's
    own handler (the one its FastAPI endpoint calls) and sends its response; a
    :class:`~maas.errors.MaasError` becomes :func:`error_response`, as the app's handler would.
    That skips the router's linear route match, dependency solving, the second JSON decode and the
    exception-middleware layers: the ingress's CPU per request is what bounds a node's requests/s
    when the forward is cheap (``bench.null``; docs/benchmarks.md has the numbers and the profile).

    Anything else goes to FastAPI unchanged — including a body that does not parse or validate,
    replayed as it came, so every error keeps FastAPI's exact wording and status: the fast path
    changes no answer, only its cost.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        route = FAST_JSON.get(path)
        if route is None:
            return await self.app(scope, receive, send)
        ctype = next((v for k, v in scope.get("headers") or () if k == b"content-type"), b"")
        ctype = ctype.split(b";")[0].strip().lower()
        if ctype != b"application/json" and not ctype.endswith(b"+json"):
            return await self.app(scope, receive, send)
        request = Request(scope, receive)
        chunks: list[bytes] = []
        try:
            while True:
                message = await receive()
                if message["type"] != "http.request":  # the client left before sending the body
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        except MaasError as exc:  # the body limit (security.Guard), as FastAPI's body read would report it
            return await error_response(request, exc)(scope, receive, send)
        raw = b"".join(chunks)
        schema, handler = route
        try:
            body = schema.model_validate(orjson.loads(raw))
        except Exception:  # noqa: BLE001 - any parse or validation error: FastAPI answers it, in its words
            return await self.app(scope, _replay(raw, receive), send)
        from maas.dataplane import current

        try:
            response = await handler(body, request, current())
        except MaasError as exc:
            drop_tracebacks(exc)
            response = error_response(request, exc)
        await response(scope, receive, send)


def _replay(raw: bytes, receive):
    """A ``receive`` that gives ``raw`` as the whole body once, then defers to ``receive``."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()
    return replayed


class HttpSemantics:
    """Pure ASGI middleware for request semantics RFC 9110 asks of every route.

    * ``HEAD`` is answered wherever ``GET`` is (RFC 9110 §9.3.2: the same status and headers,
      no body): uptime monitors and load balancers probe with it. The request runs as ``GET``
      and the body is dropped on the way out; ``Content-Length`` stays that of the ``GET``.
    * A request body in a content coding other than ``identity`` (``Content-Encoding: gzip``)
      gets 415 with ``Accept-Encoding: identity`` (§8.4.1, §15.5.16): the service reads plain
      bodies only, and decompressing would bypass the body-size limit.

    Media types are compared case-insensitively where the routes read them (§8.3.1).
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers") or ():
            if name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
                coding = value.decode("latin-1").strip()
                path = scope.get("path", "")
                message = (f"request bodies in content coding {coding!r} are not accepted; send the body "
                           "uncompressed (Content-Encoding: identity)")
                body = {"error": message} if path.startswith("/v2") else error_body(message, "invalid_request_error")
                raw = dumps(body)
                await send({"type": "http.response.start", "status": 415, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
                    (b"accept-encoding", b"identity")]})
                await send({"type": "http.response.body", "body": raw})
                return
        if scope.get("method") != "HEAD":
            return await self.app(scope, receive, send)

        async def send_headers_only(message):
            if message["type"] == "http.response.body":
                if message.get("more_body"):
                    return
                message = {"type": "http.response.body", "body": b""}
            await send(message)

        await self.app(dict(scope, method="GET"), receive, send_headers_only)
