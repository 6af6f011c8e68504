"""The one lifecycle every model family follows: load → preprocess → forward → postprocess.

Two layers:

* :class:`ModelRunner` is plain Python + torch (no Ray). A family subclasses it and fills in
  the four stages. ``run`` wraps them in ``torch.inference_mode()``. Unit tests drive
  runners directly.
* :class:`ModelDeployment` is the Ray Serve replica around a runner. It picks the device
  from what Ray assigned, matches torch threads to the replica's ``num_cpus``, loads the
  weights in ``__init__``, and batches with :class:`PullBatcher`: the forward thread takes
  everything queued (up to ``max_batch_size`` items) as soon as it is free, and waits for more
  only when idle (settings come in through ``user_config``, so serve config overrides reach
  them).

A call carries a front batch of jobs (:class:`~maas.batching.jobs.Preprocessed` + per-job params and
deadlines) and answers one result or one :class:`~maas.errors.MaasError` per job, so one bad
request never fails its neighbours. Each family module defines ``<Family>Runner`` and a
``@serve.deployment`` class that subclasses :class:`ModelDeployment` with ``runner_cls`` set.

Over 400 lines on purpose: the runner contract and the replica's lifecycle (device, threads,
warm-up, health, explanations, autoscaling stats) are the one base every family shares.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from ray import serve

from maas import metrics
from maas.batching.pull import PullBatcher
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


def set_torch_threads(num_cpus: float, threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads``, else :func:`torch_threads_for` ``(num_cpus)``
    (inter-op: 1).

    Returns:
        The thread count set.
    """
    threads = threads or torch_threads_for(num_cpus)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass
    return threads


def as_tensor(array) -> torch.Tensor:
    """``torch.from_numpy`` without its warning for read-only arrays (numpy arrays come out of
    Ray's object store read-only and zero-copy; the runners never write into them)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``), or None elsewhere: a replica's whole
    start-up (process, imports, weights, warm-up), which is what a caller waits after losing one."""
    try:
        ticks = __import__("os").sysconf("SC_CLK_TCK")
        start = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19]) / ticks
        return float(open("/proc/uptime").read().split()[0]) - start
    except (OSError, ValueError, IndexError):
        return None


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

    @property
    def abandoned(self) -> bool:
        """Cancelled, or past its deadline."""
        return self.cancelled or (self.deadline_s is not None and time.time() >= self.deadline_s)


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
        self.variant_dtype: torch.dtype | None = None  # torch bf16 when the spec's precision says so
        self.ort = None  # maas.models.runtimes.OrtModel when the forward runs on ONNX Runtime
        self.runtime_info: dict = {"name": "torch", "precision": "fp32"}

    @property
    def compute_dtype(self) -> torch.dtype:
        """bfloat16 when the spec's ``precision`` is bf16 (and its fidelity held); else the spec's
        ``dtype`` on CUDA; float32 on CPU (float16 there is slow or unsupported)."""
        if self.variant_dtype is not None:
            return self.variant_dtype
        if self.device.type != "cuda":
            return torch.float32
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[self.spec.dtype]

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """``eval()``, move to the device and cast to :attr:`compute_dtype` (logged when ignored)."""
        if self.spec.dtype != "float32" and self.device.type != "cuda":
            logger.info("model %s: dtype %s ignored on %s; using float32", self.spec.key, self.spec.dtype, self.device)
        return model.eval().to(self.device, dtype=self.compute_dtype)

    @abstractmethod
    def load(self) -> None:
        """Load weights (safely) and move the model to ``self.device``. Raises WeightsError."""

    # ------------------------------------------------------------------ runtime and precision (maas.models.runtimes)

    def fidelity_probe(self):
        """The fidelity guard's fixed inputs (:class:`maas.models.runtimes.Probe`). Families with
        runtime variants implement it, with :meth:`onnx_export` and :meth:`measure_fidelity`."""
        raise NotImplementedError(f"{type(self).__name__} has no runtime variants")

    def onnx_export(self):
        """How this family's forward exports to ONNX (:class:`maas.models.runtimes.Export`)."""
        raise NotImplementedError(f"{type(self).__name__} has no ONNX export")

    def bf16_model(self, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.dtype | None]:
        """``precision: bf16`` on torch: ``(a bfloat16 copy of model, the dtype its inputs take)``.
        ``model`` itself is left as it is (the fallback)."""
        import copy

        return copy.deepcopy(model).to(torch.bfloat16), torch.bfloat16

    def fidelity_outputs(self, probe) -> Any:
        """The outputs the guard compares: :meth:`forward` of the probe's batch (generators: their
        greedy continuations)."""
        return self.forward(probe.batch)

    def measure_fidelity(self, reference: Any, variant: Any) -> dict[str, float]:
        """Compare two :meth:`fidelity_outputs` of the probe (fp32 torch against the variant)."""
        raise NotImplementedError(f"{type(self).__name__} has no fidelity measure")

    def prepare_runtime(self) -> None:
        """After :meth:`load`: switch the forward to the spec's ``runtime``/``precision`` when it is
        not torch fp32, guarded by ``spec.fidelity`` (see :func:`maas.models.runtimes.prepare`).
        Leaves ``runtime_info`` for ``info()``.

        Raises:
            WeightsError: the variant fails its fidelity guard (``on_failure: refuse``), or its
                export failed.
        """
        spec = self.spec
        if (spec.runtime, spec.precision) == ("torch", "fp32"):
            return
        from maas.models import runtimes

        probe = self.fidelity_probe()

        def outputs():
            with torch.inference_mode():
                return self.fidelity_outputs(probe)

        fp32_model = self.model
        if spec.runtime == "torch":  # bf16: a copy, so the fp32 weights stay for a fallback
            def setup():
                self.model, self.variant_dtype = self.bf16_model(fp32_model)
                return {"threads": torch.get_num_threads()}
        else:
            def setup():
                self.ort, artifact = runtimes.onnx_model(spec, self.onnx_export(), probe, torch.get_num_threads())
                return {"threads": self.ort.threads, "artifact": artifact}

        def fallback():
            self.model, self.variant_dtype, self.ort = fp32_model, None, None

        self.runtime_info = runtimes.prepare(spec, reference=outputs, variant_setup=setup, variant=outputs,
                                             measure=self.measure_fidelity, items=probe.items, fallback=fallback)

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
            outputs = self.forward(batch) if self.spec.null_forward is None else self._null_forward(batch)
            t1 = time.perf_counter()
            results = self.postprocess(outputs, requests)
            self.last_timings_ms = {"forward": 1000 * (t1 - t0), "postprocess": 1000 * (time.perf_counter() - t1)}
            return results

    def null_outputs(self, batch: Any) -> tuple[Any, int]:
        """``(outputs shaped as forward's, items in the batch)`` without computing (see
        :class:`~maas.config.NullForwardSpec`). Raises NotImplementedError for families without one."""
        raise NotImplementedError(f"{type(self).__name__} has no null forward")

    def _null_forward(self, batch: Any) -> Any:
        """The benchmark's null forward: the family's null outputs after holding the thread for
        ``hold_ms + per_item_ms × items`` (``time.sleep`` releases the GIL and uses no CPU)."""
        outputs, items = self.null_outputs(batch)
        spec = self.spec.null_forward
        hold_s = (spec.hold_ms + spec.per_item_ms * items) / 1000
        if hold_s > 0:
            time.sleep(hold_s)
        return outputs

    def info(self) -> dict:
        """Static facts for ``/v1/models`` and the ingress (limits, device, labels)."""
        return {"device": str(self.device)}

    @abstractmethod
    def probe(self) -> ModelRequest:
        """A one-item request that exercises the forward pass (used by health checks)."""


