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
import functools
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from maas import metrics
from maas.config import AppConfig, ModelSpec
from maas.errors import (
    InvalidRequest,
    MaasError,
    MethodNotAllowed,
    ModelNotFound,
    ModelNotReady,
    ModelTimeout,
    NotFoundRoute,
    PayloadTooLarge,
    ServiceOverloaded,
    TaskNotSupported,
    UnsupportedMediaType,
    error_body,
    unwrap,
)
from maas.protocol import CompletionUsage, Usage, v2
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
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
)
from maas.security import Guard

logger = logging.getLogger("ray.serve.maas.ingress")

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


app.add_middleware(Guard)

#: Seconds a client should wait before retrying a 503 (sent as ``Retry-After``).
RETRY_AFTER_S = 1


def error_response(request: Request, exc: MaasError) -> JSONResponse:
    """The one place an error becomes a response.

    OpenAI shape everywhere except under ``/v2``, where the Open Inference Protocol's
    ``{"error": "message"}`` is used. 5xx bodies hide internals (logged with the request id);
    429/503 carry ``Retry-After`` so clients' built-in retries back off.
    """
    status = int(exc.status_code)
    message = exc.message
    if status >= 500:
        logger.error("request %s failed: %s", request.headers.get("x-request-id", "-"), exc.message)
        if not isinstance(exc, (ModelNotReady, ModelTimeout, ServiceOverloaded)):
            message = "the service could not answer this request; retry later"
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503, 504) else None
    if request.url.path.startswith("/v2"):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    body = error_body(message, exc.error_type, exc.param if status < 500 else None, exc.code)
    return JSONResponse(body, status_code=status, headers=headers)


