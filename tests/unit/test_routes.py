"""The HTTP routes of every protocol over the core with fake deployments (no Ray): each route
parses its wire format, calls the operation and renders it, with the headers that say who
answered. The Ray suites run the same routes over the real graph."""

from __future__ import annotations

import json

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
