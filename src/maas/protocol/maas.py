"""maas-serve's own routes: text2text, text classification, image classification."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, Field, StrictInt, StrictStr

from maas.errors import InvalidRequest
from maas.protocol import CompletionUsage, StrictRequest, Usage


BUDGET_DESCRIPTION = ("With model 'auto': answer within this many ms if a model is predicted to (the "
                      "X-Maas-Latency-Budget-Ms header says the same for every route).")


def _no_bool(value):
    """JSON ``true`` is not a number of milliseconds (pydantic would read it as 1.0)."""
    if isinstance(value, bool):
        raise ValueError("must be a number of milliseconds, not a boolean")
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


class Text2TextItem(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]


class Text2TextResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[Text2TextItem]
    usage: CompletionUsage
    demo_weights: bool = False


class TextClassificationRequest(StrictRequest):
    """``POST /v1/classifications/text``."""

    model: str
    input: str | list[str]
    top_k: int = Field(default=1, ge=1, description="Labels per text, best first.")
    latency_budget_ms: Budget = None
    cascade: Cascade | None = None


class ImageClassificationRequest(StrictRequest):
    """``POST /v1/classifications/image`` as JSON (multipart uploads are also accepted)."""

    model: str
    images: list[str] = Field(description="Base64-encoded image files (JPEG, PNG, WebP, BMP, TIFF, GIF).")
    top_k: int = Field(default=5, ge=1)
    latency_budget_ms: Budget = None
    cascade: Cascade | None = None

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
    data: list[Classification]
    usage: Usage | None = None
    demo_weights: bool = False
    routing: Routing | None = None
    cascade: list[CascadeStep] | None = None


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


class ExplainTextRequest(StrictRequest):
    """``POST /v1/explanations/text``: one text (why a text classifier says ``target``) or two texts
    (which tokens make an embeddings model find them similar)."""

    model: str
    input: str | list[str] = Field(description="One text (classification) or a list of two (similarity).")
    target: Target = None
    seed: StrictInt = Field(default=0, ge=0, description="Seed of the faithfulness test's random masks.")

    def texts(self) -> list[str]:
        """Raises InvalidRequest: not one or two non-blank texts."""
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if len(texts) not in (1, 2) or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise InvalidRequest("input must be one text (to explain a classification) or two non-blank texts (to "
                                 "explain their similarity)", param="input")
        return texts
