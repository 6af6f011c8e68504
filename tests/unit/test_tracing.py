"""Tracing (maas.tracing): W3C trace context against the OpenTelemetry propagator, the OTLP encoding against
opentelemetry-proto and the SDK's encoder, both exporters against a receiver, sampling, and the span trees of
requests through the HTTP app over the core with fake deployments (no Ray), collected by the SDK's
InMemorySpanExporter. The Ray suite (tests/integration/test_tracing.py) checks the real graph's export."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from maas import tracing
from maas.config import TracingSpec
from maas.dataplane import set_current
from maas.dataplane.types import ClassifyImagesRequest
from maas.ingress import app, route_paths
from tests.otlp_receiver import Receiver
from tests.unit.test_core import FakeModel, embed_answer, gen_spec, plane, spec, top_answer

SECRET = "the-secret-payload-7f3a"  # a request text that must appear in no span


def replica_times(job_items: int = 1, generator: bool = False) -> dict:
    """What a replica's answer carries for a traced job (see maas.batching.pull / continuous)."""
    now = time.time_ns()
    out = {"arrived": now - 3_000_000, "start": now - 2_000_000, "end": now - 500_000, "items": job_items,
           "requests": 1, "replica": "enc#abc", "pre": (now - 5_000_000, now - 4_000_000, 1)}
    if generator:
        out.update(first_token=now - 1_500_000, steps=3)
        del out["items"], out["requests"]
    return out


def traced(answer):
    """A fake model answer that carries replica times for traced jobs, as real replicas do."""
    def wrapped(job, params):
        out = answer(job, params)
        if params.get("trace"):
            out = {**out, "trace": replica_times()}
        return out
    return wrapped


@pytest.fixture()
def memory():
    mem = InMemorySpanExporter()
    t = tracing.Tracer(tracing.SdkExporter(mem), 1.0, {"service.name": "maas-test"}, delay_s=0.05)
    tracing.use(t)
    tracing.TracingMiddleware.known_routes = route_paths()
    try:
        yield t, mem
    finally:
        tracing.use(None)
        t.close()


def spans_of(t, mem):
    assert t.flush(10.0)
    return list(mem.get_finished_spans())


def tree(spans):
    """``{span_id: span}`` and ``{parent span_id: [children]}``."""
    by_id = {s.context.span_id: s for s in spans}
    kids: dict[int, list] = {}
    for s in spans:
        kids.setdefault(s.parent.span_id if s.parent else 0, []).append(s)
    return by_id, kids


def names(spans) -> list[str]:
    return sorted(s.name for s in spans)


def no_secret(spans) -> None:
    for s in spans:
        blob = json.dumps([s.name, dict(s.attributes or {}), [dict(e.attributes or {}) for e in s.events],
                           s.status.description], default=str)
        assert SECRET not in blob, s.name


def covered(parent, children, slack_ns: int = 1_000_000) -> None:
    """``children`` (non-overlapping, in time order) account for ``parent``'s duration within ``slack_ns``."""
    total = sum(c.end_time - c.start_time for c in children)
    assert parent.end_time - parent.start_time - total <= slack_ns, (parent.name, [c.name for c in children])
    for c in children:
        assert parent.start_time <= c.start_time and c.end_time <= parent.end_time, c.name


# ---------------------------------------------------------------------------- W3C trace context


def test_traceparent_agrees_with_the_opentelemetry_propagator():
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    prop = TraceContextTextMapPropagator()
    ctx = trace.set_span_in_context(NonRecordingSpan(SpanContext(
        0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True, trace_flags=TraceFlags(1))))
    carrier: dict = {}
    prop.inject(carrier, context=ctx)
    remote = tracing.parse_traceparent(carrier["traceparent"], "vendor=a")
    assert (remote.trace_id, remote.span_id, remote.sampled, remote.trace_state) == (
        0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True, "vendor=a")
    back = trace.get_current_span(prop.extract({"traceparent": tracing.format_traceparent(5, 7, False)}))
    assert (back.get_span_context().trace_id, back.get_span_context().span_id) == (5, 7)
    assert not back.get_span_context().trace_flags.sampled
    bad = ["", "junk", "00-" + "0" * 32 + "-b7ad6b7169203331-01", "00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16
           + "-01", "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
           "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
           "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra"]
    for header in bad:
        assert tracing.parse_traceparent(header) is None, header
        assert not trace.get_current_span(prop.extract({"traceparent": header})).get_span_context().is_valid, header
    future = tracing.parse_traceparent("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-later")
    assert future is not None and future.sampled  # a later version is read by its first four fields


