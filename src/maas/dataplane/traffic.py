"""Model versions: which version of a model name answers a request, shadow copies, auto-rollback.

Addressing (every protocol and handle):

* ``model: "imagenet@2"`` pins version 2 (404 naming the versions when there is none);
* ``model: "imagenet"`` goes through the name's :class:`~maas.config.TrafficPolicy`; without a
  policy the name's first listed version takes all of it (adding a version to a config never moves
  traffic by itself: a new version is reachable pinned until a policy gives it weight).

The policy is the ingress deployment's ``user_config`` (``{"traffic": {name: policy}}``), so a serve
config edit moves traffic through Serve's lightweight update: the ingress replicas are reconfigured
in place, no replica restarts, requests in flight finish on the version they started on.

Sticky choice: the request's routing key — the ``X-Maas-Routing-Key`` header, else the OpenAI
``user`` field, else the API key, else none (random per request) — is assigned a version by the
app's one :class:`KeyTable` (the ``RoutingKeys`` deployment, :mod:`maas.routing_keys`), and the
ingress replica keeps the answer. The table gives each new key the version furthest below its
share of the keys seen so far, so the split holds by key count even for a few keys: with plain
hashing, 100 keys at 90/10 land 10 ± 3 (one standard deviation) on the canary, measured 15 for
``user-0..99``; the table puts exactly 10 there. When the weights change, the table moves the fewest
keys needed (from versions above their new share to those below; a key on a version whose weight
went to 0 always moves), so raising a canary's weight only moves keys onto it. One table serves
all ingress replicas, so a key gets one version whichever replica answers. Should the table be
unreachable (its replica restarting), the key is hashed (BLAKE2b with the model name to a point
``u`` in [0, 1), the weights laid end to end in config order): still sticky, balanced only on
average.

A version that is not ready (loading, failed, unhealthy, replica lost) takes no traffic: a key whose
version is not ready is hashed again (another salt) over the ready versions with weight, so its
share spreads over them in proportion and keys of ready versions stay where they are. Weight 0
means no traffic, ever (that is how a rollback holds): with no ready version with weight the name
answers 503.

Shadow (``shadow: {version, fraction}``): after the answer is sent back, a copy of ``fraction`` of
the name's requests goes to the shadow version; the two answers are compared (classifications:
top-1 labels; embeddings: cosine ≥ :data:`SHADOW_COSINE_AGREE`; generation: equal text) and
counted (``maas_shadow_results``, ``/readyz`` ``traffic``), never returned. Streams are not copied.

Auto-rollback (``auto_rollback``): per version, a sliding window of (time, 5xx?, latency). When a
non-default version has at least ``min_requests`` in the window, as has the default, and its 5xx
rate exceeds the default's by more than ``max_error_rate_increase`` or its p95 latency is more than
``max_p95_ratio`` × the default's, its weight is set to 0 in this ingress replica, with a WARNING
log line and ``maas_version_rollbacks`` (reason ``errors`` or ``latency``). It holds until the next
policy is applied. Each ingress replica judges what it sees (with several, each rolls back on its
own evidence, usually within the same window).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from collections import deque

from maas import metrics
from maas.config import AppConfig, ModelSpec, TrafficPolicy, validate_traffic
from maas.errors import ModelNotFound

logger = logging.getLogger("ray.serve.maas.dataplane")

#: Embeddings of two versions count as agreeing when their cosine is at least this.
SHADOW_COSINE_AGREE = 0.99


def unit_hash(name: str, key: str, salt: int = 0) -> float:
    """A stable point in [0, 1) for (model name, routing key, salt). A routing key is opaque: one holding
    a lone surrogate (a JSON ``"\\ud800"`` escape in ``user``) hashes as any other, never raises."""
    digest = hashlib.blake2b(f"{salt}\0{name}\0{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def pick(weights: list[tuple[str, float]], u: float) -> str:
    """The version holding point ``u`` when ``weights`` (version, weight > 0) are laid end to end."""
    total = sum(w for _, w in weights)
    edge = 0.0
    for version, w in weights:
        edge += w / total
        if u < edge:
            return version
    return weights[-1][0]


class KeyTable:
    """Sticky, balanced routing-key → version assignments for every model name (see the module docstring).

    Per (name, weights) a table of keys; a new weights vector starts from the newest table of the
    name and is rebalanced with the fewest moves. Tables of the last two weight vectors are kept,
    so an ingress replica that has not yet applied a new policy still gets its old answers.

    Args:
        max_keys: Keys remembered per table; past it the oldest is forgotten (it is assigned again,
            balanced, when it comes back).
    """

    def __init__(self, max_keys: int = 200_000):
        self.max_keys = max_keys
        self.tables: dict[tuple, tuple[dict[str, str], dict[str, int]]] = {}  # (name, weights) -> (keys, counts)
        self.latest: dict[str, tuple] = {}  # name -> weights of its newest table

    def assign(self, name: str, key: str, weights: list[tuple[str, float]]) -> str:
        """The version of ``key`` under ``weights`` ((version, weight) in config order, some > 0).

        Raises:
            ValueError: no weight above 0.
        """
        live = tuple((v, float(w)) for v, w in weights if w > 0)
        if not live:
            raise ValueError(f"model {name!r}: no version with weight above 0")
        entry = self.tables.get((name, live))
        if entry is None:
            entry = self._rebalanced(name, live)
        keys, counts = entry
        version = keys.get(key)
        if version is not None:
            return version
        total_w = sum(w for _, w in live)
        n = len(keys) + 1
        version = max(live, key=lambda vw: (vw[1] / total_w * n - counts[vw[0]], vw[1]))[0]
        keys[key] = version
        counts[version] += 1
        if len(keys) > self.max_keys:
            old = next(iter(keys))
            counts[keys.pop(old)] -= 1
        return version

    def _rebalanced(self, name: str, live: tuple) -> tuple[dict[str, str], dict[str, int]]:
        """A table for new weights: the newest table of ``name`` with the fewest keys moved."""
        previous = self.tables.get((name, self.latest[name])) if name in self.latest else None
        keys = dict(previous[0]) if previous else {}
        allowed = {v for v, _ in live}
        total_w = sum(w for _, w in live)
        target = {v: round(w / total_w * len(keys)) for v, w in live}
        counts = {v: 0 for v, _ in live}
        movers = []
        for k, v in keys.items():
            if v in allowed:
                counts[v] += 1
            else:
                movers.append(k)  # its version takes no traffic now: it always moves
        for v in allowed:
            extra = counts[v] - target[v]
            if extra > 0:  # the newest keys of an over-full version move first
                own = [k for k in reversed(keys) if keys[k] == v][:extra]
                counts[v] -= len(own)
                movers += own
        for k in movers:
            below = max(live, key=lambda vw: (target[vw[0]] - counts[vw[0]], vw[1]))[0]
            keys[k] = below
            counts[below] += 1
        self.tables = {i: t for i, t in self.tables.items()
                       if i[0] != name or (previous is not None and t is previous)}
        self.tables[(name, live)] = (keys, counts)
        self.latest[name] = live
        return keys, counts


def p95(values: list[float]) -> float:
    """The 95th percentile (nearest rank) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


