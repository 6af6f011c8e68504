"""The one lifecycle every model family follows: load → preprocess → forward → postprocess.

Two layers:

* :class:`ModelRunner` is plain Python + torch (no Ray). A family subclasses it and fills in
  the four stages. ``run`` wraps them in ``torch.inference_mode()``. Unit tests drive
  runners directly.
* :class:`ModelDeployment` is the Ray Serve replica around a runner. It picks the device
  from what Ray assigned, matches torch threads to the replica's ``num_cpus``, loads the
  weights in ``__init__``, batches calls with ``@serve.batch`` (settings come in through
  ``user_config`` so serve config overrides reach them), records batch sizes, and runs the
  forward pass in a worker thread so that new requests keep queueing while a batch computes.

Each family module defines ``<Family>Runner`` and a ``@serve.deployment`` class that
subclasses :class:`ModelDeployment` with ``runner_cls`` set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from ray import serve

from maas import metrics
from maas.config import BatchingSpec, ModelSpec

logger = logging.getLogger("ray.serve.maas.models")

#: check_health probes the model only after this long without a successful batch, seconds.
PROBE_AFTER_IDLE_S = 30.0


# ---------------------------------------------------------------------------- replica runtime


def replica_num_cpus(default: float = 1.0) -> float:
    """CPUs Ray assigned to this replica (``ray_actor_options.num_cpus``), or ``default``
    outside a Ray actor."""
    try:
        import ray

        if ray.is_initialized():
            return float(ray.get_runtime_context().get_assigned_resources().get("CPU", default))
    except Exception:  # noqa: BLE001 - outside Ray there is nothing to ask
        pass
    return default


def torch_threads_for(num_cpus: float) -> int:
    """Torch intra-op threads for a replica with ``num_cpus``: ``max(1, floor(num_cpus))``, so
    fractional replicas on a small machine don't oversubscribe cores."""
    return max(1, int(num_cpus))


def set_torch_threads(num_cpus: float) -> int:
    """Set torch's intra-op threads to :func:`torch_threads_for` ``(num_cpus)`` (inter-op: 1).

    Returns:
        The thread count set.
    """
    threads = torch_threads_for(num_cpus)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass
    return threads