def test_sampling_follows_the_caller_else_the_ratio_of_the_trace_id():
    sink = InMemorySpanExporter()
    t = tracing.Tracer(tracing.SdkExporter(sink), 0.25)
    try:
        assert t.start("x", tracing.Remote(1, 2, sampled=False)) is None
        assert t.start("x", tracing.Remote(1, 2, sampled=True)).parent_id == 2
        kept = sum(t.start("x") is not None for _ in range(4000))
        assert 800 < kept < 1200  # 25 % of new traces
        assert t.sampled((1 << 64) + 5) and not t.sampled((1 << 62) * 3)  # the low 64 bits against ratio × 2^64
    finally:
        t.close()


# ---------------------------------------------------------------------------- OTLP


def sample_spans(t):
    root = t.start("POST /v1/embeddings", tracing.Remote(0xABC, 0xDEF, True, "k=v"), tracing.SERVER,
                   {"http.request.method": "POST", "http.response.status_code": 200, "ratio": 0.5, "flag": True,
                    "neg": -3})
    child = root.child("maas.front_batch", None, {"maas.batch.jobs": 3})
    child.links.append((0x123, 0x456))
    child.events.append(("first_token", child.start_ns + 5, {"n": 1}))
    child.status, child.status_message = tracing.ERROR, "ModelTimeout (504)"
    child.end_ns = child.start_ns + 1000
    root.end_ns = root.start_ns + 5000
    return [root, child]


def test_the_otlp_encoding_decodes_as_the_sdk_encodes_it():
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.sdk.resources import Resource

    t = tracing.Tracer(tracing.SdkExporter(InMemorySpanExporter()), 1.0)
    try:
        spans = sample_spans(t)
    finally:
        t.close()
    resource = {"service.name": "maas-serve", "process.pid": 7}
    ours = ExportTraceServiceRequest()
    ours.ParseFromString(tracing.encode_otlp(spans, resource))
    sdk = encode_spans([tracing.SdkExporter.readable(s, Resource(resource)) for s in spans])
    a, b = ours.resource_spans[0].scope_spans[0].spans, sdk.resource_spans[0].scope_spans[0].spans
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        y.trace_state = x.trace_state  # the SDK's ReadableSpan normalises tracestate; ours passes it on as sent
        x.flags = y.flags = 0  # the SDK knows no remote parent here; ours sets bit 9 for the server span
        assert x == y, (x, y)
    server = a[0]
    assert server.trace_id == (0xABC).to_bytes(16, "big") and server.parent_span_id == (0xDEF).to_bytes(8, "big")
    assert server.kind == 2 and server.trace_state == "k=v"
    assert {kv.key for kv in ours.resource_spans[0].resource.attributes} == {"service.name", "process.pid"}
    assert a[1].status.code == 2 and a[1].links[0].span_id == (0x456).to_bytes(8, "big")