class Traffic:
    """The traffic state of one ingress replica: versions per name, the applied policy, rollbacks.

    Args:
        config: The app config (its models and their versions).
        clock: Monotonic seconds (tests pass a fake one).
    """

    def __init__(self, config: AppConfig, clock=time.monotonic):
        self.config = config
        self.specs: dict[str, list[ModelSpec]] = config.versions()
        self.policies: dict[str, TrafficPolicy] = {}
        self.rolled_back: dict[str, dict[str, str]] = {}  # name -> version -> reason
        self.error: str | None = None  # why the last policy update was refused (the previous one stands)
        self.windows: dict[str, deque] = {}  # key -> (t, is_5xx, latency_ms)
        self.shadow_counts: dict[str, dict[str, int]] = {}  # key of the shadow -> result -> count
        self.shadow_in_flight: dict[str, int] = {}
        self.clock = clock
        self.assigned: dict[tuple[str, str], str] = {}  # (name, routing key) -> version, from the KeyTable
        self._publish()

    # ------------------------------------------------------------------ the policy

    def apply(self, user_config: dict | None) -> None:
        """Validate and apply a new policy (clears auto-rollbacks).

        Raises:
            ValueError: the policy is invalid (see :func:`maas.config.validate_traffic`); nothing changes.
        """
        tc = validate_traffic(self.config, user_config)
        self.policies = dict(tc.traffic)
        self.rolled_back = {}
        self.error = None
        self.windows.clear()
        self.assigned.clear()
        self._publish()
        logger.info("traffic policy applied: %s", {n: p.weights for n, p in self.policies.items()} or "none")

    def weights(self, name: str) -> list[tuple[str, float]]:
        """(version, weight) in config order, auto-rollbacks applied (weight 0 for those)."""
        specs = self.specs[name]
        policy = self.policies.get(name)
        if policy is None:
            out = [(s.resolved_version, 100.0 if i == 0 else 0.0) for i, s in enumerate(specs)]
        else:
            out = [(s.resolved_version, float(policy.weights.get(s.resolved_version, 0.0))) for s in specs]
        gone = self.rolled_back.get(name, {})
        return [(v, 0.0 if v in gone else w) for v, w in out]

    def default_version(self, name: str) -> str:
        """The version with the highest configured weight (first listed on a tie)."""
        specs = self.specs[name]
        policy = self.policies.get(name)
        if policy is None:
            return specs[0].resolved_version
        return max(specs, key=lambda s: policy.weights.get(s.resolved_version, 0.0)).resolved_version

    def key_of(self, name: str, version: str) -> str:
        spec = next(s for s in self.specs[name] if s.resolved_version == version)
        return spec.key

    def address(self, model: str) -> tuple[str, str | None]:
        """``"name"`` → (name, None); ``"name@v"`` → (name, v).

        Raises:
            ModelNotFound: unknown name, or the name has no version ``v``.
        """
        name, at, version = model.partition("@")
        if at and not version:
            raise ModelNotFound(f"model {model!r} names no version after '@'; use {name!r} or {name}@<version>")
        if name not in self.specs:
            raise ModelNotFound(f"model {name!r} does not exist; GET /v1/models lists the served models")
        if version:
            versions = [s.resolved_version for s in self.specs[name]]
            if version not in versions:
                raise ModelNotFound(f"model {name!r} has no version {version!r}; its versions are {versions}")
        return name, version or None

    #: Routing keys whose version this ingress replica remembers (then it asks the KeyTable again).
    MAX_ASSIGNED = 65536

    def remember(self, name: str, routing_key: str, version: str) -> None:
        """Keep the KeyTable's answer for ``routing_key`` (until the weights change)."""
        if len(self.assigned) >= self.MAX_ASSIGNED:
            self.assigned.pop(next(iter(self.assigned)))
        self.assigned[(name, routing_key)] = version

    def choose(self, name: str, routing_key: str | None, ready: dict[str, bool],
               assigned: str | None = None, weights: list[tuple[str, float]] | None = None) -> str | None:
        """The version for one request to ``name`` (see the module docstring), or None when no
        ready version has weight. ``assigned``: the KeyTable's version for ``routing_key``; without
        it the key is hashed. ``weights``: the policy the request was decided under (default the
        current one): a policy applied while the request awaited its probes must not switch it to
        a version that was never probed."""
        weighted = [(v, w) for v, w in (self.weights(name) if weights is None else weights) if w > 0]
        if not weighted:
            return None
        if assigned is not None and any(v == assigned for v, _ in weighted):
            version = assigned
        else:
            version = pick(weighted, unit_hash(name, routing_key) if routing_key is not None else random.random())
        if ready.get(version, False):
            return version
        live = [(v, w) for v, w in weighted if ready.get(v, False)]
        if not live:
            return None
        u2 = unit_hash(name, routing_key, salt=1) if routing_key is not None else random.random()
        return pick(live, u2)

    # ------------------------------------------------------------------ auto-rollback

    def record(self, name: str, version: str, failed: bool, latency_ms: float) -> None:
        """Note one answer of ``name``'s ``version`` (``failed``: a 5xx) and judge the auto-rollback."""
        policy = self.policies.get(name)
        if policy is None or policy.auto_rollback is None:
            return
        rule = policy.auto_rollback
        now = self.clock()
        window = self.windows.setdefault(f"{name}@{version}", deque())
        window.append((now, failed, latency_ms))
        default = self.default_version(name)
        if version == default or version in self.rolled_back.get(name, {}):
            return
        mine = self._recent(f"{name}@{version}", now, rule.window_s)
        base = self._recent(f"{name}@{default}", now, rule.window_s)
        if len(mine) < rule.min_requests or len(base) < rule.min_requests:
            return
        err_mine = sum(f for _, f, _ in mine) / len(mine)
        err_base = sum(f for _, f, _ in base) / len(base)
        reason = None
        if err_mine - err_base > rule.max_error_rate_increase:
            reason = (f"errors: 5xx rate {err_mine:.1%} vs {err_base:.1%} of default version {default} over "
                      f"{rule.window_s:g} s")
        else:
            ok_mine = [ms for _, f, ms in mine if not f]
            ok_base = [ms for _, f, ms in base if not f]
            if ok_mine and ok_base and p95(ok_mine) > rule.max_p95_ratio * p95(ok_base):
                reason = (f"latency: p95 {p95(ok_mine):.0f} ms vs {p95(ok_base):.0f} ms of default version {default} "
                          f"over {rule.window_s:g} s (limit {rule.max_p95_ratio:g} ×)")
        if reason is not None:
            self.rolled_back.setdefault(name, {})[version] = reason
            self.assigned = {k: v for k, v in self.assigned.items() if k[0] != name}
            logger.warning("auto-rollback: model %s version %s now takes no traffic (%s)", name, version, reason)
            metrics.rollback(name, version, reason.split(":")[0])
            self._publish()

    def _recent(self, key: str, now: float, window_s: float) -> list:
        window = self.windows.get(key)
        if not window:
            return []
        while window and window[0][0] < now - window_s:
            window.popleft()
        return list(window)

    # ------------------------------------------------------------------ shadow

    def shadow_for(self, name: str, chosen: str) -> str | None:
        """The shadow version to copy this request to (sampled by ``fraction``), or None."""
        policy = self.policies.get(name)
        if policy is None or policy.shadow is None or policy.shadow.version == chosen:
            return None
        if random.random() >= policy.shadow.fraction:
            return None
        key = f"{name}@{policy.shadow.version}"
        if self.shadow_in_flight.get(key, 0) >= policy.shadow.max_in_flight:
            self.count_shadow(name, policy.shadow.version, "dropped")
            return None
        return policy.shadow.version

    def count_shadow(self, name: str, version: str, result: str) -> None:
        counts = self.shadow_counts.setdefault(f"{name}@{version}", {})
        counts[result] = counts.get(result, 0) + 1
        metrics.shadow(name, version, result)

    # ------------------------------------------------------------------ what it says

    def describe(self, name: str) -> dict:
        """``{version: {"weight", "default", "rolled_back"?}}`` plus ``shadow`` for ``/readyz`` and ``/v1/models``."""
        default = self.default_version(name)
        out: dict = {}
        gone = self.rolled_back.get(name, {})
        for v, w in self.weights(name):
            entry: dict = {"weight": w, "default": v == default}
            if v in gone:
                entry["rolled_back"] = gone[v]
            out[v] = entry
        policy = self.policies.get(name)
        if policy is not None and policy.shadow is not None:
            key = f"{name}@{policy.shadow.version}"
            out.setdefault(policy.shadow.version, {})["shadow"] = {
                "fraction": policy.shadow.fraction, **self.shadow_counts.get(key, {})}
        return out

    def _publish(self) -> None:
        for name in self.config.versions():  # the config's names: repository models have no versions
            for v, w in self.weights(name):
                metrics.traffic_weight(name, v, w)


