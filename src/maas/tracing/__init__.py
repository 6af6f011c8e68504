"""OpenTelemetry traces of every request, exported over OTLP: where a request's time went.

Off by default; on with ``args.ingress.tracing.enabled: true`` (:class:`maas.config.TracingSpec`), configured
further by the standard ``OTEL_*`` environment variables (docs/tracing.md). Ray Serve's own tracing does not
work with Serve (ray#46252), so the spans are the project's own:

* **HTTP** (:class:`TracingMiddleware`, outermost): one ``SERVER`` span per request, named ``METHOD route``,
  continuing the caller's W3C ``traceparent`` (and ``tracestate``); the response carries ``traceparent``
  naming that span, so a client can find its request's trace. Two children cover the ingress's own work
  around the operation: ``maas.http.receive`` (body, key check, parsing, validation) and
  ``maas.http.respond`` (rendering and sending).
* **Handle calls** from other Ray jobs: ``trace_context=`` (a W3C carrier dict, what
  ``opentelemetry.propagate.inject`` fills) on every ``Ingress`` handle method; a ``SERVER`` span
  ``maas.handle <method>`` continues it.
* **The operation** (``maas.<operation>``, :class:`maas.dataplane.routing.Router`): model asked, address
  and version that answered, ``auto``'s reason, the tenant; errors with their status code.
* **The front batch** (:mod:`maas.batching.front`): each request's ``maas.front_batch.wait`` (queued until
  its batch left); the batch itself is **one** span, ``maas.front_batch``, child of the first traced request
  in it and *linked* to every traced request's operation span (OpenTelemetry links); the other requests get
  ``maas.front_batch.ride`` (their time in the batch), linked to it.
* **Replicas**: ``maas.preprocess`` (the shared preprocessor's work on the batch), ``maas.model`` (the model
  replica, from the call's arrival to its answer) with ``maas.model.queue`` (waiting in the replica's pull
  batcher) and ``maas.model.forward`` (the replica's batch: items, requests). Generation:
  ``maas.model.queue`` and ``maas.model.generate`` (time to first token, tokens) on the generator replica.

Replicas do not export. A traced job says ``"trace": 1`` in its params; the replica measures its own wall
clock (``time.time_ns``) and returns the times with the answer (``trace``), and the ingress emits the
replica's spans with them. One exporter per ingress replica, no tracing configuration on model replicas, and
an untraced request costs replicas nothing. Across nodes the replica spans carry the replica node's clock,
as spans that a replica exported itself would.

Why not the OpenTelemetry SDK's tracer: measured on the project's 2-vCPU VM (``bench.tracing``'s ``micro``),
starting and ending one SDK span with its batch processor costs ~75 µs and its OTLP encoder ~46 µs per span; a
request here has 6–11 spans, which breaks the 0.3 ms budget at c=1. A :class:`Span` costs ~10 µs measured the
same way (~3.5 µs to create and end when the garbage collector has no queue to walk), and the OTLP encoder
(:mod:`maas.tracing.otlp`) ~5 µs per span, on the export thread. The SDK stays the reference:
``tests/unit/test_tracing.py`` decodes this encoder's bytes with ``opentelemetry-proto``, hands the spans to
the SDK's exporters (:class:`SdkExporter`, e.g. its ``InMemorySpanExporter``), and parses ``traceparent``
against the OpenTelemetry propagator.

No payload, prompt, key or image goes into a span: attributes are names, ids, counts, times and statuses
(DESIGN.md), and an error's span says its type and code, not its message.
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
import re
import threading
import time
from collections import deque
from typing import Any

from maas.tracing.otlp import (  # noqa: F401 - re-exported
    SCOPE_NAME,
    SCOPE_VERSION,
    OtlpGrpcExporter,
    OtlpHttpExporter,
    SdkExporter,
    _env_number,
    _sampler_from_env,
    _resource,
    encode_otlp,
    exporter_for,
)

logger = logging.getLogger("ray.serve.maas.tracing")

#: Span kinds and status codes as OTLP numbers them (``opentelemetry/proto/trace/v1/trace.proto``).
INTERNAL, SERVER, CLIENT = 1, 2, 3
UNSET, OK, ERROR = 0, 1, 2

#: The span of the work this task is doing now (the parent of the spans it starts), or None.
CURRENT: contextvars.ContextVar["Span | None"] = contextvars.ContextVar("maas_span", default=None)

_rand = random.Random()  # ids only: not a secret (W3C trace context asks for random, not unguessable)
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


class Remote:
    """A caller's span context from W3C ``traceparent``: ``trace_id`` (128-bit int), ``span_id`` (64-bit
    int), ``sampled`` (its flag) and ``trace_state`` (``tracestate``, passed on as whole entries:
    :func:`trim_tracestate`)."""

    __slots__ = ("trace_id", "span_id", "sampled", "trace_state")

    def __init__(self, trace_id: int, span_id: int, sampled: bool, trace_state: str = ""):
        self.trace_id, self.span_id, self.sampled, self.trace_state = trace_id, span_id, sampled, trace_state


def parse_traceparent(value: str | bytes | None, tracestate: str | bytes | None = None) -> Remote | None:
    """The caller's context from a ``traceparent`` header (W3C Trace Context, level 1), or None when it is
    missing or invalid (an invalid one starts a new trace, as the standard says: never an error).

    Version ``ff`` and all-zero ids are invalid; a higher version than ``00`` is read by its first four
    fields (forward compatibility, section 4.3)."""
    if not value:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    m = _TRACEPARENT.match(value.strip())
    if m is None:
        return None
    version, trace, span, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if not trace_id or not span_id:
        return None
    if isinstance(tracestate, bytes):
        tracestate = tracestate.decode("latin-1")
    return Remote(trace_id, span_id, bool(int(flags, 16) & 1), trim_tracestate(tracestate or ""))


def trim_tracestate(value: str, limit: int = 512, entries: int = 32) -> str:
    """``tracestate`` passed on as whole entries (W3C Trace Context 3.3.1.5): at most ``entries`` of them and
    ``limit`` characters; entries that do not fit are dropped from the end, never cut."""
    kept: list[str] = []
    size = 0
    for entry in value.split(","):
        entry = entry.strip()
        if not entry:
            continue
        if len(kept) == entries or size + len(entry) + bool(kept) > limit:
            break
        kept.append(entry)
        size += len(entry) + (len(kept) > 1)
    return ",".join(kept)


def format_traceparent(trace_id: int, span_id: int, sampled: bool = True) -> str:
    """``00-<trace id>-<span id>-<flags>`` (W3C Trace Context)."""
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def cancelled(exc: BaseException) -> bool:
    """Whether ``exc`` says the caller left (asyncio's or Ray's cancellation, a closed stream)."""
    import asyncio

    return isinstance(exc, (asyncio.CancelledError, GeneratorExit)) or type(exc).__name__.endswith("CancelledError")


def error_of(exc: BaseException) -> tuple[str, int | None]:
    """``(class name, status code or None)`` of an error: what a span keeps of it."""
    code = getattr(exc, "status_code", None)
    return type(exc).__name__, (int(code) if code is not None else None)


class Span:
    """One recorded span. Times are wall clock, ns since the epoch (``time.time_ns``), as OTLP carries them.

    Attributes:
        attrs: ``str → str | bool | int | float`` (never a payload). links: ``[(trace_id, span_id)]``.
        events: ``[(name, time_ns, attrs)]``. status: :data:`UNSET`, :data:`OK` or :data:`ERROR`.
    """

    __slots__ = ("tracer", "name", "trace_id", "span_id", "parent_id", "kind", "start_ns", "end_ns", "attrs",
                 "links", "events", "status", "status_message", "trace_state", "op", "remote_parent")

    def __init__(self, tracer: "Tracer", name: str, trace_id: int, span_id: int, parent_id: int, kind: int,
                 start_ns: int, attrs: dict | None, trace_state: str = ""):
        self.tracer, self.name, self.kind = tracer, name, kind
        self.trace_id, self.span_id, self.parent_id = trace_id, span_id, parent_id
        self.start_ns, self.end_ns = start_ns, 0
        self.attrs = attrs if attrs is not None else {}
        self.links: list[tuple[int, int]] = []
        self.events: list[tuple[str, int, dict]] = []
        self.status, self.status_message, self.trace_state = UNSET, "", trace_state
        self.op: Span | None = None  # a server span's operation span (maas.http.receive/respond are cut around it)
        self.remote_parent = False  # its parent is a caller's span (another process)

    def child(self, name: str, start_ns: int | None = None, attrs: dict | None = None, kind: int = INTERNAL) -> "Span":
        """A child span starting now (or at ``start_ns``)."""
        return Span(self.tracer, name, self.trace_id, _rand.getrandbits(64) or 1, self.span_id, kind,
                    start_ns or time.time_ns(), attrs, self.trace_state)

    def fail_server(self, exc: BaseException) -> None:
        """A ``SERVER`` span's end by ``exc``: a caller who left is ``maas.cancelled`` (not an error: error-rate
        views would count client aborts as failures); a 4xx (the caller's mistake) keeps its type and code
        without failing the span (OpenTelemetry's HTTP conventions); anything else fails it."""
        if cancelled(exc):
            self.attrs["maas.cancelled"] = True
            return
        name, code = error_of(exc)
        if code is not None and code < 500:
            self.attrs["error.type"] = name
            self.attrs["maas.status_code"] = code
            return
        self.fail(exc)

    def fail(self, exc: "BaseException | tuple[str, int | None]") -> None:
        """Mark the span failed by ``exc`` (or ``(its class name, its status code)``): ``error.type``, and for a
        :class:`~maas.errors.MaasError` its status code; the message is left out (it may quote input)."""
        name, code = exc if isinstance(exc, tuple) else error_of(exc)
        self.status = ERROR
        self.attrs["error.type"] = name
        if code is not None:
            self.attrs["maas.status_code"] = code
            self.status_message = f"{name} ({code})"
        else:
            self.status_message = name

    def end(self, end_ns: int | None = None) -> None:
        """End the span now (or at ``end_ns``) and hand it to its tracer's exporter (once)."""
        if self.end_ns:
            return
        self.end_ns = end_ns or time.time_ns()
        self.tracer.record(self)

    @property
    def traceparent(self) -> str:
        return format_traceparent(self.trace_id, self.span_id)


class Tracer:
    """Samples, records and exports spans of one process (the ingress replica).

    Sampling is parent-based by default (OpenTelemetry's default sampler, ``parentbased_always_on``): a request
    whose caller sent a ``traceparent`` follows the caller's sampled flag; a new trace is sampled when its id's
    low 64 bits fall below ``sample_ratio × 2⁶⁴`` (the SDK's ``TraceIdRatioBased`` rule, so every service of a
    trace decides alike). With ``parent_based=False`` (``OTEL_TRACES_SAMPLER=traceidratio``, ``always_on``,
    ``always_off``) the ratio decides for callers' traces too. An unsampled request records nothing.

    Ended spans queue (at most ``max_queue`` spans; beyond, they are dropped and counted) and a daemon
    thread exports them in batches of ``batch_size`` every ``delay_s`` seconds or as soon as a batch fills
    (the SDK's ``BatchSpanProcessor`` defaults: ``OTEL_BSP_*``). An export that fails drops its spans and is
    logged at most once a minute, with the counts so far (``exported``, ``failed``, ``dropped``; the ingress's
    ``stats()`` handle method reports them too): tracing never holds up or fails a request.

    Args:
        exporter: Has ``export(spans: list[Span]) -> bool`` and ``close()``.
        sample_ratio: 0–1. resource: OTLP resource attributes (``service.name`` …).
    """

    def __init__(self, exporter, sample_ratio: float = 1.0, resource: dict | None = None, max_queue: int = 2048,
                 batch_size: int = 512, delay_s: float = 5.0, parent_based: bool = True):
        self.exporter, self.sample_ratio, self.parent_based = exporter, sample_ratio, parent_based
        self.bound = int(round(sample_ratio * (1 << 64)))
        self.resource = dict(resource or {})
        self.max_queue, self.batch_size, self.delay_s = max_queue, batch_size, delay_s
        self._queue: deque[Span] = deque()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False
        self.exported = self.dropped = self.failed = 0
        self._last_warning = 0.0
        self._thread = threading.Thread(target=self._loop, name="maas-trace-export", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ starting spans

    def sampled(self, trace_id: int) -> bool:
        """The ratio rule for a new trace (see the class docstring)."""
        return (trace_id & 0xFFFFFFFFFFFFFFFF) < self.bound

    def start(self, name: str, parent: "Span | Remote | None" = None, kind: int = INTERNAL,
              attrs: dict | None = None, start_ns: int | None = None) -> Span | None:
        """A span starting now (or at ``start_ns``): a child of ``parent`` (a local span or a caller's
        context), else the root of a new trace; None when the trace is not sampled."""
        if isinstance(parent, Span):
            return parent.child(name, start_ns, attrs, kind)
        if parent is not None:
            if not (parent.sampled if self.parent_based else self.sampled(parent.trace_id)):
                return None
            span = Span(self, name, parent.trace_id, _rand.getrandbits(64) or 1, parent.span_id, kind,
                        start_ns or time.time_ns(), attrs, parent.trace_state)
            span.remote_parent = True
            return span
        trace_id = _rand.getrandbits(128) or 1
        if not self.sampled(trace_id):
            return None
        return Span(self, name, trace_id, _rand.getrandbits(64) or 1, 0, kind, start_ns or time.time_ns(), attrs)

    # ------------------------------------------------------------------ export

    def record(self, span: Span) -> None:
        """Queue an ended span for export (dropped, and counted, when the queue is full)."""
        if len(self._queue) >= self.max_queue:
            self.dropped += 1
            return
        self._queue.append(span)
        if len(self._queue) >= self.batch_size:
            self._wake.set()

    def defer(self, build, *args) -> None:
        """Queue ``build(*args)``, which records spans, to run on the export thread: spans made after the fact
        from times already measured (a batch's, a replica's) cost the event loop one append. ``args`` must
        not hold payloads (they live until the next export)."""
        if len(self._queue) >= self.max_queue:
            self.dropped += 1
            return
        self._queue.append((build, args))

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Export everything queued now; True when it was sent within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self._queue and self._idle.is_set():
                return True
            self._wake.set()
            time.sleep(0.01)
        return not self._queue

    def close(self) -> None:
        """Flush and stop the export thread."""
        self.flush(5.0)
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=5.0)
        self.exporter.close()

    def _loop(self) -> None:
        while not self._closed:
            self._wake.wait(self.delay_s)
            self._wake.clear()
            while self._queue:
                self._idle.clear()
                batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
                deferred = [b for b in batch if type(b) is tuple]
                if deferred:
                    batch = [b for b in batch if type(b) is not tuple]
                    for i, (build, args) in enumerate(deferred, 1):  # their spans queue behind: exported in this round
                        try:
                            build(*args)
                        except Exception as exc:  # noqa: BLE001 - a bug here loses spans, never a request
                            self._warn(f"building spans: {type(exc).__name__}: {exc}")
                        if i % 8 == 0:
                            time.sleep(0)  # let the event loop have the GIL: this thread is never urgent
                    if not batch:
                        continue
                try:
                    ok = self.exporter.export(batch, self.resource)
                except Exception as exc:  # noqa: BLE001 - an exporter bug must not stop the thread
                    ok = False
                    self._warn(f"{type(exc).__name__}: {exc}")
                if ok:
                    self.exported += len(batch)
                else:
                    self.failed += len(batch)
                    self._warn(getattr(self.exporter, "last_error", "") or "the exporter refused the spans")
            self._idle.set()

    def _warn(self, why: str) -> None:
        now = time.monotonic()
        if now - self._last_warning > 60:
            self._last_warning = now
            logger.warning("trace export to %s failed (%s); its spans are dropped (tracing never fails a request). "
                           "So far: %s. This warning repeats at most once a minute.",
                           getattr(self.exporter, "endpoint", "?"), why, self.counts())

    def counts(self) -> dict:
        """``{"exported", "failed", "dropped", "queued"}`` spans (queued: waiting, or batches still to build)."""
        return {"exported": self.exported, "failed": self.failed, "dropped": self.dropped, "queued": len(self._queue)}


_TRACER: Tracer | None = None


def tracer() -> Tracer | None:
    """This process's tracer, or None when tracing is off (the one check on the request path)."""
    return _TRACER


def configure(spec) -> Tracer | None:
    """Start (or stop) this process's tracer from a :class:`maas.config.TracingSpec`: off unless
    ``spec.enabled``, and off whatever the spec says when ``OTEL_SDK_DISABLED=true`` (logged). A malformed
    ``OTEL_*`` variable is logged and its default used, as the OpenTelemetry SDK does. Returns the tracer.

    An exporter that cannot be built (an ``OTEL_EXPORTER_OTLP_ENDPOINT`` without a scheme for HTTP, an
    ``OTEL_EXPORTER_OTLP_CERTIFICATE`` that is not a file) leaves tracing off with an ERROR line naming the
    setting and its fix. Decision: tracing must never stop the service, so a bad tracing setting in the
    replica's environment does not keep the ingress from starting (:class:`maas.config.TracingSpec` refuses
    the config's own bad endpoints when the config is validated).
    """
    global _TRACER
    if _TRACER is not None:
        _TRACER.close()
        _TRACER = None
    if spec is None or not spec.enabled:
        return None
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        logger.info("tracing is enabled in the config but OTEL_SDK_DISABLED=true turns it off")
        return None
    if spec.sample_ratio is not None:
        ratio, parent_based = spec.sample_ratio, True
    else:
        ratio, parent_based = _sampler_from_env()
    try:
        exporter = exporter_for(spec)
    except ValueError as exc:
        logger.error("tracing is enabled but stays off: %s; fix the setting and redeploy", exc)
        return None
    _TRACER = Tracer(exporter, ratio, _resource(spec.service_name),
                     max_queue=_env_number("OTEL_BSP_MAX_QUEUE_SIZE", 2048, int),
                     batch_size=_env_number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512, int),
                     delay_s=_env_number("OTEL_BSP_SCHEDULE_DELAY", 5000.0, float) / 1000, parent_based=parent_based)
    logger.info("tracing on: OTLP to %s, sampling %.3g of %s traces", getattr(_TRACER.exporter, "endpoint", "?"),
                ratio, "new" if parent_based else "all")
    return _TRACER


def use(t: Tracer | None) -> None:
    """Set this process's tracer directly (tests: a :class:`Tracer` over an :class:`SdkExporter`)."""
    global _TRACER
    _TRACER = t


# ---------------------------------------------------------------------------- helpers for the request path


def current() -> Span | None:
    """The span of the current task's work, or None (tracing off, or the request is not sampled)."""
    return CURRENT.get() if _TRACER is not None else None


_REPLICA: list[str] = []


def replica_tag() -> str:
    """This Serve replica's id (``deployment#id``), or the process id outside Serve (kept after the first ask)."""
    if not _REPLICA:
        try:
            from ray import serve

            rid = serve.get_replica_context().replica_id
            _REPLICA.append(f"{rid.deployment_id.name}#{rid.unique_id}")
        except Exception:  # noqa: BLE001 - outside a replica (unit tests)
            _REPLICA.append(f"pid-{os.getpid()}")
    return _REPLICA[0]


def replica_spans(parent: Span, trace: dict, model_attrs: dict, pre_attrs: dict | None = None) -> None:
    """The replica spans of one call from the times its answer carried (see the module docstring):
    ``maas.preprocess`` when the preprocessor's times came along, ``maas.model`` with ``maas.model.queue``
    and ``maas.model.forward`` (pull-batched models) or ``maas.model.generate`` (generators)."""
    pre = trace.get("pre")
    if pre:
        attrs = {**(pre_attrs or {}), "maas.batch.jobs": int(pre[2])}
        if len(pre) > 3:  # tokenized by the ingress itself (maas.preprocess.text.tokenize_timed)
            attrs["maas.deployment"] = str(pre[3])
        span = parent.child("maas.preprocess", pre[0], attrs)
        span.end(pre[1])
    arrived, start, end = trace["arrived"], trace["start"], trace["end"]
    model = parent.child("maas.model", arrived, {**model_attrs, "maas.replica": trace.get("replica", "")})
    model.child("maas.model.queue", arrived).end(start)
    if "first_token" in trace:
        gen = model.child("maas.model.generate", start, {"maas.steps": int(trace.get("steps", 0))})
        if trace["first_token"]:
            gen.events.append(("first_token", int(trace["first_token"]), {}))
            gen.attrs["maas.ttft_ms"] = round((trace["first_token"] - arrived) / 1e6, 3)
        gen.end(end)
    else:
        model.child("maas.model.forward", start, {"maas.batch.items": int(trace.get("items", 0)),
                                                  "maas.batch.requests": int(trace.get("requests", 0))}).end(end)
    model.end(max(end, trace.get("done", end)))


#: Operations → ``gen_ai.operation.name`` (OpenTelemetry GenAI semantic conventions).
_GEN_AI_OPERATIONS = {"embeddings": "embeddings", "completion": "text_completion",
                      "completion-stream": "text_completion", "chat": "chat", "chat-stream": "chat",
                      "text2text": "text_completion"}


def op_span(operation: str, model: str) -> Span | None:
    """The operation's span (``maas.<operation>``), child of the current span, set as current; None when the
    request is not traced. The caller ends it (:func:`end_op`). A server span remembers it, so the ingress's
    own time before and after it becomes ``maas.http.receive`` and ``maas.http.respond``."""
    parent = CURRENT.get() if _TRACER is not None else None
    if parent is None:
        return None
    span = parent.child(f"maas.{operation}", None, {"maas.operation": operation, "maas.model.requested": model})
    gen_ai = _GEN_AI_OPERATIONS.get(operation)
    if gen_ai is not None:  # OpenTelemetry's GenAI conventions, for the operations they name
        span.attrs["gen_ai.operation.name"] = gen_ai
        span.attrs["gen_ai.request.model"] = model
    try:
        from maas.tenants import CURRENT as TENANT

        tenant = TENANT.get()
        if tenant is not None:
            span.attrs["maas.tenant"] = tenant.id
    except ImportError:  # pragma: no cover - tenants is part of the package
        pass
    if parent.kind == SERVER:
        parent.op = span
    return span


def answered(span: Span, result: Any) -> None:
    """Who answered (a result's :class:`~maas.dataplane.types.Answered`) as the span's attributes."""
    a = getattr(result, "answered", None)
    if a is None:
        return
    span.attrs["maas.address"] = a.address
    span.attrs["maas.model.version"] = a.version
    if a.route_reason is not None:
        span.attrs["maas.route_reason"] = a.route_reason
    if a.demo_weights:
        span.attrs["maas.demo_weights"] = True
    if "gen_ai.operation.name" in span.attrs:
        span.attrs["gen_ai.response.model"] = a.address
        tokens = getattr(result, "prompt_tokens", None)
        if isinstance(tokens, int):
            span.attrs["gen_ai.usage.input_tokens"] = tokens
        choices = getattr(result, "choices", None)
        if choices:
            span.attrs["gen_ai.usage.output_tokens"] = sum(int(c.completion_tokens) for c in choices)


def end_op(span: Span, exc: BaseException | None = None) -> None:
    """End an operation span, failed by ``exc`` when given (a caller who left: ``maas.cancelled``)."""
    if cancelled(exc):
        span.attrs["maas.cancelled"] = True
    elif exc is not None:
        span.fail(exc)
    span.end()


def batch_spans(traced: list[tuple[Span, int]], jobs: int, items: int, dispatched_ns: int, answered_ns: int,
                attrs: dict, info: dict | None, pre_attrs: dict, error: tuple[str, int | None] | None = None) -> None:
    """The spans of one front batch (see the module docstring): per traced job its ``maas.front_batch.wait``;
    the batch's ``maas.front_batch`` under the first traced job, linked to every traced job's span, with the
    replica spans from the answers' ``trace``; ``maas.front_batch.ride`` for the others. Runs on the export
    thread (:meth:`Tracer.defer`).

    Args:
        traced: Per traced job: ``(its operation span, when it was queued, ns)``. jobs / items: The batch's.
        dispatched_ns / answered_ns: When the batch left and when its answers came back (wall clock, ns).
        attrs: The model's attributes (``maas.address``, ``maas.deployment``).
        info: The replica's times (a traced answer's ``trace``), or None.
        pre_attrs: The preprocessor's attributes. error: The batch's error (:func:`error_of`), when the call
            failed as a whole.
    """
    first = traced[0][0]
    batch = first.child("maas.front_batch", dispatched_ns, {**attrs, "maas.batch.jobs": jobs,
                                                             "maas.batch.items": items})
    batch.links = [(op.trace_id, op.span_id) for op, _ in traced]
    link = (batch.trace_id, batch.span_id)
    for op, enqueued_ns in traced:
        wait = op.child("maas.front_batch.wait", enqueued_ns)
        wait.links.append(link)
        wait.end(dispatched_ns)
        if op is not first:
            ride = op.child("maas.front_batch.ride", dispatched_ns, {"maas.batch.jobs": jobs})
            ride.links.append(link)
            ride.end(answered_ns)
    if error is not None:
        if error[0].endswith("CancelledError"):  # every caller in it left
            batch.attrs["maas.cancelled"] = True
        else:
            batch.fail(error)
    elif info is not None:
        replica_spans(batch, info, attrs, pre_attrs)
    batch.end(answered_ns)


def call_spans(call: Span, info: dict | None, error: tuple[str, int | None] | None, model_attrs: dict,
               pre_attrs: dict, end_ns: int) -> None:
    """End a generator call's span (``maas.call``) with the replica spans its answer's times give (on the export
    thread, :meth:`Tracer.defer`)."""
    if error is not None:
        call.fail(error)
    elif info is not None:
        replica_spans(call, info, model_attrs, pre_attrs)
    call.end(end_ns)


from maas.tracing.http import (  # noqa: E402 - it builds on the names above
    TracingMiddleware,
    handle_call,
    handle_stream,
    route_of,
    traced_handle,
)

__all__ = ["CURRENT", "Remote", "Span", "Tracer", "configure", "current", "encode_otlp", "exporter_for",
           "format_traceparent", "parse_traceparent", "replica_spans", "op_span", "end_op", "answered",
           "batch_spans", "call_spans", "error_of", "TracingMiddleware", "traced_handle", "route_of", "handle_call",
           "handle_stream", "replica_tag", "tracer", "use", "OtlpHttpExporter", "OtlpGrpcExporter", "SdkExporter",
           "INTERNAL", "SERVER", "CLIENT", "OK", "ERROR"]