@app.exception_handler(MaasError)
async def _maas_error(request: Request, exc: MaasError) -> JSONResponse:
    return error_response(request, exc)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(request, _first_validation_error(exc.errors()))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Framework errors (unknown route, wrong method, unparsable body or form) in our shape."""
    cause = exc.__cause__
    if isinstance(cause, MaasError):  # e.g. the body limit tripped while the body was parsed
        return error_response(request, cause)
    detail = str(exc.detail)
    if exc.status_code == 404:
        err: MaasError = NotFoundRoute(f"no route {request.method} {request.url.path}; see /docs")
    elif exc.status_code == 405:
        err = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
    elif "Too many files" in detail or "Too many fields" in detail:
        err = PayloadTooLarge(f"{detail.rstrip('.')}; split the request")
    else:
        err = InvalidRequest(f"{detail.rstrip('.')}; check the body against the route's schema in /docs")
    return error_response(request, err)


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("request %s failed with an internal error", request.headers.get("x-request-id", "-"))
    return error_response(request, MaasError("internal error"))


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


def _usage(out: dict) -> CompletionUsage:
    prompt = sum(out["prompt_tokens"])
    completion = sum(c["completion_tokens"] for c in out["choices"])
    return CompletionUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _usage_counts(done: dict) -> CompletionUsage:
    p, c = done["prompt_tokens"], done["completion_tokens"]
    return CompletionUsage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


async def _sse(first: dict | None, rest: AsyncIterator[dict], request_id: str) -> AsyncIterator[bytes]:
    """Server-sent events: ``data: {json}`` + blank line per chunk, then ``data: [DONE]``.
    An error after the stream started is sent as one ``data: {"error": ...}`` event."""
    try:
        if first is not None:
            yield f"data: {json.dumps(first)}\n\n".encode()
        async for chunk in rest:
            yield f"data: {json.dumps(chunk)}\n\n".encode()
    except MaasError as exc:
        logger.error("stream %s failed: %s", request_id, exc.message)
        body = error_body(exc.message if exc.status_code < 500 else "generation failed", exc.error_type)
        yield f"data: {json.dumps(body)}\n\n".encode()
    yield b"data: [DONE]\n\n"


async def _stream_response(chunks: AsyncIterator[dict], request_id: str) -> StreamingResponse:
    """Pull the first chunk before answering, so request errors still get their 4xx status."""
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        first = None
    return StreamingResponse(_sse(first, chunks, request_id), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def _top_k_tensors(rows: list[list[dict]]) -> list:
    """Top-k results → ``labels`` BYTES, ``scores`` FP32, ``indices`` INT64, each [N, k]."""
    k = len(rows[0]) if rows else 0
    labels = [c["label"] for r in rows for c in r]
    return [
        v2.bytes_tensor("labels", labels, (len(rows), k)),
        v2.Tensor("scores", "FP32", np.asarray([[c["score"] for c in r] for r in rows], dtype=np.float32)),
        v2.Tensor("indices", "INT64", np.asarray([[c["index"] for c in r] for r in rows], dtype=np.int64)),
    ]


def _counted(operation: str):
    """Count each call of a handle method in ``maas_requests`` by model and HTTP status."""
    def wrap(fn):
        @functools.wraps(fn)
        async def counted(self, request, *args, **kwargs):
            model = request if isinstance(request, str) else (
                request.get("model") if isinstance(request, dict) else getattr(request, "model", None))
            try:
                out = await fn(self, request, *args, **kwargs)
            except MaasError as exc:
                metrics.request(str(model), operation, int(exc.status_code))
                raise
            except Exception:
                metrics.request(str(model), operation, 500)
                raise
            metrics.request(str(model), operation, 200)
            return out
        return counted
    return wrap


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
        # Imported here, not at module level: Serve ships this class by value, and the middleware
        # reads the replica's own module object.
        from maas import security

        security.SETTINGS.api_keys = security.load_api_keys(self.config.ingress.api_keys_file)
        security.SETTINGS.max_body_bytes = self.config.ingress.max_body_bytes
        keys = len(security.SETTINGS.api_keys)
        logger.info("API keys %s; body limit %d bytes", f"required ({keys} configured)" if keys else "not configured",
                    self.config.ingress.max_body_bytes)

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
        """Await a model call; re-raise domain errors by type; past ``model_call_timeout_s``
        cancel it on the replica and raise :class:`ModelTimeout` (504)."""
        try:
            return await asyncio.wait_for(response, timeout=self.config.ingress.model_call_timeout_s)
        except asyncio.TimeoutError:
            response.cancel()  # Serve raises CancelledError in the replica's call
            raise ModelTimeout(
                f"model {name!r} did not answer within {self.config.ingress.model_call_timeout_s} s; "
                "retry later or send less work per request"
            ) from None
        except asyncio.CancelledError:  # our caller left (disconnect, Serve's request_timeout_s)
            response.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - sorted by type just below
            raise self._domain_error(exc, name) from None

    @staticmethod
    def _domain_error(exc: BaseException, name: str) -> MaasError:
        """Map an exception from a model call to the domain error to raise."""
        from ray.serve.exceptions import BackPressureError

        cause = unwrap(exc)
        if isinstance(cause, MaasError):
            return cause
        if isinstance(cause, BackPressureError):
            return ServiceOverloaded(f"model {name!r} is at capacity; retry after {RETRY_AFTER_S} s")
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        if isinstance(cause, (ActorDiedError, ActorUnavailableError)):
            return ModelNotReady(f"model {name!r} lost its replica; retry")
        logger.error("model %s call failed with %s", name, type(cause).__name__)
        return MaasError(f"model {name!r} failed")  # 500: a bug, logged; the body hides the detail

    async def _model_info(self, route: _Route) -> dict:
        name = route.spec.name
        if name not in self._info:
            self._info[name] = await self._await(route.model.info.remote(), name)
        return self._info[name]

    def _check_items(self, n: int, param: str, limit: int | None = None, what: str = "items") -> None:
        limit = limit or self.config.ingress.max_items_per_request
        if n > limit:
            raise PayloadTooLarge(f"{param} has {n} {what}; at most {limit} per request, split it", param=param)

    # ------------------------------------------------------------------ handle methods (one set of operations)

    async def list_models(self) -> dict:
        """All served models with family, tasks, weights source and readiness (``/v1/models`` body)."""
        names = list(self.routes)
        ready = await asyncio.gather(*(self._ready(n) for n in names))
        reasons = await self._not_ready_reasons([n for n, r in zip(names, ready) if not r])
        cards = [
            ModelCard(
                id=n, created=self.created, family=self.routes[n].spec.family, tasks=list(self.routes[n].spec.tasks),
                weights=self.routes[n].spec.weights_label(), demo_weights=self.routes[n].spec.is_demo,
                ready=r, deployment=self.routes[n].spec.deployment_name, status_message=reasons.get(n),
            )
            for n, r in zip(names, ready)
        ]
        return ModelList(data=cards).model_dump(exclude_none=True)

    async def _not_ready_reasons(self, names: list[str]) -> dict[str, str]:
        """For models that don't answer: the last line of Serve's deployment status message
        (e.g. the WeightsError naming the model and the path)."""
        if not names:
            return {}

        def fetch() -> dict[str, str]:
            app_name = serve.get_replica_context().app_name
            deployments = serve.status().applications[app_name].deployments
            out = {}
            for n in names:
                dep = deployments.get(self.routes[n].spec.deployment_name)
                lines = [ln.strip() for ln in (dep.message if dep else "").splitlines() if ln.strip()]
                out[n] = (lines[-1] if lines else f"deployment status {dep.status if dep else 'unknown'}")[:500]
            return out

        try:
            return await asyncio.wait_for(asyncio.to_thread(fetch), timeout=5.0)
        except Exception:  # noqa: BLE001 - the reason is a courtesy; readiness stands without it
            return {}

    async def _ready(self, name: str) -> bool:
        try:
            await asyncio.wait_for(self._model_info(self.routes[name]), timeout=5.0)
            return True
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False

    async def readiness(self) -> dict:
        """``{"ready": bool, "models": {name: bool}, "reasons"?: {name: message}}``: ready when every
        model answers its info call."""
        names = list(self.routes)
        ready = await asyncio.gather(*(self._ready(n) for n in names))
        body: dict = {"ready": all(ready), "models": dict(zip(names, ready))}
        reasons = await self._not_ready_reasons([n for n, r in zip(names, ready) if not r])
        if reasons:
            body["reasons"] = reasons
        return body

    def _log_hints(self, req) -> None:
        hints = req.ignored_hints()
        if hints:
            logger.info("ignoring optional OpenAI hint fields %s", hints)

    @_counted("embeddings")
    async def embed(self, request: dict | EmbeddingRequest) -> dict:
        """OpenAI embeddings (texts or token arrays). Inputs longer than the model's limit are
        truncated to it."""
        req = _parse(EmbeddingRequest, request)
        route = self._route(req.model, "embeddings")
        self._log_hints(req)
        texts = req.texts()
        count = len(texts) if texts is not None else len(req.token_arrays())
        self._check_items(count, "input")
        info = await self._model_info(route)
        if req.dimensions is not None and req.dimensions != info["dimensions"]:
            raise InvalidRequest(
                f"model {req.model!r} returns {info['dimensions']}-dimensional embeddings and cannot shorten "
                f"them; omit dimensions or set it to {info['dimensions']}",
                param="dimensions",
            )
        if texts is None:
            tokens = route.pre.from_ids.remote(req.token_arrays(), max_length=info["max_input_tokens"], model=req.model)
        else:
            tokens = route.pre.remote(texts, max_length=info["max_input_tokens"], truncate=True, model=req.model)
        out = await self._await(route.model.remote(tokens, {"task": "embeddings"}), req.model)
        return EmbeddingResponse.build(
            req.model, out["embeddings"], out["num_tokens"], req.encoding_format, route.spec.is_demo
        ).model_dump()

    def _prompt_tokens(self, route: _Route, req: CompletionRequest | ChatCompletionRequest):
        limit = self.config.ingress.max_prompts_per_request
        if isinstance(req, ChatCompletionRequest):
            self._check_items(req.n, "n", limit)
            return route.pre.chat.remote(req.plain_messages(), model=req.model)
        prompts = req.prompts()
        self._check_items(len(prompts) * req.n, "prompt", limit, "prompts × n")
        if req.prompt_is_tokens:
            return route.pre.from_ids.remote(prompts, max_length=None, model=req.model)
        return route.pre.remote(prompts, max_length=None, truncate=False, add_special_tokens=False, model=req.model)

    @_counted("completion")
    async def complete(self, request: dict | CompletionRequest) -> dict:
        """OpenAI completions, non-streaming (for streaming use :meth:`stream_complete`).
        Over-long prompts are rejected, not truncated."""
        req = _parse(CompletionRequest, request)
        route = self._route(req.model, "completion")
        self._log_hints(req)
        out = await self._await(route.model.remote(self._prompt_tokens(route, req), req.to_params()), req.model)
        choices = [
            CompletionChoice(text=c["text"], index=i, finish_reason=c["finish_reason"])
            for i, c in enumerate(out["choices"])
        ]
        return CompletionResponse(
            model=req.model, choices=choices, demo_weights=route.spec.is_demo, usage=_usage(out),
        ).model_dump()

    @_counted("chat")
    async def chat(self, request: dict | ChatCompletionRequest) -> dict:
        """OpenAI chat completions, non-streaming (for streaming use :meth:`stream_chat`)."""
        req = _parse(ChatCompletionRequest, request)
        route = self._route(req.model, "chat")
        self._log_hints(req)
        out = await self._await(route.model.remote(self._prompt_tokens(route, req), req.to_params()), req.model)
        choices = [
            ChatChoice(index=i, message=ChatMessageOut(content=c["text"]), finish_reason=c["finish_reason"])
            for i, c in enumerate(out["choices"])
        ]
        return ChatCompletionResponse(
            model=req.model, choices=choices, usage=_usage(out), demo_weights=route.spec.is_demo
        ).model_dump()

    async def _events(self, req, task: str) -> AsyncIterator[dict]:
        """Stream the generator's events for ``req``; domain errors raised by type."""
        route = self._route(req.model, task)
        self._log_hints(req)
        gen = route.model.options(stream=True).stream.remote(self._prompt_tokens(route, req), req.to_params())
        operation = f"{task}-stream"
        try:
            async for event in gen:
                yield event
            metrics.request(req.model, operation, 200)
        except Exception as exc:  # noqa: BLE001 - mapped to the domain error
            err = self._domain_error(exc, req.model)
            metrics.request(req.model, operation, int(err.status_code))
            raise err from None
        finally:
            gen.cancel()  # stops generation on the replica when the caller went away

    async def stream_complete(self, request: dict | CompletionRequest) -> AsyncIterator[dict]:
        """Streaming completions: yields ``text_completion`` chunk dicts (OpenAI stream shape),
        a last usage chunk when ``stream_options.include_usage``. Handle callers use
        ``handle.options(stream=True).stream_complete.remote(request)``."""
        req = _parse(CompletionRequest, request)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        async for event in self._events(req, "completion"):
            if event.get("done"):
                if req.include_usage:
                    yield CompletionResponse(id=cid, created=created, model=req.model, choices=[],
                                             usage=_usage_counts(event)).model_dump(exclude={"demo_weights"})
                return
            choices = [CompletionChoice(text=c["text"], index=c["index"], finish_reason=c["finish_reason"])
                       for c in event["choices"]]
            yield CompletionResponse(id=cid, created=created, model=req.model, choices=choices).model_dump(
                exclude={"usage", "demo_weights"})

    async def stream_chat(self, request: dict | ChatCompletionRequest) -> AsyncIterator[dict]:
        """Streaming chat: yields ``chat.completion.chunk`` dicts; the first chunk of each choice
        carries ``delta.role``, the last its ``finish_reason``."""
        req = _parse(ChatCompletionRequest, request)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        started: set[int] = set()
        async for event in self._events(req, "chat"):
            if event.get("done"):
                if req.include_usage:
                    yield ChatCompletionChunk(id=cid, created=created, model=req.model, choices=[],
                                              usage=_usage_counts(event)).model_dump()
                return
            choices = []
            for c in event["choices"]:
                delta = ChatDelta(content=c["text"] if c["text"] or c["index"] not in started else None)
                if c["index"] not in started:
                    delta.role = "assistant"
                    started.add(c["index"])
                choices.append(ChatChunkChoice(index=c["index"], delta=delta, finish_reason=c["finish_reason"]))
            chunk = ChatCompletionChunk(id=cid, created=created, model=req.model, choices=choices).model_dump(
                exclude={"usage"})
            for c in chunk["choices"]:  # OpenAI leaves unset delta fields out rather than sending null
                c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
            yield chunk

    async def _truncated_tokens(self, route: _Route, value: str | list[str], limit: int | None = None):
        """Validate texts and start their tokenisation, truncated to the model's limit.

        Returns:
            The tokenizer's ``DeploymentResponse`` (passed on to the model unresolved).
        """
        texts = [value] if isinstance(value, str) else list(value)
        if not texts:
            raise InvalidRequest("input is an empty list; send at least one text", param="input")
        if any(not t.strip() for t in texts):
            raise InvalidRequest("input holds an empty text; send non-blank text", param="input")
        self._check_items(len(texts), "input", limit)
        info = await self._model_info(route)
        return route.pre.remote(texts, max_length=info["max_input_tokens"], truncate=True, model=route.spec.name)

    @_counted("text2text")
    async def text2text(self, request: dict | Text2TextRequest) -> dict:
        """Encoder–decoder generation; inputs are truncated to the encoder's limit."""
        req = _parse(Text2TextRequest, request)
        route = self._route(req.model, "text2text")
        tokens = await self._truncated_tokens(route, req.input, self.config.ingress.max_prompts_per_request)
        out = await self._await(route.model.remote(tokens, req.to_params()), req.model)
        data = [
            Text2TextItem(index=i, text=c["text"], finish_reason=c["finish_reason"]) for i, c in enumerate(out["choices"])
        ]
        return Text2TextResponse(model=req.model, data=data, demo_weights=route.spec.is_demo, usage=_usage(out)).model_dump()

    @_counted("text-classification")
    async def classify_text(self, request: dict | TextClassificationRequest) -> dict:
        """Text classification with a sequence-classification head; inputs truncated to the limit."""
        req = _parse(TextClassificationRequest, request)
        route = self._route(req.model, "text-classification")
        tokens = await self._truncated_tokens(route, req.input)
        out = await self._await(
            route.model.remote(tokens, {"task": "text-classification", "top_k": req.top_k}), req.model
        )
        n = sum(out["num_tokens"])
        return ClassificationResponse(
            model=req.model, demo_weights=route.spec.is_demo,
            data=[Classification(index=i, top_k=r["top_k"]) for i, r in enumerate(out["results"])],
            usage=Usage(prompt_tokens=n, total_tokens=n),
        ).model_dump()

    @_counted("image-classification")
    async def classify_images(self, model: str, images: list[bytes], top_k: int = 5) -> dict:
        """Classify encoded images (JPEG, PNG, WebP, BMP, TIFF, GIF); one result per image, in order."""
        route = self._route(model, "image-classification")
        if not isinstance(images, (list, tuple)) or not all(isinstance(b, (bytes, bytearray)) for b in images):
            raise InvalidRequest("images must be a list of encoded image files as bytes", param="images")
        return await self._classify_images(route, [bytes(b) for b in images], top_k)

    async def _classify_images(self, route: _Route, images: list, top_k: int) -> dict:
        """Encoded files (bytes) or decoded uint8 (H, W, 3) arrays → classification body."""
        model = route.spec.name
        if not images:
            raise InvalidRequest("no images in the request; send at least one", param="images")
        self._check_items(len(images), "images", self.config.ingress.max_images_per_request)
        limit = self.config.ingress.max_image_bytes
        for i, b in enumerate(images):
            if len(b) > limit if isinstance(b, bytes) else b.nbytes > 4 * limit:
                size = len(b) if isinstance(b, bytes) else b.nbytes
                raise PayloadTooLarge(f"images[{i}] is {size} bytes; the limit is {limit} bytes", param=f"images[{i}]")
        pixels = route.pre.remote(list(images), model=model)
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

    @app.get("/v1/models/{model}", response_model=ModelCard, responses={404: ERROR_RESPONSES[404]}, tags=["openai"])
    async def http_model(self, model: str) -> dict:
        if model not in self.routes:
            raise ModelNotFound(f"model {model!r} does not exist; GET /v1/models lists the served models")
        listing = await self.list_models()
        return next(m for m in listing["data"] if m["id"] == model)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES, tags=["openai"])
    async def http_completions(self, body: CompletionRequest, request: Request):
        """Completions; ``stream: true`` answers with server-sent events."""
        if body.stream:
            return await _stream_response(self.stream_complete(body), request.headers.get("x-request-id", "-"))
        return await self.complete(body)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES,
              tags=["openai"])
    async def http_chat(self, body: ChatCompletionRequest, request: Request):
        """Chat completions; ``stream: true`` answers with server-sent events."""
        if body.stream:
            return await _stream_response(self.stream_chat(body), request.headers.get("x-request-id", "-"))
        return await self.chat(body)

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
        response_model_exclude_none=True,  # images have no token usage
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
            form = await request.form(max_files=self.config.ingress.max_images_per_request + 1)
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

    # ------------------------------------------------------------------ Open Inference Protocol v2

    @app.get("/v2", tags=["v2"])
    async def v2_server_metadata(self) -> dict:
        from maas import __version__

        return {"name": "maas-serve", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live", tags=["v2"])
    async def v2_live(self) -> dict:
        return {"live": True}

    @app.get("/v2/health/ready", tags=["v2"])
    async def v2_ready(self) -> JSONResponse:
        ready = (await self.readiness())["ready"]
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    def _v2_route(self, name: str, version: str | None) -> _Route:
        route = self.routes.get(name)
        if route is None:
            raise ModelNotFound(f"model {name!r} does not exist; GET /v1/models lists the served models")
        if version not in (None, "1"):
            raise ModelNotFound(f"model {name!r} has no version {version!r}; the only version is '1'")
        return route

    @app.get("/v2/models/{name}", tags=["v2"])
    @app.get("/v2/models/{name}/versions/{version}", tags=["v2"])
    async def v2_model_metadata(self, name: str, version: str | None = None) -> dict:
        route = self._v2_route(name, version)
        info = await self._model_info(route)
        return v2.metadata(name, route.spec.family, list(route.spec.tasks), info)

    @app.get("/v2/models/{name}/ready", tags=["v2"])
    @app.get("/v2/models/{name}/versions/{version}/ready", tags=["v2"])
    async def v2_model_ready(self, name: str, version: str | None = None) -> JSONResponse:
        self._v2_route(name, version)
        ready = await self._ready(name)
        return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)

    @app.post("/v2/models/{name}/infer", tags=["v2"])
    @app.post("/v2/models/{name}/versions/{version}/infer", tags=["v2"])
    async def v2_infer(self, name: str, request: Request, version: str | None = None) -> Response:
        """Inference with JSON or binary tensors (see :mod:`maas.protocol.v2`)."""
        route = self._v2_route(name, version)
        header_length = request.headers.get("inference-header-content-length")
        try:
            hl = int(header_length) if header_length is not None else None
        except ValueError:
            raise InvalidRequest("Inference-Header-Content-Length must be an integer") from None
        req = v2.parse_request(await request.body(), hl)
        outputs = await self._v2_run(route, req)
        wanted = [o.name for o in req.outputs or []]
        known = {t.name for t in outputs}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise InvalidRequest(f"model {name!r} has no output {unknown[0]!r}; it has {sorted(known)}")
        if wanted:
            outputs = [t for t in outputs if t.name in wanted]
        body, headers = v2.encode_response(name, req, outputs)
        return Response(content=body, headers=headers)

    async def _v2_run(self, route: _Route, req: "v2.InferenceRequest") -> list:
        spec, params = route.spec, req.parameters
        expected = "image" if spec.family == "image-classifier" else "text"
        if list(req.inputs) != [expected]:
            raise InvalidRequest(f"model {spec.name!r} takes one input named {expected!r} "
                                 f"(see GET /v2/models/{spec.name}), got {sorted(req.inputs)}")
        tensor = req.inputs[expected]
        if tensor.datatype == "BYTES" and tensor.array.ndim != 1:
            raise InvalidRequest(f"input {expected!r} must have shape [N] for BYTES, got {list(tensor.array.shape)}",
                                 param=expected)
        if spec.family == "image-classifier":
            if tensor.datatype == "BYTES":
                images: list = list(tensor.array.reshape(-1))
            elif tensor.datatype == "UINT8" and tensor.array.ndim == 4 and tensor.array.shape[-1] == 3:
                images = list(tensor.array)
            else:
                raise InvalidRequest(f"input {tensor.name!r} must be BYTES [N] (encoded images) or UINT8 [N, H, W, 3], "
                                     f"got {tensor.datatype} {list(tensor.array.shape)}", param=tensor.name)
            out = await self._classify_images(route, images, params.get("top_k", 5))
            return _top_k_tensors([d["top_k"] for d in out["data"]])
        if tensor.datatype != "BYTES":
            raise InvalidRequest(f"input {tensor.name!r} must be BYTES text, got {tensor.datatype}", param=tensor.name)
        try:
            texts = [b.decode("utf-8") for b in tensor.array.reshape(-1)]
        except UnicodeDecodeError:
            raise InvalidRequest(f"input {tensor.name!r} is not valid UTF-8 text", param=tensor.name) from None
        gen = {k: params[k] for k in ("max_tokens", "temperature", "top_p", "seed", "stop") if k in params}
        if spec.family == "text-encoder":
            wanted = {o.name for o in req.outputs or []}
            if "embeddings" not in spec.tasks or wanted & {"labels", "scores", "indices"}:
                body: dict = {"model": spec.name, "input": texts}
                if "top_k" in params:
                    body["top_k"] = params["top_k"]
                out = await self.classify_text(body)
                return _top_k_tensors([d["top_k"] for d in out["data"]])
            out = await self.embed({"model": spec.name, "input": texts})
            vectors = np.asarray([d["embedding"] for d in out["data"]], dtype=np.float32)
            return [v2.Tensor("embeddings", "FP32", vectors)]
        if spec.family == "text-generator":
            out = await self.complete({"model": spec.name, "prompt": texts, **gen})
            return [v2.bytes_tensor("text_output", [c["text"] for c in out["choices"]])]
        out = await self.text2text({"model": spec.name, "input": texts, **gen})
        return [v2.bytes_tensor("text_output", [d["text"] for d in out["data"]])]
