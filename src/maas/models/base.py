"""The one lifecycle every model family follows: load → preprocess → forward → postprocess.

Two layers (the second in :mod:`maas.models.replica`, which does not import torch; re-exported here):

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
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from typing import Any

import torch

from maas.config import ModelSpec
from maas.models.replica import (  # noqa: F401 - re-exported
    PROBE_AFTER_IDLE_S,
    ModelDeployment,
    ModelRequest,
    process_age_s,
    replica_num_cpus,
    torch_threads_for,
)

logger = logging.getLogger("ray.serve.maas.models")



# ---------------------------------------------------------------------------- replica runtime


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

    def replica_facts(self) -> dict:
        """What a torch-free replica of this model needs besides ``info()`` (labels, …), JSON-ready."""
        return {}

    def fidelity_outputs(self, probe) -> Any:
        """The outputs the guard compares: :meth:`forward` of the probe's batch (generators: their
        greedy continuations)."""
        return self.forward(probe.batch)

    def measure_fidelity(self, reference: Any, variant: Any) -> dict[str, float]:
        """Compare two :meth:`fidelity_outputs` of the probe (fp32 torch against the variant)."""
        raise NotImplementedError(f"{type(self).__name__} has no fidelity measure")

    def prepare_runtime(self, keep_reference: bool = False) -> None:
        """After :meth:`load`: switch the forward to the spec's ``runtime``/``precision`` when it is
        not torch fp32, guarded by ``spec.fidelity`` (see :func:`maas.models.runtimes.prepare`).
        Leaves ``runtime_info`` for ``info()``; with ``keep_reference`` also ``fidelity_reference``
        = ``(probe, fp32 outputs)`` (the export child keeps them for a torch-free replica; a serving
        replica does not hold the probe — ~40 MB of pixels for an image model — for its life).

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

        def reference():
            ref = outputs()
            if keep_reference:
                self.fidelity_reference = (probe, ref)
            return ref

        self.runtime_info = runtimes.prepare(spec, reference=reference, variant_setup=setup, variant=outputs,
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


