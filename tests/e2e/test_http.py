"""``serve run serve_configs/local.yaml`` as a subprocess, talked to over real HTTP and from a
separate Ray job."""

import base64
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import requests

from tests.unit.test_models import CAT_CLASSES

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def url(served_app):
    print(f"\nserve run became ready in {served_app['ready_s']:.1f} s")
    return served_app["url"]


def post(url, path, **kw):
    return requests.post(f"{url}{path}", timeout=120, **kw)


def same_top_k(a: list[dict], b: list[dict]) -> bool:
    """Same classes in the same order, scores equal up to float32 batch-composition noise."""
    return [c["index"] for c in a] == [c["index"] for c in b] and all(
        abs(x["score"] - y["score"]) < 1e-5 for x, y in zip(a, b)
    )


def test_health_and_readiness(url):
    assert requests.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
    body = requests.get(f"{url}/readyz", timeout=30).json()
    assert body["ready"] is True and set(body["models"]) >= {"minilm", "efficientnet-lite0"}


def test_models_list_labels_demo_weights(url):
    data = {m["id"]: m for m in requests.get(f"{url}/v1/models", timeout=30).json()["data"]}
    assert set(data) == {"minilm", "efficientnet-lite0", "resnet50", "vgg16", "gpt2-tiny-demo", "t5-tiny-demo",
                         "sentiment-tiny-demo", "smollm2-135m"}
    assert data["minilm"]["demo_weights"] is False and data["minilm"]["weights"].startswith("package:")
    for demo in ("resnet50", "vgg16", "gpt2-tiny-demo", "t5-tiny-demo", "sentiment-tiny-demo"):
        assert data[demo]["demo_weights"] is True and data[demo]["weights"].startswith("random")
    assert all(m["ready"] and m["object"] == "model" for m in data.values())


def test_classify_photos_multipart_and_json(url, chelsea_jpeg, coffee_png):
    r = post(url, "/v1/classifications/image", data={"model": "efficientnet-lite0", "top_k": "3"},
             files=[("file", ("chelsea.jpg", chelsea_jpeg, "image/jpeg")),
                    ("file", ("coffee.png", coffee_png, "image/png"))])
    assert r.status_code == 200, r.text
    assert "usage" not in r.json()  # as the README shows: images have no token usage
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1]
    assert CAT_CLASSES & {c["index"] for c in data[0]["top_k"]}
    assert data[1]["top_k"][0]["label"] in ("espresso", "cup")
    r2 = post(url, "/v1/classifications/image",
              json={"model": "efficientnet-lite0", "top_k": 3, "images": [base64.b64encode(coffee_png).decode()]})
    assert r2.status_code == 200
    assert same_top_k(r2.json()["data"][0]["top_k"], data[1]["top_k"])


def test_embeddings_rank_paraphrase_and_base64_matches_float(url):
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply."]
    r = post(url, "/v1/embeddings", json={"model": "minilm", "input": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    e = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    assert e.shape == (3, 384) and body["usage"]["prompt_tokens"] > 0
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3
    b = post(url, "/v1/embeddings", json={"model": "minilm", "input": texts, "encoding_format": "base64"}).json()
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in b["data"]])
    assert np.array_equal(decoded, e)


