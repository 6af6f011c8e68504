"""Prometheus metrics through ``ray.serve.metrics`` (exported on each node's metrics port with
Ray's ``ray_`` prefix, e.g. ``ray_maas_stage_latency_ms_bucket``).

==============================  =========  ==========================  =========================================
metric                          type       tags                        meaning
==============================  =========  ==========================  =========================================
``maas_requests``               counter    model, operation, status    requests answered by the ingress, by HTTP status
                                                                       (streams as ``completion-stream`` / ``chat-stream``)
``maas_stage_latency_ms``       histogram  model, stage                ``front_queue`` (waiting in the ingress's front batch
                                                                       queue), ``preprocess`` (tokenizer — or the ingress for a small text batch it tokenized itself — / image preprocessor),
                                                                       ``queue`` (waiting on the replica), ``forward``,
                                                                       ``postprocess`` (on the model replica), ``prefill`` /
                                                                       ``decode`` (a generator's steps), ms
``maas_batch_size``             histogram  model                       items (texts, images) per forward on a replica;
                                                                       for generators, rows per decoding step
``maas_time_to_first_token_ms`` histogram  model                       generators: request queued on the replica → first
                                                                       token sampled, ms
``maas_inter_token_latency_ms`` histogram  model                       generators: time between a request's successive
                                                                       decoding steps, ms
``maas_running_sequences``      gauge      model                       generators: rows in the running batch (updated ≤ 2/s)
``maas_waiting_sequences``      gauge      model                       generators: rows waiting for a slot
``maas_request_latency_ms``     histogram  model                       one request as the ingress saw it (successful
                                                                       answers), ms; ``model`` is the address
                                                                       (``name`` or ``name@version``): per version
``maas_traffic_weight``         gauge      model, version              the version's weight in the applied traffic
                                                                       policy (0 after an auto-rollback)
``maas_version_rollbacks``      counter    model, version, reason      automatic rollbacks (``errors`` or ``latency``)
``maas_shadow_results``         counter    model, version, result      shadow copies: ``agree``, ``disagree``,
                                                                       ``error``, ``dropped`` (over max_in_flight)
``maas_fidelity``               gauge      model, metric               a runtime/precision variant's fidelity to fp32 torch
                                                                       on its probe set (``mean_cosine``, ``min_cosine``,
                                                                       ``top1_agreement``, ``top5_overlap``), set at start
``maas_tenant_requests``        counter    tenant, outcome             a tenant's requests: ``admitted``, ``rate``,
                                                                       ``compute`` (429s), ``forbidden`` (403s)
``maas_tenant_compute_seconds`` counter    tenant                      replica-seconds charged to a tenant's quota
==============================  =========  ==========================  =========================================

The ``tenant`` label is a tenant id of the tenants file (never a key, never request content), so
its values are bounded by the file's tenants.

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
                "ttft": metrics.Histogram("maas_time_to_first_token_ms", description="Time to first token, ms.",
                                          boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("model",)),
                "itl": metrics.Histogram("maas_inter_token_latency_ms", description="Inter-token latency, ms.",
                                         boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("model",)),
                "running": metrics.Gauge("maas_running_sequences", description="Sequences in the running batch.",
                                         tag_keys=("model",)),
                "waiting": metrics.Gauge("maas_waiting_sequences", description="Sequences waiting for a slot.",
                                         tag_keys=("model",)),
                "latency": metrics.Histogram("maas_request_latency_ms", description="Request latency at the ingress, ms.",
                                             boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("model",)),
                "weight": metrics.Gauge("maas_traffic_weight", description="Traffic weight of a model version.",
                                        tag_keys=("model", "version")),
                "rollbacks": metrics.Counter("maas_version_rollbacks", description="Automatic rollbacks.",
                                             tag_keys=("model", "version", "reason")),
                "shadow": metrics.Counter("maas_shadow_results", description="Shadow comparisons by result.",
                                          tag_keys=("model", "version", "result")),
                "fidelity": metrics.Gauge("maas_fidelity", description="Fidelity of a runtime variant to fp32 torch.",
                                          tag_keys=("model", "metric")),
                "tenant_requests": metrics.Counter("maas_tenant_requests", description="A tenant's requests by outcome.",
                                                   tag_keys=("tenant", "outcome")),
                "tenant_compute": metrics.Counter("maas_tenant_compute_seconds",
                                                  description="Replica-seconds charged to a tenant.", tag_keys=("tenant",)),
                # Pools (maas.models.pool): labelled by pool, never by repository model (its count is unbounded).
                "pool_loads": metrics.Counter("maas_pool_loads", description="Repository model loads by outcome.",
                                              tag_keys=("pool", "outcome")),
                "pool_load_s": metrics.Histogram("maas_pool_load_seconds", description="Repository model load time, s.",
                                                 boundaries=[0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60],
                                                 tag_keys=("pool",)),
                "pool_evictions": metrics.Counter("maas_pool_evictions", description="Models evicted, by reason.",
                                                  tag_keys=("pool", "reason")),
                "pool_bytes": metrics.Gauge("maas_pool_model_bytes", description="Bytes of models a replica holds.",
                                            tag_keys=("pool",)),
                "pool_models": metrics.Gauge("maas_pool_models", description="Models a replica holds.",
                                             tag_keys=("pool",)),
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


def token_times(model: str, ttft_s: float | None, itl_s: list[float]) -> None:
    """One request's time to first token (when it is the first) and inter-token gaps, seconds."""
    m = _get()
    if m:
        tags = {"model": model}
        if ttft_s is not None:
            m["ttft"].observe(1000 * ttft_s, tags=tags)
        for gap in itl_s:
            m["itl"].observe(1000 * gap, tags=tags)


