"""What a pool replica (:mod:`maas.models.pool`) uses besides its lifecycle: head-only models, the
bytes a model takes, the process's memory, and the report of held models to Serve's router.
Ray's and torch's imports stay inside the functions that need them.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

import numpy as np

from maas.errors import ModelNotReady, WeightsError

logger = logging.getLogger("ray.serve.maas.models.pool")


def report_model_ids(model_ids: list[str]) -> None:
    """Tell Serve's router which multiplexed model ids this replica holds or is loading, as
    ``@serve.multiplexed`` does (Ray 2.60's ``_ModelMultiplexWrapper._push_model_ids_info``; a
    private call, so guarded: without it routing still works, only without affinity)."""
    try:
        from ray.serve._private.common import RequestRoutingInfo
        from ray.serve.context import _get_global_client, _get_internal_replica_context

        ctx = _get_internal_replica_context()
        if ctx is None:
            return
        _get_global_client().record_request_routing_info(
            RequestRoutingInfo(replica_id=ctx.replica_id, multiplexed_model_ids=list(model_ids)))
    except Exception as exc:  # noqa: BLE001 - affinity is an optimisation
        logger.warning("could not report multiplexed model ids to Serve: %s", exc)


def rss_bytes() -> int:
    """This process's resident memory, bytes (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        import os

        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_memory() -> None:
    """Hand freed heap back to the OS (glibc ``malloc_trim``), so an eviction shows in the replica's
    RSS; a no-op where glibc is absent."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class Head:
    """A head-only model: ``logits = embeddings @ weight.T + bias`` on the pool's base embeddings.

    Attributes:
        weight: float32 (C, D). bias: float32 (C,). labels: C class names.
    """

    weight: np.ndarray
    bias: np.ndarray
    labels: list[str]

    @property
    def nbytes(self) -> int:
        return int(self.weight.nbytes + self.bias.nbytes)


def load_head(path: str, labels: list[str], dim: int) -> Head:
    """Read a head file (safetensors: ``weight`` (C, D), ``bias`` (C,)).

    Raises:
        WeightsError: missing tensors, or shapes that do not match ``labels`` and the base's ``dim``.
    """
    from safetensors.numpy import load_file

    try:
        tensors = load_file(path)
    except Exception as exc:  # noqa: BLE001 - any read failure names the file
        raise WeightsError(f"head file {path} cannot be read as safetensors: {exc}") from None
    if "weight" not in tensors or "bias" not in tensors:
        raise WeightsError(f"head file {path} needs tensors 'weight' (C, D) and 'bias' (C,); it has {sorted(tensors)}")
    w, b = tensors["weight"].astype(np.float32), tensors["bias"].astype(np.float32)
    if w.shape != (len(labels), dim) or b.shape != (len(labels),):
        raise WeightsError(f"head file {path}: weight {w.shape} and bias {b.shape} do not match {len(labels)} labels "
                           f"over the base's {dim}-dimensional embeddings (weight ({len(labels)}, {dim}), bias "
                           f"({len(labels)},))")
    return Head(np.ascontiguousarray(w), b, list(labels))


def failed_load(name: str) -> ModelNotReady:
    """The answer to a request for a model whose load failed: 503 that says where the reason is
    (the reason itself names files of the server, which a 5xx body does not show)."""
    return ModelNotReady(f"repository model {name!r} failed to load; POST /v2/repository/index gives the reason. "
                         f"Fix its folder (a changed file is loaded again) or POST /v2/repository/models/{name}/load "
                         "to retry")


def loaded_estimate(entry: dict) -> int:
    """Bytes a repository model will take loaded, before loading it: its weight files' bytes, twice
    that for a checkpoint stored in float16/bfloat16 (the pool computes in float32 on CPU)."""
    size = int(entry["size_bytes"])
    if (entry.get("spec") or {}).get("head"):
        return size
    try:
        import json
        import os

        cfg = json.loads(open(os.path.join(entry["path"], "config.json")).read())
    except (OSError, ValueError):
        return size
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    return 2 * size if dtype in ("float16", "bfloat16") else size


def module_bytes(model) -> int:
    """Bytes of a torch module's parameters and buffers."""
    return int(sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())))
