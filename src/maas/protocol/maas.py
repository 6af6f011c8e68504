"""maas-serve's own routes: schemas of text2text, text and image classification and explanations,
each request's conversion into its operation request (``to_operation``), and the rendering of the
operation results (:func:`classifications`, :func:`text2text`, :func:`explanation`)."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, StrictInt, StrictStr

from maas.dataplane import types as op
from maas.errors import InvalidRequest
from maas.protocol import CompletionUsage, StrictRequest, Usage, value_error


BUDGET_DESCRIPTION = ("With model 'auto': answer within this many ms if a model is predicted to (the "
                      "X-Maas-Latency-Budget-Ms header says the same for every route).")


def _no_bool(value):
    """JSON ``true`` is not a number of milliseconds (pydantic would read it as 1.0)."""
    if isinstance(value, bool):
        raise value_error("must be a number of milliseconds, not a boolean")
    return value


Budget = Annotated[float | None, BeforeValidator(_no_bool),
                   Field(default=None, gt=0, allow_inf_nan=False, description=BUDGET_DESCRIPTION)]


class Cascade(StrictRequest):
    """With ``model: auto``: answer with the fastest model, and ask the next better one while the
    top-1 score is below ``threshold`` and the latency budget allows."""

    threshold: float = Field(gt=0, le=1, description="Top-1 score (probability) that is confident enough.")


class Text2TextRequest(StrictRequest):
    """``POST /v1/text2text``: translation, summarisation … with an encoder–decoder model."""

    model: str
    input: str | list[str]
    max_tokens: int = Field(default=64, ge=1, le=4096, description="New tokens per output at most.")
    latency_budget_ms: Budget = None

    def to_params(self) -> dict:
        return {"max_tokens": self.max_tokens, "temperature": 0.0}

    def to_operation(self, routing_key: str | None = None, latency_budget_ms: float | None = None) -> op.GenerateRequest:
        """The generation operation's request (task ``text2text``, greedy)."""
        return op.GenerateRequest(self.model, task="text2text", prompts=_as_list(self.input), sampling=self.to_params(),
                                  routing_key=routing_key, latency_budget_ms=self.latency_budget_ms or latency_budget_ms)


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


class Text2TextItem(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]


class Text2TextResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    model_version: str = "1"
    data: list[Text2TextItem]
    usage: CompletionUsage
    demo_weights: bool = False
    routing: "Routing | None" = None  # defined below, with the classification answer


class TextClassificationRequest(StrictRequest):
    """``POST /v1/classifications/text``."""

    model: str
    input: str | list[str]
    top_k: int = Field(default=1, ge=1, description="Labels per text, best first.")
    latency_budget_ms: Budget = None
    cascade: Cascade | None = None

    def to_operation(self, routing_key: str | None = None,
                     latency_budget_ms: float | None = None) -> op.ClassifyTextsRequest:
        """The text classification operation's request."""
        return op.ClassifyTextsRequest(self.model, texts=_as_list(self.input), top_k=self.top_k,
                                       cascade_threshold=self.cascade.threshold if self.cascade else None,
                                       routing_key=routing_key,
                                       latency_budget_ms=self.latency_budget_ms or latency_budget_ms)


class ImageClassificationRequest(StrictRequest):
    """``POST /v1/classifications/image`` as JSON (multipart uploads are also accepted)."""

    model: str
    images: list[str] = Field(description="Base64-encoded image files (JPEG, PNG, WebP, BMP, TIFF, GIF).")
    top_k: int | None = Field(default=None, ge=1, description="Classes per image, best first; default 5 (or the "
                              "model's class count when smaller).")
    latency_budget_ms: Budget = None
    cascade: Cascade | None = None

    def to_operation(self, routing_key: str | None = None, latency_budget_ms: float | None = None,
                     images: list | None = None) -> op.ClassifyImagesRequest:
        """The image classification operation's request (``images``: raw files a handle caller
        sent as bytes, instead of the base64 ``images``)."""
        return op.ClassifyImagesRequest(self.model, images=self.decoded() if images is None else images,
                                        top_k=self.top_k,
                                        cascade_threshold=self.cascade.threshold if self.cascade else None,
                                        routing_key=routing_key,
                                        latency_budget_ms=self.latency_budget_ms or latency_budget_ms)

    def decoded(self) -> list[bytes]:
        """Raw bytes of each image. Raises InvalidRequest naming the bad index."""
        out = []
        for i, s in enumerate(self.images):
            if s.startswith("data:") and "," in s:
                s = s.split(",", 1)[1]
            try:
                out.append(base64.b64decode(s, validate=True))
            except (binascii.Error, ValueError):
                try:  # the URL-safe alphabet (RFC 4648 §5) is accepted too
                    out.append(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)))
                except (binascii.Error, ValueError):
                    raise InvalidRequest(f"images[{i}] is not valid base64", param=f"images[{i}]") from None
        return out


class ClassLabel(BaseModel):
    index: int = Field(description="Class index in the model's output.")
    label: str
    score: float = Field(description="Softmax probability (sigmoid for multi-label models).")


class Classification(BaseModel):
    index: int = Field(description="Position of the input in the request.")
    top_k: list[ClassLabel]


