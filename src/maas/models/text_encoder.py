"""BERT-style text encoders: sentence embeddings and (with a head) text classification.

Pooling follows what the checkpoint declares: sentence-transformers'
``1_Pooling/config.json`` (cls, mean, max or mean-sqrt-len) when present, mean pooling
otherwise; vectors are L2-normalised when ``modules.json`` lists a ``Normalize`` module.
The longest input is the spec's ``max_input_tokens``, else ``sentence_bert_config.json``'s
``max_seq_length``, else the config's ``max_position_embeddings``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from ray import serve

from maas.config import RandomSource
from maas.errors import InvalidRequest, WeightsError
from maas.models.answers import check_top_k, encoder_results
from maas.models.base import ModelDeployment, ModelRequest, ModelRunner
from maas.models.hf import collate_right, load_hf_model, probe_tokens
from maas.weights import hf_location

logger = logging.getLogger("ray.serve.maas.models.text_encoder")

POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len")


def read_pooling(model_dir: str | None) -> tuple[str, bool, int | None]:
    """Pooling mode, normalise flag and max_seq_length declared by a sentence-transformers dir.

    Returns:
        ``(mode, normalize, max_seq_length)``; ``("mean", False, None)`` when nothing is declared.
    """
    mode, norm, max_len = "mean", False, None
    if not model_dir or not Path(model_dir).is_dir():
        return mode, norm, max_len
    root = Path(model_dir)
    modules = root / "modules.json"
    if modules.exists():
        mods = json.loads(modules.read_text())
        norm = any(m.get("type", "").endswith("Normalize") for m in mods)
        for m in mods:
            if m.get("type", "").endswith("Pooling"):
                cfg_path = root / m.get("path", "") / "config.json"
                if cfg_path.exists():
                    cfg = json.loads(cfg_path.read_text())
                    for name in POOLING_MODES:
                        key = "pooling_mode_cls_token" if name == "cls" else f"pooling_mode_{name}_tokens"
                        if cfg.get(key):
                            mode = name
                            break
    sbert = root / "sentence_bert_config.json"
    if sbert.exists():
        max_len = json.loads(sbert.read_text()).get("max_seq_length")
    return mode, norm, max_len


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token states into one vector per text.

    Args:
        hidden: ``float`` (N, L, D) last hidden states.
        mask: ``int64`` (N, L) attention mask.
        mode: one of ``cls``, ``mean``, ``max``, ``mean_sqrt_len`` (sentence-transformers' modes).

    Returns:
        ``float`` (N, D).
    """
    if mode == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    summed = (hidden * m).sum(dim=1)
    counts = m.sum(dim=1).clamp(min=1e-9)
    return summed / (counts.sqrt() if mode == "mean_sqrt_len" else counts)