def select_device() -> torch.device:
    """CUDA when Ray assigned this replica a GPU and CUDA is usable, else CPU.

    Ray sets ``CUDA_VISIBLE_DEVICES`` to the assigned GPUs, so the first visible device is
    ours. A replica that was given a (logical) GPU on a machine without CUDA falls back to
    CPU and logs it once.
    """
    gpu_ids: list = []
    try:
        import ray

        if ray.is_initialized():
            gpu_ids = list(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001
        gpu_ids = []
    if gpu_ids and torch.cuda.is_available():
        return torch.device("cuda", 0)
    if gpu_ids:
        logger.warning("Ray assigned GPU(s) %s but CUDA is not available here; running on CPU", gpu_ids)
    return torch.device("cpu")


# ---------------------------------------------------------------------------- lifecycle


@dataclass
class ModelRequest:
    """One caller's request as it enters the batch queue.

    Attributes:
        inputs: The preprocessed input of this request (a ``TokenizedBatch`` or an
            ``ImageBatch`` holding the request's own items).
        params: Per-request options (``top_k``, sampling settings); each stage reads only
            what it needs.
        cancelled: Set when the caller went away (timeout, disconnect) while the request
            waited or ran; generation stops once every request of its batch is cancelled.
    """

    inputs: Any
    params: dict = field(default_factory=dict)
    cancelled: bool = False
    enqueued_at: float = 0.0


class ModelRunner(ABC):
    """Ray-free model lifecycle. Subclasses implement the four stages.

    Args:
        spec: The model's spec.
        device: Where the weights live and forward runs.
    """

    def __init__(self, spec: ModelSpec, device: torch.device | str = "cpu"):
        self.spec = spec
        self.device = torch.device(device)
        self.loaded = False
        self.last_timings_ms: dict[str, float] = {}

    @property
    def compute_dtype(self) -> torch.dtype:
        """The spec's ``dtype`` on CUDA; float32 on CPU (half precision there is slow or unsupported)."""
        if self.device.type != "cuda":
            return torch.float32
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[self.spec.dtype]

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """``eval()``, move to the device and cast to :attr:`compute_dtype` (logged when ignored)."""
        if self.spec.dtype != "float32" and self.device.type != "cuda":
            logger.info("model %s: dtype %s ignored on %s; using float32", self.spec.name, self.spec.dtype, self.device)
        return model.eval().to(self.device, dtype=self.compute_dtype)

    @abstractmethod
    def load(self) -> None:
        """Load weights (safely) and move the model to ``self.device``. Raises WeightsError."""

    def validate(self, request: ModelRequest) -> None:
        """Reject a request before it joins a batch (so one bad request never fails others).

        Raises:
            MaasError subclasses with a 4xx status.
        """

    @abstractmethod
    def preprocess(self, requests: list[ModelRequest]) -> Any:
        """Collate the requests' inputs into one batch on ``self.device``."""

    @abstractmethod
    def forward(self, batch: Any) -> Any:
        """The model call. Kept small: no per-request options except where decoding needs them."""

    @abstractmethod
    def postprocess(self, outputs: Any, requests: list[ModelRequest]) -> list[Any]:
        """Split outputs back into one JSON-ready result per request, applying per-request options."""

    def run(self, requests: list[ModelRequest]) -> list[Any]:
        """preprocess → forward → postprocess under ``torch.inference_mode()``.

        Stage times of the last run are left in ``last_timings_ms`` (``forward`` includes
        collating and moving inputs to the device).
        """
        with torch.inference_mode():
            t0 = time.perf_counter()
            batch = self.preprocess(requests)
            outputs = self.forward(batch)
            t1 = time.perf_counter()
            results = self.postprocess(outputs, requests)
            self.last_timings_ms = {"forward": 1000 * (t1 - t0), "postprocess": 1000 * (time.perf_counter() - t1)}
            return results

    def info(self) -> dict:
        """Static facts for ``/v1/models`` and the ingress (limits, device, labels)."""
        return {"device": str(self.device)}

    @abstractmethod
    def probe(self) -> ModelRequest:
        """A one-item request that exercises the forward pass (used by health checks)."""


def split_sizes(requests: list[ModelRequest]) -> list[int]:
    """Number of items each request contributes to the batch."""
    return [len(r.inputs) for r in requests]


# ---------------------------------------------------------------------------- Ray replica


class ModelDeployment:
    """Base of every model family's Serve deployment class.

    Constructor args (from ``bind``): the model spec as a dict. Weights load here, on the
    replica. ``user_config`` (the spec's ``batching``, overridable per deployment in the
    serve config) sets ``max_batch_size`` and ``batch_wait_timeout_s``.

    Handle methods: ``__call__(inputs, params)`` (one request), ``info()``, ``stats()``.
    """

    runner_cls: type[ModelRunner]

    def __init__(self, spec: dict):
        self.spec = ModelSpec.model_validate(spec)
        self.threads = set_torch_threads(replica_num_cpus())
        # One long-lived thread runs every forward (batches and health probes). Measured on a
        # 2-core machine, MiniLM batch 1: 10.6 ms per forward on one dedicated thread against
        # 16.1 ms through asyncio.to_thread's shared default executor. It also keeps batches of
        # one replica from computing at the same time and fighting over its torch threads.
        self._forward_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"maas-forward-{self.spec.name}")
        self.device = select_device()
        started = time.monotonic()
        self.runner = self.runner_cls(self.spec, self.device)
        self.runner.load()
        self.load_s = time.monotonic() - started
        self._batch_started: float | None = None
        self._last_batch_done: float | None = None  # monotonic time the last batch succeeded
        self.batch_requests: Counter[int] = Counter()
        self.batch_items: Counter[int] = Counter()
        logger.info(
            "model %s loaded on %s with %d torch threads in %.1f s%s",
            self.spec.name, self.device, self.threads, self.load_s,
            " (RANDOM demo weights)" if self.spec.is_demo else "",
        )

    def reconfigure(self, user_config: dict) -> None:
        """Apply batching settings from ``user_config`` (validated; unknown keys raise, so Serve
        reports the bad config instead of silently ignoring it)."""
        # Fields the user_config leaves out keep the spec's values.
        batching = BatchingSpec.model_validate({**self.spec.batching.model_dump(), **(user_config or {})})
        self._run_batch.set_max_batch_size(batching.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self.batching = batching

    async def check_health(self) -> None:
        """Serve health check that probes the model, not only the process.

        Unhealthy (raises) when: no weights are loaded; a batch has been running longer than
        ``health.stall_timeout_s``; or, when no batch has succeeded for ``PROBE_AFTER_IDLE_S``,
        a one-item probe forward (:meth:`ModelRunner.probe`) does not finish within
        ``health.probe_timeout_s``. A replica serving traffic is not probed: its own batches
        prove the forward pass works, and a probe would take compute from them.
        Serve then replaces the replica.
        """
        if not self.runner.loaded:
            raise RuntimeError(f"model {self.spec.name} has no loaded weights")
        health = self.spec.health
        started = self._batch_started
        if started is not None:
            running = time.monotonic() - started
            if running > health.stall_timeout_s:
                raise RuntimeError(f"model {self.spec.name}: a batch has been running for {running:.0f} s")
            return
        if self._last_batch_done is not None and time.monotonic() - self._last_batch_done < PROBE_AFTER_IDLE_S:
            return
        try:
            await asyncio.wait_for(self._in_forward_thread(self.runner.run, [self.runner.probe()]),
                                   timeout=health.probe_timeout_s)
        except asyncio.TimeoutError:
            raise RuntimeError(f"model {self.spec.name}: probe forward took over {health.probe_timeout_s} s") from None

    def _in_forward_thread(self, fn, *args) -> asyncio.Future:
        """``fn(*args)`` on the replica's forward thread, as an awaitable."""
        return asyncio.get_running_loop().run_in_executor(self._forward_thread, fn, *args)

    async def __call__(self, inputs: Any, params: dict | None = None) -> Any:
        """Run one request; returns its result (family-specific JSON-ready dict).

        Raises:
            MaasError: 4xx for a bad request (checked before batching).
        """
        request = ModelRequest(inputs=inputs, params=params or {})
        self.runner.validate(request)
        request.enqueued_at = time.perf_counter()
        try:
            return await self._run_batch(request)
        except asyncio.CancelledError:  # Serve cancels the call when the caller gives up
            request.cancelled = True
            raise

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _run_batch(self, requests: list[ModelRequest]) -> list[Any]:
        name = self.spec.name
        sizes = split_sizes(requests)
        self.batch_requests[len(requests)] += 1
        self.batch_items[sum(sizes)] += 1
        metrics.batch(name, len(requests))
        now = time.perf_counter()
        for r in requests:
            metrics.stage(name, "queue", 1000 * (now - r.enqueued_at))
        self._batch_started = time.monotonic()
        try:
            results = await self._in_forward_thread(self.runner.run, requests)
            self._last_batch_done = time.monotonic()
        finally:
            self._batch_started = None
        for stage_name, ms in self.runner.last_timings_ms.items():
            metrics.stage(name, stage_name, ms)
        return results

    def info(self) -> dict:
        """Model facts: name, family, tasks, demo flag, device, limits, load seconds."""
        return {
            "name": self.spec.name,
            "family": self.spec.family,
            "tasks": list(self.spec.tasks),
            "demo_weights": self.spec.is_demo,
            "threads": self.threads,
            "load_s": round(self.load_s, 3),
            **self.runner.info(),
        }

    def stats(self) -> dict:
        """Batch-size records of this replica: ``{"requests_per_batch": {size: count}, "items_per_batch": ...}``."""
        return {
            "requests_per_batch": dict(self.batch_requests),
            "items_per_batch": dict(self.batch_items),
        }
