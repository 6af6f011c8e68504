"""The service's operations: embed, classify texts, classify images, generate (completion, chat,
text2text; streamed or not), explain images and texts.

Each takes a request of :mod:`maas.dataplane.types` and returns a result of that module; each
checks the request against the ingress's limits, lets the router pick the address
(:meth:`~maas.dataplane.routing.Router.run`) and sends the work through the one call path
(:mod:`maas.dataplane.calls`): one-forward operations through the front batcher, generation one
call per request. No protocol shapes here: the protocol modules render the results.

Errors are :class:`~maas.errors.MaasError` subclasses, raised by type. No torch here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

import numpy as np

from maas import metrics, tracing
from maas.config import IngressSpec, ModelSpec
from maas.dataplane.calls import Calls, check_texts
from maas.dataplane.routing import Router
from maas.dataplane.types import (
    Answered,
    Classifications,
    ClassifyImagesRequest,
    ClassifyTextsRequest,
    EmbedRequest,
    Embeddings,
    ExplainImageRequest,
    ExplainTextRequest,
    Explanation,
    GeneratedChoice,
    GenerateRequest,
    Generation,
    StreamEnd,
    TextDelta,
)
from maas.errors import InvalidRequest, MaasError, ModelTimeout, PayloadTooLarge
from maas.preprocess.text import TextJob
from maas.tenants import charge

logger = logging.getLogger("ray.serve.maas.dataplane")


def answered(spec: ModelSpec, reason: str | None = None) -> Answered:
    """Who answers: the spec's address, name, version and demo flag."""
    return Answered(spec.key, spec.name, spec.resolved_version, spec.is_demo, reason)


def log_hints(req) -> None:
    """One log line naming the optional hint fields a request set (never their values)."""
    if req.hints:
        logger.info("ignoring optional OpenAI hint fields %s", req.hints)


def image_size(image) -> tuple[int, int]:
    """``(bytes, limit factor)`` of an encoded file (1) or a decoded ``uint8`` array (4: decoded
    pixels take more room than the file they came from)."""
    if isinstance(image, (bytes, bytearray)):
        return len(image), 1
    return int(getattr(image, "nbytes", 0)), 4


@dataclass
class Stream:
    """A generation stream once its address is chosen: ``answered`` says who answers (before the
    first token, for headers); ``events`` yields :class:`TextDelta` s then one :class:`StreamEnd`."""

    answered: Answered
    events: AsyncIterator[TextDelta | StreamEnd]


