"""Existing clients just work: the official ``openai`` library and ``tritonclient.http``
against the session's ``serve run serve_configs/local.yaml``; results equal our own routes
and the Python handle path."""

import base64
import time

import numpy as np
import pytest
import requests

from tests.conftest import wait_for
from tests.e2e.test_http import same_top_k
from tests.unit.test_models import CAT_CLASSES

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def url(served_app):
    return served_app["url"]


@pytest.fixture(scope="module")
def client(url):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def triton(url):
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)


# ---------------------------------------------------------------------------- openai


def test_models_list_and_retrieve(client):
    ids = {m.id for m in client.models.list()}
    assert {"minilm", "efficientnet-lite0", "gpt2-tiny-demo"} <= ids
    assert client.models.retrieve("minilm").id == "minilm"


def test_embeddings_default_base64_and_float_equal_our_route(client, url):
    texts = ["The cat sits on the mat.", "Serving many models as one service."]
    default = client.embeddings.create(model="minilm", input=texts)  # the client asks for base64
    as_float = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    ours = requests.post(f"{url}/v1/embeddings", json={"model": "minilm", "input": texts}, timeout=60).json()
    ref = np.array([d["embedding"] for d in ours["data"]], dtype=np.float32)
    assert np.array_equal(np.array([d.embedding for d in default.data], dtype=np.float32), ref)
    assert np.array_equal(np.array([d.embedding for d in as_float.data], dtype=np.float32), ref)
    assert default.usage.prompt_tokens == ours["usage"]["prompt_tokens"] > 0


def test_embeddings_token_arrays_equal_text(client, minilm_tokenizer):
    text = "Token arrays are embeddings input too."
    ids = minilm_tokenizer(text)["input_ids"]
    a = client.embeddings.create(model="minilm", input=[ids], encoding_format="float").data[0].embedding
    b = client.embeddings.create(model="minilm", input=text, encoding_format="float").data[0].embedding
    assert np.allclose(a, b, atol=1e-5)


def test_completion_and_n(client):
    out = client.completions.create(model="gpt2-tiny-demo", prompt="Hello", max_tokens=5, temperature=0)
    assert out.object == "text_completion" and out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 5
    many = client.completions.create(model="gpt2-tiny-demo", prompt=["a", "b"], max_tokens=3, n=2,
                                     temperature=1.0, seed=1)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]


def _stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join((c.choices[0].delta.content or "") if hasattr(c.choices[0], "delta") else c.choices[0].text
                   for c in chunks if c.choices)
    return text, chunks


def test_chat_streamed_equals_non_streamed_under_greedy(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]
    full = client.chat.completions.create(model="gpt2-tiny-demo", messages=messages, max_tokens=40, temperature=0)
    assert full.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="gpt2-tiny-demo", messages=messages, max_tokens=40,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    text, chunks = _stream_text(stream)
    assert text == full.choices[0].message.content
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completion_stream_equals_non_streamed(client):
    kwargs = dict(model="gpt2-tiny-demo", prompt="Once upon a time", max_tokens=30, temperature=0)
    full = client.completions.create(**kwargs)
    text, chunks = _stream_text(client.completions.create(**kwargs, stream=True))
    assert text == full.choices[0].text and chunks[-1].choices[0].finish_reason == "length"


def test_errors_raise_the_clients_exceptions(client):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512 tokens"):
        client.completions.create(model="gpt2-tiny-demo", prompt="word " * 600, max_tokens=5)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="gpt2-tiny-demo", prompt="x", logprobs=2)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="minilm", input="x", dimensions=8)


def test_time_to_first_chunk_of_a_long_completion(client):
    """Streaming delivers text long before the whole completion is done: the first chunk comes
    in under half the time the same request takes unstreamed, and text keeps coming after it."""
    kwargs = dict(model="gpt2-tiny-demo", prompt="The history of", max_tokens=400, temperature=0)
    started = time.perf_counter()
    whole = client.completions.create(**kwargs)
    unstreamed_s = time.perf_counter() - started
    assert whole.usage.completion_tokens == 400, "the reference must run to max_tokens"
    started, first, later_chunks = time.perf_counter(), None, 0
    for chunk in client.completions.create(**kwargs, stream=True):
        if chunk.choices and chunk.choices[0].text:
            if first is None:
                first = time.perf_counter() - started
            else:
                later_chunks += 1
    total = time.perf_counter() - started
    print(f"\n400 tokens: unstreamed {unstreamed_s * 1000:.0f} ms; streamed first chunk {first * 1000:.0f} ms, "
          f"last {total * 1000:.0f} ms, {later_chunks} chunks after the first")
    assert first is not None and first < unstreamed_s / 2
    assert later_chunks >= 3


def test_client_disconnect_stops_generation(url, served_app):
    """Closing the connection mid-stream takes the row out of the replica's batch: generation
    itself stops (tokens counted on the replica), far short of max_tokens."""
    from ray import serve

    handle = serve.get_deployment_handle("gpt2-tiny-demo", app_name="maas")
    before = handle.stats.remote().result()["cancelled_generations"]
    with requests.post(f"{url}/v1/completions", stream=True, timeout=60,
                       json={"model": "gpt2-tiny-demo", "prompt": "x", "max_tokens": 500, "temperature": 0,
                             "stream": True}) as r:
        next(r.iter_lines())  # one event, then hang up

    def stopped():
        stats = handle.stats.remote().result()
        return stats if stats["cancelled_generations"] > before and stats["running"] == 0 else None

    stats = wait_for(stopped, 30, "the row left the replica's batch", 0.2)
    last = stats["abandoned"][-1]
    assert last["cancelled"] is True and last["asked"] == 500
    assert 0 < last["generated"] < 500, last
    assert stats["streams"][-1]["cancelled"] is True