def test_both_exporters_deliver_to_an_otlp_receiver():
    receiver = Receiver()
    try:
        http = tracing.OtlpHttpExporter(f"http://127.0.0.1:{receiver.start_http()}/v1/traces", compression="gzip")
        grpc = tracing.OtlpGrpcExporter(f"127.0.0.1:{receiver.start_grpc()}", insecure=True)
        for exporter in (http, grpc):
            t = tracing.Tracer(exporter, 1.0, {"service.name": "maas-serve"}, delay_s=0.05)
            for s in sample_spans(t):
                t.record(s)
            assert t.flush(10.0) and t.failed == 0
            t.close()
        assert receiver.wait_for(lambda spans: len(spans) == 4)
        assert {r["service.name"] for r, _ in receiver.spans} == {"maas-serve"}
        refused = tracing.OtlpHttpExporter("http://127.0.0.1:9/v1/traces", timeout_s=1.0)  # nothing listens
        assert refused.export(sample_spans(tracing.Tracer(refused, 1.0)), {}) is False
    finally:
        receiver.stop()


def test_configuration_from_the_spec_and_the_otel_variables(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-token=a%20b,other=1")
    exporter = tracing.exporter_for(TracingSpec(enabled=True))
    assert exporter.endpoint == "http://collector:4318/v1/traces" and exporter.headers["x-token"] == "a b"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://other:9999/custom")
    assert tracing.exporter_for(TracingSpec(enabled=True)).path == "/custom"
    assert tracing.exporter_for(TracingSpec(enabled=True, endpoint="http://x:1/v1/traces")).host == "x"
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.1")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge")
    t = tracing.configure(TracingSpec(enabled=True))
    try:
        assert t.sample_ratio == pytest.approx(0.1) and t.resource["service.name"] == "edge"
        assert tracing.configure(TracingSpec(enabled=True, sample_ratio=0.5)).sample_ratio == 0.5
        monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
        assert tracing.configure(TracingSpec(enabled=True)) is None and tracing.tracer() is None
        assert tracing.configure(TracingSpec()) is None
    finally:
        tracing.configure(None)
    with pytest.raises(ValueError, match="http"):
        tracing.OtlpHttpExporter("collector:4318")


# ---------------------------------------------------------------------------- span trees of requests


@pytest.fixture()
def client(memory):
    def chat_answer(job, params):
        out = {"choices": [{"text": "Paris.", "finish_reason": "stop", "completion_tokens": 2}], "prompt_tokens": [5]}
        return {**out, "trace": replica_times(generator=True)} if params.get("trace") else out

    gen = FakeModel(chat_answer)
    gen.stream_events = [{"choices": [{"index": 0, "text": "Par", "finish_reason": None}]},
                         {"choices": [{"index": 0, "text": "is.", "finish_reason": "stop"}]},
                         {"done": True, "prompt_tokens": 5, "completion_tokens": 2,
                          "trace": replica_times(generator=True)}]
    failing = FakeModel(embed_answer)
    failing.fail = RuntimeError("boom")
    specs = [spec("enc"), spec("img", "image-classifier", ("image-classification",)), gen_spec(), spec("bad")]
    dp, _ = plane(specs, {"enc": FakeModel(traced(embed_answer)), "img": FakeModel(traced(top_answer("tabby"))),
                          "gen": gen, "bad": failing})
    set_current(dp)
    try:
        with TestClient(app) as c:
            yield c, memory
    finally:
        set_current(None)


