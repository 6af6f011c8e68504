"""The Ray Serve replica every model family shares (:class:`ModelDeployment`) and the request a
runner sees (:class:`ModelRequest`), without importing torch: a replica whose forward runs on ONNX
Runtime (:mod:`maas.models.onnx_serving`) never loads it. The torch side of a replica (threads,
device) is :mod:`maas.models.base`.

Over 300 lines on purpose: the replica's lifecycle (threads, warm-up, health, batching,
explanations, autoscaling stats) is the one base every family shares.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from maas import metrics
from maas.batching.pull import PullBatcher
from maas.config import BatchingSpec, ModelSpec

logger = logging.getLogger("ray.serve.maas.models")

#: check_health probes the model only after this long without a successful batch, seconds.
PROBE_AFTER_IDLE_S = 30.0


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
    """Intra-op threads (torch's or ONNX Runtime's) for a replica with ``num_cpus``:
    ``max(1, floor(num_cpus))``, so fractional replicas on a small machine don't oversubscribe cores."""
    return max(1, int(num_cpus))


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``), or None elsewhere: a replica's whole
    start-up (process, imports, weights, warm-up), which is what a caller waits after losing one."""
    try:
        ticks = __import__("os").sysconf("SC_CLK_TCK")
        start = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19]) / ticks
        return float(open("/proc/uptime").read().split()[0]) - start
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------------------- lifecycle


@dataclass
class ModelRequest:
    """One job (one caller's request) as the runner sees it.

    Attributes:
        inputs: The job's preprocessed items (a ``TokenizedBatch`` or an ``ImageBatch``
            holding the request's own items, numpy).
        params: Per-request options (``top_k``, sampling settings); each stage reads only
            what it needs.
        deadline_s: Wall-clock time (``time.time()``) after which the answer is no longer
            wanted, or None. Generation stops at it.
        cancelled: Set when the caller went away (timeout, disconnect) while the request
            waited or ran; generation stops at the next step once a row's caller left.
    """

    inputs: Any
    params: dict = field(default_factory=dict)
    deadline_s: float | None = None
    cancelled: bool = False
    enqueued_at: float = 0.0
    arrived_ns: int = 0  # traced requests: when the call reached the replica (wall clock, ns)
    pre_ns: tuple | None = None  # traced requests: the preprocessor's (start, end, jobs) (maas.tracing)

    @property
    def abandoned(self) -> bool:
        """Cancelled, or past its deadline."""
        return self.cancelled or (self.deadline_s is not None and time.time() >= self.deadline_s)


def timed(fn, spent: list[float]):
    """``fn`` that adds the seconds each call of it runs to ``spent[0]`` (a turn on the forward
    thread, without its wait for the thread)."""
    def run(*args):
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            spent[0] += time.perf_counter() - started
    return run


def split_jobs(pre: Any, params: list[dict] | dict | None, deadlines_s: list[float | None] | None, validate
               ) -> tuple[list[Any], list[ModelRequest], list[int]]:
    """Split a call into per-job :class:`ModelRequest` s; ``validate(i, request)`` checks job ``i``
    (raising a :class:`~maas.errors.MaasError` fails that job only).

    Args:
        pre: :class:`~maas.batching.jobs.Preprocessed` (or one job's inputs).
        params: One dict per job, or one for all. deadlines_s: Per job, or None.

    Returns:
        ``(results, requests, pending)``: ``results`` holds each failed job's error (its
        preprocessing error or its validation error) and None elsewhere; ``requests[i]``
        answers ``results[pending[i]]``.

    Raises:
        ValueError: params or deadlines do not match the number of jobs.
    """
    from maas.batching.jobs import Preprocessed
    from maas.errors import MaasError

    arrived_ns = time.time_ns()
    if not isinstance(pre, Preprocessed):
        pre = Preprocessed.single(pre)
    n = len(pre)
    params_list = [params or {}] * n if not isinstance(params, list) else params
    deadlines = deadlines_s if deadlines_s is not None else [None] * n
    if len(params_list) != n or len(deadlines) != n:
        raise ValueError(f"{n} jobs but {len(params_list)} params and {len(deadlines)} deadlines")
    results: list[Any] = [None] * n
    requests, pending = [], []
    for i, (inputs, err) in enumerate(pre.jobs()):
        if err is not None:
            results[i] = err
            continue
        request = ModelRequest(inputs=inputs, params=params_list[i], deadline_s=deadlines[i])
        if request.params.get("trace"):  # the ingress traces this job: keep the times its spans need
            request.arrived_ns, request.pre_ns = arrived_ns, pre.timing_ns
        try:
            validate(i, request)
        except MaasError as exc:
            results[i] = exc
            continue
        requests.append(request)
        pending.append(i)
    return results, requests, pending


# ---------------------------------------------------------------------------- Ray replica


class ModelDeployment:
    """Base of every model family's Serve deployment class.

    Constructor args (from ``bind``): the model spec as a dict. Weights load here, on the
    replica. ``user_config`` (the spec's ``batching``, overridable per deployment in the
    serve config) sets ``max_batch_size`` (items) and ``batch_wait_timeout_s``.

    Handle methods: ``__call__(pre, params, deadlines_s)`` (a front batch of jobs),
    ``info()``, ``stats()``, ``record_autoscaling_stats()`` (Serve's custom autoscaling metrics).
    """

    runner_cls: type  # a ModelRunner subclass (maas.models.base), or a torch-free runner

    def __init__(self, spec: dict):
        self.spec = ModelSpec.model_validate(spec)
        self.threads, self.device = self._compute()
        # One long-lived thread runs every forward (batches and health probes). Measured on a
        # 2-core machine, MiniLM batch 1: 10.6 ms per forward on one dedicated thread against
        # 16.1 ms through asyncio.to_thread's shared default executor. It also keeps batches of
        # one replica from computing at the same time and fighting over its torch threads.
        self._forward_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"maas-forward-{self.spec.key}")
        started = time.monotonic()
        self.runner = self._load_runner()
        self.load_s = time.monotonic() - started
        self.warmup_ms = self._warm_up()
        self.start_s = process_age_s() or self.load_s  # the whole start-up, for Retry-After
        self._explaining = 0  # explanations running or waiting on this replica
        self._batch_started: float | None = None
        self._last_batch_done: float | None = None  # monotonic time the last batch succeeded
        self.batching = self.spec.batching
        self._backlog = (0.0, 0.0)
        self.batcher = PullBatcher(self._run_batch, self.spec.key, self.batching.max_batch_size,
                                   self.batching.batch_wait_timeout_s, after_batch=self._record_stages)
        logger.info(
            "model %s loaded on %s with %d intra-op threads in %.1f s, warm-up forward %.0f ms%s",
            self.spec.key, self.device, self.threads, self.load_s, self.warmup_ms,
            " (RANDOM demo weights)" if self.spec.is_demo else "",
        )

    def _compute(self) -> tuple[int, Any]:
        """``(threads, device)`` of this replica: torch's intra-op threads set from its CPUs (see
        :func:`torch_threads_for`) and the device Ray gave it (:func:`maas.models.base.select_device`)."""
        from maas.models.base import select_device, set_torch_threads

        return set_torch_threads(replica_num_cpus(), self.spec.resources.torch_threads), select_device()

    def _load_runner(self):
        """The loaded runner: weights in place and the spec's runtime/precision prepared."""
        runner = self.runner_cls(self.spec, self.device)
        runner.load()
        runner.prepare_runtime()
        return runner

    def _warm_up(self) -> float:
        """One probe batch before the replica reports ready (Triton's ``model_warmup``): the first
        forwards after a load are several times slower (allocations, kernel choice), and the
        first user request should not pay for them. The second run's latency, ms, is reported in
        ``info()`` (``warmup_ms``) so ``auto`` has an estimate for the model before any request.

        Raises:
            Whatever the forward raises: a model that cannot run its probe must not report ready.
        """
        self.runner.run([self.runner.probe()])
        started = time.perf_counter()
        self.runner.run([self.runner.probe()])
        return 1000 * (time.perf_counter() - started)

    def reconfigure(self, user_config: dict) -> None:
        """Apply batching settings from ``user_config`` (validated; unknown keys raise, so Serve
        reports the bad config instead of silently ignoring it)."""
        # Fields the user_config leaves out keep the spec's values.
        batching = BatchingSpec.model_validate({**self.spec.batching.model_dump(), **(user_config or {})})
        self.batcher.configure(batching.max_batch_size, batching.batch_wait_timeout_s)
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
            raise RuntimeError(f"model {self.spec.key} has no loaded weights")
        health = self.spec.health
        started = self._batch_started
        if started is not None:
            running = time.monotonic() - started
            if running > health.stall_timeout_s:
                raise RuntimeError(f"model {self.spec.key}: a batch has been running for {running:.0f} s")
            return
        if self._last_batch_done is not None and time.monotonic() - self._last_batch_done < PROBE_AFTER_IDLE_S:
            return
        try:
            await asyncio.wait_for(self._in_forward_thread(self.runner.run, [self.runner.probe()]),
                                   timeout=health.probe_timeout_s)
        except TimeoutError:
            raise RuntimeError(f"model {self.spec.key}: probe forward took over {health.probe_timeout_s} s") from None

    def _in_forward_thread(self, fn, *args) -> asyncio.Future:
        """``fn(*args)`` on the replica's forward thread, as an awaitable."""
        return asyncio.get_running_loop().run_in_executor(self._forward_thread, fn, *args)

    def jobs(self, pre: Any, params: list[dict] | dict | None, deadlines_s: list[float | None] | None
             ) -> tuple[list[Any], list[ModelRequest], list[int]]:
        """Split a call into per-job :class:`ModelRequest` s, validating each (see :func:`split_jobs`)."""
        return split_jobs(pre, params, deadlines_s, lambda i, request: self.runner.validate(request))

    async def __call__(self, pre: Any, params: list[dict] | dict | None = None,
                       deadlines_s: list[float | None] | None = None, backlog_items: float | None = None
                       ) -> list[Any]:
        """Run a front batch of jobs; one result (family-specific JSON-ready dict) or one
        :class:`~maas.errors.MaasError` per job, in order.

        Args:
            pre: :class:`~maas.batching.jobs.Preprocessed` from the shared preprocessor (or one job's
                ``TokenizedBatch`` / ``ImageBatch``).
            params: Per-job options (one dict per job; one dict applies to every job).
            deadlines_s: Per-job wall-clock deadlines (``time.time()``), or None.
            backlog_items: The ingress's queue for this model behind this batch, per replica
                (an autoscaling signal, see :mod:`maas.autoscaling`).
        """
        if backlog_items is not None:
            self._backlog = (float(backlog_items), time.monotonic())
        results, requests, pending = self.jobs(pre, params, deadlines_s)
        if not requests:
            return results
        return await self.batcher.submit(requests, results, pending)

    async def _run_batch(self, requests: list[ModelRequest]) -> list[Any]:
        """The batch's preprocess → forward → postprocess on the forward thread."""
        self._batch_started = time.monotonic()
        try:
            results = await self._in_forward_thread(self.runner.run, requests)
            self._last_batch_done = time.monotonic()
        finally:
            self._batch_started = None
        return results

    async def explain(self, payload: Any, params: dict, deadline_s: float | None = None) -> dict:
        """An explanation of one input (see :mod:`maas.models.explain`), computed on this replica's
        forward thread between serving batches: the attribution (one forward/backward) and the
        faithfulness test (one batched forward) are two separate turns, so a waiting batch is held
        up by at most one of them.

        Raises:
            TaskNotSupported: the family has no explanations. ServiceOverloaded: more than
                ``max_concurrent_explanations`` at once on this replica (503 + Retry-After).
            ModelTimeout: the deadline passed before the explanation could start.
        """
        from maas.errors import ModelTimeout, ServiceOverloaded, TaskNotSupported

        if not hasattr(self.runner, "explain_map"):
            raise TaskNotSupported(f"model {self.spec.name!r} ({self.spec.family}) has no explanations; image "
                                   "classifiers and text encoders do")
        limit = self.spec.max_concurrent_explanations
        if self._explaining >= limit:
            raise ServiceOverloaded(f"model {self.spec.name!r} is computing {limit} explanations already; retry "
                                    "after 1 s")
        self._explaining += 1
        try:
            if deadline_s is not None and time.time() > deadline_s:
                raise ModelTimeout(f"model {self.spec.name!r}: the explanation did not start within "
                                   "explain_timeout_s; retry later")
            spent = [0.0]
            state = await self._in_forward_thread(timed(self.runner.explain_map, spent), payload, params)
            out = await self._in_forward_thread(timed(self.runner.explain_score, spent), state, params)
            self.batcher.busy_s += spent[0]
            return {**out, "compute_s": spent[0]}  # what the tenant is charged (maas.tenants)
        finally:
            self._explaining -= 1

    def _record_stages(self) -> None:
        for stage_name, ms in self.runner.last_timings_ms.items():
            metrics.stage(self.spec.key, stage_name, ms)

    def info(self) -> dict:
        """Model facts: name, family, tasks, demo flag, device, limits, load seconds."""
        return {
            "name": self.spec.key,
            "family": self.spec.family,
            "tasks": list(self.spec.tasks),
            "demo_weights": self.spec.is_demo,
            "threads": self.threads,
            "load_s": round(self.load_s, 3),
            "warmup_ms": round(self.warmup_ms, 2),
            "start_s": round(self.start_s, 1),
            "batching": self.batching.model_dump(),  # what it runs with now (user_config overrides included)
            # runtime, precision, measured fidelity, export artifact; whether this process loaded torch
            "runtime": {**self.runner.runtime_info, "torch_imported": "torch" in sys.modules},
            **self.runner.info(),
        }

    def stats(self) -> dict:
        """Batch records of this replica: ``{"replica", "requests_per_batch": {jobs: count},
        "items_per_batch": {items: count}, "queued_items", "running_items", "busy_s" (the batches'
        run time, seconds), "last_timings_ms"}``."""
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a Serve replica (unit tests)
            replica = None
        return {
            "replica": replica,
            "requests_per_batch": dict(self.batcher.batch_requests),
            "items_per_batch": dict(self.batcher.batch_items),
            "queued_items": self.batcher.queued_items,
            "running_items": self.batcher.running_items,
            "busy_s": round(self.batcher.busy_s, 6),  # batches' run time: what tenants are charged, summed
            "last_timings_ms": dict(self.runner.last_timings_ms),
        }

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics hook: items running and waiting for this model.

        With front batching a replica holds few calls but many items, so Serve's default
        (ongoing requests) undercounts load; :class:`maas.autoscaling.QueuedItemsPolicy`
        scales on these instead.
        """
        from maas.autoscaling import BACKLOG_TTL_S

        backlog, at = self._backlog
        return {"running_items": float(self.batcher.running_items), "queued_items": float(self.batcher.queued_items),
                "backlog_items": backlog if time.monotonic() - at < BACKLOG_TTL_S else 0.0}
