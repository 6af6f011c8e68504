"""The dataplane: every operation of the service, behind every protocol and handle.

Protocol modules (:mod:`maas.protocol.openai`, :mod:`maas.protocol.v2`, :mod:`maas.protocol.maas`)
parse and translate; handle methods of the ingress validate a dict; both then call one
:class:`Dataplane` operation, so HTTP and handles can never disagree. The dataplane resolves
the model name to a route (model handle + its shared preprocessor handle), checks the
request against the ingress limits, and sends the work:

* one-forward operations (embeddings, text and image classification) go through a
  :class:`~maas.dataplane.batcher.FrontBatcher` per (model, operation): concurrent requests
  become one preprocessor call chained into one model call;
* generation (completion, chat, text2text, streamed or not) goes one call per request: each
  stream needs its own call, a hop costs well under 1 % of a generation, and the generator
  replica batches what reaches it.

Operations return the response body as a dict of JSON types, except that embedding vectors
stay ``numpy.float32`` rows (the HTTP layer encodes them directly; handle methods turn them
into lists). Errors are :class:`~maas.errors.MaasError` subclasses, raised by type.

The dataplane holds no tensor code and imports no torch.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

import numpy as np
from ray.serve.handle import DeploymentHandle

from maas import metrics
from maas.config import AppConfig, ModelSpec
from maas.dataplane import auto
from maas.dataplane.traffic import Traffic, compare
from maas.dataplane.batcher import RETRY_AFTER_S, FrontBatcher
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
from maas.preprocess.text import TextJob

logger = logging.getLogger("ray.serve.maas.dataplane")

#: A readiness probe's answer is reused this long, seconds (bounds probe calls under frequent checks).
READY_PROBE_TTL_S = 0.1
#: How long the ingress waits for the routing-key table (``RoutingKeys``) before hashing the key, seconds.
KEY_TABLE_TIMEOUT_S = 1.0
#: A model whose probe takes longer than this, seconds, reads as not ready. Short because a call to
#: a replica that just died does not fail fast (Serve's router retries it until its replacement
#: runs); the probe runs on the replica's event loop beside the forward thread, so a busy replica
#: still answers within it (a full queue answers back-pressure, which counts as ready).
READY_PROBE_TIMEOUT_S = 0.5

_current: "Dataplane | None" = None


def set_current(dataplane: "Dataplane | None") -> None:
    """Make ``dataplane`` the one this process's routes use (the ingress replica sets it)."""
    global _current
    _current = dataplane


def current() -> "Dataplane":
    """This process's dataplane.

    Raises:
        ModelNotReady: none is set yet (the ingress is still starting).
    """
    if _current is None:
        raise ModelNotReady("the ingress is still starting; retry")
    return _current


def counted(operation: str):
    """Count each call of an operation in ``maas_requests`` by model and HTTP status."""
    def wrap(fn):
        @functools.wraps(fn)
        async def run(self, req, *args, **kwargs):
            model = req if isinstance(req, str) else getattr(req, "model", None)
            try:
                out = await fn(self, req, *args, **kwargs)
            except MaasError as exc:
                metrics.request(str(model), operation, int(exc.status_code))
                raise
            except asyncio.CancelledError:
                metrics.request(str(model), operation, 499)  # the caller left (nginx's code for it)
                raise
            except Exception:
                metrics.request(str(model), operation, 500)
                raise
            metrics.request(str(model), operation, 200)
            return out
        return run
    return wrap


def log_hints(req) -> None:
    """One log line naming the optional OpenAI hint fields a request set (never their values)."""
    hints = req.ignored_hints() if hasattr(req, "ignored_hints") else None
    if hints:
        logger.info("ignoring optional OpenAI hint fields %s", hints)


@dataclass
class Route:
    """Where a model's requests go: its spec, its deployment handle, its shared preprocessor."""

    spec: ModelSpec
    model: DeploymentHandle
    pre: DeploymentHandle


def usage(prompt: int, completion: int | None = None) -> dict:
    """OpenAI ``usage``: ``prompt_tokens``, ``total_tokens`` (and ``completion_tokens``)."""
    if completion is None:
        return {"prompt_tokens": prompt, "total_tokens": prompt}
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def generation_usage(out: dict) -> dict:
    return usage(sum(out["prompt_tokens"]), sum(c["completion_tokens"] for c in out["choices"]))


