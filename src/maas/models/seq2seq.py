"""Encoder–decoder Transformers (``AutoModelForSeq2SeqLM``: T5, BART, Marian …): text2text.

Inputs are truncated to the encoder's limit by the tokenizer (``max_input_tokens``, else the
config's ``n_positions``/``max_position_embeddings``, else 512). Decoding shares
:class:`~maas.models.text_generator.GenerationMixin`; per-request params are the same as for
completion (``max_tokens``, ``temperature`` default 0 here, i.e. greedy).
"""

from __future__ import annotations

import torch
from ray import serve

from maas.models.base import ModelDeployment, ModelRequest, ModelRunner
from maas.models.hf import collate_right, load_hf_model, probe_tokens
from maas.models.sampling import SamplingParams
from maas.models.text_generator import GenerationMixin
from maas.preprocess.text import load_tokenizer


class Seq2SeqRunner(GenerationMixin, ModelRunner):
    """Lifecycle of an encoder–decoder model."""

    decoder_only = False

    def load(self) -> None:
        from transformers import AutoModelForSeq2SeqLM

        self.model = self.place(load_hf_model(self.spec, AutoModelForSeq2SeqLM))
        self.tokenizer = load_tokenizer(self.spec.tokenizer_source, self.spec.name)
        cfg = self.model.config
        positions = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 512
        self.max_input_tokens = int(self.spec.max_input_tokens or positions)
        self._setup_generation()
        self.loaded = True

    def validate(self, request: ModelRequest) -> None:
        SamplingParams.from_params(request.params)

    def preprocess(self, requests: list[ModelRequest]) -> dict[str, torch.Tensor]:
        """Right-padded encoder ``input_ids``/``attention_mask`` int64 (N_total, L_max) on device."""
        ids, mask = collate_right([r.inputs for r in requests])
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def probe(self) -> ModelRequest:
        return ModelRequest(probe_tokens(self.pad_token_id), {"max_tokens": 1, "temperature": 0})

    def info(self) -> dict:
        return {"device": str(self.device), "max_input_tokens": self.max_input_tokens}


@serve.deployment(ray_actor_options={"num_cpus": 1})
class Seq2SeqGenerator(ModelDeployment):
    """Serve deployment of one encoder–decoder model (see :class:`Seq2SeqRunner`)."""

    runner_cls = Seq2SeqRunner
