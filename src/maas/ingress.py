"""The ingress deployment: one FastAPI app on ``@serve.ingress``, app name ``maas``.

It validates, resolves the model name to a route (model handle + its shared preprocessor
handle), chains ``model.remote(pre.remote(x))`` so tensors go from preprocessor to model
through the object store, awaits, and maps errors. It holds no tensor code.

The same operations are handle methods for other Ray jobs::

    h = serve.get_app_handle("maas")
    h.embed.remote({"model": "minilm", "input": ["a", "b"]}).result()
    h.classify_images.remote("efficientnet-lite0", [jpeg_bytes], top_k=3).result()

Handle methods take plain dicts/bytes and return plain dicts (the HTTP JSON bodies). Errors
raise :class:`~maas.errors.MaasError` subclasses, which a caller can catch by type.
"""


import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from maas.config import AppConfig, ModelSpec
from maas.errors import (
    InvalidRequest,
    MaasError,
    ModelNotFound,
    ModelNotReady,
    PayloadTooLarge,
    TaskNotSupported,
    UnsupportedMediaType,
    error_body,
    unwrap,
)
from maas.protocol import CompletionUsage, Usage
from maas.protocol.maas import (
    Classification,
    ClassificationResponse,
    ImageClassificationRequest,
    Text2TextItem,
    Text2TextRequest,
    Text2TextResponse,
    TextClassificationRequest,
)
from maas.protocol.openai import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
)

logger = logging.getLogger("maas.ingress")

app = FastAPI(
    title="maas-serve",
    description="Model-as-a-Service on Ray Serve: embeddings, completion, text2text and classification.",
)

_ERROR_SCHEMA = {
    "content": {"application/json": {"example": error_body("what to fix", "invalid_request_error", "field", None)}}
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid request; the message says what to fix.", **_ERROR_SCHEMA},
    404: {"description": "Unknown model.", **_ERROR_SCHEMA},
    413: {"description": "Request carries more than the configured limits.", **_ERROR_SCHEMA},
    503: {"description": "Model not ready.", **_ERROR_SCHEMA},
}


@app.exception_handler(MaasError)
async def _maas_error(request: Request, exc: MaasError) -> JSONResponse:
    if exc.status_code >= 500:
        logger.error("request %s failed: %s", request.headers.get("x-request-id", "-"), exc.message)
        return JSONResponse(
            error_body("the service could not answer this request; retry later", exc.error_type, None, exc.code),
            status_code=exc.status_code,
        )
    return JSONResponse(exc.to_body(), status_code=exc.status_code)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = _first_validation_error(exc.errors())
    return JSONResponse(err.to_body(), status_code=err.status_code)


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("request %s failed with an internal error", request.headers.get("x-request-id", "-"))
    return JSONResponse(
        error_body("internal error; the request id is in the x-request-id header", "internal_error"), status_code=500
    )


def _first_validation_error(errors: list[dict]) -> InvalidRequest:
    """One 400 that names the first bad field (pydantic's location, minus the ``body`` prefix)."""
    if not errors:
        return InvalidRequest("invalid request")
    e = errors[0]
    # Drop the 'body' prefix and the union-member tags pydantic adds ('str', 'list[str]').
    loc = [str(p) for p in e.get("loc", ()) if p != "body" and not _is_type_tag(p)]
    param = ".".join(loc) or None
    msg = e.get("msg", "invalid value")
    if e.get("type") == "extra_forbidden":
        msg = "unknown field; remove it (see the route's schema in /docs)"
    elif e.get("type") == "json_invalid":
        return InvalidRequest("request body is not valid JSON", param=None, code="invalid_json")
    return InvalidRequest(f"{param or 'body'}: {msg}", param=param)


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "list", "dict", "none"} or "[" in part)


def _parse(schema: type[BaseModel], request: Any) -> Any:
    """Validate a handle caller's dict (or an already-built schema object)."""
    if isinstance(request, schema):
        return request
    try:
        return schema.model_validate(request)
    except ValidationError as exc:
        raise _first_validation_error(exc.errors(include_url=False)) from None


