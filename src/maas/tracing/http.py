"""The request's ``SERVER`` spans (see :mod:`maas.tracing`): HTTP (:class:`TracingMiddleware`, the ingress's
outermost ASGI middleware) and handle calls from other Ray jobs (:func:`traced_handle`)."""

from __future__ import annotations

import re
import time

from maas import tracing as core
from maas.tracing import CURRENT, ERROR, SERVER, Span, cancelled, parse_traceparent

_V2_MODEL = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?")
_V2_REPO = re.compile(r"^/v2/repository/models/[^/]+")


def route_of(path: str, known: frozenset) -> str | None:
    """The route template of ``path`` (span names must not carry ids: ``/v2/models/{model_name}/infer``), or
    None for a path no route serves (the span is then named by the method alone, as the HTTP conventions ask)."""
    if path in known:
        return path
    if path.startswith("/v2/models/"):
        return _V2_MODEL.sub(lambda m: "/v2/models/{model_name}" + ("/versions/{model_version}" if m.group(1) else ""),
                             path)
    if path.startswith("/v2/repository/models/"):
        return _V2_REPO.sub("/v2/repository/models/{model_name}", path)
    return None


#: How far back an ``X-Request-Start`` may point, ns: an older stamp (a wrong unit, a stale header a proxy
#: copied) is ignored rather than drawn as minutes of front time. Above Serve's and the ingress's timeouts.
MAX_FRONT_NS = 300 * 10**9
#: How far ahead of this replica's clock a stamp may be (another host's clock), ns; such a stamp means "now".
MAX_SKEW_NS = 10**9


def request_start_ns(value: bytes, now_ns: int) -> int | None:
    """The time an ``X-Request-Start`` header says the request started, Unix ns, or None when it says nothing
    usable.

    Formats: ``t=<number>`` or ``<number>``, the unit read from the magnitude as New Relic's and Datadog's
    agents read it — seconds (nginx's ``t=${msec}``: ``1765100000.123``), milliseconds, microseconds
    (HAProxy's ``%[date(0,us)]``) or nanoseconds. A stamp older than :data:`MAX_FRONT_NS` is ignored, one
    up to :data:`MAX_SKEW_NS` ahead of this clock is read as ``now_ns``, one further ahead is ignored."""
    text = value.decode("latin-1").strip()
    if text.startswith("t="):
        text = text[2:]
    try:
        x = int(text) if text.isdigit() else float(text)
    except ValueError:
        return None
    if not 0 < x < 1e20:  # also NaN and infinities
        return None
    ns = int(x * 10**9) if x < 1e11 else int(x * 10**6) if x < 1e14 else int(x * 10**3) if x < 1e17 else int(x)
    if ns > now_ns:
        return now_ns if ns - now_ns <= MAX_SKEW_NS else None
    return ns if now_ns - ns <= MAX_FRONT_NS else None


def earliest_start_ns(values: list[bytes], now_ns: int) -> int | None:
    """The earliest usable stamp of several ``X-Request-Start`` values (repeated headers, or one header a proxy
    joined with commas): each proxy of a chain may stamp, and the first one's stamp holds the whole wait."""
    stamps = [request_start_ns(part, now_ns) for v in values for part in v.split(b",")]
    usable = [s for s in stamps if s is not None]
    return min(usable) if usable else None


class TracingMiddleware:
    """Pure ASGI middleware, outermost: the request's ``SERVER`` span (see the module docstring).

    With tracing off it is one check per request. ``known_routes`` (set by the ingress from its app's routes)
    names spans; any other path is named by its method only.

    A request carrying ``X-Request-Start`` (set by a proxy in front, or by the client; see
    :func:`request_start_ns`) has its span start at that time, with a ``maas.http.front`` child up to the
    request reaching this app: the time in proxies, HAProxy, uvicorn and Serve's own request handling,
    which no code of the app can see otherwise. Decision: honoured whenever tracing is on and the stamp is
    plausible — a caller can only lengthen its own request's trace, by at most :data:`MAX_FRONT_NS`.
    """

    known_routes: frozenset = frozenset()
    #: Not traced: health and readiness probes (Kubernetes and load balancers call them every few seconds),
    #: the API description and the playground's files.
    excluded: frozenset = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/-/healthz",
                                     "/-/routes", "/metrics", "/openapi.json", "/docs", "/redoc", "/favicon.ico"})
    excluded_prefixes = ("/static-offline-docs/", "/playground/assets/")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        t = core._TRACER
        if t is None or scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if path in self.excluded or path.startswith(self.excluded_prefixes):
            return await self.app(scope, receive, send)
        parents: list = []
        states: list = []
        request_id = agent = None
        fronts: list = []
        for name, value in scope.get("headers") or ():
            if name == b"traceparent":
                parents.append(value)
            elif name == b"tracestate":
                states.append(value.decode("latin-1"))
            elif name == b"x-request-id":
                request_id = value
            elif name == b"user-agent":
                agent = value
            elif name == b"x-request-start":
                fronts.append(value)
        # W3C: several traceparent headers are invalid (a new trace); several tracestate headers are one list
        remote = parse_traceparent(parents[0], ",".join(states)) if len(parents) == 1 else None
        method = scope.get("method", "GET")
        route = route_of(path, self.known_routes)
        attrs = {"http.request.method": method, "url.scheme": scope.get("scheme", "http"),
                 "network.protocol.version": scope.get("http_version", "1.1")}
        if route:
            attrs["http.route"] = route
            attrs["url.path"] = path
        if request_id:  # Serve's request id (HAProxy or the caller sets it): joins the trace to Serve's logs
            attrs["maas.request_id"] = request_id.decode("latin-1")[:128]
        if agent:
            attrs["user_agent.original"] = agent.decode("latin-1")[:256]
        arrived = time.time_ns()
        started = earliest_start_ns(fronts, arrived) if fronts else None
        span = t.start(f"{method} {route}" if route else method, remote, SERVER, attrs, start_ns=started or arrived)
        if span is None:
            return await self.app(scope, receive, send)
        status = 0
        header = (b"traceparent", span.traceparent.encode())

        async def traced_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*(message.get("headers") or ()), header]}
            await send(message)

        token = CURRENT.set(span)
        try:
            await self.app(scope, receive, traced_send)
        except BaseException as exc:
            if cancelled(exc):  # the client left: not a server error
                span.attrs["maas.cancelled"] = True
            else:
                span.fail(exc)
            raise
        finally:
            CURRENT.reset(token)
            end = time.time_ns()
            if status:
                span.attrs["http.response.status_code"] = status
                if status >= 500:
                    span.status = ERROR
                    span.attrs.setdefault("error.type", str(status))
            t.defer(_end_server, span, end, arrived if started is not None and started < arrived else None)
            # its children are built on the export thread