def test_an_embeddings_request_is_one_tree_that_accounts_for_its_time(client):
    c, (t, mem) = client
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    r = c.post("/v1/embeddings", json={"model": "enc", "input": [SECRET, "b"]}, headers={"traceparent": caller})
    assert r.status_code == 200
    returned = tracing.parse_traceparent(r.headers["traceparent"])
    spans = spans_of(t, mem)
    by_id, kids = tree(spans)
    assert names(spans) == ["POST /v1/embeddings", "maas.embeddings", "maas.front_batch", "maas.front_batch.wait",
                            "maas.http.receive", "maas.http.respond", "maas.model", "maas.model.forward",
                            "maas.model.queue", "maas.preprocess"]
    assert {s.context.trace_id for s in spans} == {0x0AF7651916CD43DD8448EB211C80319C}  # the caller's trace
    root = by_id[returned.span_id]
    assert root.parent.span_id == 0xB7AD6B7169203331 and root.parent.is_remote is False
    assert root.kind.name == "SERVER" and root.attributes["http.response.status_code"] == 200
    assert root.attributes["http.route"] == "/v1/embeddings"
    top = sorted(kids[root.context.span_id], key=lambda s: s.start_time)
    assert [s.name for s in top] == ["maas.http.receive", "maas.embeddings", "maas.http.respond"]
    covered(root, top)
    op = top[1]
    assert op.attributes["maas.address"] == "enc" and op.attributes["maas.model.version"] == "1"
    inner = sorted(kids[op.context.span_id], key=lambda s: s.start_time)
    assert [s.name for s in inner] == ["maas.front_batch.wait", "maas.front_batch"]
    batch = inner[1]
    assert [lk.context.span_id for lk in batch.links] == [op.context.span_id]
    assert batch.attributes["maas.batch.items"] == 2 and batch.attributes["maas.deployment"] == "enc"
    assert [lk.context.span_id for lk in inner[0].links] == [batch.context.span_id]
    assert names(kids[batch.context.span_id]) == ["maas.model", "maas.preprocess"]
    model = next(s for s in kids[batch.context.span_id] if s.name == "maas.model")
    assert names(kids[model.context.span_id]) == ["maas.model.forward", "maas.model.queue"]
    assert model.attributes["maas.replica"] == "enc#abc"
    no_secret(spans)


def test_images_in_one_front_batch_share_one_batch_span_linked_to_each_request(memory):
    t, mem = memory

    async def go():
        model = FakeModel(traced(top_answer("tabby")))
        dp, _ = plane([spec("img", "image-classifier", ("image-classification",))], {"img": model})
        model.hold = asyncio.Event()
        root = t.start("test")
        tracing.CURRENT.set(root)
        first = asyncio.ensure_future(dp.ops.classify_images(ClassifyImagesRequest("img", images=[b"a"])))
        await asyncio.sleep(0)  # the first request leaves alone; the next four queue behind it
        while not model.calls:
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(dp.ops.classify_images(ClassifyImagesRequest("img", images=[b"b", b"c"])))
                for _ in range(4)]
        deadline = time.monotonic() + 5
        while sum(b.queued_items for b in dp.calls._batchers.values()) < 8 and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        model.hold.set()
        await asyncio.gather(first, *rest)
        root.end()
    asyncio.run(go())
    spans = spans_of(t, mem)
    batches = [s for s in spans if s.name == "maas.front_batch"]
    assert sorted(s.attributes["maas.batch.jobs"] for s in batches) == [1, 4]
    shared = next(s for s in batches if s.attributes["maas.batch.jobs"] == 4)
    ops = {s.context.span_id: s for s in spans if s.name == "maas.image-classification"}
    linked = {lk.context.span_id for lk in shared.links}
    assert len(linked) == 4 and linked <= set(ops) and shared.parent.span_id in linked
    rides = [s for s in spans if s.name == "maas.front_batch.ride"]
    assert len(rides) == 3 and all(r.links[0].context.span_id == shared.context.span_id for r in rides)
    waits = [s for s in spans if s.name == "maas.front_batch.wait"]
    assert len(waits) == 5 and all(w.end_time <= shared.start_time or w.links[0].context.span_id != shared.context.span_id
                                   for w in waits)
    assert sum(s.name == "maas.model" for s in spans) == 2  # one replica call per batch, under the batch span


