"""The ingress deployment: a thin shell that mounts the protocol routes and exposes the
dataplane's operations as handle methods. App name ``maas``.

HTTP routes live in :mod:`maas.protocol.openai_routes`, :mod:`maas.protocol.v2_routes` and
:mod:`maas.protocol.maas_routes`; the operations, routing and front batching in
:mod:`maas.dataplane`. The same operations are handle methods for other Ray jobs, taking the
request body of their HTTP route as a dict and answering its response body::

    h = serve.get_app_handle("maas")
    h.embed.remote({"model": "minilm", "input": ["a", "b"]}).result()
    h.classify_images.remote({"model": "efficientnet-lite0", "images": [jpeg_bytes], "top_k": 3}).result()
    h.classify_images.remote({"model": "imagenet@2", "images": [jpeg_bytes]}).result()    # a pinned version
    h.classify_images.remote({"model": "auto", "images": [jpeg_bytes], "latency_budget_ms": 50,
                              "cascade": {"threshold": 0.6}}).result()
    h.embed.remote({"model": "minilm", "input": ["a"], "user": "u-42"})    # ``user``: sticky version

Images (and an explanation's ``image``) may be raw file bytes, as well as the base64 strings HTTP
JSON carries. Every operation method takes ``routing_key=`` (what the ``X-Maas-Routing-Key`` header says on
HTTP), ``api_key=`` and ``trace_context=`` (a W3C carrier dict, filled by ``opentelemetry.propagate.inject``:
the call joins the caller's trace when tracing is on; :mod:`maas.tracing`); ``list_models`` and ``usage``
take ``trace_context=`` too, the operator calls (``readiness``, ``stats``, the repository's) none of them.
Errors raise :class:`~maas.errors.MaasError` subclasses, which a caller can catch by type.

The ingress imports no torch: it handles bytes, JSON and numpy only.
"""

from __future__ import annotations

import logging
from typing import AsyncIterator

import numpy as np
from fastapi_offline import FastAPIOffline
from ray import serve
from ray.serve.handle import DeploymentHandle

from maas.config import AppConfig
from maas.dataplane import Dataplane, set_current
from maas.errors import InvalidRequest
from maas.protocol import http, maas_routes, openai_render, openai_routes, parse, playground, v2_routes
from maas.protocol import maas as maas_render
from maas.protocol.maas import (
    ExplainImageRequest,
    ExplainTextRequest,
    ImageClassificationRequest,
    Text2TextRequest,
    TextClassificationRequest,
)
from maas.protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from maas.security import Cors, Guard
from maas.tracing import TracingMiddleware, traced_handle

logger = logging.getLogger("ray.serve.maas.ingress")

# FastAPIOffline: FastAPI whose /docs and /redoc load Swagger UI and ReDoc from files shipped in the
# fastapi-offline package (under /static-offline-docs), not from a CDN: the docs work offline.
app = FastAPIOffline(
    title="maas-serve",
    description="Model-as-a-Service on Ray Serve: embeddings, completion, chat, text2text and classification. "
    "A playground page is at /.",
)
app.add_middleware(http.FastJson)  # innermost: the hot JSON routes without FastAPI's per-request work
app.add_middleware(Guard)
app.add_middleware(http.HttpSemantics)  # HEAD and content codings before the guard
app.add_middleware(Cors)  # browsers send preflights without credentials, answered before the guard
app.add_middleware(TracingMiddleware)  # outermost: the request's span covers every middleware
http.install(app)
app.include_router(maas_routes.router)
app.include_router(openai_routes.router)
app.include_router(v2_routes.router)
playground.mount(app)


def route_paths() -> frozenset[str]:
    """The app's fixed route paths (span names; templated v2 paths are named by :func:`maas.tracing.route_of`)."""
    routes = [*app.routes]
    for router in (maas_routes.router, openai_routes.router, v2_routes.router, playground.router):
        routes += router.routes
    return frozenset(p for r in routes if (p := getattr(r, "path", None)) and "{" not in p)


def set_gc_threshold(gen0: int) -> None:
    """Set Python's generation-0 collection threshold in this process (``ingress.gc_threshold``), keeping the
    older generations' thresholds (Python's 10 and 10).

    Why: the ingress allocates a few hundred short-lived container objects per request and frees them by
    reference count; the gen-0 counter (allocations net of frees, reset by each collection) still reached
    Python's 700 every ~6 requests, and each collection promoted the requests then in flight, so gen-1 and
    gen-2 collections followed. At 10,000 the counter's swings no longer reach the threshold; what needs the
    collector (reference cycles) is kept out of the request path (see :mod:`maas.batching.front`).
    """
    import gc

    gc.set_threshold(gen0, *gc.get_threshold()[1:])


