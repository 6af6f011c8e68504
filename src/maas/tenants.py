"""Tenants: who calls, what they may use, quotas priced in compute, and their priority.

A **tenants file** (the ingress's ``tenants_file``, YAML; :class:`TenantsFile`) maps API keys to
tenants. Keys are stored as hashes (``sha256:<hex>`` of the key; ``python -m maas tenants
hash-key`` prints one), never in clear, and never logged. Per tenant:

* ``models``: which models it may call — ``fnmatch`` patterns over model names (``minilm``,
  ``efficientnet-*``; default ``["*"]``). A pinned version ``name@v`` is allowed when ``name`` is;
  ``auto`` chooses only among allowed models. Anything else is 403.
* ``requests_per_s`` / ``burst``: a token bucket of requests (default burst: 2 s of the rate).
* ``compute_s_per_min``: the **compute quota**, in replica-seconds per minute: every answer costs
  the replica time its items took (a batch's forward split across its items by item count, a
  generation step split across its rows), so one unit prices an embedding, an image and a chat.
  A bucket refills at that rate and holds ``compute_burst_s`` (default :data:`COMPUTE_BURST_S` s
  of the rate: a tenant cannot spend a minute's quota in its first seconds, a burst its neighbours
  would feel as a tail). A request is admitted while the bucket is above zero and *reserves* what
  the tenant's requests to that model have cost lately (a moving average); its real cost is known
  when the answer comes back and settles the difference. Reserving is what keeps a tenant with
  many requests in flight from all passing at once while its bucket is still positive (measured:
  without it a flood of 8 concurrent clients was admitted 8 images at a time, and a neighbour's
  p99 doubled).
* ``priority``: ``interactive`` (default) or ``batch``; front batchers and the generators'
  continuous batcher serve ``interactive`` work first when both wait (running work is never
  dropped for it), and share each class among tenants by ``weight``.
* ``admin``: may read every tenant's usage (``GET /v1/usage``).

A tenant over its rate or quota is answered by the HTTP guard before its body is read
(:meth:`Tenancy.refusal`): a flood of refused requests costs the ingress little. Over a rate or a
quota the answer is 429 with ``Retry-After`` (seconds until the bucket admits
again) and the IETF ``RateLimit-Policy`` / ``RateLimit`` fields
(draft-ietf-httpapi-ratelimit-headers-10: ``"requests";q=…;w=…`` and ``"compute";q=…;w=60;
qu="compute-ms"``), in the OpenAI error shape (type ``rate_limit_error``, code
``rate_limit_exceeded``) that client libraries retry.

The file is read again when it changes (its size, mtime or inode; looked at every
:data:`RELOAD_INTERVAL_S`), so a revoked key stops working within 2 s, with no restart. A file
that no longer parses keeps the last good tenants (an ERROR log line says why). ``MAAS_API_KEYS``
keeps working as the simple case: its keys belong to the tenant ``default``, with no limits.

Limits are kept per ingress replica (no shared ledger on the request path: that would cost a hop
per request); with N ingress replicas, give each tenant 1/N of its intended rate and quota, or
run one ingress replica per HTTP node. Usage counts are per replica too (``/v1/usage`` says which).

Ray-free: the ingress holds one :class:`Tenancy` (``maas.security.SETTINGS.tenancy``).
"""

from __future__ import annotations

import contextvars
import fnmatch
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from maas.errors import MaasError

logger = logging.getLogger("ray.serve.maas.tenants")

#: How often the ingress looks at the tenants file for changes, seconds (revocation within 2 s).
RELOAD_INTERVAL_S = 1.0
#: The compute quota's window, seconds (``compute_s_per_min``).
COMPUTE_WINDOW_S = 60.0
#: Default compute burst: this many seconds of the quota's rate (``compute_burst_s``).
COMPUTE_BURST_S = 2.0
#: Weight of the newest cost in a tenant's moving average cost per model (what admission reserves).
COST_EWMA = 0.2
PRIORITIES = ("interactive", "batch")
#: The tenant of ``MAAS_API_KEYS`` keys when a tenants file is in use.
DEFAULT_TENANT = "default"


def hash_key(key: str | bytes) -> str:
    """The stored form of an API key: ``sha256:<64 hex digits>``."""
    raw = key.encode() if isinstance(key, str) else key
    return "sha256:" + hashlib.sha256(raw).hexdigest()