class Routing(BaseModel):
    model: str = Field(description="The model `auto` chose (also the X-Maas-Routed-Model header).")
    reason: str = Field(description="Why, machine-readable (also the X-Maas-Route-Reason header).")


class CascadeStep(BaseModel):
    model: str
    top1_score: float = Field(description="The lowest top-1 score over the request's inputs.")
    latency_ms: float


class ClassificationResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    model_version: str = "1"
    data: list[Classification]
    usage: Usage | None = None
    demo_weights: bool = False
    routing: Routing | None = None
    cascade: list[CascadeStep] | None = None


Text2TextResponse.model_rebuild()


Target = Annotated[StrictStr | StrictInt | None, Field(
    default=None, description="The class to explain: a label (case-insensitive) or a class index; default the top-1.")]


class ExplainImageRequest(StrictRequest):
    """``POST /v1/explanations/image`` as JSON (multipart uploads with one ``file`` are also accepted)."""

    model: str = Field(description="An image classifier (``name`` or ``name@version``).")
    image: str = Field(description="One base64-encoded image file (JPEG, PNG, WebP, BMP, TIFF, GIF).")
    target: Target = None
    view: Literal["full", "served"] = Field(
        default="full", description="'full': the whole image at the model's scale; 'served': exactly the resized, "
        "centre-cropped input classification sees (outside the crop the map is 0).")
    seed: StrictInt = Field(default=0, ge=0, description="Seed of the faithfulness test's random masks.")
    overlay: bool = Field(default=True, description="Return the overlay PNG (base64).")

    def decoded(self) -> bytes:
        """The image's bytes. Raises InvalidRequest when it is not base64."""
        try:
            return ImageClassificationRequest(model=self.model, images=[self.image]).decoded()[0]
        except InvalidRequest:
            raise InvalidRequest("image is not valid base64", param="image") from None

    def to_operation(self, routing_key: str | None = None, latency_budget_ms: float | None = None,
                     image: Any = None) -> op.ExplainImageRequest:
        """The image explanation operation's request (``image``: raw bytes or pixels, instead of
        the base64 ``image``)."""
        target = self.target
        if isinstance(target, str) and target.strip().lstrip("-").isdigit():
            target = int(target)  # a class index sent as text (multipart forms have no numbers)
        return op.ExplainImageRequest(self.model, image=self.decoded() if image is None else image, target=target,
                                      view=self.view, seed=self.seed, overlay=self.overlay, routing_key=routing_key,
                                      latency_budget_ms=latency_budget_ms)


class ExplainTextRequest(StrictRequest):
    """``POST /v1/explanations/text``: one text (why a text classifier says ``target``) or two texts
    (which tokens make an embeddings model find them similar)."""

    model: str
    input: str | list[str] = Field(description="One text (classification) or a list of two (similarity).")
    target: Target = None
    seed: StrictInt = Field(default=0, ge=0, description="Seed of the faithfulness test's random masks.")

    def to_operation(self, routing_key: str | None = None,
                     latency_budget_ms: float | None = None) -> op.ExplainTextRequest:
        """The text explanation operation's request."""
        return op.ExplainTextRequest(self.model, texts=_as_list(self.input), target=self.target, seed=self.seed,
                                     routing_key=routing_key, latency_budget_ms=latency_budget_ms)


# ---------------------------------------------------------------------------- rendering


def _answer(a: op.Answered) -> dict:
    out: dict = {"model": a.name, "model_version": a.version, "demo_weights": a.demo_weights}
    if a.route_reason is not None:
        out["routing"] = Routing.model_construct(model=a.address, reason=a.route_reason)
    if a.cascade is not None:
        out["cascade"] = [CascadeStep.model_construct(**s) for s in a.cascade]
    return out


def classifications(res: op.Classifications) -> dict:
    """``/v1/classifications/{text,image}`` body (``usage`` for texts only)."""
    data = [Classification.model_construct(index=i, top_k=[ClassLabel.model_construct(**c) for c in row])
            for i, row in enumerate(res.rows)]
    extra = {} if res.prompt_tokens is None else {
        "usage": Usage.model_construct(prompt_tokens=res.prompt_tokens, total_tokens=res.prompt_tokens)}
    return ClassificationResponse.model_construct(object="list", data=data, **extra, **_answer(res.answered)
                                                  ).model_dump(exclude_unset=True)


def text2text(res: op.Generation) -> dict:
    """``/v1/text2text`` body."""
    data = [Text2TextItem.model_construct(index=i, text=c.text, finish_reason=c.finish_reason)
            for i, c in enumerate(res.choices)]
    usage = CompletionUsage.model_construct(prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens,
                                            total_tokens=res.prompt_tokens + res.completion_tokens)
    return Text2TextResponse.model_construct(object="list", data=data, usage=usage, **_answer(res.answered)
                                             ).model_dump(exclude_unset=True)


def explanation(res: op.Explanation) -> dict:
    """``/v1/explanations/{image,text}`` body: the explanation's content with who answered and
    ``latency_ms``."""
    a = res.answered
    return {"object": "explanation", "model": a.name, "model_version": a.version, **res.content,
            "latency_ms": res.latency_ms, "demo_weights": a.demo_weights}