def compare(primary, shadow) -> bool:
    """Whether a shadow answer agrees with the primary one (see the module docstring). Both are
    results of one operation (:mod:`maas.dataplane.types`): ``Classifications`` agree on every
    input's top-1 label, ``Embeddings`` on a cosine ≥ :data:`SHADOW_COSINE_AGREE` per row,
    ``Generation`` on equal texts.

    Raises:
        ValueError: the answers differ in shape or hold nothing comparable.
    """
    import numpy as np

    if hasattr(primary, "choices"):
        return [c.text for c in primary.choices] == [c.text for c in shadow.choices]
    if hasattr(primary, "rows"):
        if len(primary.rows) != len(shadow.rows) or not primary.rows:
            raise ValueError("answers differ in shape")
        return all(a[0]["label"] == b[0]["label"] for a, b in zip(primary.rows, shadow.rows))
    if hasattr(primary, "vectors"):
        va, vb = np.asarray(primary.vectors, dtype=np.float64), np.asarray(shadow.vectors, dtype=np.float64)
        if va.shape[:1] != vb.shape[:1]:
            raise ValueError("answers differ in shape")
        if va.shape != vb.shape:
            return False
        norms = np.maximum(np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1), 1e-12)
        return bool(((va * vb).sum(axis=1) / norms >= SHADOW_COSINE_AGREE).all())
    raise ValueError("answers hold nothing comparable")