def test_completion_and_text2text_shapes(url):
    r = post(url, "/v1/completions", json={"model": "gpt2-tiny-demo", "prompt": "Hello there", "max_tokens": 5,
                                           "temperature": 0})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion" and body["demo_weights"] is True
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    r = post(url, "/v1/text2text", json={"model": "t5-tiny-demo", "input": "translate: hello", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["data"][0]["index"] == 0


@pytest.mark.parametrize("path,kwargs,status,param", [
    ("/v1/embeddings", {"json": {"model": "nope", "input": "x"}}, 404, "model"),
    ("/v1/embeddings", {"json": {"model": "resnet50", "input": "x"}}, 400, "model"),
    ("/v1/embeddings", {"json": {"model": "minilm", "input": "x", "bogus": 1}}, 400, "bogus"),
    ("/v1/embeddings", {"json": {"model": "minilm", "input": ""}}, 400, "input"),
    ("/v1/embeddings", {"json": {"model": "minilm", "input": 5}}, 400, "input"),
    ("/v1/embeddings", {"json": {"model": "minilm", "input": "x", "dimensions": 8}}, 400, "dimensions"),
    ("/v1/embeddings", {"data": "{not json", "headers": {"content-type": "application/json"}}, 400, None),
    ("/v1/embeddings", {"json": {"model": "minilm", "input": ["x"] * 257}}, 413, "input"),
    ("/v1/completions", {"json": {"model": "gpt2-tiny-demo", "prompt": "hi", "temperature": -1}}, 400, "temperature"),
    ("/v1/completions", {"json": {"model": "gpt2-tiny-demo", "prompt": "hi " * 600}}, 400, "prompt"),
    ("/v1/completions", {"json": {"model": "gpt2-tiny-demo", "prompt": "hi", "max_tokens": -1}}, 400, "max_tokens"),
    ("/v1/classifications/image", {"data": "x", "headers": {"content-type": "text/plain"}}, 415, None),
    ("/v1/classifications/image", {"json": {"model": "vgg16", "images": ["%%%"]}}, 400, "images[0]"),
    ("/v1/classifications/image", {"data": {"model": "vgg16"}, "files": [("other", ("a.txt", b"x"))]}, 400, "file"),
    ("/v1/classifications/image", {"files": [("file", ("a.jpg", b"hello", "image/jpeg"))],
                                   "data": {"model": "vgg16"}}, 400, "images[0]"),
])
def test_errors_have_one_shape(url, path, kwargs, status, param):
    r = post(url, path, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_separate_ray_job_gets_same_answer_as_http(served_app, url, chelsea_jpeg, tmp_path):
    image = tmp_path / "chelsea.jpg"
    image.write_bytes(chelsea_jpeg)
    script = textwrap.dedent(f"""
        import json, ray
        from ray import serve
        ray.init(address={served_app['address']!r}, namespace="serve", log_to_driver=False)
        h = serve.get_app_handle("maas")
        img = open({str(image)!r}, "rb").read()
        out = {{
            "image": h.classify_images.remote({{"model": "efficientnet-lite0", "images": [img], "top_k": 5}}).result(),
            "embed": h.embed.remote({{"model": "minilm", "input": ["hello world"]}}).result(),
        }}
        print("RESULT " + json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=served_app["env"], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    job = json.loads(line[len("RESULT "):])
    http_image = post(url, "/v1/classifications/image", data={"model": "efficientnet-lite0", "top_k": "5"},
                      files=[("file", ("c.jpg", chelsea_jpeg, "image/jpeg"))]).json()
    http_embed = post(url, "/v1/embeddings", json={"model": "minilm", "input": ["hello world"]}).json()
    assert same_top_k(job["image"]["data"][0]["top_k"], http_image["data"][0]["top_k"])
    assert np.allclose(job["embed"]["data"][0]["embedding"], http_embed["data"][0]["embedding"], atol=1e-6)


def _png_header_claiming(width: int, height: int) -> bytes:
    """A real 1×1 PNG whose IHDR is rewritten to declare width × height: a decompression bomb."""
    import struct
    import zlib

    from PIL import Image

    from tests.conftest import encode

    png = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    png[16:24] = struct.pack(">II", width, height)  # IHDR data starts after signature + length + type
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


@pytest.mark.parametrize("path,kwargs,status", [
    ("/v1/embeddings", {"data": '{"model": "minilm", "input": "\\ud800"}',
                        "headers": {"content-type": "application/json"}}, 400),
    ("/v1/embeddings", {"data": b'{"model": "minilm", "input": "\xff\xfe"}',
                        "headers": {"content-type": "application/json"}}, 400),
    ("/v1/completions", {"json": {"model": "gpt2-tiny-demo", "prompt": "hi", "seed": 10**30}}, 400),
    ("/v1/embeddings", {"data": "input=x", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 415),
    ("/v1/completions", {"data": "hi", "headers": {"content-type": "text/plain"}}, 415),
    ("/v1/classifications/image", {"data": {"model": "efficientnet-lite0"},
                                   "files": [("file", ("bomb.png", _png_header_claiming(100_000, 100_000)))]}, 413),
    ("/v1/classifications/image", {"data": {"model": "efficientnet-lite0"},
                                   "files": [("file", ("x.png", b"x"))] * 40}, 413),
    ("/v1/text2text", {"json": {"model": "t5-tiny-demo", "input": ""}}, 400),
    ("/v1/completions", {"json": {"model": "gpt2-tiny-demo", "prompt": ["a"] * 9, "n": 2}}, 413),
])
def test_hostile_inputs_get_clear_4xx(url, path, kwargs, status):
    r = post(url, path, **kwargs)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_framework_errors_use_our_shape(url):
    r = requests.get(f"{url}/v1/embeddings", timeout=10)
    assert r.status_code == 405 and "not allowed" in r.json()["error"]["message"]
    r = requests.get(f"{url}/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and "no route" in r.json()["error"]["message"]


def test_tiny_temperature_is_greedy_and_stop_counts_tokens(url):
    greedy = post(url, "/v1/completions", json={"model": "gpt2-tiny-demo", "prompt": "Hello", "max_tokens": 5,
                                                "temperature": 0}).json()
    tiny = post(url, "/v1/completions", json={"model": "gpt2-tiny-demo", "prompt": "Hello", "max_tokens": 5,
                                              "temperature": 1e-45})
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == greedy["choices"][0]["text"]
    first_char = greedy["choices"][0]["text"][:1]
    stopped = post(url, "/v1/completions", json={"model": "gpt2-tiny-demo", "prompt": "Hello", "max_tokens": 5,
                                                 "temperature": 0, "stop": first_char}).json()
    assert stopped["choices"][0] == {"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}
    assert stopped["usage"]["completion_tokens"] == 1
    newline = post(url, "/v1/chat/completions", json={"model": "gpt2-tiny-demo", "max_tokens": 8, "temperature": 0,
                                                      "messages": [{"role": "user", "content": "Hi"}], "stop": ["\n"]})
    assert newline.status_code == 200, newline.text


def test_seeded_sampling_repeats_under_concurrency(served_app):
    from ray import serve

    app = serve.get_app_handle("maas")
    body = {"model": "gpt2-tiny-demo", "prompt": "Once", "max_tokens": 8, "temperature": 1.0, "seed": 42}
    alone = app.complete.remote(body).result()["choices"][0]["text"]
    noise = [app.complete.remote({**body, "seed": None, "prompt": "x"}) for _ in range(4)]
    many = [app.complete.remote(body) for _ in range(6)]
    assert all(r.result()["choices"][0]["text"] == alone for r in many)
    assert all(r.result()["choices"] for r in noise)


# ---------------------------------------------------------------------------- what real clients send (issue 16)


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/v1/models", "/v2"])
def test_every_get_route_answers_head(url, path):
    got = requests.get(f"{url}{path}", timeout=30)
    head = requests.head(f"{url}{path}", timeout=30)
    assert head.status_code == got.status_code == 200
    assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]


def test_head_on_a_post_route_is_405_with_allow(url):
    r = requests.head(f"{url}/v1/embeddings", timeout=10)
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    r = requests.get(f"{url}/v1/embeddings", timeout=10)
    assert r.status_code == 405 and "POST" in r.headers["allow"]


def test_media_types_are_case_insensitive(url, chelsea_jpeg):
    r = post(url, "/v1/classifications/image", data=json.dumps(
        {"model": "efficientnet-lite0", "top_k": 1, "images": [base64.b64encode(chelsea_jpeg).decode()]}),
        headers={"Content-Type": "Application/JSON"})
    assert r.status_code == 200, r.text
    boundary = "XyZ"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nefficientnet-lite0\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + chelsea_jpeg + f"\r\n--{boundary}--\r\n".encode()
    r = post(url, "/v1/classifications/image", data=body,
             headers={"Content-Type": f"Multipart/Form-Data; boundary={boundary}"})
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["top_k"][0]["index"] in CAT_CLASSES
    r = post(url, "/v1/embeddings", data=json.dumps({"model": "minilm", "input": "x"}),
             headers={"Content-Type": "APPLICATION/JSON; Charset=UTF-8"})
    assert r.status_code == 200, r.text


def test_compressed_request_bodies_get_415_with_accept_encoding(url):
    import gzip

    r = post(url, "/v1/embeddings", data=gzip.compress(json.dumps({"model": "minilm", "input": "x"}).encode()),
             headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert r.status_code == 415 and r.headers["accept-encoding"] == "identity"
    assert "uncompressed" in r.json()["error"]["message"]


def test_openai_values_clients_send(url):
    r = post(url, "/v1/completions", json={"model": "gpt2-tiny-demo", "prompt": "Hello", "max_tokens": 5,
                                           "temperature": 0.8, "top_p": 0})
    greedy = post(url, "/v1/completions", json={"model": "gpt2-tiny-demo", "prompt": "Hello", "max_tokens": 5,
                                                "temperature": 0}).json()
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy["choices"][0]["text"]
    r = post(url, "/v1/embeddings", json={"model": "minilm", "input": "x", "encoding_format": None})
    assert r.status_code == 200 and isinstance(r.json()["data"][0]["embedding"], list)
    r = post(url, "/v1/completions", json={"model": "gpt2-tiny-demo", "prompt": "Hello", "max_tokens": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "" and r.json()["usage"]["completion_tokens"] == 0
    r = post(url, "/v1/completions", json={"model": "gpt2-tiny-demo", "prompt": "Hello", "n": 20})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "n ≤ 8" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------- claims the README makes (issue 17)


def test_text_classification_route_handle_and_v2_labels(url):
    from ray import serve

    body = {"model": "sentiment-tiny-demo", "input": ["a great film", "a dull film"], "top_k": 2}
    r = post(url, "/v1/classifications/text", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["demo_weights"] is True and [d["index"] for d in out["data"]] == [0, 1]
    for d in out["data"]:
        assert {c["label"] for c in d["top_k"]} == {"negative", "positive"}
        assert abs(sum(c["score"] for c in d["top_k"]) - 1.0) < 1e-5  # softmax over both labels
    assert out["usage"]["prompt_tokens"] > 0
    via_handle = serve.get_app_handle("maas").classify_text.remote(body).result()
    assert [[c["label"] for c in d["top_k"]] for d in via_handle["data"]] == \
        [[c["label"] for c in d["top_k"]] for d in out["data"]]
    v2 = post(url, "/v2/models/sentiment-tiny-demo/infer", json={
        "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": body["input"]}],
        "parameters": {"top_k": 1}})
    assert v2.status_code == 200, v2.text
    outputs = {o["name"]: o for o in v2.json()["outputs"]}
    assert outputs["labels"]["data"] == [d["top_k"][0]["label"] for d in out["data"]]
    assert v2.json()["parameters"]["demo_weights"] is True


def test_demo_weights_on_every_response_shape(url):
    chunks = []
    with requests.post(f"{url}/v1/completions", stream=True, timeout=60,
                       json={"model": "gpt2-tiny-demo", "prompt": "x", "max_tokens": 4, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                chunks.append(json.loads(line[6:]))
    assert chunks and all(c["demo_weights"] is True for c in chunks)
    v2 = post(url, "/v2/models/minilm/infer", json={
        "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]})
    assert v2.json()["parameters"]["demo_weights"] is False
    meta = requests.get(f"{url}/v2/models/vgg16", timeout=30).json()
    assert meta["parameters"]["demo_weights"] is True


def test_completions_accept_the_hints_the_readme_lists(url):
    r = post(url, "/v1/completions", json={"model": "gpt2-tiny-demo", "prompt": "x", "max_tokens": 2,
                                           "parallel_tool_calls": True, "user": "u", "store": False})
    assert r.status_code == 200, r.text


def test_token_arrays_truncate_like_text_keeping_the_closing_token(url, minilm_tokenizer):
    long_text = "word " * 400
    ids = minilm_tokenizer(long_text)["input_ids"]
    assert len(ids) > 256 and ids[-1] == minilm_tokenizer.sep_token_id
    as_text = post(url, "/v1/embeddings", json={"model": "minilm", "input": long_text}).json()
    as_ids = post(url, "/v1/embeddings", json={"model": "minilm", "input": ids}).json()
    assert as_text["usage"]["prompt_tokens"] == as_ids["usage"]["prompt_tokens"] == 256
    assert np.allclose(as_text["data"][0]["embedding"], as_ids["data"][0]["embedding"], atol=1e-5)


def test_request_ids_reach_the_logs(served_app, url):
    import glob
    import os
    import uuid

    import ray

    from tests.conftest import wait_for

    rid = f"rid-{uuid.uuid4().hex}"
    r = requests.get(f"{url}/v1/models", headers={"X-Request-Id": rid}, timeout=30)
    assert r.status_code == 200 and r.headers["x-request-id"] == rid
    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")

    def logged():
        return any(rid.encode() in open(p, "rb").read() for p in glob.glob(os.path.join(logs, "**", "*"),
                                                                         recursive=True) if os.path.isfile(p))

    wait_for(logged, 30, "the request id in the ingress's access log", 0.5)
