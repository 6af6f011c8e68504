"""Tracing on a real cluster: a side app (``/traced``) with MiniLM, EfficientNet-Lite0 and the tiny GPT-2
demo, exporting over OTLP/HTTP to a receiver this test starts (tests/otlp_receiver.py). The span trees of an
embeddings request, an image request inside a front batch of several, a streamed chat, an error and a handle
call from another Ray job (a driver subprocess); no request text in any span."""

import concurrent.futures
import json
import subprocess
import sys
import textwrap
import time

import pytest
import requests
import yaml

from tests.conftest import LOCAL_CONFIG, ROOT, side_app
from tests.otlp_receiver import Receiver

pytestmark = pytest.mark.integration

MARKER = "zebra-payload-91e2"  # request text that no span may carry


@pytest.fixture(scope="module")
def traced(served_app):
    receiver = Receiver()
    port = receiver.start_http()
    args = yaml.safe_load(LOCAL_CONFIG.read_text())["applications"][0]["args"]
    models = {m["name"]: m for m in args["models"]}
    args["models"] = [dict(models["minilm"], name="minilm-tr"), dict(models["efficientnet-lite0"], name="effnet-tr"),
                      dict(models["gpt2-tiny-demo"], name="gpt-tr")]
    args["ingress"]["tracing"] = {"enabled": True, "endpoint": f"http://127.0.0.1:{port}/v1/traces",
                                  "service_name": "maas-traced"}
    try:
        with side_app(served_app, args, "traced") as url:
            yield {"url": url, "receiver": receiver}
    finally:
        receiver.stop()


def trace_of(receiver: Receiver, trace_id: bytes, names: set[str], timeout_s: float = 30.0) -> dict:
    """The spans of one trace once every name in ``names`` arrived: ``{span_id: span}``."""
    def ready(spans):
        mine = {s.span_id: s for _, s in spans if s.trace_id == trace_id}
        return mine if names <= {s.name for s in mine.values()} else None
    found = receiver.wait_for(ready, timeout_s)
    assert found, f"spans {names} of trace {trace_id.hex()} did not arrive; got " + str(
        sorted({s.name for _, s in receiver.spans if s.trace_id == trace_id}))
    return found


def children(spans: dict, parent) -> list:
    return sorted((s for s in spans.values() if s.parent_span_id == parent.span_id), key=lambda s: s.start_time_unix_nano)


def attrs(span) -> dict:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in span.attributes}


def ns(span) -> int:
    """A span's duration in integer nanoseconds (exact: sums of them never round below zero)."""
    return span.end_time_unix_nano - span.start_time_unix_nano


def ms(span) -> float:
    return ns(span) / 1e6


def header_ids(response) -> tuple[bytes, bytes]:
    _, trace, span, _ = response.headers["traceparent"].split("-")
    return bytes.fromhex(trace), bytes.fromhex(span)


