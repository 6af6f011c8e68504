"""GPT-style generators (``AutoModelForCausalLM``): completion.

Per-request params (validated before batching, see :class:`SamplingParams`): ``max_tokens``,
``temperature`` (0 = greedy), ``top_p``, ``seed``, ``stop``. Requests in one
``@serve.batch`` batch that share the same sampling settings are generated together
(left-padded); different settings run one group after another.

Stop strings are applied to the decoded text after generation (the text is cut before
the first stop string and ``finish_reason`` is ``stop``); tokens generated past a stop
string are computed and discarded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from ray import serve

from maas.errors import InvalidRequest
from maas.models.base import ModelDeployment, ModelRequest, ModelRunner
from maas.models.hf import collate_left, load_hf_model
from maas.preprocess.text import load_tokenizer

logger = logging.getLogger("maas.models.text_generator")

DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request.

    Attributes:
        max_tokens: New tokens to generate at most (≥ 1).
        temperature: 0 = greedy (argmax); > 0 samples from softmax(logits / temperature).
        top_p: Nucleus sampling mass, in (0, 1].
        seed: Seeds torch's RNG for this request's group, making sampling repeatable.
        stop: Strings that end the text (cut before the first occurrence), at most 4.
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @classmethod
    def from_params(cls, params: dict) -> "SamplingParams":
        """Validate raw params. Raises InvalidRequest naming the field."""
        max_tokens = params.get("max_tokens", DEFAULT_MAX_TOKENS)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be an integer ≥ 1, got {max_tokens!r}", param="max_tokens")
        temperature = params.get("temperature", 1.0)
        if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise InvalidRequest(f"temperature must be between 0 and 2, got {temperature!r}", param="temperature")
        top_p = params.get("top_p", 1.0)
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {top_p!r}", param="top_p")
        seed = params.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise InvalidRequest(f"seed must be an integer, got {seed!r}", param="seed")
        stop = params.get("stop") or ()
        if isinstance(stop, str):
            stop = (stop,)
        stop = tuple(stop)
        if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequest("stop must be a non-empty string or a list of at most 4 of them", param="stop")
        return cls(max_tokens, float(temperature), float(top_p), seed, stop)


def apply_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """Cut ``text`` before the earliest stop string. Returns ``(text, stopped)``."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class GenerationMixin:
    """Grouped ``generate`` + decoding, shared by decoder-only and encoder–decoder runners."""

    def _setup_generation(self) -> None:
        tok = self.tokenizer
        gen_cfg = self.model.generation_config
        eos = gen_cfg.eos_token_id if gen_cfg.eos_token_id is not None else tok.eos_token_id
        if eos is None:
            eos = tok.sep_token_id
        self.eos_token_id = eos
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else (eos if isinstance(eos, int) else 0)

    def run(self, requests: list[ModelRequest]) -> list[dict]:
        """Group requests by sampling settings, generate each group, return per-request choices."""
        with torch.inference_mode():
            groups: dict[SamplingParams, list[int]] = {}
            for i, r in enumerate(requests):
                groups.setdefault(SamplingParams.from_params(r.params), []).append(i)
            results: list[dict | None] = [None] * len(requests)
            for sp, idxs in groups.items():
                group = [requests[i] for i in idxs]
                batch = self.preprocess(group)
                new_tokens = self.forward_sampling(batch, sp)
                for i, res in zip(idxs, self.decode(new_tokens, group, sp)):
                    results[i] = res
            return results  # type: ignore[return-value]

    def forward(self, batch):  # pragma: no cover - generation goes through forward_sampling
        return self.forward_sampling(batch, SamplingParams())

    def postprocess(self, outputs, requests):  # pragma: no cover
        return self.decode(outputs, requests, SamplingParams())

    def forward_sampling(self, batch: dict[str, torch.Tensor], sp: SamplingParams) -> torch.Tensor:
        """``model.generate`` for one group.

        Returns:
            New token ids, int64 (N, ≤ max_tokens), padded with ``pad_token_id`` after EOS.
        """
        if sp.seed is not None:
            torch.manual_seed(sp.seed)
        kwargs = dict(
            max_new_tokens=sp.max_tokens,
            do_sample=sp.temperature > 0,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
        )
        if sp.temperature > 0:
            kwargs.update(temperature=sp.temperature, top_p=sp.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        out = self.model.generate(**batch, **kwargs)
        return out[:, batch["input_ids"].shape[1] :] if self.decoder_only else out[:, 1:]

    def decode(self, new_tokens: torch.Tensor, requests: list[ModelRequest], sp: SamplingParams) -> list[dict]:
        """Per request: ``{"choices": [{"text", "finish_reason", "completion_tokens"}], "prompt_tokens": [...]}``."""
        eos = {self.eos_token_id} if isinstance(self.eos_token_id, int) else set(self.eos_token_id)
        rows = new_tokens.cpu().tolist()
        out, start = [], 0
        for r in requests:
            choices = []
            for row in rows[start : start + len(r.inputs)]:
                end = next((j for j, t in enumerate(row) if t in eos), None)
                tokens = row if end is None else row[:end]
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                text, stopped = apply_stop(text, sp.stop)
                reason = "stop" if (end is not None or stopped) else "length"
                choices.append({"text": text, "finish_reason": reason, "completion_tokens": len(tokens) + (end is not None)})
            out.append({"choices": choices, "prompt_tokens": r.inputs.lengths})
            start += len(r.inputs)
        return out


class TextGeneratorRunner(GenerationMixin, ModelRunner):
    """Lifecycle of a decoder-only generator. Prompts are never truncated (see validate)."""

    decoder_only = True

    def load(self) -> None:
        from transformers import AutoModelForCausalLM

        self.model = load_hf_model(self.spec, AutoModelForCausalLM).eval().to(self.device)
        self.tokenizer = load_tokenizer(self.spec.tokenizer_source, self.spec.name)
        cfg = self.model.config
        positions = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 1024
        self.context_tokens = int(self.spec.max_input_tokens or positions)
        self._setup_generation()
        self.loaded = True

    def validate(self, request: ModelRequest) -> None:
        """Reject empty prompts and prompt + max_tokens beyond the context window (HTTP 400)."""
        sp = SamplingParams.from_params(request.params)
        for i, n in enumerate(request.inputs.num_tokens):
            if n == 0:
                raise InvalidRequest(f"prompt[{i}] is empty; send at least one token of text", param="prompt")
            if n + sp.max_tokens > self.context_tokens:
                raise InvalidRequest(
                    f"prompt[{i}] has {n} tokens and max_tokens asks for {sp.max_tokens} more, but model "
                    f"{self.spec.name!r} has a context of {self.context_tokens} tokens; shorten the prompt "
                    f"or lower max_tokens to at most {max(self.context_tokens - n, 0)}",
                    param="max_tokens" if n < self.context_tokens else "prompt",
                    code="context_length_exceeded",
                )

    def preprocess(self, requests: list[ModelRequest]) -> dict[str, torch.Tensor]:
        """Left-padded ``input_ids``/``attention_mask`` int64 (N_total, L_max) on device."""
        rows = [b.input_ids[i, :n] for b in (r.inputs for r in requests) for i, n in enumerate(b.lengths)]
        ids, mask = collate_left(rows, self.pad_token_id)
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def info(self) -> dict:
        return {"device": str(self.device), "context_tokens": self.context_tokens}


@serve.deployment(ray_actor_options={"num_cpus": 1})
class TextGenerator(ModelDeployment):
    """Serve deployment of one GPT-style generator (see :class:`TextGeneratorRunner`)."""

    runner_cls = TextGeneratorRunner
