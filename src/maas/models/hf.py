"""Shared pieces of the Hugging Face families: loading and collating token batches."""

from __future__ import annotations

import logging

import torch

from maas.config import HuggingFaceSource, ModelSpec, RandomSource
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


def _rows(batches) -> tuple[list[torch.Tensor], int]:
    rows = []
    for b in batches:
        for i, n in enumerate(b.lengths):
            rows.append(b.input_ids[i, :n])
    return rows, batches[0].pad_token_id


def collate_right(batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge several requests' ``TokenizedBatch`` into one right-padded batch.

    Returns:
        ``(input_ids, attention_mask)``, int64 (N_total, L_max).
    """
    rows, pad = _rows(batches)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def collate_left(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows (decoder-only generation needs the prompt to end at the right edge).

    Returns:
        ``(input_ids, attention_mask)``, int64 (N, L_max).
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r) :] = r
            mask[i, width - len(r) :] = 1
    return ids, mask


def probe_tokens(pad_token_id: int = 0):
    """A two-token ``TokenizedBatch`` (ids 1, 2) for health-check probes."""
    from maas.preprocess.text import TokenizedBatch

    return TokenizedBatch(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.ones((1, 2), dtype=torch.int64),
                          num_tokens=[2], pad_token_id=pad_token_id)
