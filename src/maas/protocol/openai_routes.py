"""OpenAI API routes: ``/v1/models``, ``/v1/embeddings``, ``/v1/completions``, ``/v1/chat/completions``.

Thin: FastAPI parses the body into the schema of :mod:`maas.protocol.openai`, the route calls
one dataplane operation and encodes its answer. Streaming answers with server-sent events.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from maas.protocol.http import ERROR_RESPONSES, dataplane, json_response, stream_response
from maas.protocol.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
)

router = APIRouter(tags=["openai"])


@router.get("/v1/models", response_model=ModelList)
async def models(dp=Depends(dataplane)):
    """Every served model with its family, tasks, weights source and readiness."""
    return json_response(await dp.list_models())


@router.get("/v1/models/{model}", response_model=ModelCard, responses={404: ERROR_RESPONSES[404]})
async def model(model: str, dp=Depends(dataplane)):
    """One model's card: ``name`` gives the name's card (with its ``versions``); ``name@version`` the
    card of that version (its own weights, readiness and traffic weight; ``id`` is ``name@version``).

    Raises:
        ModelNotFound: no such model or version.
    """
    name, version = dp.traffic.address(model)  # raises ModelNotFound naming the versions
    listing = await dp.list_models()
    card = next(m for m in listing["data"] if m["id"] == name)
    if version is None:
        return json_response(card)
    entry = next(v for v in card["versions"] if v["version"] == version)
    return json_response({**{k: v for k, v in card.items() if k != "versions"}, **entry, "id": f"{name}@{version}"})


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES)
async def embeddings(body: EmbeddingRequest, dp=Depends(dataplane)):
    return json_response(await dp.embed(body))


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
async def completions(body: CompletionRequest, request: Request, dp=Depends(dataplane)):
    """Completions; ``stream: true`` answers with server-sent events."""
    if body.stream:
        return await stream_response(dp.stream_complete(body), request)
    return json_response(await dp.complete(body))


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request, dp=Depends(dataplane)):
    """Chat completions; ``stream: true`` answers with server-sent events."""
    if body.stream:
        return await stream_response(dp.stream_chat(body), request)
    return json_response(await dp.chat(body))
