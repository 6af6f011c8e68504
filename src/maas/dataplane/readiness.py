"""Whether each model address can answer now, and the model cards built from it.

:meth:`Readiness.model_ready` is what routing asks before it sends a request to a version or an
``auto`` candidate; :meth:`Readiness.cards` and :meth:`Readiness.report` are what ``/v1/models``,
``/readyz`` and the v2 ready routes show. Cards are protocol-neutral dicts; each protocol renders
them (OpenAI adds ``object``, ``created``, ``owned_by``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict

from maas.config import PoolModelSpec
from maas.dataplane.calls import Calls
from maas.dataplane.traffic import Traffic
from maas.dataplane.watch import DeploymentWatch
from maas.errors import ModelNotFound, ModelNotReady, ServiceOverloaded, unwrap

#: A readiness probe's answer is reused this long, seconds (bounds probe calls under frequent checks).
READY_PROBE_TTL_S = 0.1
#: Expected start time of a model replica that never reported one, seconds (the ``Retry-After`` of
#: a request for a model still loading; a replica that started before reports its own ``start_s``:
#: process, imports, weights and warm-up — the soak measured 16.6 s to replace a killed
#: EfficientNet-Lite0 replica whose weights alone load in ~1 s).
DEFAULT_LOAD_S = 10.0
#: A model whose probe takes longer than this, seconds, reads as not ready. Short because a call to
#: a replica that just died does not fail fast (Serve's router retries it until its replacement
#: runs); the probe runs on the replica's event loop beside the forward thread, so a busy replica
#: still answers within it (a full queue answers back-pressure, which counts as ready).
READY_PROBE_TIMEOUT_S = 0.5


class Readiness:
    """Readiness of the model addresses of one ingress replica.

    Args:
        calls: The call path (routes, model facts).
        watch: Running replica counts and Serve's status messages.
        traffic: Versions and their weights.
    """

    def __init__(self, calls: Calls, watch: DeploymentWatch, traffic: Traffic, repository=None):
        self.calls, self.watch, self.traffic = calls, watch, traffic
        self.repository = repository  # maas.dataplane.repository.RepositoryRoutes, or None
        self._ready: dict[str, tuple[bool, float]] = {}  # address → (ready, monotonic time of the probe)

    async def model_ready(self, address: str) -> bool:
        """Whether ``address`` can answer now: its router knows a running replica and one of them
        answered a live probe (a cheap ``info`` call, at most every ``READY_PROBE_TTL_S``).

        The probe is what makes a lost replica visible within a second: the router drops a
        replica the moment a call finds it dead, before the controller notices. A replica that
        is merely busy still answers the probe (it runs on the replica's event loop, beside the
        forward thread); one whose queue is full (back-pressure) counts as ready.
        """
        from ray.serve.exceptions import BackPressureError

        route = self.calls.routes.get(address)
        if route is None:  # a repository model that left while this was asked
            return False
        dep = route.spec.deployment_name
        if self.watch.serving(dep) is False:
            self.watch.follow()
            return False
        # Repository models share their pool's probe: one per pool, not one per model of it.
        probe_key = dep if isinstance(route.spec, PoolModelSpec) else address  # not getattr: see Calls.shared_heads
        cached = self._ready.get(probe_key)
        now = time.monotonic()
        if cached is not None and now - cached[1] < READY_PROBE_TTL_S:
            return cached[0]
        try:
            info = await self.calls.awaited(route.model.info.remote(), address, READY_PROBE_TIMEOUT_S)
            self.calls.learn(address, info)
            ok = True
        except Exception as exc:  # noqa: BLE001 - any other failure means not ready
            ok = isinstance(exc, ServiceOverloaded) or isinstance(unwrap(exc), BackPressureError)
        if ok and self.watch.serving(dep) is False:
            ok = False  # the probe itself found the last replica dead
        self._ready[probe_key] = (ok, time.monotonic())
        return ok

    def has_replica(self, address: str) -> bool:
        """Whether ``address`` has a running replica as far as anyone knows (True while unknown)."""
        route = self.calls.routes.get(address)
        return route is not None and self.watch.serving(route.spec.deployment_name) is not False

    async def can_take(self, address: str) -> bool:
        """Whether routing may send to ``address``: its probe answered, or, when the probe did not
        (a probe can time out on a loaded replica), it still has a running replica."""
        return await self.model_ready(address) or self.has_replica(address)

    async def check_serving(self, address: str) -> None:
        """Raise at once for a model without a running replica instead of letting the call wait
        in Serve's router for one (a model still loading would hold the caller for the whole
        call timeout). Before anything is known (the ingress's first moments), the controller is
        asked first, for at most :data:`READY_PROBE_TIMEOUT_S` × 2.

        Raises:
            ModelNotReady: 503 with ``Retry-After`` = the expected rest of its start-up.
        """
        route = self.calls.routes.get(address)
        if route is None:
            raise ModelNotFound(f"model {address!r} does not exist (it left its repository); GET /v1/models lists "
                                "the served models")
        dep = route.spec.deployment_name
        serving = self.watch.serving(dep)
        if serving is None:
            self.watch.follow()
            try:
                await asyncio.wait_for(asyncio.shield(self.watch.refresh(max_age_s=1.0)), 2 * READY_PROBE_TIMEOUT_S)
            except asyncio.TimeoutError:
                pass
            serving = self.watch.serving(dep)  # still unknown: the call goes ahead
        if serving is False:
            self.watch.follow()
            info = self.calls.known_info(address)
            load_s = float(info.get("start_s") or info.get("load_s") or DEFAULT_LOAD_S)
            retry_s = max(1, math.ceil(load_s - self.watch.down_for_s(dep)))
            raise ModelNotReady(f"model {address!r} has no running replica ({self.watch.reason(dep)}); retry after "
                                f"{retry_s} s", retry_after_s=retry_s)

    async def _all(self) -> dict[str, bool]:
        if self.repository is not None:
            await self.repository.ready()
        keys = list(self.calls.routes)
        ready = dict(zip(keys, await asyncio.gather(*(self.model_ready(k) for k in keys))))
        if not all(ready.values()):
            self.watch.follow()  # reasons come from the last answer; /readyz never waits for the controller
        return ready

    async def name_ready(self, name: str) -> bool:
        """Whether some version of ``name`` that takes traffic is ready."""
        weights = dict(self.traffic.weights(name))
        keys = [s.key for s in self.traffic.specs[name] if weights[s.resolved_version] > 0]
        return any(await asyncio.gather(*(self.model_ready(k) for k in keys)))

    async def cards(self) -> list[dict]:
        """One card per model name, described by its default version (the one with the highest
        traffic weight): ``id`` (the name), ``family``, ``tasks``, ``weights``, ``demo_weights``,
        ``ready`` (some version with traffic weight is ready), ``deployment``, ``quality``,
        ``quality_source``, ``latency_estimate_ms`` (what ``auto`` predicts now, or None),
        ``version`` (the default), ``versions`` (each version's ``id`` ``name@version``, weight,
        readiness, whether it is the default), ``runtime`` (:meth:`runtime`) and ``status_message``
        when not ready."""
        ready = defaultdict(bool, await self._all())  # a repository model may arrive meanwhile
        cards = []
        for name, specs in self.traffic.specs.items():
            weights = dict(self.traffic.weights(name))
            default = self.traffic.default_version(name)
            spec = next(s for s in specs if s.resolved_version == default)
            serving = [s for s in specs if weights[s.resolved_version] > 0]
            name_ready = any(ready[s.key] for s in serving)
            predicted = self.predict_ms(spec.key)
            card = {"id": name, "family": spec.family, "tasks": list(spec.tasks), "weights": spec.weights_label(),
                    "demo_weights": spec.is_demo, "ready": name_ready, "deployment": spec.deployment_name,
                    "quality": spec.quality, "quality_source": spec.quality_source,
                    "latency_estimate_ms": None if predicted is None else round(predicted, 1), "version": default,
                    "runtime": self.runtime(spec)}
            described = self.traffic.describe(name)
            card["versions"] = [
                {"id": f"{name}@{s.resolved_version}", "version": s.resolved_version, "deployment": s.deployment_name,
                 "ready": ready[s.key], "weights": s.weights_label(), "demo_weights": s.is_demo,
                 "runtime": self.runtime(s), **described.get(s.resolved_version, {}),
                 **({} if ready[s.key] else {"status_message": self.watch.reason(s.deployment_name)})}
                for s in specs]
            if not name_ready:
                card["status_message"] = "; ".join(self.watch.reason(s.deployment_name) for s in serving or specs)
            if self.repository is not None:
                card.update(self.repository.card_extra(name))
            cards.append(card)
        return cards

    def runtime(self, spec) -> dict:
        """What runs the model's forward: ``name`` (torch, onnxruntime, openvino), ``precision`` and, once a
        replica has reported (``info()``), the ``fidelity`` it measured against fp32 torch at start
        (and ``fallback`` when it serves fp32 because its variant missed the guard)."""
        reported = self.calls.known_info(spec.key).get("runtime")
        if reported:
            return {k: v for k, v in reported.items() if k in ("name", "precision", "fidelity", "fallback", "threads",
                                                           "torch_imported")}
        self.calls.settings(spec.key)  # not asked yet: asks a replica in the background, for the next card
        return {"name": spec.runtime, "precision": spec.precision}

    async def card(self, model: str) -> dict:
        """The card of ``name`` (with its ``versions``) or of ``name@version`` (that version's own
        weights, readiness and traffic weight; ``id`` is ``name@version``).

        Raises:
            ModelNotFound: no such model or version.
        """
        name, version = self.traffic.address(model)
        card = next((c for c in await self.cards() if c["id"] == name), None)
        if card is None:  # a repository model that left meanwhile
            raise ModelNotFound(f"model {name!r} does not exist; GET /v1/models lists the served models")
        if version is None:
            return card
        entry = next(v for v in card["versions"] if v["version"] == version)
        return {**{k: v for k, v in card.items() if k != "versions"}, **entry, "id": f"{name}@{version}"}

    def predict_ms(self, address: str) -> float | None:
        """The latency ``auto`` predicts for ``address`` now, ms (see :mod:`maas.dataplane.auto`); None
        when unknown (or the address just left)."""
        route = self.calls.routes.get(address)
        if route is None:
            return None
        spec = route.spec
        return self.calls.latency.predict(address, self.calls.queued_items(address),
                                          self.calls.settings(address).max_batch_size,
                                          max(1, self.watch.running(spec.deployment_name)))

    async def report(self) -> dict:
        """``{"ready", "models": {address: bool}, "reasons"?: {address: message}, "traffic"?, "traffic_error"?}``.

        ``ready`` is true when every model name can serve: some version with traffic weight is ready.
        A version that is not ready is listed in ``reasons`` (with where its share goes) but does not
        make the service unready while another version of its name serves; ``traffic`` shows each
        versioned name's weights, default, rollbacks and shadow counts.
        """
        ready = defaultdict(bool, await self._all())  # a repository model may arrive meanwhile
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
        body: dict = {"ready": names_ok, "models": ready}
        if reasons:
            body["reasons"] = reasons
        if traffic:
            body["traffic"] = traffic
        if self.traffic.error:
            body["traffic_error"] = self.traffic.error
        return body
