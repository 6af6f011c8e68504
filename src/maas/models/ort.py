"""ONNX Runtime on a replica without torch: the session, the exported artifact's checks, and the
fidelity measures — numpy only, so a replica that serves ``runtime: onnxruntime`` never imports
torch (see :mod:`maas.models.onnx_serving` for the memory it saves). Exporting needs torch; it
runs in a child process (:mod:`maas.models.runtimes`), once per machine.

An artifact directory (``cache_dir()/runtimes/<name>-<precision>-<key>/``) holds:

* ``model.onnx`` and ``meta.json`` (its SHA-256, recipe, library versions);
* ``replica-<spec key>.json``: what the serving replica needs to know without loading the torch
  model (the runner's ``info()``: labels, dimensions, pooling, preprocessing, …);
* ``probe-<spec key>.npz``: the fidelity guard's probe inputs before the runner's collation and
  the fp32 torch outputs for them, so each replica re-measures its own input path and session
  against fp32 torch without torch.

Both are per spec (:func:`spec_key`): two specs with the same weights share the model file but
not their labels, preprocessing or limits. A *pointer* ``<name>-<precision>-<source key>.json``
beside the artifact names it for a spec whose weights can be located without their library
(package, local files, random seeds): the source key hashes the spec key, the weight files'
paths, sizes, inodes and change times, the recipe version and the library versions (read from
package metadata, no import). A replica that finds a valid pointer starts without the child
process; a file replaced in place, even with its modification time kept, changes its inode or
change time and so the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib import metadata
from pathlib import Path

import numpy as np

from maas.errors import WeightsError

logger = logging.getLogger("ray.serve.maas.models.ort")

#: Bumped when an export or quantisation recipe changes, so cached files of the old recipe are not reused.
RECIPE_VERSION = "2"

#: ModelSpec fields that do not change the exported model (serving settings), left out of the source key.
NOT_IN_SOURCE_KEY = ("batching", "resources", "max_ongoing_requests", "max_queued_requests", "max_queued_items",
                     "health", "quality", "quality_source", "explain_timeout_s", "max_concurrent_explanations",
                     "version", "fidelity", "null_forward", "estimated_params")


# ---------------------------------------------------------------------------- fidelity measures


def embedding_fidelity(reference: np.ndarray, variant: np.ndarray) -> dict[str, float]:
    """``mean_cosine`` and ``min_cosine`` of each row of ``variant`` to its row of ``reference``
    (both float (N, D))."""
    ref, var = reference.astype(np.float64), variant.astype(np.float64)
    cos = (ref * var).sum(-1) / np.maximum(np.linalg.norm(ref, axis=-1) * np.linalg.norm(var, axis=-1), 1e-12)
    return {"mean_cosine": round(float(cos.mean()), 5), "min_cosine": round(float(cos.min()), 5)}


def logit_fidelity(reference: np.ndarray, variant: np.ndarray, k: int = 5) -> dict[str, float]:
    """``top1_agreement`` (share of rows whose arg-max class is the reference's) and
    ``top5_overlap`` (mean share of the reference's top-k classes in the variant's top-k; k is
    at most the class count) of float logits (N, C)."""
    k = min(k, reference.shape[-1])
    top1 = float((reference.argmax(-1) == variant.argmax(-1)).mean())
    ref_k = np.argsort(-reference, axis=-1)[:, :k]
    var_k = np.argsort(-variant, axis=-1)[:, :k]
    overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ref_k, var_k)]))
    return {"top1_agreement": round(top1, 4), f"top{k}_overlap": round(overlap, 4)}


def greedy_fidelity(reference: list[list[int]], variant: list[list[int]]) -> dict[str, float]:
    """``greedy_match``: share of prompts whose greedy continuation (token ids, one list per
    prompt) is the reference's, token for token; ``mean_matching_tokens``: mean length of the
    common prefix (how far the texts agree before they part)."""
    same = [a == b for a, b in zip(reference, variant)]
    prefix = []
    for a, b in zip(reference, variant):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefix.append(n)
    return {"greedy_match": round(sum(same) / max(1, len(same)), 4),
            "mean_matching_tokens": round(float(np.mean(prefix)) if prefix else 0.0, 2)}


def guard(spec, measured: dict[str, float]) -> list[str]:
    """The thresholds of ``spec.fidelity`` that ``measured`` misses, as readable phrases (empty
    when the variant holds)."""
    f = spec.fidelity
    checks = [("mean_cosine", f.min_cosine, "fidelity.min_cosine"),
              ("top1_agreement", f.min_top1_agreement, "fidelity.min_top1_agreement"),
              ("top5_overlap", f.min_top5_overlap, "fidelity.min_top5_overlap"),
              ("greedy_match", f.min_greedy_match, "fidelity.min_greedy_match")]
    return [f"{metric} {measured[metric]} < {name} {limit}" for metric, limit, name in checks
            if metric in measured and measured[metric] < limit]


def refusal(spec, misses: list[str], items: int) -> str:
    """The message of a replica that refuses its variant: the numbers and what to change."""
    other = (f"precision: fp32 with runtime: {spec.runtime}" if spec.precision == "int8"
             else "precision: fp32")
    return (f"model {spec.name!r}: {spec.runtime} {spec.precision} fails its fidelity guard against torch fp32 on "
            f"{items} probe items: {'; '.join(misses)}. Use {other}, lower the threshold in `fidelity`, or set "
            "fidelity.on_failure: fp32 to serve fp32 torch instead")


# ---------------------------------------------------------------------------- the session


class OrtModel:
    """An ONNX Runtime CPU session with the replica's threads.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (the replica's CPUs); inter-op is 1.

    Raises:
        WeightsError: onnxruntime is not installed.
        Whatever ONNX Runtime raises for a file it cannot load (the caller rebuilds it).
    """

    def __init__(self, path: Path, threads: int):
        try:
            import onnxruntime as ort
        except ImportError:
            raise WeightsError("runtime onnxruntime needs the onnxruntime package: pip install 'maas-serve[runtimes]' "
                               "(`make install` installs it)") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3  # errors only: its optimiser's notes are not the operator's business
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.threads = threads
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the model: ``feeds`` by input name (int64 token ids / float32 pixels); returns the
        outputs in the export's order."""
        return self.session.run(None, {name: feeds[name] for name in self.input_names})


