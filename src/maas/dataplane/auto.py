"""Scenario routing: ``model: "auto"`` picks, per request, the model that fits its latency budget.

For a task, the candidates are the served models offering it. Each has a ``quality`` (a number
from its spec, with its source: e.g. published ImageNet top-1) and a latency the router
predicts from what the ingress already measures:

    predicted_ms = recent_ms × (1 + batches_queued_ahead / running_replicas)

``recent_ms`` is the median of the model's last ``WINDOW`` (16) request latencies as the
dataplane saw them (preprocessing, queue, forward and hops: what a caller waits for), learnt from
every request to that model, ``auto`` or not. A median, not a moving mean: a model's first
requests after start-up are several times slower (first forwards), and a mean seeded with them
ranked EfficientNet-Lite1 faster than Lite0 in a test run; the median of 16 forgets them.
``batches_queued_ahead`` is the front queue's items over ``max_batch_size``: each full batch
waiting ahead costs about one more service time per replica. A model never measured has no
prediction and counts as fitting any budget (so it gets measured once; ``GET /v1/models`` shows
``latency_estimate_ms: null`` until then).

A runtime variant (``runtime``/``precision`` other than torch fp32, see
:mod:`maas.models.runtimes`) is ranked by its spec's ``quality`` scaled by the fidelity its
replica measured against fp32 torch for the task (:func:`variant_quality`): so an int8 MiniLM
declared with fp32's quality ranks just below an fp32 MiniLM, ``auto`` keeps fp32 while it fits
the budget and takes int8 when only int8 does.

Models with random demo weights are candidates only when no model with real weights serves the
task (``auto`` must not answer a chat with a random demo's noise because it was never measured).

The choice (``plan``): among ready candidates, with a budget, the highest ``quality`` whose
prediction is within it; with none fitting, the fastest (reason ``none-fit``); without a budget,
the ingress's ``auto_policy``: ``quality`` (highest quality) or ``latency`` (lowest prediction).
The rest of the candidates follow as failover, in the same order of preference: a model that
answers "not ready" or "at capacity" is skipped for the next one (503 only when none can serve).

Every auto-routed answer says why (``X-Maas-Routed-Model``, ``X-Maas-Route-Reason``, and a
``routing`` object in the body): ``budget=40ms;predicted=31ms;quality=75.1``,
``policy=quality;predicted=52ms;quality=77.6``, ``budget=5ms;none-fit;fastest;predicted=12ms``,
with ``;failover-from=<model>`` when a preferred model could not serve.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

#: The model name that asks the router to choose.
AUTO = "auto"
#: Request latencies kept per model; the prediction starts from their median.
WINDOW = 16


@dataclass(frozen=True)
class Choice:
    """One candidate in the order the router will try it."""

    name: str
    predicted_ms: float | None
    quality: float | None
    reason: str


class LatencyBook:
    """Recent latency per model (see the module docstring)."""

    def __init__(self, window: int = WINDOW):
        self.window = window
        self._ms: dict[str, deque[float]] = {}

    def observe(self, model: str, ms: float) -> None:
        self._ms.setdefault(model, deque(maxlen=self.window)).append(ms)

    def recent_ms(self, model: str) -> float | None:
        """Median of the last ``window`` latencies, ms; None before the first."""
        samples = self._ms.get(model)
        return statistics.median(samples) if samples else None

    def predict(self, model: str, queued_items: int, max_batch_size: int, replicas: int) -> float | None:
        """``recent_ms × (1 + queued_items / max_batch_size / replicas)``, or None (never measured)."""
        recent = self.recent_ms(model)
        if recent is None:
            return None
        return recent * (1.0 + queued_items / max(1, max_batch_size) / max(1, replicas))


def _fmt(ms: float | None) -> str:
    return "unmeasured" if ms is None else f"{ms:.0f}ms"


def _budget(ms: float) -> str:
    # 0.1 ms resolution: 0.5 stays 0.5 (a budget of 0 is refused; it must not read as one)
    return str(round(ms, 1)).removesuffix(".0") + "ms"


#: The fidelity measure that scales a variant's quality, by task; and its guard threshold in
#: :class:`maas.config.FidelitySpec`, used until a replica has reported its measurement.
TASK_FIDELITY = {"embeddings": ("mean_cosine", "min_cosine"),
                 "text-classification": ("top1_agreement", "min_top1_agreement"),
                 "image-classification": ("top1_agreement", "min_top1_agreement"),
                 "completion": ("greedy_match", "min_greedy_match"), "chat": ("greedy_match", "min_greedy_match")}


def variant_quality(spec, task: str, runtime: dict) -> float | None:
    """The quality ``auto`` ranks ``spec`` by for ``task``: ``spec.quality`` times the variant's
    fidelity to fp32 torch for that task — embeddings' mean cosine, classifiers' top-1 agreement,
    generators' greedy-text match — as its replica measured it (``runtime``, the ``/v1/models``
    card's entry), or the guard's threshold (the least a ready replica can have) before one has
    reported. A product, not a measured task score: it is a conservative discount (an int8 MiniLM
    at cosine 0.993 loses 0.7 % of its quality here; published task losses are 0.2–0.3 %) whose
    job is ordering. torch fp32, and a variant that fell back to fp32, keep ``spec.quality``;
    None stays None.
    """
    quality = spec.quality
    if quality is None or runtime.get("name", "torch") == "torch" and runtime.get("precision", "fp32") == "fp32":
        return quality
    metric, threshold = TASK_FIDELITY.get(task, (None, None))
    if metric is None:
        return quality
    measured = (runtime.get("fidelity") or {}).get(metric)
    factor = measured if measured is not None else getattr(spec.fidelity, threshold)
    return round(quality * factor, 3)


def _q(quality: float | None) -> str:
    return "unknown" if quality is None else f"{quality:g}"


def plan(candidates: list[tuple[str, float | None, float | None]], budget_ms: float | None,
         policy: str = "quality") -> list[Choice]:
    """Order ``candidates`` — ``(name, predicted_ms, quality)`` of the ready models — for a
    request with ``budget_ms`` (see the module docstring). Empty in, empty out."""
    def q(c):
        return c[2] if c[2] is not None else float("-inf")

    def lat(c):
        return c[1] if c[1] is not None else float("inf")

    if budget_ms is not None:
        fitting = [c for c in candidates if c[1] is None or c[1] <= budget_ms]
        if fitting:
            ordered = sorted(fitting, key=q, reverse=True)
            head = ordered[0]
            why = f"budget={_budget(budget_ms)};predicted={_fmt(head[1])};quality={_q(head[2])}"
        else:
            ordered = sorted(candidates, key=lat)
            head = ordered[0]
            why = f"budget={_budget(budget_ms)};none-fit;fastest;predicted={_fmt(head[1])}"
        rest = sorted((c for c in candidates if c not in ordered), key=q, reverse=True)
        ordered = ordered + rest
    else:
        ordered = sorted(candidates, key=q, reverse=True) if policy == "quality" else sorted(candidates, key=lat)
        head = ordered[0] if ordered else None
        why = f"policy={policy};predicted={_fmt(head[1])};quality={_q(head[2])}" if head else ""
    out = []
    for i, (name, predicted, quality) in enumerate(ordered):
        reason = why if i == 0 else f"failover;predicted={_fmt(predicted)};quality={_q(quality)}"
        out.append(Choice(name, predicted, quality, reason))
    return out


def escalations(choices: list[Choice], first: Choice) -> list[Choice]:
    """For a confidence cascade: the candidates of higher quality than ``first``, lowest quality
    first (the next better model is asked before the best)."""
    base = first.quality if first.quality is not None else float("-inf")
    better = [c for c in choices if c.quality is not None and c.quality > base]
    return sorted(better, key=lambda c: c.quality)
