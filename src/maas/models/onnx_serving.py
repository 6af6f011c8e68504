"""Replicas whose forward runs on ONNX Runtime or OpenVINO, without torch: text encoders and image
classifiers with ``runtime: onnxruntime`` or ``openvino`` (see :mod:`maas.models.runtimes` for the
recipes and the guard).

Why without torch: resident memory after load and three probe forwards, one process, measured on
this project's 2-vCPU machine — MiniLM int8 232 MB here against 1,045 MB for the same ONNX model
run from a torch runner (torch, the fp32 model and the session) and 878 MB for torch fp32;
EfficientNet-Lite0 fp32 456 MB against 1,289 MB and 834 MB. With several replicas per node that
is what decides how many fit.

Start-up (:meth:`OrtRunner.load`):

1. find the machine's export of this spec through its pointer (:func:`maas.models.ort.find_artifact`);
   without one, run ``python -m maas.models.runtimes`` in a child process, which loads the torch
   model, exports and quantises it (or reuses an export of the same weights), runs the fidelity
   guard against fp32 torch, and leaves the artifact with the runner's facts and the probe's fp32
   outputs. Its refusal (the guard missed, ``on_failure: refuse``) becomes this replica's
   :class:`~maas.errors.WeightsError`, message unchanged;
2. open the ONNX Runtime session with the replica's threads;
3. run the guard again in this replica: the stored probe inputs (photos as uint8 pixels, token
   rows) through this replica's own input path and session, against the stored fp32 torch
   outputs (numpy). A damaged facts or probe file makes the child export again.

Replicas of one spec start one at a time on a machine (a file lock): the first makes the export,
the others find its pointer instead of each loading torch in a child. A child left running by a
replica killed mid-export finishes or fails on its own; the export's own lock and atomic rename
keep the cache consistent either way.

With ``fidelity.on_failure: fp32`` and a variant below its guard, the replica serves the fp32 torch
runner instead (it then imports torch; ``runtime.fallback`` in ``/v1/models`` says why).

Explanations need gradients, so these replicas answer them with 400 and say to serve a torch
version; the benchmark's null forward is torch-only too (config refuses it).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from maas import metrics
from maas.errors import TaskNotSupported, WeightsError
from maas.models import ort
from maas.models.answers import check_top_k, encoder_results, image_results, image_top_k
from maas.models.replica import ModelDeployment, ModelRequest, replica_num_cpus, torch_threads_for

logger = logging.getLogger("ray.serve.maas.models.onnx")

#: Longest a child process may take to export, quantise and guard a model, seconds.
EXPORT_TIMEOUT_S = 900.0


class FallbackToTorch(Exception):
    """The variant missed its guard and the spec allows fp32 torch (``fidelity.on_failure: fp32``)."""

    def __init__(self, runtime_info: dict):
        super().__init__(runtime_info.get("fallback", "fallback"))
        self.runtime_info = runtime_info


def export_in_child(spec, threads: int) -> dict:
    """Run :func:`maas.models.runtimes.main` in a child process (it imports torch; this process does not).

    Returns:
        Its result: ``{"artifact": path or None, "runtime": runtime_info}``.

    Raises:
        WeightsError: its refusal or export error (message unchanged), or a crash or timeout
            (with the last lines of its log).
    """
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "maas.models.runtimes", str(threads)],
                              input=spec.model_dump_json(), capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise WeightsError(f"model {spec.name!r}: exporting to ONNX took over {EXPORT_TIMEOUT_S:.0f} s") from None
    result: dict = {}
    for line in reversed(done.stdout.splitlines()):
        try:
            parsed = json.loads(line)
        except ValueError:
            continue
        if isinstance(parsed, dict):
            result = parsed
            break
    if "error" in result:
        raise WeightsError(result["error"])
    if done.returncode != 0 or "runtime" not in result:
        tail = "\n".join(done.stderr.strip().splitlines()[-8:])
        raise WeightsError(f"model {spec.name!r}: the ONNX export process failed (exit {done.returncode}):\n{tail}")
    logger.info("model %s: export process done in %.1f s", spec.name, time.monotonic() - started)
    return result


class OrtRunner:
    """The runner contract of :class:`maas.models.base.ModelRunner` on ONNX Runtime or OpenVINO, numpy only.

    Subclasses set :attr:`family` and implement ``feeds``, ``outputs``, ``measure``,
    ``validate``, ``postprocess``, ``probe`` and ``info``.

    Args:
        spec: The model's spec (``runtime: onnxruntime`` or ``openvino``).
        device: Ignored: both run on the CPU here (the config refuses ``num_gpus`` for them).
    """

    family: str

    def __init__(self, spec, device: Any = "cpu"):
        self.spec = spec
        self.device = "cpu"
        self.loaded = False
        self.last_timings_ms: dict[str, float] = {}
        self.runtime_info: dict = {"name": spec.runtime, "precision": spec.precision}
        self.ort: ort.OrtModel | ort.OvModel | None = None
        self.facts: dict = {}
        self.threads = spec.resources.torch_threads or torch_threads_for(replica_num_cpus())

    def load(self) -> None:
        """Find or make the export, open it, and guard it (see the module docstring).

        Raises:
            WeightsError: the variant fails its guard (``on_failure: refuse``) or cannot be exported.
            FallbackToTorch: it fails with ``on_failure: fp32``.
        """
        spec = self.spec
        import fcntl

        # One start at a time per spec on this machine: the first makes the export (a child that
        # loads torch), the others wait here and find its pointer, instead of each loading torch.
        lock_path = ort.runtimes_dir() / f".{spec.name}-{spec.precision}.start.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            artifact, reused, rebuilt = ort.find_artifact(spec), True, False
            if artifact is not None:
                try:
                    probe = self._open(artifact)
                except Exception as exc:  # noqa: BLE001 - unreadable facts, probe or model: make them again
                    logger.warning("model %s: cached %s does not load (%s: %s); exporting it again", spec.name,
                                   artifact, type(exc).__name__, str(exc)[:200])
                    artifact = None
            if artifact is None:
                result = export_in_child(spec, self.threads)
                if result["artifact"] is None:
                    raise FallbackToTorch(result["runtime"])
                artifact = Path(result["artifact"])
                reused, rebuilt = result["runtime"]["artifact"]["reused"], result["runtime"]["artifact"]["rebuilt"]
                try:
                    probe = self._open(artifact)
                except Exception as exc:  # noqa: BLE001 - the child's own files do not load: say so, do not crash
                    raise WeightsError(f"model {spec.name!r}: the export in {artifact} does not load "
                                       f"({type(exc).__name__}: {str(exc)[:200]})") from None
        reference, variant, items = probe
        measured = self.measure(reference, variant)
        self.runtime_info = {"name": spec.runtime, "precision": spec.precision,
                             "fidelity": {**measured, "probe_items": items}, "threads": self.threads,
                             "artifact": {"path": str(artifact), "bytes": (artifact / "model.onnx").stat().st_size,
                                          "reused": reused, "rebuilt": rebuilt},
                             "torch_imported": "torch" in sys.modules}
        for metric, value in measured.items():
            metrics.fidelity(spec.key, metric, value)
        misses = ort.guard(spec, measured)
        if misses:
            message = ort.refusal(spec, misses, items)
            if spec.fidelity.on_failure == "refuse":
                raise WeightsError(message)
            logger.warning("%s; serving torch fp32 (fidelity.on_failure: fp32)", message)
            raise FallbackToTorch({**self.runtime_info, "name": "torch", "precision": "fp32",
                                   "fallback": f"{spec.runtime} {spec.precision}: {'; '.join(misses)}"})
        logger.info("model %s: %s %s holds its fidelity guard in this replica: %s", spec.name, spec.runtime,
                    spec.precision, measured)
        self.loaded = True

    def _open(self, artifact: Path) -> tuple[dict, dict, int]:
        """Open ``artifact``'s session and this spec's facts, and run the stored probe through this
        replica's own input path and session.

        Returns:
            ``(reference outputs, this session's outputs, probe items)``, numpy by output name.

        Raises:
            Whatever a missing or damaged file raises.
        """
        facts_path, probe_path = ort.facts_paths(self.spec, artifact)
        self.ort = ort.open_model(self.spec.runtime, artifact / "model.onnx", self.threads)
        self.facts = json.loads(facts_path.read_text())
        with np.load(probe_path) as stored:
            raw = {k.removeprefix("raw:"): stored[k] for k in stored.files if k.startswith("raw:")}
            reference = {k.removeprefix("ref:"): stored[k] for k in stored.files if k.startswith("ref:")}
        requests = self.probe_requests(raw)
        variant = dict(zip(self.output_names(), self.ort(self.feeds(requests))))
        return reference, variant, sum(len(r.inputs) for r in requests)

    def prepare_runtime(self) -> None:
        """Nothing: :meth:`load` opened and guarded the variant."""

    def output_names(self) -> list[str]:
        return ["logits"]

    def run(self, requests: list[ModelRequest]) -> list[Any]:
        """preprocess → forward (ONNX Runtime) → postprocess; stage times in ``last_timings_ms``."""
        t0 = time.perf_counter()
        outputs = dict(zip(self.output_names(), self.ort(self.feeds(requests))))
        t1 = time.perf_counter()
        results = self.postprocess(outputs, requests)
        self.last_timings_ms = {"forward": 1000 * (t1 - t0), "postprocess": 1000 * (time.perf_counter() - t1)}
        return results

    def explain_map(self, payload: Any, params: dict) -> dict:
        """Raises TaskNotSupported: attributions need the torch model's gradients."""
        raise TaskNotSupported(f"model {self.spec.name!r} runs on onnxruntime, which has no gradients for "
                               "explanations; ask a version of it with runtime: torch")


class OrtTextEncoderRunner(OrtRunner):
    """A BERT-style encoder's export: ``input_ids``/``attention_mask`` int64 (N, L) → ``embeddings``
    float32 (N, D) (pooled and normalised as the torch runner does) and, for classifiers,
    ``logits`` float32 (N, num_labels)."""

    family = "text-encoder"

    def output_names(self) -> list[str]:
        return ["embeddings", "logits"] if self.facts.get("classifies") else ["embeddings"]

    def feeds(self, requests: list[ModelRequest]) -> dict[str, np.ndarray]:
        """The requests' token rows, right-padded into one batch (int64 (N_total, L_max))."""
        from maas.preprocess.text import pad_right

        batches = [r.inputs for r in requests]
        b = batches[0]
        if len(batches) == 1 and b.input_ids.shape[1] and int(b.attention_mask[:, -1].max()) == 1:
            # one job, already padded to its own longest row (as maas.models.hf.collate_right)
            return {"input_ids": np.ascontiguousarray(b.input_ids, dtype=np.int64),
                    "attention_mask": np.ascontiguousarray(b.attention_mask, dtype=np.int64)}
        ids, mask = pad_right([row for b in batches for row in b.token_rows()], batches[0].pad_token_id)
        return {"input_ids": ids.astype(np.int64, copy=False), "attention_mask": mask.astype(np.int64, copy=False)}

    def probe_requests(self, raw: dict[str, np.ndarray]) -> list[ModelRequest]:
        """The stored probe (right-padded ids and mask) as one request."""
        from maas.preprocess.text import TokenizedBatch

        mask = raw["attention_mask"].astype(np.int64)
        return [ModelRequest(TokenizedBatch(raw["input_ids"].astype(np.int64), mask,
                                            [int(n) for n in mask.sum(-1)], 0), {"task": "embeddings"})]

    def measure(self, reference: dict, variant: dict) -> dict[str, float]:
        """As :meth:`maas.models.text_encoder.TextEncoderRunner.measure_fidelity`: cosine of the
        embeddings, and top-1 agreement of the logits for classifiers."""
        out = ort.embedding_fidelity(reference["embeddings"], variant["embeddings"])
        if "logits" in reference:
            out["top1_agreement"] = ort.logit_fidelity(reference["logits"], variant["logits"])["top1_agreement"]
        return out

    def validate(self, request: ModelRequest) -> None:
        if request.params.get("task", "embeddings") == "text-classification":
            check_top_k(request.params.get("top_k", 1), len(self.facts["labels"]), "label count")

    def postprocess(self, outputs: dict, requests: list[ModelRequest]) -> list[dict]:
        return encoder_results(outputs["embeddings"], outputs.get("logits"), requests, self.facts.get("labels"),
                               self.facts.get("multi_label", False))

    def probe(self) -> ModelRequest:
        from maas.preprocess.text import TokenizedBatch

        return ModelRequest(TokenizedBatch(input_ids=np.array([[1, 2]], dtype=np.int64),
                                           attention_mask=np.ones((1, 2), dtype=np.int64), num_tokens=[2],
                                           pad_token_id=0), {"task": "embeddings"})

    def info(self) -> dict:
        return {"device": "cpu", **self.facts["info"]}


class OrtImageClassifierRunner(OrtRunner):
    """An image classifier's export: ``pixels`` float32 (N, 3, H, W), normalised with the model's
    mean and std → ``logits`` float32 (N, num_classes)."""

    family = "image-classifier"

    def feeds(self, requests: list[ModelRequest]) -> dict[str, np.ndarray]:
        """``uint8`` NHWC pixels of every request → ``(pixels / 255 - mean) / std`` float32 NCHW."""
        arrays = [r.inputs.pixels for r in requests]
        pixels = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        pre = self.facts["info"]["preprocessing"]
        x = pixels.astype(np.float32) * np.float32(1 / 255)
        x -= np.asarray(pre["mean"], dtype=np.float32)
        x /= np.asarray(pre["std"], dtype=np.float32)
        return {"pixels": np.ascontiguousarray(x.transpose(0, 3, 1, 2))}

    def probe_requests(self, raw: dict[str, np.ndarray]) -> list[ModelRequest]:
        """The stored probe photos (uint8 NHWC) as one request."""
        from maas.preprocess.image import ImageBatch

        return [ModelRequest(ImageBatch(np.ascontiguousarray(raw["pixels"])), {"top_k": 1})]

    def measure(self, reference: dict, variant: dict) -> dict[str, float]:
        """Top-1 agreement and top-5 overlap of the logits."""
        return ort.logit_fidelity(reference["logits"], variant["logits"])

    def validate(self, request: ModelRequest) -> None:
        check_top_k(image_top_k(request.params, len(self.facts["labels"])), len(self.facts["labels"]), "class count")

    def postprocess(self, outputs: dict, requests: list[ModelRequest]) -> list[dict]:
        return image_results(outputs["logits"], requests, self.facts["labels"])

    def probe(self) -> ModelRequest:
        from maas.preprocess.image import ImageBatch

        crop = self.facts["info"]["preprocessing"]["crop_px"]
        return ModelRequest(ImageBatch(np.zeros((1, crop, crop, 3), dtype=np.uint8)), {"top_k": 1})

    def info(self) -> dict:
        return {"device": "cpu", **self.facts["info"]}


class OrtDeployment(ModelDeployment):
    """A replica on ONNX Runtime: ONNX Runtime's intra-op threads from the replica's CPUs, no torch.
    When the spec allows fp32 torch and the variant misses its guard, the family's torch runner
    serves instead (this replica then imports torch)."""

    def _compute(self) -> tuple[int, Any]:
        return self.spec.resources.torch_threads or torch_threads_for(replica_num_cpus()), "cpu"

    def _load_runner(self):
        runner = self.runner_cls(self.spec, self.device)
        try:
            runner.load()
            return runner
        except FallbackToTorch as fallback:
            return self._torch_runner(fallback.runtime_info)

    def _torch_runner(self, runtime_info: dict):
        from maas.models.base import select_device, set_torch_threads

        self.threads, self.device = set_torch_threads(replica_num_cpus(), self.spec.resources.torch_threads), \
            select_device()
        if self.runner_cls.family == "text-encoder":
            from maas.models.text_encoder import TextEncoderRunner as torch_cls
        else:
            from maas.models.image_classifier import ImageClassifierRunner as torch_cls
        runner = torch_cls(self.spec.model_copy(update={"runtime": "torch", "precision": "fp32"}), self.device)
        runner.load()
        runner.runtime_info = {**runtime_info, "threads": self.threads, "torch_imported": True}
        return runner


@serve.deployment(ray_actor_options={"num_cpus": 1})
class OnnxTextEncoder(OrtDeployment):
    """Serve deployment of a text encoder with ``runtime: onnxruntime`` (see :class:`OrtTextEncoderRunner`)."""

    runner_cls = OrtTextEncoderRunner


@serve.deployment(ray_actor_options={"num_cpus": 1})
class OnnxImageClassifier(OrtDeployment):
    """Serve deployment of an image classifier with ``runtime: onnxruntime``
    (see :class:`OrtImageClassifierRunner`)."""

    runner_cls = OrtImageClassifierRunner