def encode(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, pooling: str,
           normalize: bool, classifies: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The encoder's forward: ``(embeddings float32 (N, D), logits (N, num_labels) or None)`` from
    ``int64`` (N, L) ids and mask. Shared by the torch forward and the ONNX export."""
    if classifies:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden, logits = out.hidden_states[-1], out.logits
    else:
        hidden, logits = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state, None
    emb = pool(hidden, attention_mask, pooling).float()
    if normalize:
        emb = torch.nn.functional.normalize(emb, p=2, dim=-1)
    return emb, None if logits is None else logits.float()


class _ExportedEncoder(torch.nn.Module):
    """:func:`encode` as a module with tensor outputs only, for ``torch.onnx.export``."""

    def __init__(self, model: torch.nn.Module, pooling: str, normalize: bool, classifies: bool):
        super().__init__()
        self.model, self.pooling, self.normalize, self.classifies = model, pooling, normalize, classifies

    def forward(self, input_ids, attention_mask):
        emb, logits = encode(self.model, input_ids, attention_mask, pooling=self.pooling, normalize=self.normalize,
                             classifies=self.classifies)
        return (emb, logits) if self.classifies else emb


class TextEncoderRunner(ModelRunner):
    """Lifecycle of a BERT-style encoder.

    Per-request params: ``task`` (``embeddings`` or ``text-classification``), ``top_k`` for
    classification (read in :meth:`postprocess`).
    """

    def load(self) -> None:
        from transformers import AutoModel, AutoModelForSequenceClassification

        spec = self.spec
        self.classifies = "text-classification" in spec.tasks
        cls = AutoModelForSequenceClassification if self.classifies else AutoModel
        self.model = self.place(load_hf_model(spec, cls))
        cfg = self.model.config
        if self.classifies:
            archs = getattr(cfg, "architectures", None) or []
            if not isinstance(spec.weights, RandomSource) and not any("SequenceClassification" in a for a in archs):
                raise WeightsError(
                    f"model {spec.name!r} lists text-classification but its checkpoint has no sequence-classification "
                    f"head (architectures={archs}); remove the task or use a fine-tuned checkpoint"
                )
            self.labels = [cfg.id2label[i] for i in range(cfg.num_labels)]
            self.multi_label = getattr(cfg, "problem_type", None) == "multi_label_classification"
        model_dir = None if isinstance(spec.weights, RandomSource) else hf_location(spec.weights, spec.name)
        self.pooling, self.normalize, sbert_max = read_pooling(model_dir)
        positions = getattr(cfg, "max_position_embeddings", None) or 512
        self.max_input_tokens = spec.max_input_tokens or min(sbert_max or positions, positions)
        self.dimensions = int(cfg.hidden_size)
        self.loaded = True

    def validate(self, request: ModelRequest) -> None:
        if request.params.get("task", "embeddings") == "text-classification":
            check_top_k(request.params.get("top_k", 1), len(self.labels), "label count")

    def preprocess(self, requests: list[ModelRequest]) -> dict[str, torch.Tensor]:
        """Collate requests into ``input_ids``/``attention_mask`` int64 (N_total, L_max) on device."""
        ids, mask = collate_right([r.inputs for r in requests])
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Returns ``embeddings`` float32 (N, D) and, for classifiers, ``logits`` float32 (N, num_labels),
        from torch or, with ``runtime: onnxruntime``, from the exported model."""
        if self.ort is not None:
            outs = self.ort({k: v.cpu().numpy() for k, v in batch.items()})
            return {"embeddings": torch.from_numpy(outs[0]),
                    "logits": torch.from_numpy(outs[1]) if self.classifies else None}
        emb, logits = encode(self.model, batch["input_ids"], batch["attention_mask"], pooling=self.pooling,
                             normalize=self.normalize, classifies=self.classifies)
        return {"embeddings": emb, "logits": logits}

    def fidelity_probe(self):
        """:data:`maas.models.runtimes.PROBE_SENTENCES`, tokenised by the model's own tokenizer."""
        from maas.models.runtimes import PROBE_SENTENCES, Probe
        from maas.preprocess.text import load_text_tokenizer, pad_right

        tok = load_text_tokenizer(self.spec.tokenizer_source, self.spec.name)
        rows, _ = tok.encode(PROBE_SENTENCES, max_length=self.max_input_tokens, truncate=True)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids, mask = pad_right(rows, pad)
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
        batch = {k: torch.from_numpy(v).to(self.device) for k, v in feeds.items()}
        return Probe(batch=batch, feeds=feeds, calibration=None, items=len(rows))

    def replica_facts(self) -> dict:
        return {"classifies": self.classifies, "labels": getattr(self, "labels", None),
                "multi_label": getattr(self, "multi_label", False)}

    def onnx_export(self):
        from maas.models.runtimes import Export

        outputs = ["embeddings", "logits"] if self.classifies else ["embeddings"]
        axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                **{o: {0: "batch"} for o in outputs}}
        module = _ExportedEncoder(self.model, self.pooling, self.normalize, self.classifies).eval()
        return Export(module=module, inputs=["input_ids", "attention_mask"], outputs=outputs, dynamic_axes=axes,
                      recipe={"pooling": self.pooling, "normalize": self.normalize, "classifies": self.classifies})

    def measure_fidelity(self, reference: dict, variant: dict) -> dict[str, float]:
        """Embeddings' cosine; for classifiers also the logits' top-1 agreement."""
        from maas.models.runtimes import embedding_fidelity, logit_fidelity

        out = embedding_fidelity(reference["embeddings"].float().cpu().numpy(), variant["embeddings"].float().cpu().numpy())
        if self.classifies:
            top = logit_fidelity(reference["logits"].float().cpu().numpy(), variant["logits"].float().cpu().numpy())
            out["top1_agreement"] = top["top1_agreement"]
        return out

    def null_outputs(self, batch: dict[str, torch.Tensor]) -> tuple[dict, int]:
        """Benchmark null forward: ``embeddings`` float32 (N, D) all e₀ (unit vectors), ``logits``
        zeros (N, num_labels) for classifiers; N = rows of ``input_ids``."""
        n = int(batch["input_ids"].shape[0])
        emb = torch.zeros(n, self.dimensions)
        emb[:, 0] = 1.0
        logits = torch.zeros(n, len(self.labels)) if self.classifies else None
        return {"embeddings": emb, "logits": logits}, n

    def postprocess(self, outputs: dict, requests: list[ModelRequest]) -> list[dict]:
        """Per request: ``{"embeddings": float32 ndarray (n, D), "num_tokens": [...]}`` or
        ``{"results": [{"top_k": [{"index", "label", "score"}]}], "num_tokens": [...]}``."""
        logits = outputs["logits"]
        return encoder_results(outputs["embeddings"].float().cpu().numpy(),
                               None if logits is None else logits.float().cpu().numpy(), requests,
                               getattr(self, "labels", None), getattr(self, "multi_label", False))

    # ------------------------------------------------------------------ explanations (maas.models.explain)

    def explain_map(self, payload: list[dict], params: dict) -> dict:
        """Integrated-gradients token attributions through the word embeddings.

        One text: why a text classifier gives ``params["target"]`` (label or index; default its
        top label). Two texts: which tokens of each make their embeddings similar (the cosine of
        the two vectors, one side held fixed while the other is attributed).

        Raises:
            InvalidRequest: one text for a model without a classification head, two for a model
                without embeddings, or an unknown target.
        """
        from maas.models import explain

        rows = [torch.tensor([t["ids"]], dtype=torch.long, device=self.device) for t in payload]
        pad = getattr(self.model.config, "pad_token_id", None) or 0
        bases = [torch.where(torch.tensor([t["special"]], device=self.device), row, torch.full_like(row, pad))
                 for t, row in zip(payload, rows)]
        layer = self.model.get_input_embeddings()
        ones = [torch.ones_like(r) for r in rows]
        if len(payload) == 1:
            if not self.classifies:
                raise InvalidRequest(f"model {self.spec.name!r} has no classification head; send two texts to explain "
                                     "their similarity", param="input")
            with torch.no_grad():
                logits = self.model(input_ids=rows[0], attention_mask=ones[0]).logits.float()[0]
            target = self._label_index(params.get("target"), logits)

            def score(ids, mask=None):
                mask = torch.ones_like(ids) if mask is None else mask
                return torch.softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)[:, target]

            attr = [explain.integrated_gradients(score, layer, rows[0], bases[0])]
            return {"kind": "classification", "rows": rows, "attr": attr, "score": score, "target": target,
                    "payload": payload, "value": float(torch.softmax(logits, -1)[target])}
        if "embeddings" not in self.spec.tasks:
            raise InvalidRequest(f"model {self.spec.name!r} offers no embeddings; send one text to explain its "
                                 "classification", param="input")

        def embed(ids, mask=None):
            mask = torch.ones_like(ids) if mask is None else mask
            return self.forward({"input_ids": ids, "attention_mask": mask})["embeddings"]

        with torch.no_grad():
            fixed = [embed(r).detach() for r in rows]
        attr = []
        for side in (0, 1):
            other = fixed[1 - side]

            def cosine(ids, mask=None, other=other):
                return torch.nn.functional.cosine_similarity(embed(ids, mask), other.expand(ids.shape[0], -1), dim=-1)

            attr.append(explain.integrated_gradients(cosine, layer, rows[side], bases[side]))
        value = float(torch.nn.functional.cosine_similarity(fixed[0], fixed[1], dim=-1)[0])

        def score_side(side):
            other = fixed[1 - side]
            return lambda ids, mask=None: torch.nn.functional.cosine_similarity(
                embed(ids, mask), other.expand(ids.shape[0], -1), dim=-1)

        return {"kind": "similarity", "rows": rows, "attr": attr, "score": [score_side(0), score_side(1)],
                "payload": payload, "value": value}

    def _label_index(self, target, logits) -> int:
        if target is None:
            return int(logits.argmax())
        if isinstance(target, int) and not isinstance(target, bool) and 0 <= target < len(self.labels):
            return target
        if isinstance(target, str):
            lowered = {lab.lower(): i for i, lab in enumerate(self.labels)}
            if target.strip().lower() in lowered:
                return lowered[target.strip().lower()]
        raise InvalidRequest(f"target {target!r} is not a label of model {self.spec.name!r}; its labels are "
                             f"{self.labels}", param="target")

    def explain_score(self, state: dict, params: dict) -> dict:
        """Faithfulness per text (its top 20 % of non-special tokens removed from attention, against
        random 20 %) and the answer: ``{"kind", "texts": [{"tokens": [...], "faithfulness"}], ...}``."""
        from maas.models import explain

        seed = int(params.get("seed", 0))
        texts = []
        for side, (row, attr, tok) in enumerate(zip(state["rows"], state["attr"], state["payload"])):
            score = state["score"] if state["kind"] == "classification" else state["score"][side]
            special = np.asarray(tok["special"], dtype=bool)
            real = ~special
            k = max(1, int(round(explain.MASK_FRACTION * real.sum())))
            top = np.zeros(len(attr), dtype=bool)
            top[np.argsort(-np.where(real, attr, -np.inf), kind="stable")[:k]] = True
            masks = [top] + \
                [m[0] for m in explain.random_masks((1, len(attr)), seed + side, allowed=real[None, :])]
            with torch.no_grad():
                keep = torch.from_numpy(~np.stack(masks)).to(self.device).long()
                values = score(torch.cat([row, row.expand(len(masks), -1)]),
                               torch.cat([torch.ones_like(row), keep])).float().cpu().numpy()
            faith = explain.faithfulness(float(values[0]), float(values[1]), [float(v) for v in values[2:]])
            peak = float(np.abs(attr).max()) or 1.0
            tokens = [{"token": t, "start": int(o[0]), "end": int(o[1]), "attribution": round(float(a) / peak, 6),
                       "special": bool(sp)} for t, o, a, sp in zip(tok["tokens"], tok["offsets"], attr, special)]
            texts.append({"tokens": tokens, "faithfulness": faith})
        out = {"kind": state["kind"], "texts": texts, "method": "integrated-gradients",
               "steps": explain.IG_STEPS}
        if state["kind"] == "classification":
            t = state["target"]
            out["target"] = {"index": t, "label": self.labels[t], "score": state["value"]}
        else:
            out["similarity"] = state["value"]
        return out

    def probe(self) -> ModelRequest:
        return ModelRequest(probe_tokens(), {"task": "embeddings"})

    def info(self) -> dict:
        out = {
            "device": str(self.device),
            "max_input_tokens": self.max_input_tokens,
            "dimensions": self.dimensions,
            "pooling": self.pooling,
            "normalized": self.normalize,
        }
        if self.classifies:
            out["labels"] = self.labels
        return out


@serve.deployment(ray_actor_options={"num_cpus": 1})
class TextEncoder(ModelDeployment):
    """Serve deployment of one BERT-style encoder (see :class:`TextEncoderRunner`)."""

    runner_cls = TextEncoderRunner
