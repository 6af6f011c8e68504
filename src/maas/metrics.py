"""Prometheus metrics through ``ray.serve.metrics`` (exported on each node's metrics port with
Ray's ``ray_`` prefix, e.g. ``ray_maas_stage_latency_ms_bucket``).

==============================  =========  ==========================  =========================================
metric                          type       tags                        meaning
==============================  =========  ==========================  =========================================
``maas_requests``               counter    model, operation, status    requests answered by the ingress, by HTTP status
                                                                       (streams as ``completion-stream`` / ``chat-stream``)
``maas_stage_latency_ms``       histogram  model, stage                ``front_queue`` (waiting in the ingress's front batch
                                                                       queue), ``preprocess`` (tokenizer / image preprocessor),
                                                                       ``queue`` (waiting on the replica), ``forward``,
                                                                       ``postprocess`` (on the model replica), ms
``maas_batch_size``             histogram  model                       items (texts, images) per forward on a replica
==============================  =========  ==========================  =========================================

Every function here is a no-op when metrics can't be created (outside a Serve replica), and
never raises: metrics must not stop a request.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("ray.serve.maas.metrics")

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]

_metrics: dict | None = None


def _get() -> dict | None:
    global _metrics
    if _metrics is None:
        try:
            from ray.serve import metrics

            _metrics = {
                "requests": metrics.Counter("maas_requests", description="Requests answered, by HTTP status.",
                                            tag_keys=("model", "operation", "status")),
                "stage": metrics.Histogram("maas_stage_latency_ms", description="Latency per stage, ms.",
                                           boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("model", "stage")),
                "batch": metrics.Histogram("maas_batch_size", description="Items per model forward.",
                                           boundaries=BATCH_BOUNDARIES, tag_keys=("model",)),
            }
        except Exception:  # noqa: BLE001
            logger.debug("serve metrics unavailable", exc_info=True)
            _metrics = {}
    return _metrics or None


def request(model: str, operation: str, status: int) -> None:
    m = _get()
    if m:
        m["requests"].inc(1, tags={"model": model or "-", "operation": operation, "status": str(status)})


def stage(model: str, stage_name: str, ms: float) -> None:
    m = _get()
    if m:
        m["stage"].observe(ms, tags={"model": model, "stage": stage_name})


def batch(model: str, size: int) -> None:
    m = _get()
    if m:
        m["batch"].observe(size, tags={"model": model})