@dataclass
class _Route:
    spec: ModelSpec
    model: DeploymentHandle
    pre: DeploymentHandle


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    """Routes requests to model deployments through their shared preprocessors.

    Args:
        config: :class:`~maas.config.AppConfig` as a dict.
        models: model name → model deployment handle.
        preprocessors: model name → its (shared) preprocessor deployment handle.
    """

    def __init__(self, config: dict, models: dict[str, DeploymentHandle], preprocessors: dict[str, DeploymentHandle]):
        self.config = AppConfig.model_validate(config)
        self.routes = {
            spec.name: _Route(spec=spec, model=models[spec.name], pre=preprocessors[spec.name])
            for spec in self.config.models
        }
        self._info: dict[str, dict] = {}
        self.created = int(time.time())

    # ------------------------------------------------------------------ helpers

    def _route(self, name: str, task: str) -> _Route:
        route = self.routes.get(name)
        if route is None:
            raise ModelNotFound(f"model {name!r} does not exist; GET /v1/models lists the served models")
        if task not in route.spec.tasks:
            raise TaskNotSupported(
                f"model {name!r} ({route.spec.family}) does not offer {task}; it offers {list(route.spec.tasks)}"
            )
        return route

    async def _await(self, response, name: str):
        """Await a model call; re-raise domain errors by type, time out with 503."""
        try:
            return await asyncio.wait_for(response, timeout=self.config.ingress.model_call_timeout_s)
        except asyncio.TimeoutError:
            raise ModelNotReady(f"model {name!r} did not answer within {self.config.ingress.model_call_timeout_s} s") from None
        except Exception as exc:  # noqa: BLE001 - sorted by type just below
            cause = unwrap(exc)
            if isinstance(cause, MaasError):
                raise cause from None
            logger.error("model %s call failed: %s", name, type(cause).__name__)
            raise ModelNotReady(f"model {name!r} failed to answer") from None

    async def _model_info(self, route: _Route) -> dict:
        name = route.spec.name
        if name not in self._info:
            self._info[name] = await self._await(route.model.info.remote(), name)
        return self._info[name]

    def _check_items(self, n: int, param: str) -> None:
        limit = self.config.ingress.max_items_per_request
        if n > limit:
            raise PayloadTooLarge(f"{param} has {n} items; at most {limit} per request, split it", param=param)

    # ------------------------------------------------------------------ handle methods (one set of operations)

    async def list_models(self) -> dict:
        """All served models with family, tasks, weights source and readiness (``/v1/models`` body)."""
        names = list(self.routes)
        ready = await asyncio.gather(*(self._ready(n) for n in names))
        cards = [
            ModelCard(
                id=n, created=self.created, family=self.routes[n].spec.family, tasks=list(self.routes[n].spec.tasks),
                weights=self.routes[n].spec.weights_label(), demo_weights=self.routes[n].spec.is_demo,
                ready=r, deployment=self.routes[n].spec.deployment_name,
            )
            for n, r in zip(names, ready)
        ]
        return ModelList(data=cards).model_dump()

    async def _ready(self, name: str) -> bool:
        try:
            await asyncio.wait_for(self._model_info(self.routes[name]), timeout=5.0)
            return True
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False

    async def readiness(self) -> dict:
        """``{"ready": bool, "models": {name: bool}}``: every model answers its info call."""
        names = list(self.routes)
        ready = await asyncio.gather(*(self._ready(n) for n in names))
        return {"ready": all(ready), "models": dict(zip(names, ready))}

    async def embed(self, request: dict | EmbeddingRequest) -> dict:
        """OpenAI embeddings. Inputs longer than the model's limit are truncated to it."""
        req = _parse(EmbeddingRequest, request)
        route = self._route(req.model, "embeddings")
        texts = req.texts()
        self._check_items(len(texts), "input")
        info = await self._model_info(route)
        if req.dimensions is not None and req.dimensions != info["dimensions"]:
            raise InvalidRequest(
                f"model {req.model!r} returns {info['dimensions']}-dimensional embeddings and cannot shorten "
                f"them; omit dimensions or set it to {info['dimensions']}",
                param="dimensions",
            )
        tokens = route.pre.remote(texts, max_length=info["max_input_tokens"], truncate=True)
        out = await self._await(route.model.remote(tokens, {"task": "embeddings"}), req.model)
        return EmbeddingResponse.build(
            req.model, out["embeddings"], out["num_tokens"], req.encoding_format, route.spec.is_demo
        ).model_dump()

    async def complete(self, request: dict | CompletionRequest) -> dict:
        """OpenAI completions (non-streaming). Over-long prompts are rejected, not truncated."""
        req = _parse(CompletionRequest, request)
        route = self._route(req.model, "completion")
        prompts = req.prompts()
        self._check_items(len(prompts), "prompt")
        tokens = route.pre.remote(prompts, max_length=None, truncate=False, add_special_tokens=False)
        out = await self._await(route.model.remote(tokens, req.to_params()), req.model)
        choices = [
            CompletionChoice(text=c["text"], index=i, finish_reason=c["finish_reason"])
            for i, c in enumerate(out["choices"])
        ]
        prompt_tokens = sum(out["prompt_tokens"])
        completion_tokens = sum(c["completion_tokens"] for c in out["choices"])
        return CompletionResponse(
            model=req.model, choices=choices, demo_weights=route.spec.is_demo,
            usage=CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens),
        ).model_dump()

    async def text2text(self, request: dict | Text2TextRequest) -> dict:
        """Encoder–decoder generation; inputs are truncated to the encoder's limit."""
        req = _parse(Text2TextRequest, request)
        route = self._route(req.model, "text2text")
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if not texts:
            raise InvalidRequest("input is an empty list; send at least one text", param="input")
        self._check_items(len(texts), "input")
        info = await self._model_info(route)
        tokens = route.pre.remote(texts, max_length=info["max_input_tokens"], truncate=True)
        out = await self._await(route.model.remote(tokens, req.to_params()), req.model)
        data = [
            Text2TextItem(index=i, text=c["text"], finish_reason=c["finish_reason"]) for i, c in enumerate(out["choices"])
        ]
        pt = sum(out["prompt_tokens"])
        ct = sum(c["completion_tokens"] for c in out["choices"])
        return Text2TextResponse(
            model=req.model, data=data, demo_weights=route.spec.is_demo,
            usage=CompletionUsage(prompt_tokens=pt, completion_tokens=ct, total_tokens=pt + ct),
        ).model_dump()

    async def classify_text(self, request: dict | TextClassificationRequest) -> dict:
        """Text classification with a sequence-classification head; inputs truncated to the limit."""
        req = _parse(TextClassificationRequest, request)
        route = self._route(req.model, "text-classification")
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if not texts:
            raise InvalidRequest("input is an empty list; send at least one text", param="input")
        self._check_items(len(texts), "input")
        info = await self._model_info(route)
        tokens = route.pre.remote(texts, max_length=info["max_input_tokens"], truncate=True)
        out = await self._await(
            route.model.remote(tokens, {"task": "text-classification", "top_k": req.top_k}), req.model
        )
        n = sum(out["num_tokens"])
        return ClassificationResponse(
            model=req.model, demo_weights=route.spec.is_demo,
            data=[Classification(index=i, top_k=r["top_k"]) for i, r in enumerate(out["results"])],
            usage=Usage(prompt_tokens=n, total_tokens=n),
        ).model_dump()

    async def classify_images(self, model: str, images: list[bytes], top_k: int = 5) -> dict:
        """Classify encoded images (JPEG, PNG, WebP, BMP, TIFF, GIF); one result per image, in order."""
        route = self._route(model, "image-classification")
        if not isinstance(images, (list, tuple)) or not all(isinstance(b, (bytes, bytearray)) for b in images):
            raise InvalidRequest("images must be a list of encoded image files as bytes", param="images")
        if not images:
            raise InvalidRequest("no images in the request; send at least one", param="images")
        self._check_items(len(images), "images")
        limit = self.config.ingress.max_image_bytes
        for i, b in enumerate(images):
            if len(b) > limit:
                raise PayloadTooLarge(f"images[{i}] is {len(b)} bytes; the limit is {limit} bytes", param=f"images[{i}]")
        pixels = route.pre.remote([bytes(b) for b in images])
        out = await self._await(route.model.remote(pixels, {"top_k": top_k}), model)
        return ClassificationResponse(
            model=model, demo_weights=route.spec.is_demo,
            data=[Classification(index=i, top_k=r["top_k"]) for i, r in enumerate(out["results"])],
        ).model_dump(exclude_none=True)

    # ------------------------------------------------------------------ HTTP routes

    @app.get("/healthz", tags=["health"])
    async def http_healthz(self) -> dict:
        """Liveness: the ingress answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "Some model is not ready."}})
    async def http_readyz(self) -> JSONResponse:
        """Readiness: every model is loaded and answering."""
        body = await self.readiness()
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/v1/models", response_model=ModelList, tags=["openai"])
    async def http_models(self) -> dict:
        return await self.list_models()

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES, tags=["openai"])
    async def http_embeddings(self, body: EmbeddingRequest) -> dict:
        return await self.embed(body)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES, tags=["openai"])
    async def http_completions(self, body: CompletionRequest) -> dict:
        return await self.complete(body)

    @app.post("/v1/text2text", response_model=Text2TextResponse, responses=ERROR_RESPONSES, tags=["maas"])
    async def http_text2text(self, body: Text2TextRequest) -> dict:
        return await self.text2text(body)

    @app.post(
        "/v1/classifications/text", response_model=ClassificationResponse, responses=ERROR_RESPONSES, tags=["maas"]
    )
    async def http_classify_text(self, body: TextClassificationRequest) -> dict:
        return await self.classify_text(body)

    @app.post(
        "/v1/classifications/image",
        response_model=ClassificationResponse,
        responses={**ERROR_RESPONSES, 415: {"description": "Neither multipart/form-data nor JSON."}},
        tags=["maas"],
        openapi_extra={
            "requestBody": {
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["model", "file"],
                            "properties": {
                                "model": {"type": "string"},
                                "top_k": {"type": "integer", "default": 5},
                                "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
                            },
                        }
                    },
                    "application/json": {"schema": ImageClassificationRequest.model_json_schema()},
                }
            }
        },
    )
    async def http_classify_image(self, request: Request) -> dict:
        """Multipart upload (fields ``model``, ``top_k``, one or more ``file``/``files``) or JSON
        ``{"model", "images": [base64], "top_k"}``."""
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=self.config.ingress.max_items_per_request + 1)
            files = [f for key in ("file", "files") for f in form.getlist(key) if hasattr(f, "read")]
            if not files:
                raise InvalidRequest("multipart request has no file; attach images as 'file' fields", param="file")
            raw = {"model": form.get("model"), "images": [], "top_k": form.get("top_k", 5)}
            if raw["model"] is None:
                raise InvalidRequest("multipart request has no 'model' field", param="model")
            try:
                top_k = int(raw["top_k"])
            except (TypeError, ValueError):
                raise InvalidRequest(f"top_k must be an integer, got {raw['top_k']!r}", param="top_k") from None
            images = [await f.read() for f in files]
            return await self.classify_images(str(raw["model"]), images, top_k)
        if ctype.startswith("application/json") or not ctype:
            try:
                body = await request.json()
            except ValueError:
                raise InvalidRequest("request body is not valid JSON", code="invalid_json") from None
            req = _parse(ImageClassificationRequest, body)
            return await self.classify_images(req.model, req.decoded(), req.top_k)
        raise UnsupportedMediaType(
            f"content type {ctype!r} is not accepted; send multipart/form-data with 'file' fields or JSON with base64 'images'"
        )

