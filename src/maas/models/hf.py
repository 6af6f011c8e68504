"""Shared pieces of the Hugging Face families: loading and collating token batches."""

from __future__ import annotations

import logging

import numpy as np
import torch

from maas.config import HuggingFaceSource, ModelSpec, RandomSource
from maas.models.base import as_tensor
from maas.weights import hf_load_error, hf_location

logger = logging.getLogger("ray.serve.maas.models.hf")


def load_hf_model(spec: ModelSpec, auto_cls) -> torch.nn.Module:
    """Build a transformers model from the spec's weights source.

    * ``huggingface`` / ``package``: ``auto_cls.from_pretrained(dir_or_id)``; transformers
      reads ``model.safetensors`` when present and otherwise ``torch.load(weights_only=True)``.
    * ``random``: ``auto_cls.from_config(AutoConfig.for_model(**hf_config))`` after
      ``torch.manual_seed(seed)``, logged as demo weights.

    Raises:
        WeightsError: naming the model and the location, with how to fix it.
    """
    from transformers import AutoConfig

    w = spec.weights
    if isinstance(w, RandomSource):
        cfg_kwargs = dict(spec.hf_config or {})
        model_type = cfg_kwargs.pop("model_type")
        torch.manual_seed(w.seed)
        config = AutoConfig.for_model(model_type, **cfg_kwargs)
        logger.warning("model %s uses RANDOM demo weights (seed %d): outputs are meaningless", spec.name, w.seed)
        return auto_cls.from_config(config)
    where = hf_location(w, spec.name)
    revision = w.revision if isinstance(w, HuggingFaceSource) else None
    try:
        return auto_cls.from_pretrained(where, revision=revision, use_safetensors=None)
    except Exception as exc:  # noqa: BLE001 - any hub/file failure is a load error
        raise hf_load_error(spec.name, where, exc) from None


def collate_right(batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge several requests' ``TokenizedBatch`` (numpy) into one right-padded batch.

    Returns:
        ``(input_ids, attention_mask)``, ``torch.int64`` (N_total, L_max) on CPU.
    """
    from maas.preprocess.text import pad_right

    if len(batches) == 1 and batches[0].input_ids.shape[1] and int(batches[0].attention_mask[:, -1].max()) == 1:
        b = batches[0]  # one job, already padded to its own longest row
        return as_tensor(np.ascontiguousarray(b.input_ids)), as_tensor(np.ascontiguousarray(b.attention_mask))
    rows = [r for b in batches for r in b.token_rows()]
    ids, mask = pad_right(rows, batches[0].pad_token_id)
    return torch.from_numpy(ids), torch.from_numpy(mask)


def collate_left(rows: list, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows (decoder-only generation needs the prompt to end at the right edge).

    Args:
        rows: Token ids per row (numpy or lists).

    Returns:
        ``(input_ids, attention_mask)``, ``torch.int64`` (N, L_max).
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r) :] = torch.as_tensor(np.asarray(r, dtype=np.int64))
            mask[i, width - len(r) :] = 1
    return ids, mask


def probe_tokens(pad_token_id: int = 0):
    """A two-token ``TokenizedBatch`` (ids 1, 2) for health-check probes."""
    from maas.preprocess.text import TokenizedBatch

    return TokenizedBatch(input_ids=np.array([[1, 2]], dtype=np.int64), attention_mask=np.ones((1, 2), dtype=np.int64),
                          num_tokens=[2], pad_token_id=pad_token_id)