def test_a_streamed_chat_has_its_time_to_first_token_and_the_generator_spans(client):
    c, (t, mem) = client
    msgs = [{"role": "user", "content": SECRET}]
    with c.stream("POST", "/v1/chat/completions", json={"model": "gen", "messages": msgs, "stream": True}) as r:
        assert r.status_code == 200 and "traceparent" in r.headers
        assert [ln for ln in r.iter_lines() if ln.startswith("data: ")][-1] == "data: [DONE]"
    spans = spans_of(t, mem)
    by_id, kids = tree(spans)
    op = next(s for s in spans if s.name == "maas.chat-stream")
    assert [e.name for e in op.events] == ["first_token"] and op.attributes["maas.ttft_ms"] >= 0
    assert op.attributes["gen_ai.usage.output_tokens"] == 2 and op.attributes["gen_ai.usage.input_tokens"] == 5
    call = next(s for s in kids[op.context.span_id] if s.name == "maas.call")
    model = next(s for s in kids[call.context.span_id] if s.name == "maas.model")
    assert names(kids[model.context.span_id]) == ["maas.model.generate", "maas.model.queue"]
    gen = next(s for s in kids[model.context.span_id] if s.name == "maas.model.generate")
    assert gen.attributes["maas.steps"] == 3 and [e.name for e in gen.events] == ["first_token"]
    root = by_id[op.parent.span_id]
    assert root.name == "POST /v1/chat/completions" and root.end_time >= op.end_time
    no_secret(spans)


def test_errors_carry_their_type_and_status_not_their_message(client):
    c, (t, mem) = client
    missing = c.post("/v1/embeddings", json={"model": SECRET, "input": ["a"]})
    failed = c.post("/v1/embeddings", json={"model": "bad", "input": ["a"]})
    assert missing.status_code == 404 and failed.status_code == 500
    spans = spans_of(t, mem)
    ops = [s for s in spans if s.name == "maas.embeddings"]
    codes = sorted(s.attributes["maas.status_code"] for s in ops)
    assert codes == [404, 500] and all(s.status.status_code.name == "ERROR" for s in ops)
    roots = {s.attributes["http.response.status_code"]: s for s in spans if s.name == "POST /v1/embeddings"}
    assert roots[500].status.status_code.name == "ERROR"  # a 5xx fails the server span
    assert roots[404].status.status_code.name == "UNSET"  # a client's mistake does not (HTTP conventions)
    batch = next(s for s in spans if s.name == "maas.front_batch")
    assert batch.status.status_code.name == "ERROR" and batch.attributes["error.type"]
    for s in ops:
        assert "maas.model.requested" in s.attributes
    assert not any(SECRET in s.status.description for s in ops if s.status.description)
    unknown = c.get("/v1/nothing-here/" + SECRET)
    assert unknown.status_code == 404
    assert [s.name for s in spans_of(t, mem) if s.attributes.get("http.response.status_code") == 404][-1] == "GET"


