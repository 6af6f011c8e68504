"""maas-serve's own routes: health, readiness, text2text, text and image classification.

Thin: parse (JSON through the schemas of :mod:`maas.protocol.maas`; image uploads as
multipart or base64 JSON) into the operation's request, call the operation, render its result
(:mod:`maas.protocol.maas`).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from maas.dataplane.types import ClassifyImagesRequest
from maas.errors import InvalidRequest, UnsupportedMediaType
from maas.protocol import maas as render
from maas.protocol import parse
from maas.protocol.http import ERROR_RESPONSES, answer_response, dataplane, fast_json, json_response, routed
from maas.protocol.maas import (
    ClassificationResponse,
    ExplainImageRequest,
    ExplainTextRequest,
    ImageClassificationRequest,
    Text2TextRequest,
    Text2TextResponse,
    TextClassificationRequest,
)

router = APIRouter()


@router.get("/healthz", tags=["health"])
async def healthz():
    """Liveness: the ingress answers."""
    return json_response({"status": "ok"})


@router.get("/v1/pools", tags=["maas"])
async def pools(dp=Depends(dataplane)):
    """The pools' replicas (apps with repositories): per replica its pool, the repository models it
    holds (name → bytes), their total, its memory (``rss_bytes``), what it took before any model
    (``baseline_bytes``) and its budgets."""
    return json_response({"replicas": await dp.repository_api().replicas()})


@router.get("/v1/usage", tags=["maas"])
async def usage(dp=Depends(dataplane)):
    """Usage per tenant in this ingress replica since it started (apps with a tenants file): requests,
    ``compute_s`` (replica-seconds charged), items, tokens, refusals (``rejected``: rate, compute,
    forbidden) and what is left of its rate and quota. A tenant sees its own row; an admin tenant
    every row."""
    return json_response({**dp.usage(), "replica": dp.replica_id})


@router.get("/readyz", tags=["health"], responses={503: {"description": "Some model is not ready."}})
async def readyz(dp=Depends(dataplane)):
    """Readiness: every model is loaded and has a running replica."""
    body = await dp.readiness.report()
    return json_response(body, 200 if body["ready"] else 503)


@fast_json("/v1/text2text", Text2TextRequest)
async def _text2text(body: Text2TextRequest, request: Request, dp):
    res = await dp.ops.generate(body.to_operation(**routed(request)))
    return answer_response(render.text2text(res), res.answered)


@fast_json("/v1/classifications/text", TextClassificationRequest)
async def _classify_text(body: TextClassificationRequest, request: Request, dp):
    res = await dp.ops.classify_texts(body.to_operation(**routed(request)))
    return answer_response(render.classifications(res), res.answered)


@router.post("/v1/text2text", response_model=Text2TextResponse, responses=ERROR_RESPONSES, tags=["maas"])
async def text2text(body: Text2TextRequest, request: Request, dp=Depends(dataplane)):
    """Encoder–decoder generation (T5/BART style)."""
    return await _text2text(body, request, dp)


@router.post("/v1/classifications/text", response_model=ClassificationResponse, responses=ERROR_RESPONSES,
             tags=["maas"])
async def classify_text(body: TextClassificationRequest, request: Request, dp=Depends(dataplane)):
    """Text classification with a sequence-classification head."""
    return await _classify_text(body, request, dp)


_IMAGE_REQUEST_BODY = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["model", "file"],
                    "properties": {
                        "model": {"type": "string"},
                        "top_k": {"type": "integer", "description": "default 5, or the class count when smaller"},
                        "latency_budget_ms": {"type": "number", "description": "With model 'auto'."},
                        "cascade_threshold": {"type": "number", "description": "With model 'auto': confidence "
                                              "cascade (see the JSON body's cascade)."},
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    },
                }
            },
            "application/json": {"schema": ImageClassificationRequest.model_json_schema()},
        }
    }
}


@router.post(
    "/v1/classifications/image",
    response_model=ClassificationResponse,
    response_model_exclude_none=True,  # images have no token usage
    responses={**ERROR_RESPONSES, 415: {"description": "Neither multipart/form-data nor JSON."}},
    tags=["maas"],
    openapi_extra=_IMAGE_REQUEST_BODY,
)
async def classify_image(request: Request, dp=Depends(dataplane)):
    """Multipart upload (fields ``model``, ``top_k``, one or more ``file``/``files``) or JSON
    ``{"model", "images": [base64], "top_k"}``."""
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        form = await request.form(max_files=dp.limits.max_images_per_request + 1)
        files = [f for key in ("file", "files") for f in form.getlist(key) if hasattr(f, "read")]
        if not files:
            raise InvalidRequest("multipart request has no file; attach images as 'file' fields", param="file")
        model, top_k = form.get("model"), form.get("top_k")
        if model is None:
            raise InvalidRequest("multipart request has no 'model' field", param="model")
        try:
            top_k = None if top_k is None else int(top_k)
        except (TypeError, ValueError):
            raise InvalidRequest(f"top_k must be an integer, got {top_k!r}", param="top_k") from None
        budget, threshold = _positive(form, "latency_budget_ms"), _positive(form, "cascade_threshold", 1.0)
        images = [await f.read() for f in files]
        req = ClassifyImagesRequest(str(model), images=images, top_k=top_k, cascade_threshold=threshold,
                                    **routed(request, latency_budget_ms=budget))
    elif _is_json(media):
        req = parse(ImageClassificationRequest, await _json(request)).to_operation(**routed(request))
    else:
        raise UnsupportedMediaType(f"content type {ctype!r} is not accepted; send multipart/form-data with 'file' "
                                   "fields or JSON with base64 'images'")
    res = await dp.ops.classify_images(req)
    return answer_response(render.classifications(res), res.answered)



_EXPLAIN_IMAGE_BODY = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object", "required": ["model", "file"],
                    "properties": {
                        "model": {"type": "string"}, "file": {"type": "string", "format": "binary"},
                        "target": {"type": "string", "description": "A label or class index; default the top-1."},
                        "view": {"type": "string", "enum": ["full", "served"], "default": "full"},
                        "seed": {"type": "integer", "default": 0},
                        "overlay": {"type": "boolean", "default": True},
                    },
                }
            },
            "application/json": {"schema": ExplainImageRequest.model_json_schema()},
        }
    }
}


@router.post("/v1/explanations/image", responses=ERROR_RESPONSES, tags=["maas"], openapi_extra=_EXPLAIN_IMAGE_BODY)
async def explain_image(request: Request, dp=Depends(dataplane)):
    """Why an image classifier answers a class: a Grad-CAM heatmap over the original image (grid,
    overlay PNG, regions as boxes) with a faithfulness score. Multipart (``model``, one ``file``,
    ``target``, ``view``, ``seed``) or JSON ``{"model", "image": base64, ...}``."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        form = await request.form(max_files=2)
        unknown = sorted(set(form.keys()) - {"model", "target", "view", "seed", "overlay", "file", "files", "image"})
        if unknown:  # as the JSON schema refuses unknown fields, so does the form
            raise InvalidRequest(f"unknown form field(s) {unknown}; the fields are model, file, target, view, seed, "
                                 "overlay", param=unknown[0])
        if len(form.getlist("model")) > 1:
            raise InvalidRequest("the form has more than one 'model' field; send one", param="model")
        files = [f for key in ("file", "files", "image") for f in form.getlist(key) if hasattr(f, "read")]
        if len(files) != 1:
            raise InvalidRequest("attach exactly one image as the 'file' field", param="file")
        fields = {k: form.get(k) for k in ("model", "target", "view", "seed", "overlay") if form.get(k) not in (None, "")}
        if "model" not in fields:
            raise InvalidRequest("multipart request has no 'model' field", param="model")
        fields["image"] = "x"  # validated below without the file
        if "seed" in fields:
            try:
                fields["seed"] = int(fields["seed"])
            except (TypeError, ValueError):
                raise InvalidRequest(f"seed must be a non-negative integer, got {fields['seed']!r}",
                                     param="seed") from None
        if "overlay" in fields:
            flag = str(fields["overlay"]).strip().lower()
            if flag not in ("true", "false", "1", "0"):
                raise InvalidRequest(f"overlay must be true or false, got {fields['overlay']!r}", param="overlay")
            fields["overlay"] = flag in ("true", "1")
        req = parse(ExplainImageRequest, fields).to_operation(**routed(request), image=await files[0].read())
    elif _is_json(media):
        req = parse(ExplainImageRequest, await _json(request)).to_operation(**routed(request))
    else:
        raise UnsupportedMediaType(f"content type {media!r} is not accepted; send multipart/form-data with one "
                                   "'file' or JSON with a base64 'image'")
    res = await dp.ops.explain_image(req)
    return answer_response(render.explanation(res), res.answered)


