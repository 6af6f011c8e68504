"""One way to call a model: deadline, error mapping, latency record, front batching.

Every call the ingress makes to a model or preprocessor deployment goes through
:meth:`Calls.awaited` (the deadline and the error mapping) and every request through
:meth:`Calls.timed` (the per-request record: ``maas_requests`` by status, latency for ``auto``
and for the version's auto-rollback). One-forward operations go through a
:class:`~maas.batching.front.FrontBatcher` per (address, operation) (:meth:`Calls.batched`);
generation goes one call per request (:meth:`Calls.generate`, :meth:`Calls.stream`): each stream
needs its own call, and the generator replica batches what reaches it.

Batching settings come from one source, the model deployment's ``user_config`` (its spec's
``batching``, overridable in a serve config's ``deployments:``): the replica reports the settings
it runs with in ``info()``, and the ingress's front batcher follows them (refreshed at most every
:data:`SETTINGS_TTL_S`, without waiting on the request path).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

from ray.serve.handle import DeploymentHandle

from maas import metrics, tracing
from maas.batching.front import RETRY_AFTER_S, FrontBatcher
from maas.config import INGRESS_DEPLOYMENT, BatchingSpec, IngressSpec, ModelSpec, PoolModelSpec
from maas.dataplane.auto import LatencyBook
from maas.dataplane.traffic import Traffic
from maas.dataplane.watch import DeploymentWatch
from maas.errors import (
    InvalidRequest,
    MaasError,
    ModelNotFound,
    ModelNotReady,
    ModelTimeout,
    PayloadTooLarge,
    ServiceOverloaded,
    TaskNotSupported,
    unwrap,
)
from maas.preprocess.text import inline_chars, tokenize_timed
from maas.tenants import CURRENT, charge

logger = logging.getLogger("ray.serve.maas.dataplane")

#: How often, at most, the ingress asks a model for the batching settings it runs with, seconds.
SETTINGS_TTL_S = 2.0


@dataclass
class Route:
    """Where an address's requests go: its spec, its deployment handle, its shared preprocessor."""

    spec: ModelSpec
    model: DeploymentHandle
    pre: DeploymentHandle