def test_a_v2_request_is_named_by_its_route_template_and_multipart_images_are_traced(client):
    c, (t, mem) = client
    jpeg = base64.b64encode(b"jpeg").decode()
    r = c.post("/v2/models/img/infer", json={"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                         "data": [jpeg]}]})
    assert r.status_code == 200, r.text
    c.post("/v1/classifications/image", data={"model": "img"}, files=[("file", ("a.jpg", b"jpeg", "image/jpeg"))])
    spans = spans_of(t, mem)
    assert {"POST /v2/models/{model_name}/infer", "POST /v1/classifications/image"} <= {s.name for s in spans}
    assert sum(s.name == "maas.image-classification" for s in spans) == 2


def test_a_handle_call_continues_the_callers_trace(memory):
    t, mem = memory

    class Owner:
        @tracing.traced_handle
        async def embed(self, request: dict) -> dict:
            assert tracing.current() is not None
            return {"ok": request["x"]}

        @tracing.traced_handle
        async def stream_chat(self, request: dict):
            for i in range(2):
                yield i

    async def go():
        carrier = {"traceparent": tracing.format_traceparent(0xFEED, 0xBEEF)}
        assert await Owner().embed({"x": 1}, trace_context=carrier) == {"ok": 1}
        assert [i async for i in Owner().stream_chat({}, trace_context=carrier)] == [0, 1]
        assert await Owner().embed({"x": 2}) == {"ok": 2}  # no caller context: a new trace
    asyncio.run(go())
    spans = spans_of(t, mem)
    handles = [s for s in spans if s.name.startswith("maas.handle")]
    assert names(handles) == ["maas.handle embed", "maas.handle embed", "maas.handle stream_chat"]
    joined = [s for s in handles if s.context.trace_id == 0xFEED]
    assert len(joined) == 2 and all(s.parent.span_id == 0xBEEF and s.kind.name == "SERVER" for s in joined)


def test_replicas_report_times_for_traced_jobs_only():
    from maas.batching.jobs import Preprocessed
    from maas.batching.pull import PullBatcher
    from maas.models.replica import split_jobs

    async def go():
        batcher = PullBatcher(lambda reqs: asyncio.sleep(0, [{"v": i} for i, _ in enumerate(reqs)]), "m")
        pre = Preprocessed(inputs=[1, 2, 3], rows=[1, 2], errors=[None, None], timing_ns=(10, 20, 2))
        pre.inputs = type("Rows", (), {"rows": lambda self, a, b: [0] * (b - a), "__len__": lambda self: 3})()
        results, requests, pending = split_jobs(pre, [{"trace": 1}, {}], None, lambda i, r: None)
        return await batcher.submit(requests, results, pending)
    traced_out, plain_out = asyncio.run(go())
    info = traced_out["trace"]
    assert info["pre"] == (10, 20, 2) and info["arrived"] <= info["start"] <= info["end"]
    assert info["items"] == 3 and info["requests"] == 2
    assert "trace" not in plain_out and "compute_s" in plain_out


def test_off_means_no_span_no_header_and_no_replica_times(memory):
    t, mem = memory
    tracing.use(None)
    dp, _ = plane([spec("enc")], {"enc": FakeModel(traced(embed_answer))})
    set_current(dp)
    try:
        with TestClient(app) as c:
            r = c.post("/v1/embeddings", json={"model": "enc", "input": ["a"]})
    finally:
        set_current(None)
    assert r.status_code == 200 and "traceparent" not in r.headers
    assert spans_of(t, mem) == []


# ---------------------------------------------------------------------------- from a new user's trial


def test_tracestate_keeps_whole_entries_and_duplicate_headers_follow_w3c(memory):
    t, mem = memory
    long = ",".join(f"vendor{i}=" + "v" * 40 for i in range(15))
    kept = tracing.trim_tracestate(long)
    assert len(kept) <= 512 and all(e.endswith("v" * 40) for e in kept.split(","))  # never an entry cut short
    assert len(tracing.trim_tracestate(",".join(f"k{i}=1" for i in range(40))).split(",")) == 32

    async def app_ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def call(headers, app=app_ok, path="/v1/embeddings"):
        scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
        await tracing.TracingMiddleware(app)(scope, None, lambda m: asyncio.sleep(0))

    caller = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    other = b"00-1af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    asyncio.run(call([(b"traceparent", caller), (b"tracestate", b"a=1"), (b"tracestate", b"b=2")]))
    asyncio.run(call([(b"traceparent", caller), (b"traceparent", other)]))
    asyncio.run(call([], path="/readyz"))  # probes are not traced

    async def app_left(scope, receive, send):
        raise asyncio.CancelledError()

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(call([(b"x-request-id", b"req-7")], app=app_left))
    spans = spans_of(t, mem)
    assert len(spans) == 3
    joined, fresh, left = spans
    assert joined.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert joined.context.trace_state.to_header() == "a=1,b=2"
    assert fresh.context.trace_id not in (0x0AF7651916CD43DD8448EB211C80319C, 0x1AF7651916CD43DD8448EB211C80319C)
    assert left.status.status_code.name == "UNSET" and left.attributes["maas.cancelled"] is True  # a client left
    assert left.attributes["maas.request_id"] == "req-7"


def test_samplers_bad_variables_and_endpoints_fail_soft_or_early(monkeypatch, caplog):
    from pydantic import ValidationError

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    t = tracing.configure(TracingSpec(enabled=True, endpoint="http://127.0.0.1:9/v1/traces"))
    try:
        assert t.start("x", tracing.Remote(1, 2, sampled=True)) is None  # not parent-based: off is off
    finally:
        tracing.configure(None)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "jaeger_remote")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "10s")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "5s")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with caplog.at_level("WARNING", logger="ray.serve.maas.tracing"):
        t = tracing.configure(TracingSpec(enabled=True, endpoint="http://127.0.0.1:9/v1/traces"))
    try:
        assert t is not None and t.sample_ratio == 1.0 and t.parent_based and t.delay_s == 5.0
        assert t.exporter.timeout_s == 10.0
    finally:
        tracing.configure(None)
    said = caplog.text
    assert "jaeger_remote" in said and "OTEL_EXPORTER_OTLP_TIMEOUT" in said and "http/json" in said
    with pytest.raises(ValidationError, match="protocol: grpc"):
        TracingSpec(enabled=True, endpoint="otel-collector:4318")
    assert TracingSpec(enabled=True, endpoint="otel-collector:4317", protocol="grpc").endpoint
    assert tracing.OtlpHttpExporter("http://collector:4318/").path == "/v1/traces"