def test_an_embeddings_trace_continues_the_caller_and_accounts_for_the_latency(traced):
    url, receiver = traced["url"], traced["receiver"]
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    for _ in range(3):  # warm: the first request reads the model's facts
        requests.post(f"{url}/v1/embeddings", json={"model": "minilm-tr", "input": ["warm"]}, timeout=60)
    started = time.perf_counter()
    r = requests.post(f"{url}/v1/embeddings", json={"model": "minilm-tr", "input": [MARKER, "second text"]},
                      headers={"traceparent": f"00-{caller_trace}-{caller_span}-01"}, timeout=60)
    latency_ms = 1000 * (time.perf_counter() - started)
    assert r.status_code == 200, r.text
    trace_id, root_id = header_ids(r)
    assert trace_id.hex() == caller_trace
    spans = trace_of(receiver, trace_id, {"POST /v1/embeddings", "maas.embeddings", "maas.front_batch",
                                          "maas.preprocess", "maas.model", "maas.model.forward"})
    root = spans[root_id]
    assert root.parent_span_id.hex() == caller_span and root.kind == 2
    assert attrs(root)["http.response.status_code"] == 200
    top = children(spans, root)
    assert [s.name for s in top] == ["maas.http.receive", "maas.embeddings", "maas.http.respond"]
    gap_ns = ns(root) - sum(ns(s) for s in top)
    assert 0 <= gap_ns <= 1_000_000, gap_ns  # the ingress's spans account for its time within 1 ms
    assert ms(root) <= latency_ms  # and the client saw at least that (the rest: HTTP on the way in and out)
    op = top[1]
    assert attrs(op)["maas.address"] == "minilm-tr" and attrs(op)["maas.model.version"] == "1"
    wait, batch = children(spans, op)
    assert (wait.name, batch.name) == ("maas.front_batch.wait", "maas.front_batch")
    assert [lk.span_id for lk in batch.links] == [op.span_id]
    pre, model = children(spans, batch)
    assert (pre.name, model.name) == ("maas.preprocess", "maas.model")
    # two short texts: tokenized by the ingress itself (tokenizers.inline_max_chars), and traced as its work
    assert attrs(pre)["maas.deployment"] == "Ingress" and attrs(model)["maas.replica"]
    queue, forward = children(spans, model)
    assert (queue.name, forward.name) == ("maas.model.queue", "maas.model.forward")
    assert attrs(forward)["maas.batch.items"] >= 2
    assert pre.end_time_unix_nano <= forward.start_time_unix_nano  # tokenised before the forward ran
    assert batch.start_time_unix_nano <= pre.start_time_unix_nano and model.end_time_unix_nano <= batch.end_time_unix_nano

    # A batch over inline_max_chars goes to the shared tokenizer deployment, whose span says so.
    r = requests.post(f"{url}/v1/embeddings", json={"model": "minilm-tr", "input": ["a longer text " * 50]},
                      headers={"traceparent": f"00-{caller_trace[:-4]}0ca1-{caller_span}-01"}, timeout=60)
    assert r.status_code == 200, r.text
    spans = trace_of(receiver, header_ids(r)[0], {"maas.preprocess", "maas.model.forward"})
    pre = next(s for s in spans.values() if s.name == "maas.preprocess")
    assert attrs(pre)["maas.deployment"].startswith("Tokenizer-")

    # Stamped X-Request-Start (µs, as a proxy in front would): through HAProxy and Serve the server span starts at
    # the stamp, and maas.http.front holds the time before the app; the children still account for the span.
    stamp_ns = time.time_ns()
    r = requests.post(f"{url}/v1/embeddings", json={"model": "minilm-tr", "input": ["stamped"]}, timeout=60,
                      headers={"traceparent": f"00-{caller_trace[:-4]}beef-{caller_span}-01",
                               "x-request-start": f"t={stamp_ns // 1000}"})
    assert r.status_code == 200, r.text
    trace_id, root_id = header_ids(r)
    spans = trace_of(receiver, trace_id, {"POST /v1/embeddings", "maas.http.front", "maas.embeddings"})
    root = spans[root_id]
    assert root.start_time_unix_nano == stamp_ns // 1000 * 1000
    top = children(spans, root)
    assert [s.name for s in top] == ["maas.http.front", "maas.http.receive", "maas.embeddings", "maas.http.respond"]
    assert top[0].start_time_unix_nano == root.start_time_unix_nano and 0 < ns(top[0])
    assert 0 <= ns(root) - sum(ns(s) for s in top) <= 1_000_000