def _end_server(span: Span, end: int, arrived: int | None = None) -> None:
    """End a ``SERVER`` span with ``maas.http.receive`` and ``maas.http.respond`` around its operation, and
    ``maas.http.front`` before ``arrived`` (the request reaching the app) when the span started earlier, at
    an ``X-Request-Start`` stamp."""
    received = span.start_ns
    if arrived is not None:
        span.child("maas.http.front", span.start_ns).end(arrived)
        received = arrived
    op = span.op
    if op is not None and op.end_ns:
        span.child("maas.http.receive", received).end(op.start_ns)
        span.child("maas.http.respond", op.end_ns).end(end)
    span.end(end)


def traced_handle(method):
    """An ``Ingress`` handle method that takes ``trace_context=`` (a W3C carrier dict: ``traceparent``,
    ``tracestate``) and runs in a ``SERVER`` span ``maas.handle <method>`` continuing it (a new trace without
    it, when tracing is on and the trace is sampled).

    The wrappers reach this module through an import at call time: Serve ships the ingress class by value,
    and a closure over this module's globals would carry its ``ContextVar`` (which cannot be pickled)."""
    import functools
    import inspect

    # help() and inspect.signature() show trace_context= (functools.wraps alone would show the method's own).
    sig = inspect.signature(method)
    params = list(sig.parameters.values())
    at = len(params) - int(bool(params) and params[-1].kind is inspect.Parameter.VAR_KEYWORD)  # before **kwargs
    params.insert(at, inspect.Parameter("trace_context", inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation="dict | None"))
    sig = sig.replace(parameters=params)
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, *args, trace_context: dict | None = None, **kwargs):
            from maas import tracing

            async for item in tracing.handle_stream(method, self, args, kwargs, trace_context):
                yield item
        stream.__signature__ = sig
        return stream

    @functools.wraps(method)
    async def call(self, *args, trace_context: dict | None = None, **kwargs):
        from maas import tracing

        return await tracing.handle_call(method, self, args, kwargs, trace_context)
    call.__signature__ = sig
    return call


def _handle_span(name: str, trace_context: dict | None) -> Span | None:
    t = core._TRACER
    if t is None:
        return None
    remote = None
    if isinstance(trace_context, dict):
        remote = parse_traceparent(trace_context.get("traceparent"), trace_context.get("tracestate"))
    return t.start(f"maas.handle {name}", remote, SERVER, {"rpc.system": "ray_serve", "rpc.method": name})


async def handle_call(method, owner, args: tuple, kwargs: dict, trace_context: dict | None):
    """``await method(owner, *args, **kwargs)`` inside its handle span (see :func:`traced_handle`)."""
    span = _handle_span(method.__name__, trace_context)
    if span is None:
        return await method(owner, *args, **kwargs)
    token = CURRENT.set(span)
    try:
        return await method(owner, *args, **kwargs)
    except BaseException as exc:
        span.fail_server(exc)
        raise
    finally:
        CURRENT.reset(token)
        span.end()


async def handle_stream(method, owner, args: tuple, kwargs: dict, trace_context: dict | None):
    """``method(owner, *args, **kwargs)``'s items inside its handle span (see :func:`traced_handle`)."""
    span = _handle_span(method.__name__, trace_context)
    if span is None:
        async for item in method(owner, *args, **kwargs):
            yield item
        return
    token = CURRENT.set(span)
    try:
        async for item in method(owner, *args, **kwargs):
            yield item
    except BaseException as exc:
        span.fail_server(exc)
        raise
    finally:
        try:
            CURRENT.reset(token)
        except ValueError:  # resumed in another task's context: that context is not ours to reset
            pass
        span.end()