def test_a_caller_mistake_does_not_fail_a_handle_span_and_generation_has_gen_ai_fields(client):
    c, (t, mem) = client
    from maas.errors import ModelNotFound

    class Owner:
        @tracing.traced_handle
        async def embed(self):
            raise ModelNotFound("no such model")

    with pytest.raises(ModelNotFound):
        asyncio.run(Owner().embed())
    r = c.post("/v1/chat/completions", json={"model": "gen", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    spans = spans_of(t, mem)
    handle = next(s for s in spans if s.name == "maas.handle embed")
    assert handle.status.status_code.name == "UNSET" and handle.attributes["maas.status_code"] == 404
    chat = next(s for s in spans if s.name == "maas.chat")
    assert chat.attributes["gen_ai.operation.name"] == "chat" and chat.attributes["gen_ai.request.model"] == "gen"
    assert chat.attributes["gen_ai.response.model"] == "gen"
    assert chat.attributes["gen_ai.usage.input_tokens"] == 5 and chat.attributes["gen_ai.usage.output_tokens"] == 2


def test_request_start_stamps_in_every_unit_and_implausible_ones_ignored():
    from maas.tracing.http import MAX_FRONT_NS, request_start_ns

    now = 1_765_100_000_123_456_789
    for stamp in (b"t=1765100000.123", b"1765100000123", b"t=1765100000123456", b"1765100000123456789"):
        got = request_start_ns(stamp, now)
        assert got is not None and abs(got - 1_765_100_000_123_000_000) < 1_000_000, (stamp, got)
    assert request_start_ns(b"t=1765100000.5", now) == now  # ahead of this clock by < 1 s: "now"
    for bad in (b"t=1765100009", b"", b"t=", b"soon", b"t=-5", b"nan", b"inf", b"1e30",
                str((now - MAX_FRONT_NS - 1) / 1e9).encode()):
        assert request_start_ns(bad, now) is None, bad


def test_a_request_start_stamp_starts_the_server_span_with_its_front_time(client):
    c, (t, mem) = client
    stamp = time.time_ns() - 40_000_000  # 40 ms before the request reached the app: a proxy's queue
    r = c.post("/v1/embeddings", json={"model": "enc", "input": ["b"]},
               headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                        "x-request-start": f"t={stamp // 1000}"})  # microseconds, as HAProxy's date(0,us)
    assert r.status_code == 200
    spans = spans_of(t, mem)
    by_id, kids = tree(spans)
    root = by_id[tracing.parse_traceparent(r.headers["traceparent"]).span_id]
    assert abs(root.start_time - stamp) < 1_000  # from the stamp (µs precision)
    top = sorted(kids[root.context.span_id], key=lambda s: s.start_time)
    assert [s.name for s in top] == ["maas.http.front", "maas.http.receive", "maas.embeddings", "maas.http.respond"]
    assert top[0].start_time == root.start_time and top[0].end_time - top[0].start_time >= 39_000_000
    assert top[1].start_time == top[0].end_time  # the app's own part starts where the front ends
    covered(root, top)


def test_bad_tracing_settings_never_stop_the_ingress_and_grpc_refuses_an_http_address(monkeypatch, caplog, tmp_path):
    from pydantic import ValidationError

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")  # no scheme: OTLP/HTTP cannot use it
    with caplog.at_level("ERROR", logger="ray.serve.maas.tracing"):
        assert tracing.configure(TracingSpec(enabled=True)) is None and tracing.tracer() is None
    assert "stays off" in caplog.text and "collector:4318" in caplog.text
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    for arg in ("10", "-1", "half"):  # out of [0, 1] or not a number: every trace, as the SDK does
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", arg)
        t = tracing.configure(TracingSpec(enabled=True, endpoint="http://127.0.0.1:9/v1/traces"))
        try:
            assert t.sample_ratio == 1.0, arg
        finally:
            tracing.configure(None)
    # The doc's YAML with protocol: grpc uncommented and the HTTP URL left in place: refused with the fix.
    for e in ("http://otel-collector:4318/v1/traces", "otel-collector:4318"):
        with pytest.raises(ValidationError, match="otel-collector:4317"):
            TracingSpec(enabled=True, endpoint=e, protocol="grpc")
    assert TracingSpec(enabled=True, endpoint="http://otel-collector:4317", protocol="grpc").endpoint
    # OTEL_EXPORTER_OTLP_INSECURE applies to an endpoint without a scheme only (the scheme wins).
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "false")
    import grpc

    secure: list[str] = []
    monkeypatch.setattr(grpc, "secure_channel",
                        lambda target, creds: secure.append(target) or grpc.insecure_channel(target))
    tracing.OtlpGrpcExporter("http://127.0.0.1:4317", insecure=False).close()
    assert secure == []
    tracing.OtlpGrpcExporter("127.0.0.1:4317", insecure=False).close()
    assert secure == ["127.0.0.1:4317"]