def test_image_requests_in_one_front_batch_link_to_one_batch_span(traced, chelsea_jpeg):
    url, receiver = traced["url"], traced["receiver"]

    def one(_):
        return requests.post(f"{url}/v1/classifications/image", data={"model": "effnet-tr", "top_k": "1"},
                             files=[("file", ("c.jpg", chelsea_jpeg, "image/jpeg"))], timeout=120)
    one(0)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    ids = [header_ids(a) for a in answers]
    traces = {t for t, _ in ids}
    assert len(traces) == 8  # a trace per request

    def batches(spans):
        shared = [s for _, s in spans if s.name == "maas.front_batch" and s.trace_id in traces and len(s.links) > 1]
        return shared or None
    shared = receiver.wait_for(batches, 30.0)
    assert shared, "no front batch held two traced image requests"
    batch = shared[0]
    linked = {lk.trace_id for lk in batch.links}
    assert linked <= traces and len(linked) == attrs(batch)["maas.batch.jobs"]
    rides = receiver.wait_for(lambda spans: [s for _, s in spans if s.name == "maas.front_batch.ride"
                                             and s.links and s.links[0].span_id == batch.span_id], 30.0)
    assert len(rides) == len(linked) - 1  # every other request in it shows the batch it rode in
    spans = trace_of(receiver, batch.trace_id, {"maas.preprocess", "maas.model.forward"})
    pre = next(s for s in spans.values() if s.name == "maas.preprocess")
    assert attrs(pre)["maas.deployment"].startswith("ImagePreprocessor")


def test_a_streamed_chat_trace_has_time_to_first_token(traced):
    url, receiver = traced["url"], traced["receiver"]
    body = {"model": "gpt-tr", "messages": [{"role": "user", "content": MARKER}], "stream": True, "max_tokens": 8}
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines(decode_unicode=True) if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    trace_id, _ = header_ids(r)
    spans = trace_of(receiver, trace_id, {"maas.chat-stream", "maas.call", "maas.model.generate"})
    op = next(s for s in spans.values() if s.name == "maas.chat-stream")
    assert [e.name for e in op.events] == ["first_token"] and attrs(op)["maas.ttft_ms"] > 0
    assert attrs(op)["gen_ai.usage.output_tokens"] >= 1
    gen = next(s for s in spans.values() if s.name == "maas.model.generate")
    assert attrs(gen)["maas.steps"] >= 1 and [e.name for e in gen.events] == ["first_token"]


def test_an_error_is_a_failed_span_with_its_status(traced):
    url, receiver = traced["url"], traced["receiver"]
    r = requests.post(f"{url}/v1/embeddings", json={"model": "minilm-tr", "input": ["a"], "dimensions": 7}, timeout=60)
    assert r.status_code == 400, r.text
    trace_id, root_id = header_ids(r)
    spans = trace_of(receiver, trace_id, {"POST /v1/embeddings", "maas.embeddings"})
    op = next(s for s in spans.values() if s.name == "maas.embeddings")
    assert op.status.code == 2 and attrs(op)["maas.status_code"] == 400 and attrs(op)["error.type"] == "InvalidRequest"
    assert attrs(spans[root_id])["http.response.status_code"] == 400


def test_a_handle_call_from_another_ray_job_joins_its_trace(traced, served_app):
    receiver = traced["receiver"]
    script = textwrap.dedent("""
        import json, sys
        import ray
        from ray import serve
        ray.init(address=sys.argv[1], namespace="serve", log_to_driver=False)
        h = serve.get_app_handle("traced")
        carrier = {"traceparent": "00-5a1ee1e0c0ffee000000000000000042-1111222233334444-01"}
        out = h.embed.remote({"model": "minilm-tr", "input": ["%s"]}, trace_context=carrier).result()
        print(json.dumps({"n": len(out["data"])}))
    """ % MARKER)
    done = subprocess.run([sys.executable, "-c", script, served_app["address"]], env=served_app["env"], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"n": 1}
    spans = trace_of(receiver, bytes.fromhex("5a1ee1e0c0ffee000000000000000042"),
                     {"maas.handle embed", "maas.embeddings", "maas.front_batch", "maas.model.forward"})
    handle = next(s for s in spans.values() if s.name == "maas.handle embed")
    assert handle.kind == 2 and handle.parent_span_id.hex() == "1111222233334444"
    assert attrs(handle)["rpc.method"] == "embed"


def test_no_request_text_in_any_span(traced):
    receiver = traced["receiver"]
    receiver.wait_for(lambda spans: len(spans) > 40, 30.0)
    with receiver.lock:
        spans = list(receiver.spans)
    assert spans and {r["service.name"] for r, _ in spans} == {"maas-traced"}
    for _, s in spans:
        text = s.SerializeToString()
        assert MARKER.encode() not in text, s.name
