"""The ingress deployment: a thin shell that mounts the protocol routes and exposes the
dataplane's operations as handle methods. App name ``maas``.

HTTP routes live in :mod:`maas.protocol.openai_routes`, :mod:`maas.protocol.v2_routes` and
:mod:`maas.protocol.maas_routes`; the operations, routing and front batching in
:mod:`maas.dataplane`. The same operations are handle methods for other Ray jobs::

    h = serve.get_app_handle("maas")
    h.embed.remote({"model": "minilm", "input": ["a", "b"]}).result()
    h.classify_images.remote("efficientnet-lite0", [jpeg_bytes], top_k=3).result()
    h.classify_images.remote("imagenet@2", [jpeg_bytes]).result()        # a pinned version
    h.embed.remote({"model": "minilm", "input": ["a"], "user": "u-42"})    # ``user``: sticky version

Handle methods take plain dicts/bytes and return plain dicts (the HTTP JSON bodies). Errors
raise :class:`~maas.errors.MaasError` subclasses, which a caller can catch by type.

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
from maas.protocol import http, maas_routes, openai_routes, parse, playground, v2_routes
from maas.protocol.maas import ExplainTextRequest, Text2TextRequest, TextClassificationRequest
from maas.protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from maas.security import Guard

logger = logging.getLogger("ray.serve.maas.ingress")

# FastAPIOffline: FastAPI whose /docs and /redoc load Swagger UI and ReDoc from files shipped in the
# fastapi-offline package (under /static-offline-docs), not from a CDN: the docs work offline.
app = FastAPIOffline(
    title="maas-serve",
    description="Model-as-a-Service on Ray Serve: embeddings, completion, chat, text2text and classification. "
    "A playground page is at /.",
)
app.add_middleware(Guard)
app.add_middleware(http.HttpSemantics)  # outermost: HEAD and content codings before the guard
http.install(app)
app.include_router(maas_routes.router)
app.include_router(openai_routes.router)
app.include_router(v2_routes.router)
playground.mount(app)


def _plain(body: dict) -> dict:
    """A dataplane body as JSON types only (embedding arrays as lists), for handle callers."""
    for d in body.get("data", ()):
        if isinstance(d, dict) and isinstance(d.get("embedding"), np.ndarray):
            d["embedding"] = d["embedding"].tolist()
    return body


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    """Mounts the routes and serves the handle methods over one :class:`~maas.dataplane.Dataplane`.

    Args:
        config: :class:`~maas.config.AppConfig` as a dict.
        models: model name → model deployment handle.
        preprocessors: model name → its (shared) preprocessor deployment handle.
        keys: the ``RoutingKeys`` deployment (apps where a model has several versions), else None.
    """

    def __init__(self, config: dict, models: dict[str, DeploymentHandle], preprocessors: dict[str, DeploymentHandle],
                 keys: DeploymentHandle | None = None):
        self.config = AppConfig.model_validate(config)
        self.dataplane = Dataplane(self.config, models, preprocessors, keys=keys)
        set_current(self.dataplane)
        # Imported here, not at module level: Serve ships this class by value, and the middleware
        # reads the replica's own module object.
        from maas import security

        security.SETTINGS.api_keys = security.load_api_keys(self.config.ingress.api_keys_file)
        security.SETTINGS.max_body_bytes = self.config.ingress.max_body_bytes
        keys = len(security.SETTINGS.api_keys)
        logger.info("API keys %s; body limit %d bytes", f"required ({keys} configured)" if keys else "not configured",
                    self.config.ingress.max_body_bytes)
        self._traffic_applied = False

    def reconfigure(self, user_config: dict) -> None:
        """Apply the traffic policy (:class:`maas.config.TrafficConfig`) from the deployment's
        ``user_config``: Serve calls this at start and on every lightweight config update, with no
        restart, so a ``serve deploy`` of an edited policy moves traffic in place.

        An invalid policy at start raises (the deploy fails with the message in ``serve status``).
        An invalid policy in a live update is refused without taking the service down: the last
        valid policy stays, the reason is logged as an ERROR and shown as ``traffic_error`` in
        ``/readyz`` (raising here would make Serve replace the replica, whose start would fail on
        the same policy, and the service would go down over a typo).

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

    async def list_models(self) -> dict:
        """All served models with family, tasks, weights source and readiness (``/v1/models`` body)."""
        return await self.dataplane.list_models()

    async def readiness(self) -> dict:
        """``{"ready", "models", "reasons"?}`` (``/readyz`` body)."""
        return await self.dataplane.readiness()

    async def stats(self) -> dict:
        """Front batching records of this ingress replica (see ``Dataplane.stats``)."""
        return self.dataplane.stats()

    async def embed(self, request: dict) -> dict:
        """OpenAI embeddings body for an OpenAI embeddings request dict."""
        return _plain(await self.dataplane.embed(parse(EmbeddingRequest, request)))

    async def complete(self, request: dict) -> dict:
        """OpenAI completions, not streamed (streamed: :meth:`stream_complete`)."""
        return await self.dataplane.complete(parse(CompletionRequest, request))

    async def chat(self, request: dict) -> dict:
        """OpenAI chat completions, not streamed (streamed: :meth:`stream_chat`)."""
        return await self.dataplane.chat(parse(ChatCompletionRequest, request))

    async def stream_complete(self, request: dict) -> AsyncIterator[dict]:
        """Streamed completion chunks; call with ``handle.options(stream=True).stream_complete.remote(...)``."""
        async for chunk in self.dataplane.stream_complete(parse(CompletionRequest, request)):
            yield chunk

    async def stream_chat(self, request: dict) -> AsyncIterator[dict]:
        """Streamed chat chunks; call with ``handle.options(stream=True).stream_chat.remote(...)``."""
        async for chunk in self.dataplane.stream_chat(parse(ChatCompletionRequest, request)):
            yield chunk

    async def text2text(self, request: dict) -> dict:
        """Encoder–decoder generation (``/v1/text2text`` body)."""
        return await self.dataplane.text2text(parse(Text2TextRequest, request))

    async def classify_text(self, request: dict) -> dict:
        """Text classification (``/v1/classifications/text`` body)."""
        return await self.dataplane.classify_text(parse(TextClassificationRequest, request))

    async def explain_image(self, model: str, image: bytes, target: str | int | None = None, view: str = "full",
                            seed: int = 0, overlay: bool = True) -> dict:
        """Grad-CAM explanation of one encoded image (``/v1/explanations/image`` body)."""
        if not isinstance(image, (bytes, bytearray)):
            raise InvalidRequest("image must be an encoded image file as bytes", param="image")
        return await self.dataplane.explain_image(model, bytes(image), target, view, seed, overlay)

    async def explain_text(self, request: dict) -> dict:
        """Token attributions (``/v1/explanations/text`` body)."""
        return await self.dataplane.explain_text(parse(ExplainTextRequest, request))

    async def classify_images(self, model: str, images: list[bytes], top_k: int = 5,
                              routing_key: str | None = None) -> dict:
        """Classify encoded images (JPEG, PNG, WebP, BMP, TIFF, GIF); one result per image, in order.
        ``model`` may be ``name@version``; ``routing_key`` keeps one caller on one version."""
        if not isinstance(images, (list, tuple)) or not all(isinstance(b, (bytes, bytearray)) for b in images):
            raise InvalidRequest("images must be a list of encoded image files as bytes", param="images")
        return await self.dataplane.classify_images(model, [bytes(b) for b in images], top_k, routing_key=routing_key)