class OvModel:
    """An OpenVINO CPU model compiled from the exported ONNX file, with the replica's threads.

    fp32 files run with ``INFERENCE_PRECISION_HINT`` f32 (OpenVINO would otherwise pick bf16 on
    CPUs with AMX, a precision the guard did not see); int8 files (quantised by the same recipes
    as ONNX Runtime's) run their quantised layers in int8 and the rest in f32. Latency mode, one
    stream, ``INFERENCE_NUM_THREADS`` = the replica's CPUs: one request at a time per replica, as
    the forward thread calls it.

    Args:
        path: the ``.onnx`` file.
        threads: inference threads (the replica's CPUs).

    Raises:
        WeightsError: openvino is not installed.
    """

    def __init__(self, path: Path, threads: int):
        try:
            import openvino as ov
        except ImportError:
            raise WeightsError("runtime openvino needs the openvino package: pip install 'maas-serve[runtimes]' "
                               "(`make install` installs it)") from None
        core = ov.Core()
        model = core.read_model(str(path))
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                          "INFERENCE_PRECISION_HINT": "f32",
                                                          "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})
        self.request = self.compiled.create_infer_request()
        self.threads = threads
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the model: ``feeds`` by input name; returns the outputs in the export's order (copies:
        the request's buffers are reused by the next call)."""
        out = self.request.infer({name: feeds[name] for name in self.input_names})
        return [np.array(out[o], copy=True) for o in self.compiled.outputs]


def open_model(runtime: str, path: Path, threads: int) -> OrtModel | OvModel:
    """The exported file under ``runtime`` (``onnxruntime`` or ``openvino``)."""
    return OvModel(path, threads) if runtime == "openvino" else OrtModel(path, threads)


# ---------------------------------------------------------------------------- artifacts


def versions() -> dict[str, str]:
    """Versions of the libraries an exported file depends on (package metadata; nothing imported)."""
    out = {}
    for name in ("torch", "onnx", "onnxruntime", "openvino"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def valid(path: Path) -> bool:
    """Whether an artifact directory is complete and its ``model.onnx`` matches ``meta.json``'s SHA-256."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        return meta["sha256"] == file_digest(path / "model.onnx")
    except (OSError, ValueError, KeyError):
        return False


def runtimes_dir() -> Path:
    from maas.weights import cache_dir

    return cache_dir() / "runtimes"


def weight_files(spec) -> list[Path] | None:
    """The files the spec's weights come from, when they can be found without their library
    (package, local files or directories); ``[]`` for random weights; None otherwise (hub ids)."""
    from maas.config import PackageSource, RandomSource
    from maas.weights import package_path

    w = spec.weights
    if isinstance(w, RandomSource):
        return []
    if isinstance(w, PackageSource):
        root = package_path(w, spec.name)
    else:
        local = getattr(w, "path", None) or getattr(w, "id", None)
        if not local or not os.path.isabs(local) and not local.startswith("."):
            return None
        root = Path(local)
        if not root.exists():
            return None
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]


def spec_key(spec) -> str:
    """The spec's model fields (not its serving settings, :data:`NOT_IN_SOURCE_KEY`), hashed (16 hex)."""
    fields = spec.model_dump(mode="json", exclude=set(NOT_IN_SOURCE_KEY))
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_key(spec) -> str | None:
    """The pointer's key (16 hex): :func:`spec_key`, the weight files' paths, sizes, inodes,
    modification and change times, the recipe version and the library versions. None when the
    weights' files cannot be located without their library (see :func:`weight_files`)."""
    files = weight_files(spec)
    if files is None:
        return None
    stats = [(str(p), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns) for p in files for st in [p.stat()]]
    parts = {"spec": spec_key(spec), "files": stats, "recipe_version": RECIPE_VERSION, **versions()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def facts_paths(spec, artifact: Path) -> tuple[Path, Path]:
    """``(replica facts .json, probe .npz)`` of ``spec`` in ``artifact``."""
    key = spec_key(spec)
    return artifact / f"replica-{key}.json", artifact / f"probe-{key}.npz"


def pointer_path(spec) -> Path | None:
    key = source_key(spec)
    return None if key is None else runtimes_dir() / f"{spec.name}-{spec.precision}-{key}.json"


def write_pointer(spec, artifact: Path) -> None:
    """Point the spec's source key at ``artifact`` (atomic: a temporary file renamed)."""
    path = pointer_path(spec)
    if path is None:
        return
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"artifact": str(artifact)}))
    os.replace(tmp, path)


def find_artifact(spec) -> Path | None:
    """The valid artifact the spec's pointer names (with the spec's facts and probe files), or None."""
    path = pointer_path(spec)
    if path is None or not path.exists():
        return None
    try:
        artifact = Path(json.loads(path.read_text())["artifact"])
    except (OSError, ValueError, KeyError):
        return None
    if valid(artifact) and all(p.exists() for p in facts_paths(spec, artifact)):
        return artifact
    return None