class Forbidden(MaasError):
    """The tenant may not use this model (HTTP 403)."""

    status_code = 403
    error_type = "permission_error"

    def __init__(self, message: str, *, param: str | None = "model", code: str | None = "model_not_allowed"):
        super().__init__(message, param=param, code=code)


class RateLimited(MaasError):
    """Over the tenant's request rate or compute quota (HTTP 429 + ``Retry-After`` and the IETF
    ``RateLimit-Policy`` / ``RateLimit`` fields in :attr:`headers`)."""

    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: int | None = None, headers: dict[str, str] | None = None,
                 param: str | None = None, code: str | None = "rate_limit_exceeded"):
        super().__init__(message, param=param, code=code, retry_after_s=retry_after_s)
        self.headers = dict(headers or {})

    def __reduce__(self):
        return (_rate_limited, (self.message, self.retry_after_s, self.headers))


def _rate_limited(message: str, retry_after_s: int | None, headers: dict) -> "RateLimited":
    return RateLimited(message, retry_after_s=retry_after_s, headers=headers)


class TenantSpec(BaseModel):
    """One tenant of the tenants file."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
                    description="The tenant's id: in usage, logs and metric labels (never a key).")
    keys: list[str] = Field(min_length=1, description="Its API keys' hashes, sha256:<hex> (maas tenants hash-key).")
    models: list[str] = Field(default_factory=lambda: ["*"], min_length=1,
                              description="Model-name patterns (fnmatch) it may call.")
    requests_per_s: float | None = Field(default=None, gt=0, description="Request rate; unset = unlimited.")
    burst: int | None = Field(default=None, ge=1, description="Requests above the rate at once; default 2 s of it.")
    compute_s_per_min: float | None = Field(
        default=None, gt=0, description="Replica-seconds of compute per minute; unset = unlimited.")
    compute_burst_s: float | None = Field(
        default=None, gt=0, description="Replica-seconds it may spend at once; default 2 s of its rate "
        "(compute_s_per_min / 30).")
    priority: Literal["interactive", "batch"] = "interactive"
    weight: float = Field(default=1.0, gt=0, le=1000, description="Its share of a priority class under contention.")
    admin: bool = Field(default=False, description="May read every tenant's usage.")

    @field_validator("keys")
    @classmethod
    def _hashed(cls, keys: list[str]) -> list[str]:
        for k in keys:
            if not (k.startswith("sha256:") and len(k) == 71 and all(c in "0123456789abcdef" for c in k[7:])):
                raise ValueError("keys are stored hashed: 'sha256:' + 64 lower-case hex digits of the key "
                                 "(python -m maas tenants hash-key <key>); a clear key is never accepted here")
        return keys


class TenantsFile(BaseModel):
    """The tenants file: ``tenants: [TenantSpec, …]``."""

    model_config = ConfigDict(extra="forbid")

    tenants: list[TenantSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> "TenantsFile":
        ids = [t.id for t in self.tenants]
        if len(set(ids)) != len(ids):
            raise ValueError(f"tenant ids must be unique: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
        seen: dict[str, str] = {}
        for t in self.tenants:
            for k in t.keys:
                if k in seen and seen[k] != t.id:
                    raise ValueError(f"one key hash belongs to tenants {seen[k]!r} and {t.id!r}; a key has one tenant")
                seen[k] = t.id
        return self


class Bucket:
    """A token bucket: ``capacity`` tokens, refilled at ``rate_per_s``; may go below zero (a debt
    paid back by the refill) when costs are taken after the fact.

    Args:
        capacity: Tokens when full (requests, or compute seconds). rate_per_s: Refill per second.
        now: The clock's time at creation, seconds.
    """

    def __init__(self, capacity: float, rate_per_s: float, now: float):
        self.capacity, self.rate_per_s = float(capacity), float(rate_per_s)
        self.level, self.updated = float(capacity), now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate_per_s)
            self.updated = now

    def wait_s(self, need: float, now: float) -> float:
        """Seconds until ``need`` tokens are there (0 when they are now)."""
        self._refill(now)
        return 0.0 if self.level >= need else (need - self.level) / self.rate_per_s

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount

    def remaining(self, now: float) -> float:
        self._refill(now)
        return self.level


@dataclass
class Usage:
    """One tenant's counts in this ingress replica since it started."""

    requests: int = 0
    compute_s: float = 0.0
    items: int = 0
    tokens: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: {"rate": 0, "compute": 0, "forbidden": 0})

    def public(self) -> dict:
        return {"requests": self.requests, "compute_s": round(self.compute_s, 6), "items": self.items,
                "tokens": self.tokens, "rejected": dict(self.rejected)}