def _plain(body: dict) -> dict:
    """A rendered body as JSON types only (embedding arrays as lists), for handle callers."""
    for d in body.get("data", ()):
        if isinstance(d, dict) and isinstance(d.get("embedding"), np.ndarray):
            d["embedding"] = d["embedding"].tolist()
    return body


def _raw_files(request: dict, field: str, many: bool) -> tuple[dict, list | None]:
    """Split raw ``bytes`` files out of a handle caller's request (HTTP JSON carries base64):
    ``(the request with placeholders, the files)`` or ``(request, None)`` when they are base64."""
    if not isinstance(request, dict):
        raise InvalidRequest(f"the request must be a dict (the JSON body of the HTTP route), got "
                             f"{type(request).__name__}")
    value = request.get(field)
    items = value if many else [value]
    if not isinstance(items, (list, tuple)) or not items or not any(isinstance(b, (bytes, bytearray)) for b in items):
        return request, None
    if not all(isinstance(b, (bytes, bytearray)) for b in items):
        raise InvalidRequest(f"{field} must be all raw bytes or all base64 strings, not a mix", param=field)
    placeholder = ["AA=="] * len(items) if many else "AA=="
    return {**request, field: placeholder}, [bytes(b) for b in items]


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    """Mounts the routes and serves the handle methods over one :class:`~maas.dataplane.Dataplane`.

    Args:
        config: :class:`~maas.config.AppConfig` as a dict.
        models: model name → model deployment handle.
        preprocessors: model name → its (shared) preprocessor deployment handle.
        keys: the ``RoutingKeys`` deployment (apps where a model has several versions), else None.
        index: the ``RepositoryIndex`` deployment (apps with repositories), else None.
        pools: pool name → its ``Pool-<name>`` deployment handle. pool_tokenizers: pool name → its tokenizer's.
    """

    def __init__(self, config: dict, models: dict[str, DeploymentHandle], preprocessors: dict[str, DeploymentHandle],
                 keys: DeploymentHandle | None = None, index: DeploymentHandle | None = None,
                 pools: dict[str, DeploymentHandle] | None = None,
                 pool_tokenizers: dict[str, DeploymentHandle] | None = None):
        self.config = AppConfig.model_validate(config)
        set_gc_threshold(self.config.ingress.gc_threshold)
        self.dataplane = Dataplane(self.config, models, preprocessors, keys=keys, index=index, pools=pools,
                                   pool_tokenizers=pool_tokenizers)
        set_current(self.dataplane)
        # Imported here, not at module level: Serve ships this class by value, and the middleware
        # reads the replica's own module object.
        from maas import security

        security.SETTINGS.api_keys = security.load_api_keys(self.config.ingress.api_keys_file)
        security.SETTINGS.max_body_bytes = self.config.ingress.max_body_bytes
        security.SETTINGS.cors_allowed_origins = security.cors_origins(self.config.ingress.cors_allowed_origins)
        keys = len(security.SETTINGS.api_keys)
        security.SETTINGS.tenancy = None
        if self.config.ingress.tenants_file:
            from maas.tenants import Tenancy

            security.SETTINGS.tenancy = Tenancy(self.config.ingress.tenants_file, security.SETTINGS.api_keys)
            keys = len(security.SETTINGS.tenancy.by_hash)
        self.dataplane.tenancy = security.SETTINGS.tenancy
        from maas import tracing

        tracing.TracingMiddleware.known_routes = route_paths()
        tracing.configure(self.config.ingress.tracing)
        logger.info("API keys %s; body limit %d bytes", f"required ({keys} configured)" if keys else "not configured",
                    self.config.ingress.max_body_bytes)
        self._traffic_applied = False

    async def __del__(self):
        """On the replica's graceful shutdown (Serve calls it): export the spans still queued (at most 5 s), so a
        rollout or a scale-down does not lose the last seconds of traces."""
        import asyncio

        from maas import tracing

        await asyncio.to_thread(tracing.configure, None)

    async def reconfigure(self, user_config: dict) -> None:
        """Apply the traffic policy (:class:`maas.config.TrafficConfig`) from the deployment's
        ``user_config``: Serve calls this at start and on every lightweight config update, with no
        restart, so a ``serve deploy`` of an edited policy moves traffic in place.

        An invalid policy at start raises (the deploy fails with the message in ``serve status``).
        An invalid policy in a live update is refused without taking the service down: the last
        valid policy stays, the reason is logged as an ERROR and shown as ``traffic_error`` in
        ``/readyz`` (raising here would make Serve replace the replica, whose start would fail on
        the same policy, and the service would go down over a typo).

        ``async`` on purpose: Serve runs a plain ``def reconfigure`` in a thread, where the policy
        could change between two reads of one request's routing; on the event loop it is applied
        between requests' steps, atomically for each of them.

        Raises:
            ValueError: an invalid policy when the replica starts.
        """
        try:
            self.dataplane.traffic.apply(user_config)
        except ValueError as exc:
            if not self._traffic_applied:
                raise
            self.dataplane.traffic.error = f"refused traffic policy update (the previous policy stands): {exc}"
            logger.error("%s", self.dataplane.traffic.error)
            return
        self._traffic_applied = True

    # ------------------------------------------------------------------ handle methods (the dataplane's operations)

    @traced_handle
    async def list_models(self) -> dict:
        """All served models with family, tasks, weights source and readiness (``/v1/models`` body)."""
        return openai_render.model_list(await self.dataplane.readiness.cards(), self.dataplane.created)

    async def readiness(self) -> dict:
        """``{"ready", "models", "reasons"?}`` (``/readyz`` body)."""
        return await self.dataplane.readiness.report()

    async def stats(self) -> dict:
        """Front batching records of this ingress replica (see ``Calls.stats``), ``"tokenized_in_ingress"``:
        batches and generation requests this replica tokenized itself (``tokenizers.inline_max_chars``); with
        tracing on, also ``"tracing"``: spans exported, failed, dropped and queued
        (:meth:`maas.tracing.Tracer.counts`)."""
        from maas import tracing

        out = self.dataplane.calls.stats()
        out["tokenized_in_ingress"] = self.dataplane.calls.inline_batches
        t = tracing.tracer()
        if t is not None:
            out["tracing"] = t.counts()
        return out

    async def repository_index(self, ready: bool = False) -> list[dict]:
        """``POST /v2/repository/index``: every repository model with its state (``READY`` /
        ``UNAVAILABLE``), reason, pool and the replicas that hold it."""
        return await self.dataplane.repository_api().index_list(ready)

    async def load_model(self, name: str) -> dict:
        """``POST /v2/repository/models/{name}/load``: serve it (again) and load it on a pool replica now."""
        return await self.dataplane.repository_api().load(name)

    async def unload_model(self, name: str) -> dict:
        """``POST /v2/repository/models/{name}/unload``: stop serving it; pool replicas drain and evict it."""
        return await self.dataplane.repository_api().unload(name)

    def _as_tenant(self, api_key: str | None) -> None:
        """A handle call's tenant: the one of ``api_key`` (its permissions, quotas and priority, as on
        HTTP). Without a key a handle call from the cluster runs as no tenant: a Ray job that reaches
        the handle is inside the cluster's trust boundary (it could call the model deployments as well).

        Raises:
            Unauthorized: tenants are configured and ``api_key`` is not a key of any tenant.
        """
        tenancy = self.dataplane.tenancy
        if api_key is None or tenancy is None:
            return
        from maas.tenants import CURRENT, Unauthorized

        tenancy.maybe_reload()
        tenant = tenancy.resolve(api_key.encode())
        if tenant is None:
            raise Unauthorized("invalid API key")
        CURRENT.set(tenant)

    @traced_handle
    async def usage(self, api_key: str | None = None) -> dict:
        """``GET /v1/usage``: the tenant of ``api_key`` (every tenant without a key: a handle caller is
        inside the cluster)."""
        self._as_tenant(api_key)
        return {**self.dataplane.usage(), "replica": self.dataplane.replica_id}

    @traced_handle
    async def embed(self, request: dict, routing_key: str | None = None, api_key: str | None = None) -> dict:
        """``POST /v1/embeddings``: an OpenAI embeddings request dict → its body (vectors as lists)."""
        self._as_tenant(api_key)
        body = parse(EmbeddingRequest, request)
        res = await self.dataplane.ops.embed(body.to_operation(routing_key))
        return _plain(openai_render.embeddings(res, body.encoding_format))

    @traced_handle
    async def complete(self, request: dict, routing_key: str | None = None, api_key: str | None = None) -> dict:
        """``POST /v1/completions``, not streamed (streamed: :meth:`stream_complete`)."""
        self._as_tenant(api_key)
        res = await self.dataplane.ops.generate(parse(CompletionRequest, request).to_operation(routing_key))
        return openai_render.completion(res)

    @traced_handle
    async def chat(self, request: dict, routing_key: str | None = None, api_key: str | None = None) -> dict:
        """``POST /v1/chat/completions``, not streamed (streamed: :meth:`stream_chat`)."""
        self._as_tenant(api_key)
        res = await self.dataplane.ops.generate(parse(ChatCompletionRequest, request).to_operation(routing_key))
        return openai_render.chat_completion(res)

    @traced_handle
    async def stream_complete(self, request: dict, routing_key: str | None = None, api_key: str | None = None) -> AsyncIterator[dict]:
        """Streamed completion chunks; call with ``handle.options(stream=True).stream_complete.remote(...)``."""
        self._as_tenant(api_key)
        async for chunk in self._stream(parse(CompletionRequest, request), False, routing_key):
            yield chunk

    @traced_handle
    async def stream_chat(self, request: dict, routing_key: str | None = None, api_key: str | None = None) -> AsyncIterator[dict]:
        """Streamed chat chunks; call with ``handle.options(stream=True).stream_chat.remote(...)``."""
        self._as_tenant(api_key)
        async for chunk in self._stream(parse(ChatCompletionRequest, request), True, routing_key):
            yield chunk

    async def _stream(self, body, chat: bool, routing_key: str | None) -> AsyncIterator[dict]:
        stream = await self.dataplane.ops.stream(body.to_operation(routing_key))
        renderer = openai_render.StreamRenderer(stream.answered, chat, body.include_usage)
        async for event in stream.events:
            for chunk in renderer.render(event):
                yield chunk

    @traced_handle
    async def text2text(self, request: dict, routing_key: str | None = None, api_key: str | None = None) -> dict:
        """``POST /v1/text2text``: encoder–decoder generation."""
        self._as_tenant(api_key)
        res = await self.dataplane.ops.generate(parse(Text2TextRequest, request).to_operation(routing_key))
        return maas_render.text2text(res)

    @traced_handle
    async def classify_text(self, request: dict, routing_key: str | None = None, api_key: str | None = None) -> dict:
        """``POST /v1/classifications/text``."""
        self._as_tenant(api_key)
        res = await self.dataplane.ops.classify_texts(parse(TextClassificationRequest, request).to_operation(routing_key))
        return maas_render.classifications(res)

    @traced_handle
    async def classify_images(self, request: dict, routing_key: str | None = None, api_key: str | None = None) -> dict:
        """``POST /v1/classifications/image`` as JSON: ``{"model", "images", "top_k"?, "latency_budget_ms"?,
        "cascade"?}``; ``images`` raw file bytes (JPEG, PNG, WebP, BMP, TIFF, GIF) or base64 strings.
        One result per image, in order."""
        self._as_tenant(api_key)
        checked, files = _raw_files(request, "images", many=True)
        req = parse(ImageClassificationRequest, checked).to_operation(routing_key, images=files)
        return maas_render.classifications(await self.dataplane.ops.classify_images(req))

    @traced_handle
    async def explain_image(self, request: dict, routing_key: str | None = None, api_key: str | None = None) -> dict:
        """``POST /v1/explanations/image`` as JSON: ``{"model", "image", "target"?, "view"?, "seed"?,
        "overlay"?}``; ``image`` raw file bytes or base64."""
        self._as_tenant(api_key)
        checked, files = _raw_files(request, "image", many=False)
        req = parse(ExplainImageRequest, checked).to_operation(routing_key, image=files[0] if files else None)
        return maas_render.explanation(await self.dataplane.ops.explain_image(req))

    @traced_handle
    async def explain_text(self, request: dict, routing_key: str | None = None, api_key: str | None = None) -> dict:
        """``POST /v1/explanations/text``: token attributions."""
        self._as_tenant(api_key)
        res = await self.dataplane.ops.explain_text(parse(ExplainTextRequest, request).to_operation(routing_key))
        return maas_render.explanation(res)
