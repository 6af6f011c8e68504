"""The dataplane: the service's operations over the model graph, behind every protocol and handle.

One direction, one place per responsibility (``docs/architecture.md`` draws it):

==========================  ==========================================================================
module                      responsibility
==========================  ==========================================================================
:mod:`.types`               the operations' own request and result types (no protocol shapes)
:mod:`.operations`          embed, classify texts/images, generate (streamed or not), explain
:mod:`.routing`             which address (``name@version``) answers: versions, pins, ``auto``, cascade,
                            shadow, failover — one entry point, ``Router.run``
:mod:`.calls`               the one call path: deadline, error mapping, per-request record, front
                            batching, batching settings from the model's own ``user_config``
:mod:`.readiness`           whether each address can answer now; model cards; ``/readyz``
:mod:`.traffic`, :mod:`.auto`  the traffic policy and key table; ``auto``'s prediction and plan
:mod:`.watch`               running replicas and Serve's status messages
:mod:`.explain`             rendering Grad-CAM maps onto the original image (numpy, Pillow)
==========================  ==========================================================================

Protocol modules (:mod:`maas.protocol`) parse their wire format into :mod:`.types` requests, call
:class:`Operations`, and render the results; the ingress's handle methods do the same from the
request dicts, so HTTP and handles can never disagree. Nothing here imports torch.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.serve.handle import DeploymentHandle

from maas.config import AppConfig
from maas.dataplane.calls import Calls, Route
from maas.dataplane.operations import Operations
from maas.dataplane.readiness import Readiness
from maas.dataplane.routing import Router
from maas.dataplane.traffic import Traffic
from maas.dataplane.watch import DeploymentWatch
from maas.errors import ModelNotReady

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


def inline_tokenizers(config: AppConfig) -> dict[str, Any]:
    """Address → the tokenizer this ingress replica tokenizes small batches with (``tokenizers.inline_max_chars``;
    empty when it is 0): one :class:`~maas.preprocess.text.TextTokenizer` per distinct tokenizer of the config's
    text models, loaded here at start-up (tens of ms and a few MB each); a model whose tokenizer cannot be
    loaded here (no ``tokenizer.json``) always uses its tokenizer deployment."""
    if config.tokenizers.inline_max_chars <= 0:
        return {}
    from maas.config import tokenizer_deployment_name
    from maas.preprocess.text import load_inline_tokenizer

    loaded: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for spec in config.models:
        if spec.family == "image-classifier":
            continue
        dep = tokenizer_deployment_name(spec)
        if dep not in loaded:
            loaded[dep] = load_inline_tokenizer(spec.tokenizer_source, dep)
        if loaded[dep] is not None:
            out[spec.key] = loaded[dep]
    skipped = [s.key for s in config.models if s.family != "image-classifier" and s.key not in out]
    logging.getLogger("ray.serve.maas.dataplane").info(
        "small text batches tokenized in the ingress (up to %d characters, 16 texts) for %s; always by their "
        "tokenizer deployment: %s", config.tokenizers.inline_max_chars, sorted(out) or "no model",
        sorted(skipped) or "no model")
    return out


class Dataplane:
    """The parts of one ingress replica's core, wired once.

    Args:
        config: The validated app config.
        models: Address (``name`` or ``name@version``) → model deployment handle.
        preprocessors: Address → its (shared) preprocessor deployment handle.
        watch: Replica counts and deployment status (default: polled from Serve).
        keys: The ``RoutingKeys`` deployment's handle (apps with versions; see :mod:`maas.routing_keys`).

    Attributes:
        ops: :class:`Operations` (what protocols and handles call). router: :class:`Router`.
        readiness: :class:`Readiness`. calls: :class:`Calls`. traffic: :class:`Traffic`.
    """

    def __init__(self, config: AppConfig, models: dict[str, DeploymentHandle],
                 preprocessors: dict[str, DeploymentHandle], watch: DeploymentWatch | None = None,
                 keys: DeploymentHandle | None = None, index: DeploymentHandle | None = None,
                 pools: dict[str, DeploymentHandle] | None = None,
                 pool_tokenizers: dict[str, DeploymentHandle] | None = None):
        self.config = config
        self.limits = config.ingress
        self.created = int(time.time())  # the models' ``created`` (OpenAI cards): when this replica started
        routes = {s.key: Route(s, models[s.key], preprocessors[s.key]) for s in config.models}
        pools = pools or {}
        by_pool = {p.name: p.deployment_name for p in config.pools}
        self.watch = watch or DeploymentWatch(
            [s.deployment_name for s in config.models] + [by_pool[n] for n in pools],
            handles={**{s.deployment_name: models[s.key] for s in config.models},
                     **{by_pool[n]: h for n, h in pools.items()}})
        self.traffic = Traffic(config)
        self.calls = Calls(self.limits, routes, self.watch, self.traffic, inline_tokenizers(config),
                           config.tokenizers.inline_max_chars)
        self.repository = None
        if index is not None:
            from maas.dataplane.repository import RepositoryRoutes

            self.repository = RepositoryRoutes(config, index, pools, pool_tokenizers or {}, self.calls, self.traffic)
        self.readiness = Readiness(self.calls, self.watch, self.traffic, self.repository)
        self.router = Router(self.limits, self.calls, self.readiness, self.traffic, keys, self.repository)
        self.ops = Operations(self.limits, self.calls, self.router)

    def repository_api(self):
        """The repository models' routes and API (:class:`~maas.dataplane.repository.RepositoryRoutes`).

        Raises:
            NotFoundRoute: the app has no repositories (404 that says how to add one).
        """
        if self.repository is None:
            from maas.errors import NotFoundRoute

            raise NotFoundRoute("this app has no model repository; add `repositories:` and `pools:` to its config "
                                "(docs/repository.md)")
        return self.repository

    def permit(self, model: str) -> None:
        """Check that the current tenant may use ``model`` (a name, ``name@v`` or ``auto``) before a
        route reads anything else of the request (a v2 input schema, a model's metadata).

        Raises:
            Forbidden: it may not (403; counted as the tenant's refusal).
        """
        from maas.tenants import CURRENT, Forbidden

        tenant = CURRENT.get() if self.tenancy is not None else None
        if tenant is not None and model != "auto" and not tenant.may_use(model):
            from maas import metrics

            tenant.usage.rejected["forbidden"] += 1
            metrics.tenant_request(tenant.id, "forbidden")
            raise Forbidden(f"this API key may not use model {model.partition('@')[0]!r}; its models are "
                            f"{tenant.spec.models}")

    def visible(self, model: str) -> bool:
        """Whether the current tenant may see ``model`` in listings (every model without tenancy)."""
        from maas.tenants import CURRENT

        tenant = CURRENT.get() if self.tenancy is not None else None
        return tenant is None or tenant.may_use(model)

    def check_admin(self, what: str) -> None:
        """With tenants, ``what`` (the repository API) is for admin tenants only.

        Raises:
            Forbidden: the current tenant is not an admin.
        """
        from maas.tenants import CURRENT, Forbidden

        tenant = CURRENT.get() if self.tenancy is not None else None
        if tenant is not None and not tenant.spec.admin:
            raise Forbidden(f"{what} needs an admin tenant's key (admin: true in the tenants file)", param=None,
                            code="admin_required")

    def usage(self) -> dict:
        """``GET /v1/usage`` of the current tenant (see :meth:`maas.tenants.Tenancy.usage`).

        Raises:
            NotFoundRoute: the app has no tenants file (404 that says how to add one).
        """
        if self.tenancy is None:
            from maas.errors import NotFoundRoute

            raise NotFoundRoute("this app has no tenants: set args.ingress.tenants_file (docs/tenants.md)")
        from maas.tenants import CURRENT

        return self.tenancy.usage(CURRENT.get())

    @property
    def replica_id(self) -> str:
        """This ingress replica's id ('local' outside Serve)."""
        try:
            from ray import serve

            return serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a Serve replica
            return "local"

    @property
    def tenancy(self):
        """The ingress's :class:`maas.tenants.Tenancy`, or None (no tenants file)."""
        return self.router.tenancy

    @tenancy.setter
    def tenancy(self, value) -> None:
        self.router.tenancy = value

    @property
    def routes(self) -> dict[str, Route]:
        """Address → :class:`Route`."""
        return self.calls.routes
