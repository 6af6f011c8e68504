"""Protocol schemas and encodings without Ray: OpenAI request rules, v2 binary tensors,
and the one error mapping."""

import json
import struct

import numpy as np
import pytest
from pydantic import ValidationError

from maas.errors import InvalidRequest, ModelNotFound, ServiceOverloaded
from maas.protocol import v2
from maas.protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest


def test_openai_hints_are_ignored_and_behaviour_fields_rejected():
    req = CompletionRequest(model="m", prompt="x", user="u", store=True, echo=False, logprobs=None)
    assert sorted(req.ignored_hints()) == ["store"]  # user is the routing key among versions, not a hint
    for field, value in [("logprobs", 2), ("logprobs", 0), ("echo", True), ("presence_penalty", 0.5), ("suffix", "!")]:
        with pytest.raises(InvalidRequest) as info:
            CompletionRequest(model="m", prompt="x", **{field: value})
        assert info.value.param == field
    with pytest.raises(InvalidRequest) as info:
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                              tools=[{"type": "function", "function": {"name": "f"}}])
    assert info.value.param == "tools"
    ok = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                               response_format={"type": "text"}, max_completion_tokens=5)
    assert ok.to_params()["max_tokens"] == 5


def test_embedding_inputs():
    assert EmbeddingRequest(model="m", input="a").texts() == ["a"]
    assert EmbeddingRequest(model="m", input=[1, 2, 3]).token_arrays() == [[1, 2, 3]]
    assert EmbeddingRequest(model="m", input=[[1], [2, 3]]).token_arrays() == [[1], [2, 3]]
    op = EmbeddingRequest(model="m", input=[[1], [2, 3]], user="u").to_operation()
    assert op.texts is None and op.token_ids == [[1], [2, 3]] and op.routing_key == "u"
    for bad in ([True], [[1, False]], [True, False]):  # JSON booleans are not token ids (lax mode reads 1 / 0)
        with pytest.raises(ValidationError, match="true/false"):
            EmbeddingRequest(model="m", input=bad)


def _binary_request(inputs: list[tuple[dict, bytes]], outputs=None, params=None) -> tuple[bytes, int]:
    head = {"inputs": [i for i, _ in inputs]}
    if outputs:
        head["outputs"] = outputs
    if params:
        head["parameters"] = params
    raw = json.dumps(head).encode()
    return raw + b"".join(b for _, b in inputs), len(raw)


def test_v2_binary_roundtrip():
    texts = [b"hello", "h\u00e9llo \u4e2d\u6587".encode()]
    blob = v2.encode_bytes_binary(texts)
    pixels = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(1, 2, 4, 3)
    body, hl = _binary_request([
        ({"name": "text", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(blob)}}, blob),
        ({"name": "px", "shape": [1, 2, 4, 3], "datatype": "UINT8",
          "parameters": {"binary_data_size": pixels.nbytes}}, pixels.tobytes()),
    ], params={"binary_data_output": True})
    req = v2.parse_request(body, hl)
    assert list(req.inputs["text"].array) == texts
    assert np.array_equal(req.inputs["px"].array, pixels)
    out, headers = v2.encode_response("m", req, [v2.Tensor("scores", "FP32", np.array([[0.5, 0.25]], np.float32)),
                                                 v2.bytes_tensor("labels", ["a", "bc"], (1, 2))])
    n = int(headers["inference-header-content-length"])
    head = json.loads(out[:n])
    assert [o["parameters"]["binary_data_size"] for o in head["outputs"]] == [8, 4 + 1 + 4 + 2]
    assert np.frombuffer(out[n:n + 8], "<f4").tolist() == [0.5, 0.25]
    assert struct.unpack_from("<I", out, n + 8)[0] == 1


def test_v2_json_and_errors():
    req = v2.parse_request(json.dumps({"inputs": [{"name": "t", "shape": [1, 2], "datatype": "FP32",
                                                    "data": [[1, 2]]}]}).encode(), None)
    assert req.inputs["t"].array.dtype == np.float32 and req.inputs["t"].array.shape == (1, 2)
    out, headers = v2.encode_response("m", req, [v2.bytes_tensor("text_output", ["x"])])
    assert headers["content-type"] == "application/json" and json.loads(out)["outputs"][0]["data"] == ["x"]
    bad = [
        ({"inputs": [{"name": "t", "shape": [3], "datatype": "FP32", "data": [1, 2]}]}, "needs 3 elements"),
        ({"inputs": [{"name": "t", "shape": [1], "datatype": "COMPLEX", "data": [1]}]}, "unknown datatype"),
        ({"inputs": [{"name": "t", "shape": [1], "datatype": "INT32", "data": ["a"]}]}, "not INT32"),
        ({"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES"}]}, "neither data nor"),
        ({"inputs": []}, "inputs"),
        ({"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["a"]},
                     {"name": "t", "shape": [1], "datatype": "BYTES", "data": ["b"]}]}, "must be unique"),
    ]
    for body, msg in bad:
        with pytest.raises(InvalidRequest, match=msg):
            v2.parse_request(json.dumps(body).encode(), None)
    with pytest.raises(InvalidRequest, match="exceeds the binary data"):
        body, hl = _binary_request([({"name": "t", "shape": [4], "datatype": "FP32",
                                      "parameters": {"binary_data_size": 16}}, b"\0" * 8)])
        v2.parse_request(body, hl)


def test_error_response_shapes_and_retry_after():
    from starlette.requests import Request

    from maas.protocol.http import error_response

    def req(path):
        return Request({"type": "http", "path": path, "headers": [], "method": "GET", "query_string": b""})

    r = error_response(req("/v1/embeddings"), ModelNotFound("model 'x' does not exist"))
    assert r.status_code == 404 and json.loads(r.body)["error"]["code"] == "model_not_found"
    r = error_response(req("/v1/completions"), ServiceOverloaded("busy"))
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    r = error_response(req("/v2/models/x/infer"), ModelNotFound("no such model"))
    assert r.status_code == 404 and json.loads(r.body) == {"error": "no such model"}
    from maas.errors import MaasError

    r = error_response(req("/v1/embeddings"), MaasError("secret internal detail"))
    assert r.status_code == 500 and "secret" not in r.body.decode()