def test_compression_is_read_as_the_spec_names_it(monkeypatch, caplog):
    spec = TracingSpec(enabled=True, endpoint="http://127.0.0.1:9/v1/traces")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", " GZIP ")
    assert tracing.exporter_for(spec).compression == "gzip"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")
    with caplog.at_level("WARNING", logger="ray.serve.maas.tracing"):
        exporter = tracing.exporter_for(spec)
    assert exporter.compression != "gzip" and "zstd" in caplog.text


def test_several_request_start_stamps_the_earliest_usable_one_wins():
    from maas.tracing.http import earliest_start_ns

    now = 1_765_100_000_000_000_000
    a, b = b"t=1765099999950000", b"t=1765099999990000"  # 50 ms and 10 ms before now, in µs
    assert earliest_start_ns([b, a], now) == now - 50_000_000  # repeated headers
    assert earliest_start_ns([b + b", " + a], now) == now - 50_000_000  # joined by a proxy
    assert earliest_start_ns([b"junk", b"t=1765100009"], now) is None  # nothing usable
    assert earliest_start_ns([b"junk, " + b], now) == now - 10_000_000


def test_an_attribute_holding_a_lone_surrogate_is_exported_not_the_batch_lost():
    """A span attribute echoing the request (the requested model name, JSON ``"\\ud800"``) encodes with ``?`` in
    its place: the batch, with other requests' spans, still exports and parses."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    t = tracing.Tracer(tracing.SdkExporter(InMemorySpanExporter()), 1.0)
    try:
        spans = sample_spans(t)
    finally:
        t.close()
    spans[0].attrs["maas.model.requested"] = "bad \ud800"
    spans[1].status_message = "model 'bad \ud800' does not exist"
    ours = ExportTraceServiceRequest()
    ours.ParseFromString(tracing.encode_otlp(spans, {"service.name": "maas-serve"}))
    got = ours.resource_spans[0].scope_spans[0].spans
    assert len(got) == 2
    assert {kv.key: kv.value.string_value for kv in got[0].attributes}["maas.model.requested"] == "bad ?"
    assert got[1].status.message == "model 'bad ?' does not exist"