class Calls:
    """The call path of one ingress replica (see the module docstring).

    Args:
        limits: The ingress's limits (``model_call_timeout_s``, item bounds).
        routes: Address → :class:`Route`.
        watch: Running replica counts (front batching keeps ``pipeline_depth`` batches per replica).
        traffic: The versions' traffic state (per-version records for auto-rollback).
        inline: Address → the tokenizer this replica holds for it (:meth:`preprocess`); none: every batch
            goes to the preprocessor deployment.
        inline_max_chars: The most characters of plain text a batch tokenized here holds
            (``tokenizers.inline_max_chars``).
    """

    def __init__(self, limits: IngressSpec, routes: dict[str, Route], watch: DeploymentWatch, traffic: Traffic,
                 inline: dict[str, Any] | None = None, inline_max_chars: int = 0):
        self.limits, self.routes, self.watch, self.traffic = limits, routes, watch, traffic
        # address → the TextTokenizer this replica tokenizes small batches with (see preprocess())
        self.inline, self.inline_max_chars = inline or {}, inline_max_chars
        self.inline_batches = 0  # batches (and generation requests) tokenized here, for stats()
        self.latency = LatencyBook()
        self._info: dict[str, dict] = {}
        self._settings: dict[str, tuple[BatchingSpec, float]] = {}  # address → (settings, monotonic time)
        self._refreshing: set[str] = set()
        self._batchers: dict[tuple[str, str], FrontBatcher] = {}
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ addresses

    def route(self, address: str, task: str) -> Route:
        """The route of ``address`` (a real model, not ``auto``) for ``task``.

        Raises:
            ModelNotFound: no such model. TaskNotSupported: the model does not offer ``task``.
        """
        route = self.routes.get(address)
        if route is None:
            raise ModelNotFound(f"model {address!r} does not exist; GET /v1/models lists the served models")
        if task not in route.spec.tasks:
            raise TaskNotSupported(
                f"model {address!r} ({route.spec.family}) does not offer {task}; it offers {list(route.spec.tasks)}")
        return route

    def check_items(self, n: int, param: str, limit: int | None = None, what: str = "items") -> None:
        """Raises PayloadTooLarge: ``n`` is over ``limit`` (default ``max_items_per_request``)."""
        limit = limit or self.limits.max_items_per_request
        if n > limit:
            raise PayloadTooLarge(f"{param} has {n} {what}; at most {limit} per request, split it", param=param)

    # ------------------------------------------------------------------ the one call path

    def domain_error(self, exc: BaseException, address: str) -> MaasError:
        """The domain error for an exception from a model or preprocessor call (by type; a 500
        for anything unexpected, logged without the request's content)."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError
        from ray.serve.exceptions import BackPressureError

        cause = unwrap(exc)
        if isinstance(cause, MaasError):
            return cause
        if isinstance(cause, BackPressureError):
            return ServiceOverloaded(f"model {address!r} is at capacity; retry after {RETRY_AFTER_S} s")
        if isinstance(cause, (ActorDiedError, ActorUnavailableError)):
            return ModelNotReady(f"model {address!r} lost its replica; retry")
        if isinstance(cause, asyncio.CancelledError):
            return ModelNotReady(f"the call to model {address!r} was cancelled; retry")
        # A bug: its type, a short message and where it was raised, so the log finds it (one 500 in a
        # full suite run said only "ValueError"). Inputs never reach this branch: bad input is a
        # MaasError (4xx) from the replica or the preprocessor, returned above.
        logger.error("model %s call failed with %s: %.200s", address, type(cause).__name__, cause,
                     exc_info=(type(cause), cause, cause.__traceback__))
        return MaasError(f"model {address!r} failed")  # 500: a bug, logged; the body hides the detail

    async def awaited(self, call: Awaitable, address: str, timeout_s: float | None = None,
                      timeout_error: Callable[[], MaasError] | None = None, cancel: Callable[[], Any] | None = None):
        """Await a model or preprocessor call (a ``DeploymentResponse`` or a coroutine) within
        ``timeout_s`` (default ``model_call_timeout_s``; ``inf`` for none), errors mapped by type.

        On the deadline or when our caller leaves, the call is cancelled on the replica
        (``cancel``, default the response's own ``cancel()``).

        Raises:
            ModelTimeout: past the deadline (``timeout_error()`` when given). MaasError: the
                mapped error. asyncio.CancelledError: our caller left.
        """
        timeout_s = self.limits.model_call_timeout_s if timeout_s is None else timeout_s
        cancel = cancel or getattr(call, "cancel", None)
        try:
            if timeout_s == float("inf"):
                return await call
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for wraps the call in a task of its own,
            # one more task and loop round per request (wait_for was ~5 % of the ingress's request path).
            async with asyncio.timeout(timeout_s):
                return await call
        except TimeoutError:  # asyncio.TimeoutError is TimeoutError since Python 3.11
            if cancel is not None:
                cancel()
            raise (timeout_error() if timeout_error else self.timeout_error(address)) from None
        except asyncio.CancelledError:  # our caller left (disconnect, Serve's request_timeout_s)
            if cancel is not None:
                cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - sorted by type in domain_error
            raise self.domain_error(exc, address) from None

    def timeout_error(self, address: str) -> ModelTimeout:
        return ModelTimeout(f"model {address!r} did not answer within {self.limits.model_call_timeout_s} s; "
                            "retry later or send less work per request")

    def deadline_s(self) -> float:
        """The wall-clock deadline of a request starting now (``model_call_timeout_s`` ahead)."""
        return time.time() + self.limits.model_call_timeout_s

    async def timed(self, address: str, operation: str, op: Callable[[str], Awaitable[Any]]) -> Any:
        """``await op(address)``, recorded once per request: ``maas_requests`` by status (499 when
        the caller left), and for answers the latency ``auto`` learns and the version's record
        that auto-rollback reads (5xx noted as errors)."""
        started = time.perf_counter()
        spec = self.routes[address].spec if address in self.routes else None
        status = 500
        try:
            out = await op(address)
            status = 200
            return out
        except MaasError as exc:
            status = int(exc.status_code)
            raise
        except asyncio.CancelledError:
            status = 499  # the caller left (nginx's code for it)
            raise
        finally:
            ms = 1000 * (time.perf_counter() - started)
            metrics.request(address, operation, status)
            if status == 200:
                self.latency.observe(address, ms)
                metrics.request_latency(address, ms)
            if spec is not None and status != 499 and (status == 200 or status >= 500):
                self.traffic.record(spec.name, spec.resolved_version, status >= 500, ms)

    # ------------------------------------------------------------------ model facts and settings

    async def info(self, route: Route) -> dict:
        """The model's static facts (limits, labels), asked once per address and kept."""
        address = route.spec.key
        if address not in self._info:
            info = await self.awaited(route.model.info.remote(), address)
            if info.get("partial"):  # a pool replica that could not read the model's facts yet: not kept
                raise ModelNotReady(f"model {address!r} is not ready yet (its limits are not known); retry after 1 s",
                                    retry_after_s=1)
            self.learn(address, info)
        return self._info[address]

    def known_info(self, address: str) -> dict:
        """The model's ``info()`` answer if one came already, else ``{}`` (never waits)."""
        return self._info.get(address, {})

    def learn(self, address: str, info: dict) -> None:
        """Keep a model's ``info()`` answer; its ``batching`` is the settings it runs with now, its
        ``warmup_ms`` the first latency ``auto`` knows for it (until requests are measured)."""
        if address not in self._info and info.get("warmup_ms") is not None and self.latency.recent_ms(address) is None:
            self.latency.observe(address, float(info["warmup_ms"]))
        if not info.get("partial"):
            self._info.setdefault(address, info)
        if isinstance(info.get("batching"), dict):
            settings = BatchingSpec.model_validate(info["batching"])
            self._settings[address] = (settings, time.monotonic())
            for (a, _), b in self._batchers.items():
                if a == address:
                    b.max_batch_items, b.max_forwards_per_call = settings.max_batch_size, settings.max_forwards_per_call

    def settings(self, address: str) -> BatchingSpec:
        """The batching settings ``address`` runs with (its replica's last report, else its spec's).
        A report older than :data:`SETTINGS_TTL_S` is refreshed in the background."""
        known = self._settings.get(address)
        if known is None or time.monotonic() - known[1] > SETTINGS_TTL_S:
            self._refresh(address)
        if known is not None:
            return known[0]
        route = self.routes.get(address)  # a repository model that left keeps its batcher's last settings
        return route.spec.batching if route is not None else BatchingSpec()

    def _refresh(self, address: str) -> None:
        if address in self._refreshing:
            return
        self._refreshing.add(address)

        async def ask():
            try:
                route = self.routes.get(address)
                if route is not None:
                    self.learn(address, await self.awaited(route.model.info.remote(), address, 5.0))
            except Exception:  # noqa: BLE001 - settings stay as known; readiness reports a dead model
                pass
            finally:
                self._refreshing.discard(address)

        task = asyncio.get_running_loop().create_task(ask())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ front batching

    def batcher(self, route: Route, operation: str) -> FrontBatcher:
        """The front batcher of (address, operation), made on first use."""
        shared = self.shared_heads(route)
        key = (f"{route.spec.deployment_name} head-only models", operation) if shared else (route.spec.key, operation)
        b = self._batchers.get(key)
        if b is not None:
            return b
        spec, address = route.spec, route.spec.key
        dep = spec.deployment_name
        label = key[0] if shared else address

        def dispatch(jobs):
            pre = self.preprocess(route, [j.payload for j in jobs], label)
            backlog = b.queued_items / max(1, self.watch.running(dep))
            call = shared if shared is not None else route.model
            return call.remote(pre, [j.params for j in jobs], [j.deadline_s for j in jobs], backlog_items=backlog)

        def max_inflight() -> int:
            depth = self.settings(address).pipeline_depth or (2 if spec.resources.num_gpus > 0 else 1)
            return depth * max(1, self.watch.running(dep))

        b = FrontBatcher(label, dispatch, lambda exc: self.domain_error(exc, label),
                         max_batch_items=self.settings(address).max_batch_size,
                         max_forwards_per_call=self.settings(address).max_forwards_per_call,
                         max_queued_items=spec.resolved_max_queued_items, max_inflight=max_inflight,
                         trace_attrs=({"maas.address": label, "maas.deployment": dep, "maas.operation": operation},
                                      {"maas.deployment": getattr(route.pre, "deployment_name", "")}))
        self._batchers[key] = b
        return b

    def preprocess(self, route: Route, payloads: list, label: str) -> Any:
        """The preprocessor's answer for ``payloads`` (a front batch's jobs, or one generation request's), to pass
        to the model call: the preprocessor deployment's ``DeploymentResponse`` (chained, resolved by Serve), or
        — for plain texts of at most ``inline_max_chars`` characters, when this replica holds the address's
        tokenizer — the :class:`~maas.batching.jobs.Preprocessed` tokenized right here (same function, same
        per-job 4xx errors), which saves the hops to the tokenizer deployment and back
        (``maas.config.TokenizerDeploymentSpec`` has the measured trade). ``label``: the metrics tag."""
        tokenizer = self.inline.get(route.spec.key) if self.inline else None
        if tokenizer is not None:
            chars = inline_chars(payloads)
            if chars is not None and chars <= self.inline_max_chars:
                self.inline_batches += 1
                return tokenize_timed(tokenizer, payloads, label, INGRESS_DEPLOYMENT)
        return route.pre.remote(payloads, model=label)

    async def batched(self, route: Route, operation: str, payload: Any, params: dict, items: int) -> Any:
        """One request through its front batcher; its own answer, or its error raised.

        Raises:
            ModelTimeout: no answer within ``model_call_timeout_s`` (the job is withdrawn).
        """
        b = self.batcher(route, operation)
        if self.shared_heads(route) is not None:
            params = {**params, "model": route.spec.key}  # the batch mixes models: each job names its own
        tenant = CURRENT.get()
        span = tracing.current()
        if span is not None:
            params = {**params, "trace": 1}  # the replicas return their times with the answer (maas.tracing)
        out = await self.awaited(b.submit(payload, params, items, self.deadline_s(), tenant, span), route.spec.key)
        if isinstance(out, dict):
            cost = out.pop("compute_s", None)  # the replica's time for this job (maas.batching.pull)
            if tenant is not None and cost is not None:
                charge(cost, items)
            if span is not None:
                out.pop("trace", None)
        return out

    @staticmethod
    def shared_heads(route: Route):
        """For a head-only repository model, its pool's ``heads`` handle method: one front batcher per
        pool and operation serves all of them (one tokenizer call, one pool call, one base forward on
        the replica for a batch that mixes them); else None."""
        # Not getattr(spec, "head", None): on a ModelSpec (no such field) that is pydantic's __getattr__
        # raising AttributeError, twice per request: ~17 µs of the in-process request path (docs/benchmarks.md).
        if not isinstance(route.spec, PoolModelSpec) or route.spec.head is None:
            return None
        return getattr(route.model, "heads", None)

    def forget(self, address: str) -> None:
        """Drop what is known about ``address`` (a repository model that left the routes): its facts
        and its idle front batchers. Its settings stay, and so does a batcher that still holds
        requests: those were routed before it left and are sent and answered (nothing lost); an
        idle one goes at the next ``forget``."""
        self._info.pop(address, None)
        for key in [k for k, b in self._batchers.items() if k[0] not in self.routes and b.idle]:
            del self._batchers[key]
        for gone in [a for a in self._settings if a not in self.routes and not any(k[0] == a for k in self._batchers)]:
            del self._settings[gone]

    def queued_items(self, address: str) -> int:
        """Items waiting in the front batchers of ``address``."""
        return sum(b.queued_items for (a, _), b in self._batchers.items() if a == address)

    def stats(self) -> dict:
        """Front batching records: ``{"address/operation": FrontBatcher.stats()}``."""
        return {f"{a}/{op}": b.stats() for (a, op), b in self._batchers.items()}

    # ------------------------------------------------------------------ generation (one call per request)

    async def generate(self, route: Route, job: Any, params: dict) -> dict:
        """One generation request: its tokenizer call chained into one generator call.

        Returns:
            The replica's result ``{"choices": [{"text", "finish_reason", "completion_tokens"}],
            "prompt_tokens": [int]}``.
        """
        address = route.spec.key
        tenant = CURRENT.get()
        if tenant is not None:
            params = {**params, "priority": tenant.priority}
        span = tracing.current()
        if span is not None:
            params = {**params, "trace": 1}
            call = span.child("maas.call", None, {"maas.address": address, "maas.deployment": route.spec.deployment_name})
        try:
            pre = self.preprocess(route, [job], address)  # after the call's span: a tokenizing here is inside it
            out = (await self.awaited(route.model.remote(pre, [params], [self.deadline_s()]), address))[0]
        except BaseException as exc:
            if span is not None:
                tracing.end_op(call, exc)
            raise
        if span is not None:
            self._traced_call(call, route, out)
        if isinstance(out, BaseException):
            raise out
        cost = out.pop("compute_s", None) if isinstance(out, dict) else None
        if tenant is not None:
            tokens = sum(out.get("prompt_tokens") or ()) + sum(c.get("completion_tokens", 0) for c in out["choices"])
            charge(cost or 0.0, len(out.get("prompt_tokens") or ()), tokens)
        return out

    async def stream(self, route: Route, job: Any, params: dict) -> AsyncIterator[dict]:
        """The generator's stream events for one request (see ``TextGenerator.stream``), domain
        errors raised by type; the call is cancelled on the replica when the caller stops reading."""
        address = route.spec.key
        tenant = CURRENT.get()
        if tenant is not None:
            params = {**params, "priority": tenant.priority}
        span = tracing.current()
        call = None
        if span is not None:
            params = {**params, "trace": 1}
            call = span.child("maas.call", None, {"maas.address": address, "maas.deployment": route.spec.deployment_name})
        gen = None
        failed: BaseException | None = None
        try:
            pre = self.preprocess(route, [job], address)  # after the call's span: a tokenizing here is inside it
            gen = route.model.options(stream=True).stream.remote(pre, params, self.deadline_s())
            async for event in gen:
                if "error" in event:  # refused before it started (see TextGenerator.stream)
                    raise event["error"]
                if event.get("done"):
                    if tenant is not None:
                        charge(event.get("compute_s") or 0.0, 1, event["prompt_tokens"] + event["completion_tokens"])
                    if call is not None:
                        self._traced_call(call, route, event)
                        call = None
                yield event
        except Exception as exc:  # noqa: BLE001 - mapped to the domain error
            failed = self.domain_error(exc, address)
            raise failed from None
        except BaseException as exc:
            failed = exc
            raise
        finally:
            if gen is not None:
                gen.cancel()  # stops generation on the replica when the caller went away
            if call is not None:
                tracing.end_op(call, failed or GeneratorExit())

    @staticmethod
    def _traced_call(call, route: Route, out: Any) -> None:
        """End a generation call's span with the replica spans its answer's times give (built on the tracer's
        export thread)."""
        info = out.pop("trace", None) if isinstance(out, dict) else None
        error = tracing.error_of(out) if isinstance(out, BaseException) else None
        t = tracing.tracer()
        if t is not None:
            t.defer(tracing.call_spans, call, info, error, {"maas.address": route.spec.key,
                                                             "maas.deployment": route.spec.deployment_name},
                    {"maas.deployment": getattr(route.pre, "deployment_name", "")}, time.time_ns())


def check_texts(texts: list[str], param: str = "input") -> list[str]:
    """Raises InvalidRequest: no text, or a blank one."""
    if not texts:
        raise InvalidRequest(f"{param} is an empty list; send at least one text", param=param)
    if any(not isinstance(t, str) or not t.strip() for t in texts):
        raise InvalidRequest(f"{param} holds an empty text; send non-blank text", param=param)
    return texts