class Operations:
    """Every operation of the service over one ingress replica's router and call path.

    Args:
        limits: The ingress's limits. calls: The call path. router: The routing decision.
    """

    def __init__(self, limits: IngressSpec, calls: Calls, router: Router):
        self.limits, self.calls, self.router = limits, calls, router

    # ------------------------------------------------------------------ one-forward operations (front batched)

    async def embed(self, req: EmbedRequest) -> Embeddings:
        """Embeddings of texts or token rows; inputs over the model's limit are truncated.

        Raises:
            InvalidRequest: an empty input, or ``dimensions`` other than the model's.
            PayloadTooLarge: more than ``max_items_per_request`` inputs.
        """
        rows = req.texts if req.texts is not None else req.token_ids
        if not rows:
            raise InvalidRequest("input is an empty list; send at least one text", param="input")
        if req.texts is not None:
            for i, t in enumerate(req.texts):
                if not t:
                    raise InvalidRequest(f"input[{i}] is an empty string; embeddings need text", param="input")
        self.calls.check_items(len(rows), "input")
        log_hints(req)
        return await self.router.run(req, "embeddings", "embeddings", lambda a: self._embed(a, req, rows))

    async def _embed(self, address: str, req: EmbedRequest, rows: list) -> Embeddings:
        route = self.calls.route(address, "embeddings")
        info = await self.calls.info(route)
        if req.dimensions is not None and req.dimensions != info["dimensions"]:
            raise InvalidRequest(f"model {address!r} returns {info['dimensions']}-dimensional embeddings and cannot "
                                 f"shorten them; omit dimensions or set it to {info['dimensions']}", param="dimensions")
        job = TextJob("texts" if req.texts is not None else "ids", rows, max_length=info["max_input_tokens"])
        out = await self.calls.batched(route, "embeddings", job, {"task": "embeddings"}, len(rows))
        return Embeddings(answered(route.spec), np.asarray(out["embeddings"], dtype="<f4"),
                          int(sum(out["num_tokens"])))

    async def classify_texts(self, req: ClassifyTextsRequest) -> Classifications:
        """Text classification with a sequence-classification head; inputs truncated to the limit.

        Raises:
            InvalidRequest: no text or a blank one. PayloadTooLarge: too many texts.
        """
        check_texts(req.texts)
        self.calls.check_items(len(req.texts), "input")
        return await self.router.run(req, "text-classification", "text-classification",
                                     lambda a: self._classify_texts(a, req))

    async def _classify_texts(self, address: str, req: ClassifyTextsRequest) -> Classifications:
        route = self.calls.route(address, "text-classification")
        info = await self.calls.info(route)
        job = TextJob("texts", req.texts, max_length=info["max_input_tokens"])
        out = await self.calls.batched(route, "text-classification", job,
                                       {"task": "text-classification", "top_k": req.top_k}, len(req.texts))
        return Classifications(answered(route.spec), [r["top_k"] for r in out["results"]],
                               int(sum(out["num_tokens"])))

    async def classify_images(self, req: ClassifyImagesRequest) -> Classifications:
        """Encoded files (bytes) or decoded ``uint8`` (H, W, 3) arrays → top-k per image, in order.

        Raises:
            InvalidRequest: no image. PayloadTooLarge: too many images, or one over ``max_image_bytes``.
        """
        if not req.images:
            raise InvalidRequest("no images in the request; send at least one", param="images")
        self.calls.check_items(len(req.images), "images", self.limits.max_images_per_request)
        limit = self.limits.max_image_bytes
        for i, image in enumerate(req.images):
            size, factor = image_size(image)
            if size > factor * limit:
                raise PayloadTooLarge(f"images[{i}] is {size} bytes; the limit is {limit} bytes", param=f"images[{i}]")
        return await self.router.run(req, "image-classification", "image-classification",
                                     lambda a: self._classify_images(a, req))

    async def _classify_images(self, address: str, req: ClassifyImagesRequest) -> Classifications:
        route = self.calls.route(address, "image-classification")
        out = await self.calls.batched(route, "image-classification", list(req.images),
                                       {} if req.top_k is None else {"top_k": req.top_k},
                                       len(req.images))
        return Classifications(answered(route.spec), [r["top_k"] for r in out["results"]])

    # ------------------------------------------------------------------ generation (one call per request)

    def _check_generation(self, req: GenerateRequest) -> None:
        limit = self.limits.max_prompts_per_request
        if req.task == "chat":
            if not req.messages:
                raise InvalidRequest("messages is empty; send at least one message", param="messages")
            self.calls.check_items(req.n, "n", limit)
        elif req.task == "text2text":
            check_texts(req.prompts or [])
            self.calls.check_items(len(req.prompts), "input", limit)
        else:
            if not req.prompts:
                raise InvalidRequest("prompt is an empty list; send at least one prompt", param="prompt")
            self.calls.check_items(len(req.prompts) * req.n, "prompt", limit, "prompts × n")
            if not req.prompt_is_tokens:  # here, so that the error names the field the caller sent
                for i, p in enumerate(req.prompts):
                    try:
                        if isinstance(p, str):
                            p.encode("utf-8")
                    except UnicodeEncodeError:
                        raise InvalidRequest(f"prompt[{i}] is not valid Unicode (it holds a lone surrogate); send "
                                             "UTF-8 text", param="prompt") from None

    async def _job(self, route, req: GenerateRequest) -> TextJob:
        """The tokenizer job: chat messages, or prompts (completion never truncates; text2text
        truncates to the encoder's limit)."""
        if req.task == "chat":
            return TextJob("chat", req.messages)
        if req.task == "text2text":
            info = await self.calls.info(route)
            return TextJob("texts", req.prompts, max_length=info["max_input_tokens"])
        if req.prompt_is_tokens:
            return TextJob("ids", req.prompts, max_length=None, param="prompt")
        return TextJob("texts", req.prompts, max_length=None, truncate=False, add_special_tokens=False, param="prompt")

    async def generate(self, req: GenerateRequest) -> Generation:
        """A completion, chat or text2text, not streamed. Over-long completion and chat prompts
        are refused (400 ``context_length_exceeded``), never truncated.

        Raises:
            InvalidRequest / PayloadTooLarge: bad or too many prompts. ModelTimeout: past the deadline.
        """
        self._check_generation(req)
        log_hints(req)
        return await self.router.run(req, req.task, req.task, lambda a: self._generate(a, req))

    async def _generate(self, address: str, req: GenerateRequest) -> Generation:
        route = self.calls.route(address, req.task)
        out = await self.calls.generate(route, await self._job(route, req), req.sampling)
        return Generation(answered(route.spec), [GeneratedChoice(c["text"], c["finish_reason"], c["completion_tokens"])
                                                 for c in out["choices"]], int(sum(out["prompt_tokens"])))

    async def stream(self, req: GenerateRequest) -> Stream:
        """A streamed completion or chat: the address is chosen now (``auto``: the first ready model
        of its plan; no failover and no shadow once a stream started).

        Raises:
            The routing errors now; the request's own errors from the first event on.
        """
        self._check_generation(req)
        log_hints(req)
        span = tracing.op_span(f"{req.task}-stream", req.model) if tracing._TRACER is not None else None
        try:
            address, reason = await self.router.choose(req, req.task)
            route = self.calls.route(address, req.task)
        except BaseException as exc:
            self.router.settle()  # admitted but never started: its reservation goes back to the tenant
            if span is not None:
                tracing.end_op(span, exc)
            raise
        stream = Stream(answered(route.spec, reason), self._events(route, req, span))
        if span is not None:
            tracing.answered(span, stream)
        return stream

    async def _events(self, route, req: GenerateRequest, span=None) -> AsyncIterator[TextDelta | StreamEnd]:
        """The stream's events; its operation span (``span``, when traced) ends with it: time to first token
        (an event and ``maas.ttft_ms``, as the ingress saw it) and the token counts."""
        address, operation = route.spec.key, f"{req.task}-stream"
        token = tracing.CURRENT.set(span) if span is not None else None
        failed: BaseException | None = None
        try:
            async for event in self.calls.stream(route, await self._job(route, req), req.sampling):
                if event.get("done"):
                    if span is not None:
                        span.attrs["gen_ai.usage.input_tokens"] = int(event["prompt_tokens"])
                        span.attrs["gen_ai.usage.output_tokens"] = int(event["completion_tokens"])
                    yield StreamEnd(event["prompt_tokens"], event["completion_tokens"])
                    break
                if span is not None and not span.events:
                    now = time.time_ns()
                    span.events.append(("first_token", now, {}))
                    span.attrs["maas.ttft_ms"] = round((now - span.start_ns) / 1e6, 3)
                yield TextDelta(event["choices"])
            metrics.request(address, operation, 200)
        except MaasError as exc:
            failed = exc
            metrics.request(address, operation, int(exc.status_code))
            raise
        except BaseException as exc:
            failed = exc
            raise
        finally:
            self.router.settle()  # the tenant's cost of the stream (admitted in Router.choose)
            if span is not None:
                try:
                    tracing.CURRENT.reset(token)
                except ValueError:  # resumed in another task's context
                    pass
                tracing.end_op(span, failed)

    # ------------------------------------------------------------------ explanations (on the model's replica)

    async def _within_explain_timeout(self, spec: ModelSpec, calls):
        return await self.calls.awaited(calls, spec.key, spec.explain_timeout_s, lambda: ModelTimeout(
            f"model {spec.key!r} did not finish the explanation within explain_timeout_s "
            f"({spec.explain_timeout_s:g} s); retry later"))

    async def explain_image(self, req: ExplainImageRequest) -> Explanation:
        """Grad-CAM of an image classifier for one image, mapped onto the original image (see
        :mod:`maas.dataplane.explain`), with its faithfulness score.

        Raises:
            InvalidRequest: bad view, target or image. PayloadTooLarge: the image is over the limit.
            ServiceOverloaded: the replica is computing ``max_concurrent_explanations`` already.
            ModelTimeout: over ``explain_timeout_s``.
        """
        if req.view not in ("full", "served"):
            raise InvalidRequest(f"view must be 'full' or 'served', got {req.view!r}", param="view")
        size, factor = image_size(req.image)
        if size > factor * self.limits.max_image_bytes:
            raise PayloadTooLarge(f"the image is {size} bytes; the limit is {self.limits.max_image_bytes} bytes",
                                  param="image")
        return await self.router.run(req, "image-classification", "explain-image",
                                     lambda a: self._explain_image(a, req), shadow=False)

    async def _explain_image(self, address: str, req: ExplainImageRequest) -> Explanation:
        from maas.dataplane.explain import OVERLAY_MAX_PX, render_image

        route = self.calls.route(address, "image-classification")
        spec = route.spec

        async def run():
            view = await self.calls.awaited(
                route.pre.explain_view.remote(req.image, req.view, OVERLAY_MAX_PX if req.overlay else None),
                address, float("inf"))
            deadline = time.time() + spec.explain_timeout_s
            result = await self.calls.awaited(
                route.model.explain.remote(view, {"target": req.target, "seed": req.seed}, deadline),
                address, float("inf"))
            return view, result

        started = time.perf_counter()
        view, result = await self._within_explain_timeout(spec, run())
        charge(result.pop("compute_s", 0.0), 1)
        rendered = await asyncio.to_thread(render_image, result, view)
        content = {"method": result["method"], "layer": result["layer"], "view": req.view, "target": result["target"],
                   "top_k": result["top_k"], "faithfulness": result["faithfulness"], **rendered}
        return Explanation(answered(spec), content, round(1000 * (time.perf_counter() - started), 1))

    async def explain_text(self, req: ExplainTextRequest) -> Explanation:
        """Token attributions (Integrated Gradients) mapped to character offsets: one text for a
        text classifier's ``target``, two texts for an embeddings model's similarity.

        Raises:
            InvalidRequest: not one or two non-blank texts.
        """
        if len(req.texts) not in (1, 2) or any(not isinstance(t, str) or not t.strip() for t in req.texts):
            raise InvalidRequest("input must be one text (to explain a classification) or two non-blank texts (to "
                                 "explain their similarity)", param="input")
        task = "text-classification" if len(req.texts) == 1 else "embeddings"
        return await self.router.run(req, task, "explain-text", lambda a: self._explain_text(a, req, task),
                                     shadow=False)

    async def _explain_text(self, address: str, req: ExplainTextRequest, task: str) -> Explanation:
        route = self.calls.route(address, task)
        spec = route.spec
        info = await self.calls.info(route)

        async def run():
            tokens = await self.calls.awaited(route.pre.explain_tokens.remote(req.texts, info["max_input_tokens"]),
                                              address, float("inf"))
            deadline = time.time() + spec.explain_timeout_s
            return await self.calls.awaited(
                route.model.explain.remote(tokens, {"target": req.target, "seed": req.seed}, deadline),
                address, float("inf"))

        started = time.perf_counter()
        result = await self._within_explain_timeout(spec, run())
        charge(result.pop("compute_s", 0.0), len(req.texts))
        content = {"method": result["method"], "kind": result["kind"],
                   "texts": [{"text": t, **r} for t, r in zip(req.texts, result["texts"])]}
        for key in ("target", "similarity"):
            if key in result:
                content[key] = result[key]
        return Explanation(answered(spec), content, round(1000 * (time.perf_counter() - started), 1))