@router.post("/v1/explanations/text", responses=ERROR_RESPONSES, tags=["maas"])
async def explain_text(body: ExplainTextRequest, request: Request, dp=Depends(dataplane)):
    """Token attributions with character offsets: one text for a text classifier (``target``), two
    texts for an embeddings model's similarity; each text with a faithfulness score."""
    res = await dp.ops.explain_text(body.to_operation(**routed(request)))
    return answer_response(render.explanation(res), res.answered)


def _positive(form, field: str, upper: float | None = None) -> float | None:
    """An optional positive number from a multipart form field (``upper`` inclusive)."""
    raw = form.get(field)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = -1.0
    if not value > 0 or (upper is not None and value > upper) or value == float("inf"):
        bound = f" and at most {upper}" if upper is not None else ""
        raise InvalidRequest(f"{field} must be a number above 0{bound}, got {raw!r}", param=field)
    return value


def _is_json(media: str) -> bool:
    """JSON (``application/json``, any ``+json``) or no content type, which routes read as JSON."""
    return media == "application/json" or media.endswith("+json") or not media


async def _json(request: Request):
    """The body as JSON. Raises InvalidRequest: it is not."""
    try:
        return await request.json()
    except ValueError:
        raise InvalidRequest("request body is not valid JSON", code="invalid_json") from None
