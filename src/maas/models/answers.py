"""The encoders' and image classifiers' answers from their outputs, in numpy: request checks
(``top_k``) and postprocessing (scores, top-k, embeddings per request). Shared by the torch
runners (:mod:`maas.models.text_encoder`, :mod:`maas.models.image_classifier`) and the
torch-free ONNX Runtime runners (:mod:`maas.models.onnx_serving`), so a model answers the same
whatever runs its forward.
"""

from __future__ import annotations

import numpy as np

from maas.errors import InvalidRequest

#: Image classification's ``top_k`` when the request gives none.
DEFAULT_IMAGE_TOP_K = 5


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of float logits (N, C) → float32 (N, C)."""
    x = logits.astype(np.float32, copy=True)
    x -= x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Element-wise logistic function of float logits → float32 (multi-label scores)."""
    with np.errstate(over="ignore"):  # exp overflows to inf for logits below about -88: the score is 0
        return (1.0 / (1.0 + np.exp(-logits.astype(np.float32)))).astype(np.float32)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` highest ``scores`` of each row (N, C), highest first (equal scores in any order,
    as ``torch.topk``).

    Returns:
        ``(values float (N, k), indices int64 (N, k))``.
    """
    if k < scores.shape[-1]:
        part = np.argpartition(-scores, k - 1, axis=-1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, -1), axis=-1, kind="stable")
        idx = np.take_along_axis(part, order, -1)
    else:
        idx = np.argsort(-scores, axis=-1, kind="stable")
    return np.take_along_axis(scores, idx, -1), idx.astype(np.int64)


def check_top_k(top_k_value, classes: int, what: str) -> None:
    """Raises InvalidRequest (400) unless ``top_k_value`` is an integer in 1..``classes``;
    ``what`` names the count in the message (e.g. "label count")."""
    if not isinstance(top_k_value, int) or isinstance(top_k_value, bool) or not 1 <= top_k_value <= classes:
        raise InvalidRequest(f"top_k must be an integer from 1 to {classes} (the model's {what}), got {top_k_value!r}",
                             param="top_k")


def ranked(scores: np.ndarray, k: int, labels: list[str]) -> list[dict]:
    """Per row of ``scores`` (N, C): ``{"top_k": [{"index", "label", "score"}, ...]}``, k entries."""
    values, idx = top_k(scores, k)
    return [{"top_k": [{"index": int(i), "label": labels[int(i)], "score": float(s)} for s, i in zip(vr, ir)]}
            for vr, ir in zip(values, idx)]


def encoder_results(embeddings: np.ndarray, logits: np.ndarray | None, requests, labels: list[str] | None,
                    multi_label: bool) -> list[dict]:
    """A text encoder's answer per request.

    Args:
        embeddings: float32 (N, D), rows of every request in order.
        logits: float (N, num_labels) for classifiers, else None.
        requests: the batch's ``ModelRequest`` s (their ``inputs`` are ``TokenizedBatch`` es).
        labels, multi_label: the head's labels; sigmoid scores when multi-label, else softmax.

    Returns:
        ``{"embeddings": float32 (n, D), "num_tokens": [...]}`` or ``{"results": [{"top_k": [...]}],
        "num_tokens": [...]}`` per request.
    """
    emb = embeddings.astype(np.float32, copy=False)
    results, start = [], 0
    for r in requests:
        n = len(r.inputs)
        used = r.inputs.lengths
        if r.params.get("task", "embeddings") == "text-classification":
            part = logits[start:start + n]
            scores = sigmoid(part) if multi_label else softmax(part)
            results.append({"results": ranked(scores, r.params.get("top_k", 1), labels), "num_tokens": used})
        else:
            results.append({"embeddings": emb[start:start + n], "num_tokens": used})
        start += n
    return results


def image_top_k(params: dict, classes: int) -> int:
    """An image request's ``top_k``: its own, else :data:`DEFAULT_IMAGE_TOP_K` or the class count
    when that is smaller (a 4-class model answers its 4 classes by default; asking for 5 is a 400)."""
    k = params.get("top_k")
    return min(DEFAULT_IMAGE_TOP_K, classes) if k is None else k


def image_results(logits: np.ndarray, requests, labels: list[str]) -> list[dict]:
    """An image classifier's answer per request: ``{"results": [{"top_k": [...], "logits"?}]}``
    from float logits (N, num_classes); ``return_logits`` adds each image's logits (a list)."""
    logits = logits.astype(np.float32, copy=False)
    probs = softmax(logits)
    out, start = [], 0
    for r in requests:
        n = len(r.inputs)
        items = ranked(probs[start:start + n], image_top_k(r.params, len(labels)), labels)
        if r.params.get("return_logits"):
            for row, item in enumerate(items):
                item["logits"] = logits[start + row].tolist()
        out.append({"results": items})
        start += n
    return out
