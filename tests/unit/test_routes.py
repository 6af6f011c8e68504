"""The HTTP routes of every protocol over the core with fake deployments (no Ray): each route
parses its wire format, calls the operation and renders it, with the headers that say who
answered. The Ray suites run the same routes over the real graph."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from maas.dataplane import set_current
from maas.ingress import app
from tests.unit.test_core import FakeModel, embed_answer, gen_spec, plane, spec, top_answer


@pytest.fixture()
def client():
    def chat_answer(job, params):
        return {"choices": [{"text": "Paris.", "finish_reason": "stop", "completion_tokens": 2}], "prompt_tokens": [5]}

    gen = FakeModel(chat_answer)
    gen.stream_events = [{"choices": [{"index": 0, "text": "Par", "finish_reason": None}]},
                         {"choices": [{"index": 0, "text": "is.", "finish_reason": "stop"}]},
                         {"done": True, "prompt_tokens": 5, "completion_tokens": 2}]
    specs = [spec("enc"), spec("img", "image-classifier", ("image-classification",)), gen_spec()]
    dp, _ = plane(specs, {"enc": FakeModel(embed_answer), "img": FakeModel(top_answer("tabby")), "gen": gen})
    set_current(dp)
    try:
        with TestClient(app) as c:
            yield c
    finally:
        set_current(None)


def test_image_classification_multipart_and_json_answer_alike(client):
    import base64

    multi = client.post("/v1/classifications/image", data={"model": "img", "top_k": "1"},
                        files=[("file", ("a.jpg", b"jpeg bytes", "image/jpeg"))])
    assert multi.status_code == 200, multi.text
    assert multi.headers["x-maas-model-version"] == "1"
    body = client.post("/v1/classifications/image",
                       json={"model": "img", "images": [base64.b64encode(b"jpeg bytes").decode()], "top_k": 1})
    assert body.status_code == 200 and body.json()["data"] == multi.json()["data"]
    assert body.json()["data"][0]["top_k"][0]["label"] == "tabby" and body.json()["model_version"] == "1"
    other = client.post("/v1/classifications/image", content=b"x", headers={"content-type": "text/plain"})
    assert other.status_code == 415


def test_embeddings_and_the_budget_header(client):
    r = client.post("/v1/embeddings", json={"model": "enc", "input": ["a", "b"]})
    assert r.status_code == 200 and len(r.json()["data"]) == 2 and r.json()["usage"]["prompt_tokens"] == 6
    assert r.headers["x-maas-model-version"] == "1" and r.json()["model_version"] == "1"
    bad = client.post("/v1/embeddings", json={"model": "auto", "input": ["a"]},
                      headers={"X-Maas-Latency-Budget-Ms": "soon"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Maas-Latency-Budget-Ms"
    routed = client.post("/v1/embeddings", json={"model": "auto", "input": ["a"]},
                         headers={"X-Maas-Latency-Budget-Ms": "50"})
    assert routed.headers["x-maas-routed-model"] == "enc" and routed.headers["x-maas-route-reason"].startswith("budget=")
    assert routed.json()["routing"]["model"] == "enc"


def test_chat_whole_and_streamed(client):
    msgs = [{"role": "user", "content": "capital of France?"}]
    whole = client.post("/v1/chat/completions", json={"model": "gen", "messages": msgs})
    assert whole.status_code == 200 and whole.json()["choices"][0]["message"]["content"] == "Paris."
    with client.stream("POST", "/v1/chat/completions",
                       json={"model": "gen", "messages": msgs, "stream": True,
                             "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["x-maas-model-version"] == "1"
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Paris."
    assert chunks[-1]["usage"]["total_tokens"] == 7


def test_v2_infer_calls_the_same_operations(client):
    text = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hello"]}]}
    r = client.post("/v2/models/enc/infer", json=text)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "embeddings" and out["shape"] == [1, 4] and r.json()["model_version"] == "1"
    gen = client.post("/v2/models/gen/infer", json={**{"inputs": text["inputs"]},
                                                    "parameters": {"max_tokens": 4, "temperature": 0}})
    assert gen.status_code == 200 and gen.json()["outputs"][0]["data"] == ["Paris."]
    bad = client.post("/v2/models/gen/infer", json={**text, "parameters": {"temperature": "hot"}})
    assert bad.status_code == 400 and "temperature" in bad.json()["error"]


def test_models_list_renders_through_its_schema(client):
    from maas.protocol.openai_render import ModelList

    r = client.get("/v1/models")
    assert r.status_code == 200
    listed = ModelList.model_validate(r.json())
    assert {m.id for m in listed.data} == {"enc", "img", "gen"} and all(m.version == "1" for m in listed.data)


@pytest.mark.parametrize("path, body, headers", [
    ("/v1/embeddings", b'{"model": "enc", "input": ["a", "b"]}', {}),
    ("/v1/embeddings", b'{"model": "enc", "input": ["a"], "encoding_format": "base64"}', {}),
    ("/v1/embeddings", b'{"model": "missing", "input": "a"}', {}),  # 404 from the operation
    ("/v1/embeddings", b'{"model": "enc", "input": []}', {}),  # 400 from the operation
    ("/v1/embeddings", b'{"model": "enc"}', {}),  # validation error: FastAPI answers
    ("/v1/embeddings", b'{"model": "enc", "input": [NaN]}', {}),  # orjson refuses, json accepts
    ("/v1/embeddings", b'{"model": "enc", "input": "a"', {}),  # truncated JSON
    ("/v1/embeddings", b'[1, 2]', {}),
    ("/v1/embeddings", b'{"model": "auto", "input": ["a"]}', {"X-Maas-Latency-Budget-Ms": "50"}),
    ("/v1/embeddings", b'{"model": "auto", "input": ["a"]}', {"X-Maas-Latency-Budget-Ms": "soon"}),
    ("/v1/chat/completions", b'{"model": "gen", "messages": [{"role": "user", "content": "Capital?"}]}', {}),
    ("/v1/chat/completions", b'{"model": "gen", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}', {}),
    ("/v1/completions", b'{"model": "gen", "prompt": "The capital of France is", "max_tokens": 0}', {}),
])
def test_the_fast_json_path_answers_exactly_as_fastapi_does(client, monkeypatch, path, body, headers):
    """FastJson (the hot JSON routes without FastAPI's router) changes no answer: status, body
    and routing headers are the ones the FastAPI endpoint gives, for good and bad requests."""
    from maas.protocol import http

    def call():
        r = client.post(path, content=body, headers={"content-type": "application/json", **headers})
        keep = {k: v for k, v in r.headers.items() if k.startswith("x-maas") or k in ("content-type", "retry-after")}
        if "x-maas-route-reason" in keep:  # auto's prediction learns from the first call
            keep["x-maas-route-reason"] = re.sub(r"predicted=[^;]*", "predicted=_",
                                                              keep["x-maas-route-reason"])
        text = r.text
        for field in ("id", "created"):  # per-response values
            text = re.sub(rf'"{field}":\s*("[^"]*"|\d+)', f'"{field}":_', text)
        text = re.sub(r"predicted=[^;]*", "predicted=_", text)
        return r.status_code, keep, text

    fast = call()
    monkeypatch.setattr(http, "FAST_JSON", {})
    assert call() == fast


def test_an_error_answer_leaves_no_reference_cycle_holding_the_request_body():
    """A body that is not JSON goes through FastAPI's own parser, whose exceptions sit in the locals of the frames
    in their tracebacks: a reference cycle holding the raw body until Python's collector ran (66 objects per
    request); a validator's ValueError, kept by pydantic in the error, did the same with the parsed texts. The
    error handlers drop an answered error's tracebacks and the validators raise no ValueError, so the request is
    freed at once."""
    import asyncio
    import gc

    cases = {"/v1/embeddings": (b"application/json", b'{"model": "enc", "input": ["' + b"x" * 200_000),
             "/v2/models/enc/infer": (b"application/json", b"[" * 200_000),
             # valid JSON that a validator refuses (texts and token ids mixed)
             "/v1/embeddings?mix": (b"application/json", b'{"model": "enc", "input": ["' + b"y" * 200_000 + b'", 5]}')}

    async def scenario(path, ctype, raw):
        dp, _ = plane([spec("enc")], {"enc": FakeModel(embed_answer)})
        set_current(dp)
        scope = {"type": "http", "method": "POST", "path": path.split("?")[0], "root_path": "", "scheme": "http",
                 "query_string": b"", "headers": [(b"content-type", ctype), (b"content-length", str(len(raw)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000), "http_version": "1.1"}
        statuses = []

        async def receive():
            return {"type": "http.request", "body": raw, "more_body": False}

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        for _ in range(3):
            await app(dict(scope), receive, send)
        return statuses

    for path, (ctype, raw) in cases.items():
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            statuses = asyncio.run(scenario(path, ctype, raw))
            gc.collect()
            holding = [type(o).__name__ for o in gc.garbage  # the body, or a text parsed out of it
                       if any(isinstance(r, (bytes, str)) and len(r) >= 100_000 for r in gc.get_referents(o))]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
            set_current(None)
        assert statuses == [400] * 3, (path, statuses)
        assert holding == [], (path, holding)