class Tenant:
    """A tenant's spec, its buckets and its usage (one ingress replica)."""

    def __init__(self, spec: TenantSpec, now: float):
        self.spec = spec
        self.id = spec.id
        self.requests = None
        if spec.requests_per_s is not None:
            burst = spec.burst or max(1, math.ceil(2 * spec.requests_per_s))
            self.requests = Bucket(burst, spec.requests_per_s, now)
        self.compute = None
        if spec.compute_s_per_min is not None:
            rate = spec.compute_s_per_min / COMPUTE_WINDOW_S
            self.compute = Bucket(spec.compute_burst_s or COMPUTE_BURST_S * rate, rate, now)
        self.usage = Usage()
        self._allowed: dict[str, bool] = {}
        self.cost_s: dict[str, float] = {}  # model → moving average cost of one request, seconds

    @property
    def priority(self) -> str:
        return self.spec.priority

    @property
    def weight(self) -> float:
        return self.spec.weight

    def may_use(self, model: str) -> bool:
        """Whether a model name (``name`` or ``name@version``) matches one of the tenant's patterns."""
        name = model.partition("@")[0]
        ok = self._allowed.get(name)
        if ok is None:
            ok = any(fnmatch.fnmatchcase(name, p) for p in self.spec.models)
            if len(self._allowed) < 4096:
                self._allowed[name] = ok
        return ok

    def adopt(self, old: "Tenant") -> None:
        """Keep ``old``'s usage and bucket levels across a reload (a reload must not refill quotas)."""
        self.usage = old.usage
        for mine, theirs in ((self.requests, old.requests), (self.compute, old.compute)):
            if mine is not None and theirs is not None:
                mine.level, mine.updated = min(mine.capacity, theirs.level), theirs.updated

    def policy_header(self) -> str:
        parts = []
        if self.requests is not None:
            window = self.requests.capacity / self.requests.rate_per_s
            parts.append(f'"requests";q={int(self.requests.capacity)};w={max(1, round(window))}')
        if self.compute is not None:
            quota_ms = round(1000 * self.compute.rate_per_s * COMPUTE_WINDOW_S)
            parts.append(f'"compute";q={quota_ms};w={int(COMPUTE_WINDOW_S)};qu="compute-ms"')
        return ", ".join(parts)

    def limit_headers(self, now: float, which: str | None = None, wait_s: float = 0.0) -> dict[str, str]:
        """``RateLimit-Policy`` and ``RateLimit`` (remaining and seconds to reset of the policy that
        limits now, or of the tightest one)."""
        if self.requests is None and self.compute is None:
            return {}
        if which is None:
            which = "compute" if self.requests is None else "requests"
        if which == "requests":
            r = max(0, int(self.requests.remaining(now)))
        else:
            r = max(0, round(1000 * self.compute.remaining(now)))
        return {"RateLimit-Policy": self.policy_header(), "RateLimit": f'"{which}";r={r};t={max(0, math.ceil(wait_s))}'}


#: The tenant of the request being handled (set by the HTTP guard or a handle method; None = no tenancy).
CURRENT: contextvars.ContextVar["Tenant | None"] = contextvars.ContextVar("maas_tenant", default=None)


@dataclass
class Charge:
    """What one request costs, gathered while it is served (:func:`charge`)."""

    compute_s: float = 0.0
    items: int = 0
    tokens: int = 0
    model: str = ""
    reserved_s: float = 0.0  # taken from the compute bucket at admission (settled against compute_s)


#: The charge of the request being handled (set by :meth:`Tenancy.admit`).
CHARGE: contextvars.ContextVar["Charge | None"] = contextvars.ContextVar("maas_charge", default=None)


def charge(compute_s: float = 0.0, items: int = 0, tokens: int = 0) -> None:
    """Add to the current request's cost (a no-op outside a tenant's request)."""
    c = CHARGE.get()
    if c is not None:
        c.compute_s += compute_s
        c.items += items
        c.tokens += tokens


