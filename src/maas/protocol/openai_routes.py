"""OpenAI API routes: ``/v1/models``, ``/v1/embeddings``, ``/v1/completions``, ``/v1/chat/completions``.

Thin: FastAPI parses the body into the schema of :mod:`maas.protocol.openai`, the route turns it
into the operation's request, calls the operation and renders the result
(:mod:`maas.protocol.openai_render`). Streaming answers with server-sent events.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from maas.protocol import openai_render as render
from maas.protocol.http import (
    ERROR_RESPONSES,
    answer_response,
    dataplane,
    fast_json,
    json_response,
    routed,
    stream_response,
)
from maas.protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

router = APIRouter(tags=["openai"])


@router.get("/v1/models", response_model=render.ModelList)
async def models(dp=Depends(dataplane)):
    """Every served model with its family, tasks, weights source, versions and readiness."""
    cards = [c for c in await dp.readiness.cards() if dp.visible(c["id"])]  # a tenant lists its own models
    return json_response(render.model_list(cards, dp.created))


@router.get("/v1/models/{model}", response_model=render.ModelCard, responses={404: ERROR_RESPONSES[404]})
async def model(model: str, dp=Depends(dataplane)):
    """One model's card: ``name`` gives the name's card (with its ``versions``); ``name@version`` the
    card of that version (its own weights, readiness and traffic weight; ``id`` is ``name@version``).

    Raises:
        ModelNotFound: no such model or version.
    """
    dp.permit(model)
    if dp.repository is not None:
        await dp.repository.ensure_known(model)  # a model copied into a repository since the last poll
    return json_response(render.model_card(await dp.readiness.card(model), dp.created))


@fast_json("/v1/embeddings", EmbeddingRequest)
async def embed(body: EmbeddingRequest, request: Request, dp):
    res = await dp.ops.embed(body.to_operation(**routed(request, body.user)))
    return answer_response(render.embeddings(res, body.encoding_format), res.answered)


@fast_json("/v1/completions", CompletionRequest)
async def complete(body: CompletionRequest, request: Request, dp):
    return await _generate(body, request, dp, chat=False)


@fast_json("/v1/chat/completions", ChatCompletionRequest)
async def chat(body: ChatCompletionRequest, request: Request, dp):
    return await _generate(body, request, dp, chat=True)


# The FastAPI endpoints (OpenAPI, and every request the fast path hands over) call the same handlers.
@router.post("/v1/embeddings", response_model=render.EmbeddingResponse, responses=ERROR_RESPONSES)
async def embeddings(body: EmbeddingRequest, request: Request, dp=Depends(dataplane)):
    """Embeddings of one text, a list of texts, or token arrays."""
    return await embed(body, request, dp)


@router.post("/v1/completions", response_model=render.CompletionResponse, responses=ERROR_RESPONSES)
async def completions(body: CompletionRequest, request: Request, dp=Depends(dataplane)):
    """Completions; ``stream: true`` answers with server-sent events."""
    return await complete(body, request, dp)


@router.post("/v1/chat/completions", response_model=render.ChatCompletionResponse, responses=ERROR_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request, dp=Depends(dataplane)):
    """Chat completions; ``stream: true`` answers with server-sent events."""
    return await chat(body, request, dp)


async def _generate(body: CompletionRequest | ChatCompletionRequest, request: Request, dp, chat: bool):
    """One generation request, whole or streamed; only the rendering differs between the two routes."""
    req = body.to_operation(**routed(request, body.user))
    if body.stream:
        stream = await dp.ops.stream(req)
        renderer = render.StreamRenderer(stream.answered, chat=chat, include_usage=body.include_usage)
        return await stream_response(stream, renderer.render, request)
    res = await dp.ops.generate(req)
    return answer_response(render.chat_completion(res) if chat else render.completion(res), res.answered)