def sequences(model: str, running: int, waiting: int) -> None:
    m = _get()
    if m:
        m["running"].set(running, tags={"model": model})
        m["waiting"].set(waiting, tags={"model": model})


def request_latency(model: str, ms: float) -> None:
    m = _get()
    if m:
        m["latency"].observe(ms, tags={"model": model})


def traffic_weight(model: str, version: str, weight: float) -> None:
    m = _get()
    if m:
        m["weight"].set(weight, tags={"model": model, "version": version})


def rollback(model: str, version: str, reason: str) -> None:
    m = _get()
    if m:
        m["rollbacks"].inc(1, tags={"model": model, "version": version, "reason": reason})


def shadow(model: str, version: str, result: str) -> None:
    m = _get()
    if m:
        m["shadow"].inc(1, tags={"model": model, "version": version, "result": result})


def fidelity(model: str, metric: str, value: float) -> None:
    m = _get()
    if m:
        m["fidelity"].set(value, tags={"model": model, "metric": metric})


def pool_load(pool: str, outcome: str, seconds: float | None = None) -> None:
    """One repository model load on a pool replica (``outcome``: ok, failed)."""
    m = _get()
    if m:
        m["pool_loads"].inc(1, tags={"pool": pool, "outcome": outcome})
        if seconds is not None:
            m["pool_load_s"].observe(seconds, tags={"pool": pool})


def pool_eviction(pool: str, reason: str) -> None:
    """One model evicted (``reason``: budget, removed, unloaded)."""
    m = _get()
    if m:
        m["pool_evictions"].inc(1, tags={"pool": pool, "reason": reason})


def pool_held(pool: str, models: int, nbytes: int) -> None:
    m = _get()
    if m:
        m["pool_bytes"].set(nbytes, tags={"pool": pool})
        m["pool_models"].set(models, tags={"pool": pool})


def tenant_request(tenant: str, outcome: str) -> None:
    """A tenant's request: ``admitted``, or refused for ``rate``, ``compute`` (429) or ``forbidden`` (403)."""
    m = _get()
    if m:
        m["tenant_requests"].inc(1, tags={"tenant": tenant, "outcome": outcome})


def tenant_usage(tenant: str, compute_s: float) -> None:
    """Replica-seconds charged to a tenant (one answered request)."""
    m = _get()
    if m and compute_s > 0:
        m["tenant_compute"].inc(compute_s, tags={"tenant": tenant})