# ---------------------------------------------------------------------------- Ray replica


class ModelDeployment:
    """Base of every model family's Serve deployment class.

    Constructor args (from ``bind``): the model spec as a dict. Weights load here, on the
    replica. ``user_config`` (the spec's ``batching``, overridable per deployment in the
    serve config) sets ``max_batch_size`` (items) and ``batch_wait_timeout_s``.

    Handle methods: ``__call__(pre, params, deadlines_s)`` (a front batch of jobs),
    ``info()``, ``stats()``, ``record_autoscaling_stats()`` (Serve's custom autoscaling metrics).
    """

    runner_cls: type[ModelRunner]

    def __init__(self, spec: dict):
        self.spec = ModelSpec.model_validate(spec)
        self.threads = set_torch_threads(replica_num_cpus(), self.spec.resources.torch_threads)
        # One long-lived thread runs every forward (batches and health probes). Measured on a
        # 2-core machine, MiniLM batch 1: 10.6 ms per forward on one dedicated thread against
        # 16.1 ms through asyncio.to_thread's shared default executor. It also keeps batches of
        # one replica from computing at the same time and fighting over its torch threads.
        self._forward_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"maas-forward-{self.spec.key}")
        self.device = select_device()
        started = time.monotonic()
        self.runner = self.runner_cls(self.spec, self.device)
        self.runner.load()
        self.runner.prepare_runtime()
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
            "model %s loaded on %s with %d torch threads in %.1f s, warm-up forward %.0f ms%s",
            self.spec.key, self.device, self.threads, self.load_s, self.warmup_ms,
            " (RANDOM demo weights)" if self.spec.is_demo else "",
        )

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
        except asyncio.TimeoutError:
            raise RuntimeError(f"model {self.spec.key}: probe forward took over {health.probe_timeout_s} s") from None

    def _in_forward_thread(self, fn, *args) -> asyncio.Future:
        """``fn(*args)`` on the replica's forward thread, as an awaitable."""
        return asyncio.get_running_loop().run_in_executor(self._forward_thread, fn, *args)

    def jobs(self, pre: Any, params: list[dict] | dict | None, deadlines_s: list[float | None] | None
             ) -> tuple[list[Any], list[ModelRequest], list[int]]:
        """Split a call into per-job :class:`ModelRequest` s, validating each.

        Returns:
            ``(results, requests, pending)``: ``results`` holds each failed job's error (its
            preprocessing error or its validation error) and None elsewhere; ``requests[i]``
            answers ``results[pending[i]]``.
        """
        from maas.batching.jobs import Preprocessed
        from maas.errors import MaasError

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
            try:
                self.runner.validate(request)
            except MaasError as exc:
                results[i] = exc
                continue
            requests.append(request)
            pending.append(i)
        return results, requests, pending

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
            state = await self._in_forward_thread(self.runner.explain_map, payload, params)
            return await self._in_forward_thread(self.runner.explain_score, state, params)
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
            "runtime": self.runner.runtime_info,  # runtime, precision, measured fidelity, export artifact
            **self.runner.info(),
        }

    def stats(self) -> dict:
        """Batch records of this replica: ``{"replica", "requests_per_batch": {jobs: count},
        "items_per_batch": {items: count}, "queued_items", "running_items", "last_timings_ms"}``."""
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