class Tenancy:
    """The tenants of one ingress replica: keys → tenants, admission, usage, reloads.

    Args:
        path: The tenants file, or None (only ``env_keys``).
        env_keys: Keys of ``MAAS_API_KEYS`` (clear; the tenant ``default``, unlimited).
        clock: Monotonic seconds (tests pass a fake one).

    Raises:
        ValueError: the file cannot be read or is invalid at start (the message names the file and
            the field, never a key).
    """

    def __init__(self, path: str | None, env_keys: tuple[bytes, ...] = (), clock=time.monotonic):
        self.path, self.clock = path, clock
        self.env_hashes = {hash_key(k) for k in env_keys}
        self.tenants: dict[str, Tenant] = {}
        self.retired: dict[str, Tenant] = {}  # tenants a reload removed (put back, they keep their state)
        self.by_hash: dict[str, Tenant] = {}
        self._stamp: tuple | None = None
        self.checked_at = -1e9
        self.error: str | None = None
        self.reload(strict=True)

    # ------------------------------------------------------------------ the file

    def _file_stamp(self) -> tuple | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return ("missing",)
        return (st.st_size, st.st_mtime_ns, st.st_ino)

    def reload(self, strict: bool = False) -> bool:
        """Read the file again (and the ``MAAS_API_KEYS`` tenant). Returns whether tenants changed.

        Raises:
            ValueError: only with ``strict`` (at start), when the file is unreadable or invalid.
        """
        self._stamp = self._file_stamp()
        self.checked_at = self.clock()
        specs: list[TenantSpec] = []
        if self.path is not None:
            try:
                text = open(self.path).read()
                if not text.strip():  # a file being rewritten in place (truncated, not yet written)
                    raise ValueError("the file is empty; an app with no tenants lists `tenants: []`")
                specs = TenantsFile.model_validate(yaml.safe_load(text) or {}).tenants
            except (OSError, ValueError, yaml.YAMLError) as exc:
                if isinstance(exc, ValidationError):
                    why = "; ".join(".".join(map(str, e["loc"])) + ": " + e["msg"].removeprefix("Value error, ")
                                    for e in exc.errors(include_url=False))
                elif isinstance(exc, ValueError) and not isinstance(exc, yaml.YAMLError):
                    why = str(exc)
                else:
                    why = type(exc).__name__ + (f": {exc.problem}" if isinstance(exc, yaml.MarkedYAMLError) else "")
                self.error = f"tenants file {self.path} is invalid: {why}"
                if strict:
                    raise ValueError(self.error) from None
                logger.error("%s; the previous tenants stay in force", self.error)
                return False
        if self.env_hashes and DEFAULT_TENANT not in {s.id for s in specs}:
            specs.append(TenantSpec(id=DEFAULT_TENANT, keys=sorted(self.env_hashes)))
        now = self.clock()
        tenants = {}
        for spec in specs:
            t = Tenant(spec, now)
            old = self.tenants.get(spec.id) or self.retired.pop(spec.id, None)
            if old is not None:
                t.adopt(old)
            tenants[spec.id] = t
        for gone in set(self.tenants) - set(tenants):  # a tenant taken out and put back keeps its usage and debt
            self.retired[gone] = self.tenants[gone]
        changed = {i: t.spec for i, t in self.tenants.items()} != {i: t.spec for i, t in tenants.items()}
        self.tenants = tenants
        self.by_hash = {k: t for t in tenants.values() for k in t.spec.keys}
        self.error = None
        if changed:
            logger.info("tenants: %d (%s)", len(tenants), ", ".join(sorted(tenants)))
        return changed

    def maybe_reload(self) -> None:
        """Reload when the file changed (looked at no more than every :data:`RELOAD_INTERVAL_S`)."""
        now = self.clock()
        if now - self.checked_at < RELOAD_INTERVAL_S:
            return
        self.checked_at = now
        if self._file_stamp() != self._stamp:
            self.reload()

    # ------------------------------------------------------------------ requests

    def resolve(self, key: bytes | None) -> Tenant | None:
        """The tenant of a presented key, or None (no key, or not a key of any tenant). A hash
        lookup: the key is hashed once, compared as a digest."""
        if not key:
            return None
        return self.by_hash.get(hash_key(key))

    def admit(self, tenant: Tenant, model: str, items: int = 1) -> None:
        """Check a request of ``tenant`` for ``model`` (``auto``: checked per candidate by the
        router) and count it; start its :class:`Charge`.

        Raises:
            Forbidden: the tenant may not use the model. RateLimited: over its rate or compute quota.
        """
        from maas import metrics

        if model != "auto" and not tenant.may_use(model):
            tenant.usage.rejected["forbidden"] += 1
            metrics.tenant_request(tenant.id, "forbidden")
            raise Forbidden(f"this API key may not use model {model.partition('@')[0]!r}; its models are "
                            f"{tenant.spec.models}")
        now = self.clock()
        refused = self.refusal(tenant, now)
        if refused is not None:
            raise refused
        if tenant.requests is not None:
            tenant.requests.take(1.0, now)
        reserved = 0.0
        if tenant.compute is not None:
            reserved = tenant.cost_s.get(model, 0.0)
            tenant.compute.take(reserved, now)
        tenant.usage.requests += 1
        metrics.tenant_request(tenant.id, "admitted")
        CHARGE.set(Charge(model=model, reserved_s=reserved))

    def refusal(self, tenant: Tenant, now: float | None = None) -> "RateLimited | None":
        """The 429 for a tenant over its request rate or compute quota now (counted as a refusal),
        else None; nothing is taken from its buckets. The HTTP guard asks before reading a body."""
        from maas import metrics

        now = self.clock() if now is None else now
        if tenant.requests is not None:
            wait = tenant.requests.wait_s(1.0, now)
            if wait > 0:
                tenant.usage.rejected["rate"] += 1
                metrics.tenant_request(tenant.id, "rate")
                return self._limited(tenant, "requests", wait, now, f"tenant {tenant.id!r} is over its request rate "
                                     f"({tenant.spec.requests_per_s:g}/s)")
        if tenant.compute is not None:
            debt = tenant.compute.remaining(now)
            if debt <= 0:
                wait = (1e-3 - debt) / tenant.compute.rate_per_s
                tenant.usage.rejected["compute"] += 1
                metrics.tenant_request(tenant.id, "compute")
                return self._limited(tenant, "compute", wait, now, f"tenant {tenant.id!r} is over its compute quota "
                                     f"({tenant.spec.compute_s_per_min:g} replica-seconds per minute)")
        return None

    def _limited(self, tenant: Tenant, which: str, wait_s: float, now: float, why: str) -> RateLimited:
        retry = max(1, math.ceil(wait_s))
        return RateLimited(f"{why}; retry after {retry} s", retry_after_s=retry,
                           headers=tenant.limit_headers(now, which, wait_s))

    def settle(self, tenant: Tenant) -> None:
        """Take the current request's cost from the tenant's compute bucket and usage."""
        c = CHARGE.get()
        if c is None:
            return
        CHARGE.set(None)
        tenant.usage.compute_s += c.compute_s
        tenant.usage.items += c.items
        tenant.usage.tokens += c.tokens
        if tenant.compute is not None:
            tenant.compute.take(c.compute_s - c.reserved_s, self.clock())
            if c.compute_s > 0:
                old = tenant.cost_s.get(c.model)
                tenant.cost_s[c.model] = c.compute_s if old is None else old + COST_EWMA * (c.compute_s - old)
                if len(tenant.cost_s) > 1024:
                    tenant.cost_s.pop(next(iter(tenant.cost_s)))
        from maas import metrics

        metrics.tenant_usage(tenant.id, c.compute_s)

    def usage(self, tenant: Tenant | None) -> dict:
        """``GET /v1/usage``: the caller's own tenant, or every tenant for an admin (or without tenancy)."""
        now = self.clock()
        shown = list(self.tenants.values()) if tenant is None or tenant.spec.admin else [tenant]
        out = []
        for t in shown:
            row = {"tenant": t.id, "priority": t.priority, **t.usage.public()}
            if t.requests is not None:
                row["requests_remaining"] = max(0, int(t.requests.remaining(now)))
            if t.compute is not None:
                row["compute_remaining_s"] = round(t.compute.remaining(now), 3)
            out.append(row)
        return {"object": "list", "data": out}


class Unauthorized(MaasError):
    """A handle call's ``api_key`` is not a key of any tenant (HTTP 401 on the wire)."""

    status_code = 401
    error_type = "authentication_error"