# ---------------------------------------------------------------------------- tritonclient


def test_triton_server_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("minilm")
    meta = triton.get_model_metadata("efficientnet-lite0")
    assert meta["inputs"][0] == {"name": "image", "datatype": "BYTES", "shape": [-1]}
    assert [o["name"] for o in meta["outputs"]] == ["labels", "scores", "indices"]
    assert triton.get_model_metadata("minilm")["outputs"][0] == {"name": "embeddings", "datatype": "FP32",
                                                                 "shape": [-1, 384]}


def _v1_top3(url, image: bytes) -> list[dict]:
    return requests.post(f"{url}/v1/classifications/image", timeout=60, data={"model": "efficientnet-lite0", "top_k": "3"},
                         files=[("file", ("c.jpg", image, "image/jpeg"))]).json()["data"][0]["top_k"]


@pytest.mark.parametrize("binary_out", [True, False])
def test_triton_image_infer_equals_v1(triton, url, chelsea_jpeg, binary_out):
    """Encoded image files go as binary BYTES (JSON can't carry raw bytes; see the base64 test)."""
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([chelsea_jpeg], dtype=np.object_), binary_data=True)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary_out) for n in ("labels", "scores", "indices")]
    res = triton.infer("efficientnet-lite0", [inp], outputs=outputs, parameters={"top_k": 3})
    indices, scores = res.as_numpy("indices"), res.as_numpy("scores")
    assert indices.shape == (1, 3) and CAT_CLASSES & set(indices[0].tolist())
    labels = [b.decode() if isinstance(b, bytes) else b for b in res.as_numpy("labels")[0]]
    got = [{"index": int(i), "label": label, "score": float(s)} for i, label, s in zip(indices[0], labels, scores[0])]
    assert same_top_k(got, _v1_top3(url, chelsea_jpeg))


def test_v2_json_image_as_base64(url, chelsea_jpeg):
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"content_type": "base64"},
                        "data": [base64.b64encode(chelsea_jpeg).decode()]}], "parameters": {"top_k": 3}}
    out = {o["name"]: o for o in requests.post(f"{url}/v2/models/efficientnet-lite0/infer", json=body,
                                               timeout=60).json()["outputs"]}
    got = [{"index": i, "label": label, "score": s}
           for i, label, s in zip(out["indices"]["data"], out["labels"]["data"], out["scores"]["data"])]
    assert out["labels"]["shape"] == [1, 3] and same_top_k(got, _v1_top3(url, chelsea_jpeg))


def test_triton_uint8_pixels(triton, chelsea_jpeg):
    import io

    import tritonclient.http as httpclient
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(chelsea_jpeg)).convert("RGB"))[None]
    inp = httpclient.InferInput("image", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels)
    res = triton.infer("efficientnet-lite0", [inp])  # no outputs named: all, binary
    assert CAT_CLASSES & set(res.as_numpy("indices")[0].tolist())


@pytest.mark.parametrize("binary", [True, False])
def test_triton_text_infer_equals_v1_and_handle(triton, url, served_app, binary):
    import tritonclient.http as httpclient
    from ray import serve

    texts = ["hello world", "a second sentence"]
    inp = httpclient.InferInput("text", [2], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_), binary_data=binary)
    res = triton.infer("minilm", [inp], outputs=[httpclient.InferRequestedOutput("embeddings", binary_data=binary)])
    got = res.as_numpy("embeddings")
    v1 = requests.post(f"{url}/v1/embeddings", json={"model": "minilm", "input": texts}, timeout=60).json()
    handle = serve.get_app_handle("maas").embed.remote({"model": "minilm", "input": texts}).result()
    for ref in (v1, handle):
        assert np.allclose(got, np.array([d["embedding"] for d in ref["data"]], dtype=np.float32), atol=1e-6)


def test_triton_generator_text_output(triton):
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("text", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"Hello"], dtype=np.object_))
    res = triton.infer("gpt2-tiny-demo", [inp], parameters={"max_tokens": 4, "temperature": 0})
    assert res.as_numpy("text_output").shape == (1,)


def test_v2_errors(url):
    r = requests.post(f"{url}/v2/models/nope/infer", json={"inputs": []}, timeout=30)
    assert r.status_code == 404 and set(r.json()) == {"error"}
    r = requests.post(f"{url}/v2/models/minilm/infer", data=b"{bad", timeout=30)
    assert r.status_code == 400 and "error" in r.json()
    r = requests.post(f"{url}/v2/models/minilm/infer", timeout=30,
                      json={"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["x"]}]})
    assert r.status_code == 400 and "needs 2 elements" in r.json()["error"]
    for inputs in ([{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["x"]}],
                   [{"name": "text", "shape": [1, 2], "datatype": "BYTES", "data": [["x", "y"]]}]):
        r = requests.post(f"{url}/v2/models/minilm/infer", json={"inputs": inputs}, timeout=30)
        assert r.status_code == 400 and "error" in r.json(), r.text
    r = requests.get(f"{url}/v2/models/minilm/versions/7", timeout=30)
    assert r.status_code == 404
    assert requests.get(f"{url}/v2/health/live", timeout=30).json() == {"live": True}
    assert requests.get(f"{url}/v2/health/ready", timeout=30).json() == {"ready": True}
    assert requests.get(f"{url}/v2/models/minilm/ready", timeout=30).json() == {"name": "minilm", "ready": True}