class Dataplane:
    """The service's operations over the model graph (see the module docstring).

    Args:
        config: The validated app config.
        models: Model name → model deployment handle.
        preprocessors: Model name → its (shared) preprocessor deployment handle.
        watch: Replica counts and deployment status (default: polled from Serve).
        keys: The ``RoutingKeys`` deployment's handle (apps with versions; see :mod:`maas.routing_keys`).
    """

    def __init__(self, config: AppConfig, models: dict[str, DeploymentHandle],
                 preprocessors: dict[str, DeploymentHandle], watch: DeploymentWatch | None = None,
                 keys: DeploymentHandle | None = None):
        self.config = config
        self.keys = keys
        self.limits = config.ingress
        # Keyed by each spec's address: ``name``, or ``name@version`` for a versioned spec.
        self.routes = {s.key: Route(s, models[s.key], preprocessors[s.key]) for s in config.models}
        self.watch = watch or DeploymentWatch([s.deployment_name for s in config.models],
                                              handles={s.deployment_name: models[s.key] for s in config.models})
        self.traffic = Traffic(config)
        self._shadows: set[asyncio.Task] = set()
        self._info: dict[str, dict] = {}
        self._ready: dict[str, tuple[bool, float]] = {}  # model -> (ready, monotonic time of the probe)
        self._batchers: dict[tuple[str, str], FrontBatcher] = {}
        self.created = int(time.time())
        self.latency = auto.LatencyBook()

    # ------------------------------------------------------------------ routing (``model: auto`` too)

    def budget_ms(self, budget_ms: float | None = None) -> float | None:
        """The request's latency budget: the body's field, else the ``X-Maas-Latency-Budget-Ms``
        header (see :data:`maas.dataplane.auto.routing_context`).

        Raises:
            InvalidRequest: the header is not a positive number.
        """
        if budget_ms is not None:
            return float(budget_ms)
        ctx = auto.routing_context.get()
        raw = ctx.get("budget_header") if ctx else None
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not value > 0 or value != value or value == float("inf"):
            raise InvalidRequest(f"X-Maas-Latency-Budget-Ms must be a positive number of milliseconds, got {raw!r}",
                                 param="X-Maas-Latency-Budget-Ms")
        return value

    def queued_items(self, name: str) -> int:
        return sum(b.queued_items for (m, _), b in self._batchers.items() if m == name)

    def predict_ms(self, name: str) -> float | None:
        """The model's predicted latency now (see :mod:`maas.dataplane.auto`), ms."""
        spec = self.routes[name].spec
        return self.latency.predict(name, self.queued_items(name), spec.batching.max_batch_size,
                                    max(1, self.watch.running(spec.deployment_name)))

    async def auto_plan(self, task: str, budget_ms: float | None) -> list[auto.Choice]:
        """The ready models serving ``task``, in the order ``auto`` tries them.

        Raises:
            TaskNotSupported: no model serves ``task``. ModelNotReady: none is ready.
        """
        names = [n for n, r in self.routes.items() if task in r.spec.tasks and self.takes_traffic(n)]
        if not names:
            raise TaskNotSupported(f"no served model offers {task}, so model 'auto' cannot choose one")
        real = [n for n in names if not self.routes[n].spec.is_demo]
        names = real or names  # demo weights only when nothing real serves the task
        ready = await asyncio.gather(*(self.model_ready(n) for n in names))
        live = [(n, self.predict_ms(n), self.routes[n].spec.quality) for n, ok in zip(names, ready) if ok]
        if not live:
            raise ModelNotReady(f"none of the models serving {task} ({', '.join(names)}) is ready; retry")
        return auto.plan(live, budget_ms, self.limits.auto_policy)

    def note_route(self, body: Any, name: str, reason: str) -> None:
        """Say which model ``auto`` chose and why: in the body (``routing``) and, for HTTP, in
        the ``X-Maas-Routed-Model`` / ``X-Maas-Route-Reason`` response headers."""
        ctx = auto.routing_context.get()
        if ctx is not None:
            ctx.update(routed_model=name, route_reason=reason)
        if isinstance(body, dict):
            body["routing"] = {"model": name, "reason": reason}

    def stamp(self, body: Any, key: str) -> None:
        """Say which model version answered: ``model`` (the name) and ``model_version`` in the body,
        and, for HTTP, the ``X-Maas-Model-Version`` response header."""
        spec = self.routes[key].spec
        ctx = auto.routing_context.get()
        if ctx is not None:
            ctx["model_version"] = spec.resolved_version
        if isinstance(body, dict):
            body["model"] = spec.name
            body["model_version"] = spec.resolved_version

    def takes_traffic(self, key: str) -> bool:
        """Whether the traffic policy gives this spec a weight above 0 (unpinned requests reach it)."""
        spec = self.routes[key].spec
        return dict(self.traffic.weights(spec.name)).get(spec.resolved_version, 0.0) > 0

    def routing_key(self, user: str | None = None) -> str | None:
        """The request's sticky routing key: the ``X-Maas-Routing-Key`` header, else ``user`` (the OpenAI
        field or a handle argument), else the API key, else None (random per request)."""
        ctx = auto.routing_context.get() or {}
        return ctx.get("routing_key") or user or ctx.get("api_key")

    async def resolve(self, model: str, routing_key: str | None = None) -> str:
        """The address (``name`` or ``name@version``) that serves a request for ``model``: pinned with
        ``name@version``, else chosen by the name's traffic policy (see :mod:`maas.dataplane.traffic`).

        Raises:
            ModelNotFound: unknown name or version. ModelNotReady: no version with traffic weight is ready.
        """
        route = self.routes.get(model)
        if route is not None and route.spec.version is None:
            return model  # an unversioned model: nothing to choose
        name, version = self.traffic.address(model)
        if version is not None:
            key = self.traffic.key_of(name, version)
            if len(self.traffic.specs[name]) > 1 and not await self.model_ready(key):
                dep = self.routes[key].spec.deployment_name
                raise ModelNotReady(f"version {version} of model {name!r} is not ready ({self.watch.reason(dep)}); "
                                    f"retry, or address {name!r} to let the traffic policy choose a ready version")
            return key
        specs = self.traffic.specs[name]
        weighted = [v for v, w in self.traffic.weights(name) if w > 0]
        checks = await asyncio.gather(*(self.model_ready(self.traffic.key_of(name, v)) for v in weighted))
        assigned = None
        if routing_key is not None and len(weighted) > 1:
            assigned = await self.assigned_version(name, routing_key)
        chosen = self.traffic.choose(name, routing_key, dict(zip(weighted, checks)), assigned)
        if chosen is None:
            raise ModelNotReady(f"no version of model {name!r} that takes traffic is ready (weights "
                                f"{dict(self.traffic.weights(name))}; versions {[s.resolved_version for s in specs]}); "
                                "retry, or pin a ready one with model 'name@version'")
        return self.traffic.key_of(name, chosen)

    async def assigned_version(self, name: str, routing_key: str) -> str | None:
        """The KeyTable's version for ``routing_key`` (remembered by this replica after the first
        ask), or None when the ``RoutingKeys`` deployment does not answer within
        :data:`KEY_TABLE_TIMEOUT_S` (the key is then hashed; see :mod:`maas.dataplane.traffic`)."""
        version = self.traffic.assigned.get((name, routing_key))
        if version is not None or self.keys is None:
            return version
        weights = self.traffic.weights(name)
        try:
            version = await asyncio.wait_for(self.keys.assign.remote(name, routing_key, weights),
                                             timeout=KEY_TABLE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - hashing is the fallback
            logger.warning("routing-key table did not answer (%s); hashing the key", type(exc).__name__)
            return None
        if self.traffic.weights(name) == weights:  # not a stale answer across a policy change
            self.traffic.remember(name, routing_key, version)
        return version

    async def timed(self, key: str, op):
        """``await op(key)``: its latency learnt for ``auto`` and recorded per version (successful
        answers), 5xx answers noted for the auto-rollback."""
        started = time.perf_counter()
        spec = self.routes[key].spec if key in self.routes else None
        try:
            out = await op(key)
        except MaasError as exc:
            if spec is not None and int(exc.status_code) >= 500:
                self.traffic.record(spec.name, spec.resolved_version, True, 1000 * (time.perf_counter() - started))
            raise
        except asyncio.CancelledError:
            raise
        except Exception:
            if spec is not None:
                self.traffic.record(spec.name, spec.resolved_version, True, 1000 * (time.perf_counter() - started))
            raise
        ms = 1000 * (time.perf_counter() - started)
        self.latency.observe(key, ms)
        metrics.request_latency(key, ms)
        if spec is not None:
            self.traffic.record(spec.name, spec.resolved_version, False, ms)
        return out

    async def routed(self, name: str, task: str, op, budget_ms: float | None = None, user: str | None = None,
                     shadow: bool = True):
        """Run ``op(address)`` for model ``name``: a version chosen by the traffic policy (or pinned),
        a shadow copy when the policy asks for one; for ``auto`` on the planned models in turn,
        skipping one that is not ready or at capacity (the answer then says ``failover-from``).
        ``user``: a routing key from the request body (see :meth:`routing_key`)."""
        if name != auto.AUTO:
            key = await self.resolve(name, self.routing_key(user))
            body = await self.timed(key, op)
            self.stamp(body, key)
            spec = self.routes[key].spec
            if shadow and spec.version is not None and "@" not in name:
                self.shadow(spec.name, spec.resolved_version, op, body)
            return body
        skipped: list[str] = []
        last: MaasError | None = None
        for choice in await self.auto_plan(task, self.budget_ms(budget_ms)):
            try:
                body = await self.timed(choice.name, op)
            except (ModelNotReady, ServiceOverloaded) as exc:
                skipped.append(choice.name)
                last = exc
                continue
            reason = choice.reason + (f";failover-from={','.join(skipped)}" if skipped else "")
            self.note_route(body, choice.name, reason)
            self.stamp(body, choice.name)
            return body
        assert last is not None
        raise last

    def shadow(self, name: str, chosen: str, op, primary: Any) -> None:
        """Copy the request to the policy's shadow version in the background (see
        :mod:`maas.dataplane.traffic`); the caller's answer never waits for it."""
        version = self.traffic.shadow_for(name, chosen)
        if version is None:
            return
        key = self.traffic.key_of(name, version)

        async def run():
            self.traffic.shadow_in_flight[key] = self.traffic.shadow_in_flight.get(key, 0) + 1
            try:
                answer = await op(key)
                result = "agree" if compare(primary, answer) else "disagree"
            except Exception:  # noqa: BLE001 - a failing shadow is counted, never raised
                result = "error"
            finally:
                self.traffic.shadow_in_flight[key] -= 1
            self.traffic.count_shadow(name, version, result)

        task = asyncio.get_running_loop().create_task(run())
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    @staticmethod
    def check_cascade(model: str) -> None:
        """Raises InvalidRequest: a cascade asks the router to choose, so it needs ``model: auto``."""
        if model != auto.AUTO:
            raise InvalidRequest(f"cascade needs model 'auto' (the router picks the models it steps through); "
                                 f"got model {model!r}", param="cascade")

    async def cascaded(self, task: str, op, threshold: float, budget_ms: float | None = None):
        """Confidence cascade for a classification with ``model: auto``: the fastest ready model
        first (within the budget when one fits), then, while the lowest top-1 score over the
        inputs is below ``threshold``, the next better model if its predicted latency fits the
        budget left. Answers with the last model asked; ``cascade`` lists the steps."""
        budget = self.budget_ms(budget_ms)
        choices = await self.auto_plan(task, budget)
        by_speed = sorted(choices, key=lambda c: float("inf") if c.predicted_ms is None else c.predicted_ms)
        fitting = [c for c in by_speed if budget is None or c.predicted_ms is None or c.predicted_ms <= budget]
        current = (fitting or by_speed)[0]
        started = time.perf_counter()
        steps: list[dict] = []
        body = None
        while True:
            t0 = time.perf_counter()
            body = await self.timed(current.name, op)
            score = min(d["top_k"][0]["score"] for d in body["data"])
            steps.append({"model": current.name, "top1_score": round(float(score), 4),
                          "latency_ms": round(1000 * (time.perf_counter() - t0), 1)})
            if score >= threshold:
                break
            spent = 1000 * (time.perf_counter() - started)
            nxt = next((c for c in auto.escalations(choices, current)
                        if budget is None or c.predicted_ms is None or spent + c.predicted_ms <= budget), None)
            if nxt is None:
                break
            current = nxt
        reason = (f"cascade;threshold={threshold};steps={'>'.join(s['model'] for s in steps)}"
                  + (f";budget={auto._budget(budget)}" if budget is not None else ""))
        self.note_route(body, current.name, reason)
        body["cascade"] = steps
        return body


    def route(self, name: str, task: str) -> Route:
        """The route of model ``name`` (a real model, not ``auto``) for ``task``.

        Raises:
            ModelNotFound: no such model. TaskNotSupported: the model does not offer ``task``.
        """
        route = self.routes.get(name)
        if route is None:
            raise ModelNotFound(f"model {name!r} does not exist; GET /v1/models lists the served models")
        if task not in route.spec.tasks:
            raise TaskNotSupported(
                f"model {name!r} ({route.spec.family}) does not offer {task}; it offers {list(route.spec.tasks)}"
            )
        return route

    def domain_error(self, exc: BaseException, name: str) -> MaasError:
        """Map an exception from a model or preprocessor call to the domain error to raise."""
        from ray.serve.exceptions import BackPressureError

        cause = unwrap(exc)
        if isinstance(cause, MaasError):
            return cause
        if isinstance(cause, BackPressureError):
            return ServiceOverloaded(f"model {name!r} is at capacity; retry after {RETRY_AFTER_S} s")
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        if isinstance(cause, (ActorDiedError, ActorUnavailableError)):
            return ModelNotReady(f"model {name!r} lost its replica; retry")
        if isinstance(cause, asyncio.CancelledError):
            return ModelNotReady(f"the call to model {name!r} was cancelled; retry")
        logger.error("model %s call failed with %s", name, type(cause).__name__)
        return MaasError(f"model {name!r} failed")  # 500: a bug, logged; the body hides the detail

    def timeout_error(self, name: str) -> ModelTimeout:
        return ModelTimeout(f"model {name!r} did not answer within {self.limits.model_call_timeout_s} s; "
                            "retry later or send less work per request")

    async def call(self, response, name: str):
        """Await a model call; map errors by type; past ``model_call_timeout_s`` cancel it on the
        replica and raise :class:`ModelTimeout` (504)."""
        try:
            return await asyncio.wait_for(response, timeout=self.limits.model_call_timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise self.timeout_error(name) from None
        except asyncio.CancelledError:  # our caller left (disconnect, Serve's request_timeout_s)
            response.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - sorted by type in domain_error
            raise self.domain_error(exc, name) from None

    def deadline_s(self) -> float:
        """The wall-clock deadline of a request starting now (``model_call_timeout_s`` ahead)."""
        return time.time() + self.limits.model_call_timeout_s

    async def info(self, route: Route) -> dict:
        """The model's static facts (limits, labels), asked once per model and kept."""
        name = route.spec.key
        if name not in self._info:
            self._info[name] = await self.call(route.model.info.remote(), name)
        return self._info[name]

    def check_items(self, n: int, param: str, limit: int | None = None, what: str = "items") -> None:
        limit = limit or self.limits.max_items_per_request
        if n > limit:
            raise PayloadTooLarge(f"{param} has {n} {what}; at most {limit} per request, split it", param=param)

    # ------------------------------------------------------------------ front batching

    def batcher(self, route: Route, operation: str) -> FrontBatcher:
        key = (route.spec.key, operation)
        b = self._batchers.get(key)
        if b is None:
            spec = route.spec
            name = spec.key

            def dispatch(jobs):
                pre = route.pre.remote([j.payload for j in jobs], model=name)
                backlog = b.queued_items / max(1, self.watch.running(spec.deployment_name))
                return route.model.remote(pre, [j.params for j in jobs], [j.deadline_s for j in jobs],
                                          backlog_items=backlog)

            b = FrontBatcher(
                name, dispatch, lambda exc: self.domain_error(exc, name),
                max_batch_items=spec.batching.max_batch_size,
                max_queued_items=spec.resolved_max_queued_items,
                max_inflight=lambda: spec.resolved_pipeline_depth * max(1, self.watch.running(spec.deployment_name)),
            )
            self._batchers[key] = b
        return b

    async def batched(self, route: Route, operation: str, payload: Any, params: dict, items: int) -> Any:
        """One request through the model's front batcher; its own answer, or its error raised.

        Raises:
            ModelTimeout: no answer within ``model_call_timeout_s`` (the job is withdrawn).
        """
        b = self.batcher(route, operation)
        try:
            return await asyncio.wait_for(b.submit(payload, params, items, self.deadline_s()),
                                          timeout=self.limits.model_call_timeout_s)
        except asyncio.TimeoutError:
            raise self.timeout_error(route.spec.key) from None

    def stats(self) -> dict:
        """Front batching records: ``{"model/operation": FrontBatcher.stats()}``."""
        return {f"{m}/{op}": b.stats() for (m, op), b in self._batchers.items()}

    # ------------------------------------------------------------------ models and readiness

    async def model_ready(self, name: str) -> bool:
        """Whether the model can answer now: its router knows a running replica and one of them
        answered a live probe (a cheap ``info`` call, at most every ``READY_PROBE_TTL_S``).

        The probe is what makes a lost replica visible within a second: the router drops a
        replica the moment a call finds it dead, before the controller notices. A replica that
        is merely busy still answers the probe (it runs on the replica's event loop, beside the
        forward thread); one whose queue is full (back-pressure) counts as ready.
        """
        from ray.serve.exceptions import BackPressureError

        route = self.routes[name]
        dep = route.spec.deployment_name
        if self.watch.known_for(dep) and not self.watch.running(dep):
            return False
        cached = self._ready.get(name)
        now = time.monotonic()
        if cached is not None and now - cached[1] < READY_PROBE_TTL_S:
            return cached[0]
        try:
            await asyncio.wait_for(self.info(route), timeout=5.0)  # loaded once (static facts kept)
            await self.call_with_timeout(route.model.info.remote(), READY_PROBE_TIMEOUT_S)
            ok = True
        except BackPressureError:
            ok = True
        except Exception as exc:  # noqa: BLE001 - any other failure means not ready
            ok = isinstance(unwrap(exc), BackPressureError)
        if ok and self.watch.known_for(dep) and not self.watch.running(dep):
            ok = False  # the probe itself found the last replica dead
        self._ready[name] = (ok, time.monotonic())
        return ok

    @staticmethod
    async def call_with_timeout(response, timeout_s: float):
        try:
            return await asyncio.wait_for(response, timeout=timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise

    async def list_models(self) -> dict:
        """All served models with family, tasks, weights source and readiness (``/v1/models`` body).

        One card per model name, described by its default version (the one with the highest traffic
        weight); ``versions`` lists every version with its address (``id``: ``name@version``), weight,
        readiness and whether it is the default. ``ready``: some version that takes traffic is ready.
        """
        keys = list(self.routes)
        ready = dict(zip(keys, await asyncio.gather(*(self.model_ready(k) for k in keys))))
        if not all(ready.values()):
            await self.watch.refresh()
        cards = []
        for name, specs in self.traffic.specs.items():
            weights = dict(self.traffic.weights(name))
            default = self.traffic.default_version(name)
            spec = next(s for s in specs if s.resolved_version == default)
            serving = [s for s in specs if weights[s.resolved_version] > 0]
            name_ready = any(ready[s.key] for s in serving)
            card = {"id": name, "object": "model", "created": self.created, "owned_by": "maas", "family": spec.family,
                    "tasks": list(spec.tasks), "weights": spec.weights_label(), "demo_weights": spec.is_demo,
                    "ready": name_ready, "deployment": spec.deployment_name, "quality": spec.quality,
                    "quality_source": spec.quality_source, "latency_estimate_ms":
                        None if (p := self.predict_ms(spec.key)) is None else round(p, 1),
                    "version": default}
            described = self.traffic.describe(name)
            card["versions"] = [
                {"id": f"{name}@{s.resolved_version}", "version": s.resolved_version, "deployment": s.deployment_name,
                 "ready": ready[s.key], "weights": s.weights_label(), "demo_weights": s.is_demo,
                 **described.get(s.resolved_version, {}),
                 **({} if ready[s.key] else {"status_message": self.watch.reason(s.deployment_name)})}
                for s in specs]
            if not name_ready:
                card["status_message"] = "; ".join(self.watch.reason(s.deployment_name) for s in serving or specs)
            cards.append(card)
        return {"object": "list", "data": cards}

    async def readiness(self) -> dict:
        """``{"ready", "models": {address: bool}, "reasons"?: {address: message}, "traffic"?, "traffic_error"?}``.

        ``ready`` is true when every model name can serve: some version with traffic weight is ready.
        A version that is not ready is listed in ``reasons`` (with where its share goes) but does not
        make the service unready while another version of its name serves; ``traffic`` shows each
        versioned name's weights, default, rollbacks and shadow counts.
        """
        keys = list(self.routes)
        ready = dict(zip(keys, await asyncio.gather(*(self.model_ready(k) for k in keys))))
        if not all(ready.values()):
            await self.watch.refresh()
        body: dict = {"models": ready}
        reasons: dict[str, str] = {}
        names_ok = True
        traffic: dict = {}
        for name, specs in self.traffic.specs.items():
            weights = dict(self.traffic.weights(name))
            up = [s.resolved_version for s in specs if weights[s.resolved_version] > 0 and ready[s.key]]
            names_ok = names_ok and bool(up)
            for s in specs:
                if ready[s.key]:
                    continue
                why = self.watch.reason(s.deployment_name)
                if len(specs) > 1 and weights[s.resolved_version] > 0:
                    why += (f"; version {s.resolved_version} takes no traffic, its share goes to version(s) {up}"
                            if up else f"; no version of {name!r} that takes traffic is ready")
                reasons[s.key] = why
            if len(specs) > 1 or name in self.traffic.policies:
                traffic[name] = self.traffic.describe(name)
        body = {"ready": names_ok, **body}
        if reasons:
            body["reasons"] = reasons
        if traffic:
            body["traffic"] = traffic
        if self.traffic.error:
            body["traffic_error"] = self.traffic.error
        return body

    # ------------------------------------------------------------------ one-forward operations (front batched)

    async def embed(self, req) -> dict:
        """OpenAI embeddings (texts or token arrays); inputs over the model's limit are truncated.

        Args:
            req: :class:`~maas.protocol.openai.EmbeddingRequest` (``model`` may be ``auto``).

        Returns:
            The embeddings body; each ``embedding`` a ``float32`` (D,) array, or base64 text.
        """
        return await self.routed(req.model, "embeddings", lambda name: self._embed(name, req), user=req.user)

    @counted("embeddings")
    async def _embed(self, name: str, req) -> dict:
        route = self.route(name, "embeddings")
        log_hints(req)
        texts = req.texts()
        rows = texts if texts is not None else req.token_arrays()
        self.check_items(len(rows), "input")
        info = await self.info(route)
        if req.dimensions is not None and req.dimensions != info["dimensions"]:
            raise InvalidRequest(
                f"model {name!r} returns {info['dimensions']}-dimensional embeddings and cannot shorten "
                f"them; omit dimensions or set it to {info['dimensions']}",
                param="dimensions",
            )
        job = TextJob("texts" if texts is not None else "ids", rows, max_length=info["max_input_tokens"])
        out = await self.batched(route, "embeddings", job, {"task": "embeddings"}, len(rows))
        vectors = np.asarray(out["embeddings"], dtype="<f4")
        as_b64 = req.encoding_format == "base64"
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.tobytes()).decode() if as_b64 else v}
                for i, v in enumerate(vectors)]
        n = int(sum(out["num_tokens"]))
        return {"object": "list", "data": data, "model": name, "usage": usage(n),
                "demo_weights": route.spec.is_demo}

    async def classify_text(self, req) -> dict:
        """Text classification with a sequence-classification head; inputs truncated to the limit.
        ``model: auto`` takes ``latency_budget_ms`` and ``cascade`` (see :meth:`cascaded`)."""
        budget = getattr(req, "latency_budget_ms", None)
        cascade = getattr(req, "cascade", None)
        op = lambda name: self._classify_text(name, req)  # noqa: E731
        if cascade is not None:
            self.check_cascade(req.model)
            return await self.cascaded("text-classification", op, cascade.threshold, budget)
        return await self.routed(req.model, "text-classification", op, budget)

    @counted("text-classification")
    async def _classify_text(self, name: str, req) -> dict:
        route = self.route(name, "text-classification")
        texts = self._texts(req.input)
        info = await self.info(route)
        job = TextJob("texts", texts, max_length=info["max_input_tokens"])
        out = await self.batched(route, "text-classification", job,
                                 {"task": "text-classification", "top_k": req.top_k}, len(texts))
        n = int(sum(out["num_tokens"]))
        return {"object": "list", "model": name, "demo_weights": route.spec.is_demo,
                "data": [{"index": i, "top_k": r["top_k"]} for i, r in enumerate(out["results"])],
                "usage": usage(n)}

    async def classify_images(self, model: str, images: list, top_k: int = 5, latency_budget_ms: float | None = None,
                              cascade_threshold: float | None = None, routing_key: str | None = None) -> dict:
        """Encoded files (bytes) or decoded ``uint8`` (H, W, 3) arrays → classification body.
        ``model`` may be ``auto`` (with an optional budget, ms, and confidence cascade) or
        ``name@version``; ``routing_key`` keeps one caller on one version (see :meth:`routing_key`)."""
        op = lambda name: self._classify_images(name, images, top_k)  # noqa: E731
        if cascade_threshold is not None:
            self.check_cascade(model)
            return await self.cascaded("image-classification", op, cascade_threshold, latency_budget_ms)
        return await self.routed(model, "image-classification", op, latency_budget_ms, user=routing_key)

    @counted("image-classification")
    async def _classify_images(self, model: str, images: list, top_k: int = 5) -> dict:
        route = self.route(model, "image-classification")
        if not images:
            raise InvalidRequest("no images in the request; send at least one", param="images")
        self.check_items(len(images), "images", self.limits.max_images_per_request)
        limit = self.limits.max_image_bytes
        for i, b in enumerate(images):
            size = len(b) if isinstance(b, (bytes, bytearray)) else b.nbytes
            if size > (limit if isinstance(b, (bytes, bytearray)) else 4 * limit):
                raise PayloadTooLarge(f"images[{i}] is {size} bytes; the limit is {limit} bytes", param=f"images[{i}]")
        out = await self.batched(route, "image-classification", list(images), {"top_k": top_k}, len(images))
        return {"object": "list", "model": model, "demo_weights": route.spec.is_demo,
                "data": [{"index": i, "top_k": r["top_k"]} for i, r in enumerate(out["results"])]}

    def _texts(self, value: str | list[str], limit: int | None = None) -> list[str]:
        texts = [value] if isinstance(value, str) else list(value)
        if not texts:
            raise InvalidRequest("input is an empty list; send at least one text", param="input")
        if any(not t.strip() for t in texts):
            raise InvalidRequest("input holds an empty text; send non-blank text", param="input")
        self.check_items(len(texts), "input", limit)
        return texts

    # ------------------------------------------------------------------ explanations (on the model's replica)

    async def awaited(self, response, name: str):
        """Await a model or preprocessor call with no deadline of its own; errors mapped by type."""
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - sorted by type in domain_error
            raise self.domain_error(exc, name) from None

    async def within_explain_timeout(self, spec: ModelSpec, coro):
        """``await coro`` within the model's ``explain_timeout_s``; past it the calls are cancelled.

        Raises:
            ModelTimeout: the explanation took longer (504).
        """
        try:
            return await asyncio.wait_for(coro, timeout=spec.explain_timeout_s)
        except asyncio.TimeoutError:
            raise ModelTimeout(f"model {spec.key!r} did not finish the explanation within explain_timeout_s "
                               f"({spec.explain_timeout_s:g} s); retry later") from None

    async def explain_image(self, model: str, image, target=None, view: str = "full", seed: int = 0,
                            overlay: bool = True) -> dict:
        """Grad-CAM of an image classifier for one image (bytes or ``uint8`` (H, W, 3)), mapped onto the
        original image (see :mod:`maas.dataplane.explain`), with its faithfulness score.

        Raises:
            InvalidRequest: bad view, target or image. PayloadTooLarge: the image is over the limit.
            ServiceOverloaded: the replica is computing ``max_concurrent_explanations`` already.
            ModelTimeout: over ``explain_timeout_s``.
        """
        if view not in ("full", "served"):
            raise InvalidRequest(f"view must be 'full' or 'served', got {view!r}", param="view")
        return await self.routed(model, "image-classification",
                                 lambda key: self._explain_image(key, image, target, view, seed, overlay), shadow=False)

    @counted("explain-image")
    async def _explain_image(self, key: str, image, target, view: str, seed: int, overlay: bool) -> dict:
        from maas.dataplane.explain import OVERLAY_MAX_PX, render_image

        route = self.route(key, "image-classification")
        spec = route.spec
        size = len(image) if isinstance(image, (bytes, bytearray)) else getattr(image, "nbytes", 0)
        if size > self.limits.max_image_bytes * (1 if isinstance(image, (bytes, bytearray)) else 4):
            raise PayloadTooLarge(f"the image is {size} bytes; the limit is {self.limits.max_image_bytes} bytes",
                                  param="image")

        async def run():
            view_data = await self.awaited(
                route.pre.explain_view.remote(image, view, OVERLAY_MAX_PX if overlay else None), key)
            deadline = time.time() + spec.explain_timeout_s
            result = await self.awaited(route.model.explain.remote(view_data, {"target": target, "seed": seed},
                                                                   deadline), key)
            return view_data, result

        started = time.perf_counter()
        view_data, result = await self.within_explain_timeout(spec, run())
        rendered = await asyncio.to_thread(render_image, result, view_data)
        return {"object": "explanation", "model": key, "method": result["method"], "layer": result["layer"],
                "view": view, "target": result["target"], "top_k": result["top_k"],
                "faithfulness": result["faithfulness"], **rendered,
                "latency_ms": round(1000 * (time.perf_counter() - started), 1), "demo_weights": spec.is_demo}

    async def explain_text(self, req) -> dict:
        """Token attributions (Integrated Gradients) mapped to character offsets: one text for a text
        classifier's ``target``, two texts for an embeddings model's similarity.

        Args:
            req: :class:`~maas.protocol.maas.ExplainTextRequest`.
        """
        texts = req.texts()
        task = "text-classification" if len(texts) == 1 else "embeddings"
        return await self.routed(req.model, task, lambda key: self._explain_text(key, texts, req), shadow=False)

    @counted("explain-text")
    async def _explain_text(self, key: str, texts: list[str], req) -> dict:
        route = self.route(key, "text-classification" if len(texts) == 1 else "embeddings")
        spec = route.spec
        info = await self.info(route)

        async def run():
            tokens = await self.awaited(route.pre.explain_tokens.remote(texts, info["max_input_tokens"]), key)
            deadline = time.time() + spec.explain_timeout_s
            return await self.awaited(route.model.explain.remote(tokens, {"target": req.target, "seed": req.seed},
                                                                 deadline), key)

        started = time.perf_counter()
        result = await self.within_explain_timeout(spec, run())
        body = {"object": "explanation", "model": key, "method": result["method"], "kind": result["kind"],
                "texts": [{"text": t, **r} for t, r in zip(texts, result["texts"])],
                "latency_ms": round(1000 * (time.perf_counter() - started), 1), "demo_weights": spec.is_demo}
        if "target" in result:
            body["target"] = result["target"]
        if "similarity" in result:
            body["similarity"] = result["similarity"]
        return body

    # ------------------------------------------------------------------ generation (one call per request)

    def _prompt_job(self, req) -> TextJob:
        """The tokenizer job of a completion or chat request (never truncated)."""
        limit = self.limits.max_prompts_per_request
        if hasattr(req, "messages"):
            self.check_items(req.choices, "n", limit)
            return TextJob("chat", req.plain_messages())
        prompts = req.prompts()
        self.check_items(len(prompts) * req.choices, "prompt", limit, "prompts × n")
        if req.prompt_is_tokens:
            return TextJob("ids", prompts, max_length=None)
        return TextJob("texts", prompts, max_length=None, truncate=False, add_special_tokens=False)

    async def generate(self, route: Route, job: TextJob, params: dict) -> dict:
        """One generation request: tokenizer call chained into one generator call."""
        name = route.spec.key
        pre = route.pre.remote([job], model=name)
        out = (await self.call(route.model.remote(pre, [params], [self.deadline_s()]), name))[0]
        if isinstance(out, BaseException):
            raise out
        return out

    async def complete(self, req) -> dict:
        """OpenAI completions, not streamed. Over-long prompts are rejected, not truncated."""
        return await self.routed(req.model, "completion", lambda name: self._complete(name, req), user=req.user)

    @counted("completion")
    async def _complete(self, name: str, req) -> dict:
        route = self.route(name, "completion")
        log_hints(req)
        out = await self.generate(route, self._prompt_job(req), req.to_params())
        choices = [{"text": c["text"], "index": i, "logprobs": None, "finish_reason": c["finish_reason"]}
                   for i, c in enumerate(out["choices"])]
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name, "choices": choices, "usage": generation_usage(out),
                "demo_weights": route.spec.is_demo}

    async def chat(self, req) -> dict:
        """OpenAI chat completions, not streamed."""
        return await self.routed(req.model, "chat", lambda name: self._chat(name, req), user=req.user)

    @counted("chat")
    async def _chat(self, name: str, req) -> dict:
        route = self.route(name, "chat")
        log_hints(req)
        out = await self.generate(route, self._prompt_job(req), req.to_params())
        choices = [{"index": i, "message": {"role": "assistant", "content": c["text"]}, "logprobs": None,
                    "finish_reason": c["finish_reason"]} for i, c in enumerate(out["choices"])]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": name, "choices": choices, "usage": generation_usage(out),
                "demo_weights": route.spec.is_demo}

    async def text2text(self, req) -> dict:
        """Encoder–decoder generation; inputs are truncated to the encoder's limit."""
        return await self.routed(req.model, "text2text", lambda name: self._text2text(name, req),
                                 getattr(req, "latency_budget_ms", None))

    @counted("text2text")
    async def _text2text(self, name: str, req) -> dict:
        route = self.route(name, "text2text")
        texts = self._texts(req.input, self.limits.max_prompts_per_request)
        info = await self.info(route)
        out = await self.generate(route, TextJob("texts", texts, max_length=info["max_input_tokens"]),
                                  req.to_params())
        data = [{"index": i, "text": c["text"], "finish_reason": c["finish_reason"]}
                for i, c in enumerate(out["choices"])]
        return {"object": "list", "model": name, "data": data, "usage": generation_usage(out),
                "demo_weights": route.spec.is_demo}

    async def events(self, req, task: str) -> AsyncIterator[dict]:
        """The generator's stream events for ``req`` (see ``StreamingMixin.stream``); domain errors
        raised by type. The call is cancelled on the replica when the caller stops reading."""
        route = self.route(req.model, task)
        log_hints(req)
        name = route.spec.key
        pre = route.pre.remote([self._prompt_job(req)], model=name)
        gen = route.model.options(stream=True).stream.remote(pre, req.to_params(), self.deadline_s())
        operation = f"{task}-stream"
        try:
            async for event in gen:
                if "error" in event:  # refused before it started (see TextGenerator.stream)
                    raise event["error"]
                yield event
            metrics.request(name, operation, 200)
        except Exception as exc:  # noqa: BLE001 - mapped to the domain error
            err = self.domain_error(exc, name)
            metrics.request(name, operation, int(err.status_code))
            raise err from None
        finally:
            gen.cancel()  # stops generation on the replica when the caller went away

    async def resolve_stream(self, req, task: str):
        """The request with the address that serves it: for ``model: auto`` the first ready model of
        the plan, else the version the traffic policy picks (or the pinned one). A stream does not
        fail over once it started, and is not copied to a shadow."""
        if req.model != auto.AUTO:
            key = await self.resolve(req.model, self.routing_key(req.user))
        else:
            choice = (await self.auto_plan(task, self.budget_ms()))[0]
            self.note_route(None, choice.name, choice.reason)
            key = choice.name
        self.stamp(None, key)
        return req.model_copy(update={"model": key})

    async def stream_complete(self, req) -> AsyncIterator[dict]:
        """Streaming completions: ``text_completion`` chunk dicts (OpenAI stream shape), then a
        usage chunk when ``stream_options.include_usage``."""
        req = await self.resolve_stream(req, "completion")
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        spec = self.route(req.model, "completion").spec
        demo, model, version = spec.is_demo, spec.name, spec.resolved_version
        async for event in self.events(req, "completion"):
            if event.get("done"):
                if req.include_usage:
                    yield {"id": cid, "object": "text_completion", "created": created, "model": model, "model_version": version,
                           "choices": [], "usage": usage(event["prompt_tokens"], event["completion_tokens"]),
                           "demo_weights": demo}
                return
            choices = [{"text": c["text"], "index": c["index"], "logprobs": None, "finish_reason": c["finish_reason"]}
                       for c in event["choices"]]
            yield {"id": cid, "object": "text_completion", "created": created, "model": model, "model_version": version,
                   "choices": choices, "demo_weights": demo}

    async def stream_chat(self, req) -> AsyncIterator[dict]:
        """Streaming chat: ``chat.completion.chunk`` dicts; the first chunk of each choice carries
        ``delta.role``, the last its ``finish_reason``; unset delta fields are left out."""
        req = await self.resolve_stream(req, "chat")
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        spec = self.route(req.model, "chat").spec
        demo, model, version = spec.is_demo, spec.name, spec.resolved_version
        started: set[int] = set()
        async for event in self.events(req, "chat"):
            if event.get("done"):
                if req.include_usage:
                    yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "model_version": version,
                           "choices": [], "usage": usage(event["prompt_tokens"], event["completion_tokens"]),
                           "demo_weights": demo}
                return
            choices = []
            for c in event["choices"]:
                delta: dict = {}
                if c["index"] not in started:
                    delta["role"] = "assistant"
                    started.add(c["index"])
                if c["text"] or "role" in delta:
                    delta["content"] = c["text"]
                choices.append({"index": c["index"], "delta": delta, "logprobs": None,
                                "finish_reason": c["finish_reason"]})
            yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "model_version": version,
                   "choices": choices, "demo_weights": demo}
