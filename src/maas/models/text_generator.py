"""GPT-style generators (``AutoModelForCausalLM``): completion and chat, batched or streamed.

Per-request params (validated before a request joins, see :class:`SamplingParams`):
``max_tokens`` (None = up to the context window), ``temperature`` (0 = greedy), ``top_p``,
``seed``, ``stop``, ``n``.

Serving (:class:`TextGenerator`): every request, streamed or not, joins the replica's
continuous batch (:mod:`maas.batching.continuous`): its rows enter and leave the running batch at
any decoding step, each with its own settings. A stream yields coalesced text deltas (each event
carries everything produced since the previous one); when its caller goes away, its rows leave
the batch at the next step.

:class:`GenerationMixin.run` is the plain path: requests with equal settings in one left-padded
``model.generate`` call. The encoder–decoder runner (:mod:`maas.models.seq2seq`) serves with
it, and the tests use it as the reference the continuous batch must equal.

Stop strings end the text before their first occurrence (``finish_reason`` ``stop``), matched
on the decoded text; while streaming, text that could be the start of a stop string is held
back until it is decided (:class:`~maas.models.sampling.StreamState`; the per-request settings
and the stream's text state live in :mod:`maas.models.sampling`).

Over 400 lines on purpose: the runner (load, plain ``generate`` path, stop handling) and the
replica around the continuous batch share the tokenizer and cache details that make them agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any, AsyncIterator

import torch
from ray import serve

from maas import metrics
from maas.config import BatchingSpec
from maas.errors import InvalidRequest
from maas.models.base import ModelDeployment, ModelRequest, ModelRunner
from maas.models.hf import collate_left, load_hf_model, probe_tokens
from maas.models.sampling import DEFAULT_MAX_TOKENS, SamplingParams, apply_stop
from maas.preprocess.text import load_tokenizer

logger = logging.getLogger("ray.serve.maas.models.text_generator")

class GenerationMixin:
    """Grouped ``generate`` + decoding, shared by decoder-only and encoder–decoder runners."""

    decoder_only: bool
    context_tokens: int | None = None

    def _setup_generation(self) -> None:
        tok = self.tokenizer
        gen_cfg = self.model.generation_config
        eos = gen_cfg.eos_token_id if gen_cfg.eos_token_id is not None else tok.eos_token_id
        if eos is None:
            eos = tok.sep_token_id
        self.eos_token_id = eos
        self.eos_set = {eos} if isinstance(eos, int) else set(eos or ())
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else (eos if isinstance(eos, int) else 0)
        # Sampling draws from torch's global RNG; one sampling generation at a time keeps a
        # seeded request repeatable while batches and streams run in other threads.
        self.rng_lock = threading.Lock()
        self.cancelled_generations = 0  # batches stopped early because every caller left

    def _sampling_guard(self, sp: SamplingParams):
        return self.rng_lock if sp.temperature > 0 else contextlib.nullcontext()

    def max_new_tokens(self, requests: list[ModelRequest], sp: SamplingParams) -> int:
        """``max_tokens``, or for None the room left in the context by the longest prompt."""
        if sp.max_tokens is not None:
            return sp.max_tokens
        longest = max(max(r.inputs.lengths) for r in requests)
        return max(1, (self.context_tokens or 512) - (longest if self.decoder_only else 0))

    def run(self, requests: list[ModelRequest]) -> list[dict]:
        """Group requests by sampling settings, generate each group, return per-request choices."""
        with torch.inference_mode():
            # Requests with equal settings share a generate call; a seeded sampling request runs
            # alone, so its draws don't depend on what else was in the batch.
            groups: dict[tuple, list[int]] = {}
            for i, r in enumerate(requests):
                sp = SamplingParams.from_params(r.params)
                alone = i if (sp.seed is not None and sp.temperature > 0) else None
                groups.setdefault((sp, alone), []).append(i)
            results: list[dict | None] = [None] * len(requests)
            timings = {"forward": 0.0, "postprocess": 0.0}
            for (sp, _), idxs in groups.items():
                group = [requests[i] for i in idxs]
                t0 = time.perf_counter()
                batch = self.expand(self.preprocess(group), sp.n)
                new_tokens, stopped_at = self.forward_sampling(batch, sp, self.max_new_tokens(group, sp), group)
                t1 = time.perf_counter()
                for i, res in zip(idxs, self.decode(new_tokens, group, sp, stopped_at)):
                    results[i] = res
                timings["forward"] += 1000 * (t1 - t0)
                timings["postprocess"] += 1000 * (time.perf_counter() - t1)
            self.last_timings_ms = timings
            return results  # type: ignore[return-value]

    @staticmethod
    def expand(batch: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
        """Repeat each row ``n`` times (prompt-major), for ``n`` choices per prompt."""
        return batch if n == 1 else {k: v.repeat_interleave(n, dim=0) for k, v in batch.items()}

    def forward(self, batch):  # pragma: no cover - generation goes through forward_sampling
        return self.forward_sampling(batch, SamplingParams(), DEFAULT_MAX_TOKENS)[0]

    def postprocess(self, outputs, requests):  # pragma: no cover
        return self.decode(outputs, requests, SamplingParams())

    def _generate_kwargs(self, sp: SamplingParams, max_new: int) -> dict:
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new, do_sample=sp.temperature > 0,
            pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id,
        )
        if sp.temperature > 0:
            kwargs.update(temperature=sp.temperature, top_p=sp.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def forward_sampling(
        self, batch: dict[str, torch.Tensor], sp: SamplingParams, max_new: int, requests: list[ModelRequest] = ()
    ) -> tuple[torch.Tensor, dict[int, int]]:
        """``model.generate`` for one group.

        Rows end at EOS, or as soon as their decoded text holds a stop string (checked on the
        text, so any stop string works, whatever the tokenisation); generation ends early once
        every request of the group is cancelled.

        Returns:
            ``(new_tokens, stopped_at)``: new token ids, int64 (N, ≤ max_new), padded with
            ``pad_token_id`` after a row ends; and, for rows ended by a stop string, the number of
            new tokens up to and including the one that completed it.
        """
        from transformers import StoppingCriteria, StoppingCriteriaList

        if max_new == 0:  # max_tokens 0: nothing to generate (OpenAI answers an empty text too)
            return torch.zeros((batch["input_ids"].shape[0], 0), dtype=torch.int64), {}
        runner = self
        prompt_width = batch["input_ids"].shape[1] if self.decoder_only else 1
        stopped_at: dict[int, int] = {}

        class StopCriteria(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                done = [False] * input_ids.shape[0]
                if sp.stop:
                    new = input_ids[:, prompt_width:].tolist()
                    for row, tokens in enumerate(new):
                        if row in stopped_at:
                            done[row] = True
                        elif not any(t in runner.eos_set for t in tokens):
                            text = runner.tokenizer.decode(tokens, skip_special_tokens=True)
                            if apply_stop(text, sp.stop)[1]:
                                stopped_at[row] = len(tokens)
                                done[row] = True
                if requests and all(r.abandoned for r in requests):
                    runner.cancelled_generations += 1
                    done = [True] * len(done)
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        with self._sampling_guard(sp):
            if sp.seed is not None:
                torch.manual_seed(sp.seed)
            out = self.model.generate(**batch, **self._generate_kwargs(sp, max_new),
                                      stopping_criteria=StoppingCriteriaList([StopCriteria()]))
        return out[:, prompt_width:], stopped_at

    def decode(self, new_tokens: torch.Tensor, requests: list[ModelRequest], sp: SamplingParams,
               stopped_at: dict[int, int] | None = None) -> list[dict]:
        """Per request: ``{"choices": [{"text", "finish_reason", "completion_tokens"}], "prompt_tokens": [...]}``.

        Choices are prompt-major: prompt ``i``'s ``j``-th sample is choice ``i * n + j``.
        ``completion_tokens`` counts tokens up to and including EOS or the token that completed a
        stop string (as the streamed path does).
        """
        stopped_at = stopped_at or {}
        rows = new_tokens.cpu().tolist()
        out, start = [], 0
        for r in requests:
            count = len(r.inputs) * sp.n
            choices = []
            for i, row in enumerate(rows[start : start + count], start=start):
                if i in stopped_at:
                    tokens, used, reason = row[: stopped_at[i]], stopped_at[i], "stop"
                    text, _ = apply_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), sp.stop)
                else:
                    end = next((j for j, t in enumerate(row) if t in self.eos_set), None)
                    tokens = row if end is None else row[:end]
                    text, stopped = apply_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), sp.stop)
                    used = self._tokens_until_stop(tokens, sp.stop) if stopped else len(tokens) + (end is not None)
                    reason = "stop" if (end is not None or stopped) else "length"
                choices.append({"text": text, "finish_reason": reason, "completion_tokens": used})
            out.append({"choices": choices, "prompt_tokens": r.inputs.lengths})
            start += count
        return out

    def _tokens_until_stop(self, tokens: list[int], stop: tuple[str, ...]) -> int:
        """Tokens generated up to and including the one that completed a stop string."""
        for k in range(1, len(tokens) + 1):
            if apply_stop(self.tokenizer.decode(tokens[:k], skip_special_tokens=True), stop)[1]:
                return k
        return len(tokens)


class TextGeneratorRunner(GenerationMixin, ModelRunner):
    """Lifecycle of a decoder-only generator. Prompts are never truncated (see validate)."""

    decoder_only = True

    def load(self) -> None:
        from transformers import AutoModelForCausalLM

        self.model = self.place(load_hf_model(self.spec, AutoModelForCausalLM))
        self.tokenizer = load_tokenizer(self.spec.tokenizer_source, self.spec.name)
        cfg = self.model.config
        positions = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 1024
        self.context_tokens = int(self.spec.max_input_tokens or positions)
        self._setup_generation()
        self.loaded = True

    def validate(self, request: ModelRequest) -> None:
        """Reject empty prompts and prompt + max_tokens beyond the context window (HTTP 400).

        Context-window errors (code ``context_length_exceeded``) open with OpenAI's own sentences
        ("This model's maximum context length is N tokens. However, ..."), which clients such as
        LiteLLM and LangChain match to tell a context-window error from other 400s.

        Raises:
            InvalidRequest: an empty prompt; a prompt that fills the context; prompt + max_tokens
                (1 when unset) beyond it.
        """
        sp = SamplingParams.from_params(request.params)
        context = self.context_tokens
        for i, n in enumerate(request.inputs.num_tokens):
            if n == 0:
                raise InvalidRequest(f"prompt[{i}] is empty; send at least one token of text", param="prompt")
            wanted = sp.max_tokens if sp.max_tokens is not None else 1
            if n >= context:
                raise InvalidRequest(
                    f"This model's maximum context length is {context} tokens. However, your messages resulted "
                    f"in {n} tokens. Please reduce the length of the messages. (prompt[{i}] of model "
                    f"{self.spec.key!r} must leave room for at least one generated token.)",
                    param="prompt", code="context_length_exceeded",
                )
            if n + wanted > context:
                raise InvalidRequest(
                    f"This model's maximum context length is {context} tokens. However, you requested "
                    f"{n + wanted} tokens ({n} in the messages, {wanted} in the completion). Please reduce the "
                    f"length of the messages or completion. (prompt[{i}] of model {self.spec.key!r}: max_tokens "
                    f"can be at most {context - n}.)",
                    param="max_tokens", code="context_length_exceeded",
                )

    def preprocess(self, requests: list[ModelRequest]) -> dict[str, torch.Tensor]:
        """Left-padded ``input_ids``/``attention_mask`` int64 (N_total, L_max) on device."""
        rows = [b.input_ids[i, :n] for b in (r.inputs for r in requests) for i, n in enumerate(b.lengths)]
        ids, mask = collate_left(rows, self.pad_token_id)
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def probe(self) -> ModelRequest:
        return ModelRequest(probe_tokens(self.pad_token_id), {"max_tokens": 1, "temperature": 0})

    # ------------------------------------------------------------------ bf16 variant (maas.models.runtimes)

    #: New tokens of each probe prompt's greedy continuation in the fidelity guard.
    GUARD_TOKENS = 32

    def fidelity_probe(self, prompts: list[str] | None = None):
        """:data:`maas.models.runtimes.PROBE_SENTENCES` (or ``prompts``) as completion prompts,
        left-padded in one batch."""
        from maas.models.runtimes import PROBE_SENTENCES, Probe

        rows = [torch.tensor(self.tokenizer(s)["input_ids"], dtype=torch.int64) for s in prompts or PROBE_SENTENCES]
        ids, mask = collate_left(rows, self.pad_token_id)
        batch = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        return Probe(batch=batch, feeds={}, calibration=None, items=len(rows))

    def bf16_model(self, model: torch.nn.Module) -> tuple[torch.nn.Module, None]:
        """bf16 linear layers around an fp32 residual stream, the head rescored in fp32
        (:func:`maas.models.runtimes.bf16_generator`); inputs stay int64 token ids."""
        from maas.models.runtimes import bf16_generator

        return bf16_generator(model), None

    def fidelity_outputs(self, probe) -> list[list[int]]:
        """Greedy continuations of the probe prompts, :attr:`GUARD_TOKENS` new tokens each (token
        ids up to the first end-of-sequence)."""
        new, _ = self.forward_sampling(probe.batch, SamplingParams(temperature=0.0), self.GUARD_TOKENS)
        out = []
        for row in new.tolist():
            end = next((i for i, t in enumerate(row) if t in self.eos_set), len(row))
            out.append(row[:end])
        return out

    def measure_fidelity(self, reference: list[list[int]], variant: list[list[int]]) -> dict[str, float]:
        """Share of prompts with the same greedy text (see :func:`maas.models.runtimes.greedy_fidelity`)."""
        from maas.models.runtimes import greedy_fidelity

        return greedy_fidelity(reference, variant)

    def info(self) -> dict:
        return {"device": str(self.device), "context_tokens": self.context_tokens}



@serve.deployment(ray_actor_options={"num_cpus": 1})
class TextGenerator(ModelDeployment):
    """Serve deployment of one GPT-style generator, continuously batched.

    Every request, streamed or not, goes into the replica's
    :class:`~maas.batching.continuous.ContinuousBatcher`: sequences join and leave the running
    batch at each decoding step. ``batching.max_batch_size`` is the most sequences running at
    once; ``batching.kv_cache_tokens``, ``prefill_tokens_per_step`` and
    ``max_waiting_sequences`` bound the KV cache and the wait (see that module).

    Handle methods: ``__call__(pre, params, deadlines_s)`` (whole answers, one per job),
    ``stream(pre, params, deadline_s)`` (events, ``handle.options(stream=True)``), ``info``,
    ``stats``.
    """

    runner_cls = TextGeneratorRunner

    def __init__(self, spec: dict):
        super().__init__(spec)
        from maas.batching.continuous import ContinuousBatcher

        self.engine = ContinuousBatcher(self.runner, self.spec.key, **self._engine_settings(self.batching),
                                        on_step=self._on_step, on_token_times=self._on_token_times)
        self.active_streams = 0
        self.stream_log: list[dict] = []
        self._gauges_at = 0.0

    @staticmethod
    def _engine_settings(b: BatchingSpec) -> dict:
        from maas.batching.continuous import DEFAULT_KV_CACHE_TOKENS, DEFAULT_PREFILL_TOKENS_PER_STEP

        return {"max_batch_size": b.max_batch_size, "kv_cache_tokens": b.kv_cache_tokens or DEFAULT_KV_CACHE_TOKENS,
                "prefill_tokens_per_step": b.prefill_tokens_per_step or DEFAULT_PREFILL_TOKENS_PER_STEP,
                "max_waiting_sequences": b.max_waiting_sequences or max(64, 4 * b.max_batch_size)}

    def reconfigure(self, user_config: dict) -> None:
        super().reconfigure(user_config)
        self.engine.configure(**self._engine_settings(self.batching))

    # ------------------------------------------------------------------ metrics hooks (engine thread)

    def _on_step(self, kind: str, rows: int, seconds: float) -> None:
        metrics.stage(self.spec.key, kind, 1000 * seconds)
        if kind == "decode":
            metrics.batch(self.spec.key, rows)
        now = time.monotonic()
        if now - self._gauges_at > 0.5:
            self._gauges_at = now
            counts = self.engine.counts()
            metrics.sequences(self.spec.key, counts["running"], counts["waiting"])

    def _on_token_times(self, ttft_s: float | None, itl_s: list[float]) -> None:
        metrics.token_times(self.spec.key, ttft_s, itl_s)

    # ------------------------------------------------------------------ calls

    def _submit(self, request: ModelRequest, on_event=None) -> asyncio.Future:
        """Queue ``request``; the future gets its result, a MaasError, or None (caller left)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def done(value) -> None:
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(value))

        self.engine.submit(request, SamplingParams.from_params(request.params), done, on_event)
        return future

    async def __call__(self, pre: Any, params: list[dict] | dict | None = None,
                       deadlines_s: list[float | None] | None = None, backlog_items: float | None = None
                       ) -> list[Any]:
        """Generate every job of the call (see :meth:`ModelDeployment.__call__`); each job's
        sequences join the running batch on their own."""
        from maas.errors import MaasError

        if backlog_items is not None:
            self._backlog = (float(backlog_items), time.monotonic())
        results, requests, pending = self.jobs(pre, params, deadlines_s)
        futures: list[tuple[int, asyncio.Future]] = []
        for pos, request in zip(pending, requests):
            try:
                futures.append((pos, self._submit(request)))
            except MaasError as exc:
                results[pos] = exc
        try:
            for pos, future in futures:
                results[pos] = await future
        except asyncio.CancelledError:
            for request in requests:
                request.cancelled = True  # the engine frees their rows at its next step
            raise
        self._last_batch_done = time.monotonic()
        return results

    async def stream(self, pre: Any, params: dict | None = None, deadline_s: float | None = None
                     ) -> AsyncIterator[dict]:
        """Stream one request's events. Call with
        ``handle.options(stream=True).stream.remote(pre, params, deadline_s)``; ``pre`` is the
        tokenizer's :class:`~maas.batching.jobs.Preprocessed` for one job (or its ``TokenizedBatch``).

        Yields ``{"choices": [{"index", "text", "finish_reason"}]}`` deltas (coalesced: each
        carries everything produced since the previous one), then
        ``{"done": True, "prompt_tokens", "completion_tokens", "cancelled", "steps"}``; or, for a
        request refused before it starts (4xx, 503), one ``{"error": MaasError}`` event — a
        value, not a raised exception, so the replica does not log a caller's mistake as an
        ERROR with a traceback (the dataplane raises it).
        Generation stops at ``deadline_s`` (wall clock, the stream ends as ``length``) or when
        the caller leaves (its row leaves the batch at the next step).

        Raises:
            MaasError: the generation failed after it started (5xx).
        """
        from maas.errors import MaasError

        results, requests, _ = self.jobs(pre, [params or {}], [deadline_s])
        if not requests:
            yield {"error": results[0]}
            return
        request = requests[0]
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        finished: dict | None = None

        def on_event(event: dict) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        try:
            future = self._submit(request, on_event)
        except MaasError as exc:
            yield {"error": exc}
            return
        future.add_done_callback(lambda f: queue.put_nowait(("end", f.result())))
        self.active_streams += 1
        try:
            while True:
                items = [await queue.get()]
                while not queue.empty():  # coalesce what arrived while the consumer was busy
                    items.append(queue.get_nowait())
                merged: dict[int, dict] = {}  # one entry per choice index, texts concatenated
                end = False
                for it in items:
                    if isinstance(it, tuple):
                        end = True
                        if isinstance(it[1], MaasError):
                            raise it[1]
                        continue
                    if it.get("done"):
                        finished = it
                        continue
                    for c in it["choices"]:
                        m = merged.setdefault(c["index"], {"index": c["index"], "text": "", "finish_reason": None})
                        m["text"] += c["text"]
                        m["finish_reason"] = c["finish_reason"] or m["finish_reason"]
                if merged:
                    yield {"choices": [merged[i] for i in sorted(merged)]}
                if finished is not None:
                    yield finished
                    break
                if end:
                    break
        finally:
            request.cancelled = request.cancelled or finished is None
            self.active_streams -= 1
            self.stream_log.append({"cancelled": finished is None,
                                    "completion_tokens": finished["completion_tokens"] if finished else None,
                                    "steps": finished["steps"] if finished else None})
            del self.stream_log[:-100]
            self._last_batch_done = time.monotonic()

    # ------------------------------------------------------------------ health and stats

    async def check_health(self) -> None:
        """Unhealthy when no weights are loaded, a generation step has run longer than
        ``health.stall_timeout_s``, or (idle for ``PROBE_AFTER_IDLE_S``) a one-token probe
        through the engine does not finish within ``health.probe_timeout_s``."""
        from maas.models.base import PROBE_AFTER_IDLE_S

        if not self.runner.loaded:
            raise RuntimeError(f"model {self.spec.name} has no loaded weights")
        health = self.spec.health
        started = self.engine.step_started
        if started is not None and time.monotonic() - started > health.stall_timeout_s:
            raise RuntimeError(f"model {self.spec.name}: a generation step has been running for "
                               f"{time.monotonic() - started:.0f} s")
        recent = [t for t in (self.engine.last_step_done, self._last_batch_done) if t is not None]
        if recent and time.monotonic() - max(recent) < PROBE_AFTER_IDLE_S:
            return
        try:
            out = await asyncio.wait_for(self._submit(self.runner.probe()), timeout=health.probe_timeout_s)
        except asyncio.TimeoutError:
            raise RuntimeError(f"model {self.spec.name}: probe generation took over {health.probe_timeout_s} s") from None
        if isinstance(out, BaseException):
            raise RuntimeError(f"model {self.spec.name}: probe generation failed: {out}")

    def stats(self) -> dict:
        """Replica records: batches (see :meth:`ModelDeployment.stats`), plus ``running`` and
        ``waiting`` sequences, ``max_running`` (most rows in one decode step so far),
        ``active_streams``, the last 100 ``streams`` (``cancelled``, ``completion_tokens``,
        ``steps``), ``cancelled_generations`` (requests whose rows left early: caller gone or
        deadline), ``abandoned`` (the last 100 of those: tokens ``generated`` of ``asked``) and
        ``rejected`` (503s for a full wait queue)."""
        out = ModelDeployment.stats(self)
        counts = self.engine.counts()
        out.update(running=counts["running"], waiting=counts["waiting"], max_running=self.engine.max_rows_seen,
                   steps=self.engine.steps, active_streams=self.active_streams, streams=list(self.stream_log),
                   cancelled_generations=self.engine.cancelled_jobs, abandoned=list(self.engine.abandoned),
                   rejected=self.engine.rejected)
        return out

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Running and waiting sequences (see :meth:`ModelDeployment.record_autoscaling_stats`)."""
        out = super().record_autoscaling_stats()
        counts = self.engine.counts()
        out.update(running_items=float(counts["running"]), queued_items=float(counts["waiting"]))
        return out

