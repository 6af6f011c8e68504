"""Routing: which address (``name@version``) answers a request. One entry point, :meth:`Router.run`.

A request names its model as ``name``, ``name@version`` or ``auto``:

* ``name@version`` pins a version (503 when that version is not ready and the name has others);
* ``name`` goes through the name's traffic policy (:mod:`maas.dataplane.traffic`): a sticky
  version per routing key, only versions that are ready and have weight; after the answer a
  shadow copy when the policy asks for one;
* ``auto`` plans among the ready models serving the task (:mod:`maas.dataplane.auto`) and tries
  them in order, skipping one that is not ready or at capacity (``failover-from`` in the reason);
  with a ``cascade_threshold`` it asks the fastest model first and escalates while the answer's
  top-1 score is below the threshold and the budget allows.

Operations give the router a function ``op(address)`` that serves the request at one address;
the router runs it through :meth:`~maas.dataplane.calls.Calls.timed` (one record per request) and
sets the result's :class:`~maas.dataplane.types.Answered` (``route_reason``, ``cascade``).
Streams choose once (:meth:`Router.choose`): they neither fail over nor get shadowed.

Tenants (:mod:`maas.tenants`): a request of a tenant (``maas.tenants.CURRENT``, set by the HTTP
guard or a handle's ``api_key``) is admitted here — the model permission (``auto`` plans among the
tenant's models only), its request rate and compute quota — and its cost, gathered while it is
served, is taken from the tenant's quota when it is answered (:meth:`Router.settle`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from ray.serve.handle import DeploymentHandle

from maas import tracing
from maas.config import IngressSpec
from maas.dataplane import auto
from maas.dataplane.calls import Calls
from maas.dataplane.readiness import Readiness
from maas.dataplane.traffic import Traffic, compare
from maas.errors import InvalidRequest, MaasError, ModelNotFound, ModelNotReady, ServiceOverloaded, TaskNotSupported

logger = logging.getLogger("ray.serve.maas.dataplane")

#: How long the ingress waits for the routing-key table (``RoutingKeys``) before hashing the key, seconds.
KEY_TABLE_TIMEOUT_S = 1.0

Op = Callable[[str], Awaitable[Any]]


def _utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (False for a lone surrogate, which a JSON ``\\ud800`` escape can carry)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Router:
    """The routing decision of one ingress replica (see the module docstring).

    Args:
        limits: The ingress settings (``auto_policy``).
        calls: The call path. readiness: Which addresses can answer now.
        traffic: Versions and their policies. keys: The ``RoutingKeys`` deployment, or None.
    """

    def __init__(self, limits: IngressSpec, calls: Calls, readiness: Readiness, traffic: Traffic,
                 keys: DeploymentHandle | None = None, repository=None):
        self.limits, self.calls, self.readiness, self.traffic, self.keys = limits, calls, readiness, traffic, keys
        self.repository = repository  # maas.dataplane.repository.RepositoryRoutes, or None
        self.tenancy = None  # maas.tenants.Tenancy when the ingress has a tenants file
        self._shadows: set[asyncio.Task] = set()

    def admit(self, req) -> None:
        """Admit the current tenant's request for ``req.model`` (no tenancy, or a handle call without a
        key: nothing to check).

        Raises:
            Forbidden: the tenant may not use the model. RateLimited: over its rate or compute quota.
        """
        if self.tenancy is not None:
            from maas.tenants import CURRENT

            tenant = CURRENT.get()
            if tenant is not None:
                self.tenancy.admit(tenant, req.model)

    def settle(self) -> None:
        """Take the current request's cost from its tenant's quota (after the answer)."""
        if self.tenancy is not None:
            from maas.tenants import CURRENT

            tenant = CURRENT.get()
            if tenant is not None:
                self.tenancy.settle(tenant)

    async def run(self, req, task: str, operation: str, op: Op, shadow: bool = True) -> Any:
        """Serve ``req`` (a :class:`~maas.dataplane.types.Routed`) for ``task`` with ``op(address)``.

        Raises:
            ModelNotFound / TaskNotSupported / InvalidRequest: a bad model, task, budget or cascade.
            ModelNotReady / ServiceOverloaded: nothing that may answer can (503).
            Forbidden / RateLimited: the tenant may not use the model, or is over its rate or quota.
        """
        span = tracing.op_span(operation, req.model) if tracing._TRACER is not None else None
        if span is None:
            self.admit(req)
            try:
                return await self._run(req, task, operation, op, shadow)
            finally:
                self.settle()
        token = tracing.CURRENT.set(span)
        try:
            self.admit(req)
            try:
                out = await self._run(req, task, operation, op, shadow)
            finally:
                self.settle()
            tracing.answered(span, out)
        except BaseException as exc:
            tracing.end_op(span, exc)
            raise
        else:
            span.end()
            return out
        finally:
            tracing.CURRENT.reset(token)

    async def _run(self, req, task: str, operation: str, op: Op, shadow: bool) -> Any:
        threshold = getattr(req, "cascade_threshold", None)
        if threshold is not None:
            if req.model != auto.AUTO:
                raise InvalidRequest(f"cascade needs model 'auto' (the router picks the models it steps through); "
                                     f"got model {req.model!r}", param="cascade")
            return await self._cascade(task, operation, op, threshold, req.latency_budget_ms)
        if req.model != auto.AUTO:
            address = await self.resolve(req.model, req.routing_key)
            await self.readiness.check_serving(address)
            route = self.calls.routes.get(address)  # before the call: a repository model may leave meanwhile
            if route is None:
                raise ModelNotFound(f"model {address!r} does not exist; GET /v1/models lists the served models")
            spec = route.spec
            out = await self.calls.timed(address, operation, op)
            if shadow and spec.version is not None and "@" not in req.model:
                self._shadow(spec.name, spec.resolved_version, op, out)
            return out
        skipped: list[str] = []
        last: MaasError | None = None
        for choice in await self.plan(task, req.latency_budget_ms):
            try:
                out = await self.calls.timed(choice.name, operation, op)
            except (ModelNotReady, ServiceOverloaded, ModelNotFound) as exc:  # not found: a repository model left
                skipped.append(choice.name)
                last = exc
                continue
            out.answered.route_reason = choice.reason + (f";failover-from={','.join(skipped)}" if skipped else "")
            return out
        assert last is not None
        raise last

    async def choose(self, req, task: str) -> tuple[str, str | None]:
        """``(address, auto's reason or None)`` for a request that cannot fail over (a stream):
        the first ready model of ``auto``'s plan, else the version the traffic policy picks. The
        tenant's request is admitted here; the stream settles its cost when it ends."""
        self.admit(req)
        if req.model != auto.AUTO:
            address = await self.resolve(req.model, req.routing_key)
            await self.readiness.check_serving(address)
            return address, None
        choice = (await self.plan(task, req.latency_budget_ms))[0]
        return choice.name, choice.reason

    # ------------------------------------------------------------------ versions

    async def resolve(self, model: str, routing_key: str | None = None) -> str:
        """The address that serves a request for ``model``: pinned with ``name@version``, else
        chosen by the name's traffic policy.

        Raises:
            ModelNotFound: unknown name or version. ModelNotReady: no version with traffic weight is ready
                (or a repository model that is unavailable, with the reason).
        """
        if self.repository is not None:
            await self.repository.ensure_known(model)  # a model copied into a repository since the last poll
        route = self.calls.routes.get(model)
        if route is not None and route.spec.version is None:
            return model  # an unversioned model: nothing to choose
        name, version = self.traffic.address(model)
        if version is not None:
            key = self.traffic.key_of(name, version)
            if len(self.traffic.specs[name]) > 1 and not await self.readiness.can_take(key):
                dep = self.calls.routes[key].spec.deployment_name
                raise ModelNotReady(f"version {version} of model {name!r} is not ready "
                                    f"({self.readiness.watch.reason(dep)}); retry, or address {name!r} to let the "
                                    "traffic policy choose a ready version")
            return key
        specs = self.traffic.specs[name]
        weights = self.traffic.weights(name)  # one snapshot: a policy applied while we await doesn't mix in
        weighted = [v for v, w in weights if w > 0]
        # A version whose probe failed but that has a running replica still takes its share: a probe
        # can time out on a loaded replica, and refusing then would fail a request that would be served.
        checks = await asyncio.gather(*(self.readiness.can_take(self.traffic.key_of(name, v)) for v in weighted))
        assigned = None
        if routing_key is not None and len(weighted) > 1:
            assigned = await self._assigned_version(name, routing_key)
        chosen = self.traffic.choose(name, routing_key, dict(zip(weighted, checks)), assigned, weights)
        if chosen is None:
            raise ModelNotReady(f"no version of model {name!r} that takes traffic is ready (weights "
                                f"{dict(weights)}; versions {[s.resolved_version for s in specs]}); "
                                "retry, or pin a ready one with model 'name@version'")
        return self.traffic.key_of(name, chosen)

    async def _assigned_version(self, name: str, routing_key: str) -> str | None:
        """The KeyTable's version for ``routing_key`` (remembered by this replica after the first
        ask), or None when the ``RoutingKeys`` deployment does not answer within
        :data:`KEY_TABLE_TIMEOUT_S` (the key is then hashed; see :mod:`maas.dataplane.traffic`)."""
        version = self.traffic.assigned.get((name, routing_key))
        if version is not None or self.keys is None:
            return version
        if not routing_key.isascii() and not _utf8(routing_key):
            # A lone surrogate: Ray's own serialization packs a string argument as msgpack, which refuses it
            # (a failed call and a warning per request); such a key is hashed instead, still sticky.
            return None
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

    def takes_traffic(self, address: str) -> bool:
        """Whether the traffic policy gives this spec a weight above 0 (unpinned requests reach it)."""
        spec = self.calls.routes[address].spec
        return dict(self.traffic.weights(spec.name)).get(spec.resolved_version, 0.0) > 0

    def _shadow(self, name: str, chosen: str, op: Op, primary: Any) -> None:
        """Copy the request to the policy's shadow version in the background (see
        :mod:`maas.dataplane.traffic`); the caller's answer never waits for it."""
        version = self.traffic.shadow_for(name, chosen)
        if version is None:
            return
        key = self.traffic.key_of(name, version)

        async def run():
            from maas.tenants import CHARGE

            CHARGE.set(None)  # a shadow copy is the operator's experiment: not the tenant's cost
            tracing.CURRENT.set(None)  # nor part of the caller's trace (its span has ended)
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

    # ------------------------------------------------------------------ auto and cascades

    async def plan(self, task: str, budget_ms: float | None) -> list[auto.Choice]:
        """The ready models serving ``task``, in the order ``auto`` tries them.

        Raises:
            TaskNotSupported: no model serves ``task``. ModelNotReady: none is ready.
        """
        routes = self.calls.routes
        tenant = None
        if self.tenancy is not None:
            from maas.tenants import CURRENT

            tenant = CURRENT.get()
        # Repository models are candidates once some pool replica holds them: auto never picks one that
        # would first have to load (a cold load costs seconds, which no latency prediction covers).
        names = [n for n, r in routes.items() if task in r.spec.tasks and self.takes_traffic(n)
                 and (self.repository is None or r.spec.key not in self.repository.entries
                      or self.repository.loaded_on(n))]
        if not names:
            raise TaskNotSupported(f"no served model offers {task}, so model 'auto' cannot choose one")
        if tenant is not None:
            names = [n for n in names if tenant.may_use(n)]
            if not names:
                from maas import metrics
                from maas.tenants import Forbidden

                tenant.usage.requests -= 1  # admitted as `auto`, refused here: a refusal, not a request
                tenant.usage.rejected["forbidden"] += 1
                metrics.tenant_request(tenant.id, "forbidden")

                raise Forbidden(f"model 'auto' has no model offering {task} that this API key may use; its models are "
                                f"{tenant.spec.models}")
        real = [n for n in names if not routes[n].spec.is_demo]
        names = real or names  # demo weights only when nothing real serves the task
        # As for versions, a probe is a preference: a model whose probe timed out on a loaded replica
        # but that has a running replica stays a candidate (failover covers one that then fails).
        ready = await asyncio.gather(*(self.readiness.can_take(n) for n in names))
        live = [(n, self.readiness.predict_ms(n),
                 auto.variant_quality(routes[n].spec, task, self.readiness.runtime(routes[n].spec)))
                for n, ok in zip(names, ready) if ok and n in routes]  # a repository model may leave meanwhile
        if not live:
            raise ModelNotReady(f"none of the models serving {task} ({', '.join(names)}) is ready; retry")
        return auto.plan(live, budget_ms, self.limits.auto_policy)

    async def _cascade(self, task: str, operation: str, op: Op, threshold: float, budget: float | None) -> Any:
        """Confidence cascade for a classification with ``model: auto``: the fastest ready model
        first (within the budget when one fits), then, while the lowest top-1 score over the
        inputs is below ``threshold``, the next better model if its predicted latency fits the
        budget left. Answers with the last model asked; ``answered.cascade`` lists the steps."""
        choices = await self.plan(task, budget)
        by_speed = sorted(choices, key=lambda c: float("inf") if c.predicted_ms is None else c.predicted_ms)
        fitting = [c for c in by_speed if budget is None or c.predicted_ms is None or c.predicted_ms <= budget]
        current = (fitting or by_speed)[0]
        started = time.perf_counter()
        steps: list[dict] = []
        while True:
            t0 = time.perf_counter()
            out = await self.calls.timed(current.name, operation, op)
            score = out.min_top1()
            steps.append({"model": current.name, "top1_score": round(score, 4),
                          "latency_ms": round(1000 * (time.perf_counter() - t0), 1)})
            if score >= threshold:
                break
            spent = 1000 * (time.perf_counter() - started)
            nxt = next((c for c in auto.escalations(choices, current)
                        if budget is None or c.predicted_ms is None or spent + c.predicted_ms <= budget), None)
            if nxt is None:
                break
            current = nxt
        out.answered.route_reason = (f"cascade;threshold={threshold};steps={'>'.join(s['model'] for s in steps)}"
                                     + (f";budget={auto._budget(budget)}" if budget is not None else ""))
        out.answered.cascade = steps
        return out
