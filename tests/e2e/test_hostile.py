"""A corpus of bad and awkward inputs, generated here, against every route it applies to (HTTP and
handles). Every answer is a clear 4xx or a right answer, no replica dies, and request payloads
never reach the logs."""

import base64
import collections
import io
import uuid

import numpy as np
import pytest
import requests
from PIL import Image
from skimage import data

from tests.conftest import encode, wait_for
from tests.e2e.test_http import _png_header_claiming
from tests.unit.test_models import CAT_CLASSES

pytestmark = pytest.mark.e2e

MARKER = f"payload-marker-{uuid.uuid4().hex}"
IMG = "efficientnet-lite0"


def _images() -> dict[str, tuple[bytes, int]]:
    """name → (file bytes, expected status)."""
    chelsea = data.chelsea()
    gif = io.BytesIO()
    frames = [Image.fromarray(chelsea), Image.fromarray(chelsea[::-1])]
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    palette = Image.fromarray(chelsea).convert("P")
    upright = Image.fromarray(chelsea)
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "zero bytes": (b"", 400),
        "truncated jpeg": (encode(chelsea, "JPEG")[:3000], 400),
        "text named .jpg": (b"just some text\n" * 10, 400),
        "html page": (b"<!doctype html><html><body>hi</body></html>", 400),
        "png claiming 40000x40000": (_png_header_claiming(40_000, 40_000), 413),
        "1x1": (encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), 200),
        "20000x10": (encode(Image.new("RGB", (20_000, 10), (10, 200, 10)), "PNG"), 200),
        "animated gif": (gif.getvalue(), 200),
        "cmyk jpeg": (encode(upright.convert("CMYK"), "JPEG", quality=95), 200),
        "16-bit png": (encode(Image.fromarray(data.camera().astype(np.uint16) * 257), "PNG"), 200),
        "palette png with transparency": (encode(palette, "PNG", transparency=0), 200),
        "exif orientation 6": (encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95,
                                      exif=exif.tobytes()), 200),
    }


def _json_cases() -> list[tuple[str, str, dict, int]]:
    """(name, path, JSON body, expected status)."""
    long_text = ("word " * 3000) + MARKER
    return [
        ("empty string", "/v1/embeddings", {"model": "minilm", "input": ""}, 400),
        ("empty list", "/v1/embeddings", {"model": "minilm", "input": []}, 400),
        ("10000 items", "/v1/embeddings", {"model": "minilm", "input": ["x"] * 10_000}, 413),
        ("text beyond max length (truncated)", "/v1/embeddings", {"model": "minilm", "input": long_text}, 200),
        ("prompt beyond context (rejected)", "/v1/completions", {"model": "gpt2-tiny-demo", "prompt": long_text}, 400),
        ("NUL bytes", "/v1/embeddings", {"model": "minilm", "input": f"a\x00b {MARKER}"}, 200),
        ("rtl + combining", "/v1/embeddings", {"model": "minilm", "input": "שלום עולם e\u0301\u0302"}, 200),
        ("emoji + chinese", "/v1/embeddings", {"model": "minilm", "input": "模型服务 🚀🔥"}, 200),
        ("lone surrogate", "/v1/embeddings", {"model": "minilm", "input": "\ud800"}, 400),
        ("negative top_k", "/v1/classifications/image", {"model": IMG, "images": [], "top_k": -1}, 400),
        ("huge top_k", "/v1/classifications/text", {"model": "minilm", "input": "x", "top_k": 10**9}, 400),
        ("max_tokens -1", "/v1/completions", {"model": "gpt2-tiny-demo", "prompt": "hi", "max_tokens": -1}, 400),
        ("max_tokens beyond context", "/v1/completions",
         {"model": "gpt2-tiny-demo", "prompt": "hi", "max_tokens": 100_000}, 400),
        ("temperature < 0", "/v1/completions", {"model": "gpt2-tiny-demo", "prompt": "hi", "temperature": -0.5}, 400),
        ("unknown model", "/v1/completions", {"model": "nope", "prompt": MARKER}, 404),
        ("task the model lacks", "/v1/text2text", {"model": "minilm", "input": MARKER}, 400),
        ("wrong JSON types", "/v1/completions", {"model": "gpt2-tiny-demo", "prompt": {"a": 1}}, 400),
        ("wrong base64", "/v1/classifications/image", {"model": IMG, "images": ["***"]}, 400),
        ("normal completion", "/v1/completions", {"model": "gpt2-tiny-demo", "prompt": MARKER, "max_tokens": 4}, 200),
        ("normal chat", "/v1/chat/completions",
         {"model": "gpt2-tiny-demo", "messages": [{"role": "user", "content": MARKER}], "max_tokens": 4}, 200),
        ("normal text2text", "/v1/text2text", {"model": "t5-tiny-demo", "input": MARKER, "max_tokens": 4}, 200),
    ]


def _raw_cases() -> list[tuple[str, str, dict, int]]:
    """(name, path, requests kwargs, expected status) for bodies that aren't JSON objects."""
    return [
        ("invalid JSON", "/v1/embeddings", {"data": b"{nope", "headers": {"content-type": "application/json"}}, 400),
        ("invalid UTF-8", "/v1/embeddings",
         {"data": b'{"model": "minilm", "input": "\xc3\x28"}', "headers": {"content-type": "application/json"}}, 400),
        ("wrong content type", "/v1/embeddings", {"data": MARKER, "headers": {"content-type": "text/plain"}}, 415),
        ("multipart without a file", "/v1/classifications/image", {"files": [("model", (None, IMG))]}, 400),
        ("form-urlencoded to the image route", "/v1/classifications/image", {"data": {"model": IMG}}, 415),
        ("image route, wrong content type", "/v1/classifications/image",
         {"data": b"x", "headers": {"content-type": "application/xml"}}, 415),
    ]


def _replica_actor_ids() -> set[str]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    return {a.actor_id for a in actors if a.class_name.startswith("ServeReplica:maas:")}


def test_corpus_gets_clear_answers_and_nothing_dies(served_app, chelsea_jpeg):
    from ray import serve

    from maas.errors import MaasError

    url = served_app["url"]
    before = _replica_actor_ids()
    assert len(before) == 14  # 12 deployments; minilm and efficientnet-lite0 run 2 replicas each
    statuses: dict[str, int] = {}
    headers = {"Authorization": f"Bearer {MARKER}", "X-Request-Note": MARKER}

    for name, (raw, want) in _images().items():
        r = requests.post(f"{url}/v1/classifications/image", data={"model": IMG, "top_k": "3"}, timeout=120,
                          files=[("file", (f"{name}.jpg", raw, "image/jpeg"))], headers=headers)
        statuses[f"image: {name} (multipart)"] = r.status_code
        assert r.status_code == want, (name, r.text)
        if want != 200:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        r2 = requests.post(f"{url}/v1/classifications/image", timeout=120, headers=headers,
                           json={"model": IMG, "images": [base64.b64encode(raw).decode()], "top_k": 3})
        statuses[f"image: {name} (json)"] = r2.status_code
        assert r2.status_code == want, (name, r2.text)

    for name, path, body, want in _json_cases():
        r = requests.post(f"{url}{path}", json=body, timeout=120, headers=headers)
        statuses[f"{path}: {name}"] = r.status_code
        assert r.status_code == want, (name, r.text)
        if want >= 400:
            err = r.json()["error"]
            assert err["message"] and set(err) == {"message", "type", "param", "code"}

    for name, path, kwargs, want in _raw_cases():
        r = requests.post(f"{url}{path}", timeout=60, **kwargs)
        statuses[f"{path}: {name}"] = r.status_code
        assert r.status_code == want, (name, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    # The same operations through a handle: domain errors by type, never a crash.
    app = serve.get_app_handle("maas")
    handle_cases = [
        (app.embed, ({"model": "minilm", "input": ""},), 400),
        (app.embed, ({"model": "minilm", "input": ["x"] * 10_000},), 413),
        (app.embed, ({"model": "nope", "input": "x"},), 404),
        (app.complete, ({"model": "gpt2-tiny-demo", "prompt": "hi", "temperature": -1},), 400),
        (app.complete, ({"model": "gpt2-tiny-demo", "prompt": "hi", "seed": 2**70},), 400),
        (app.classify_images, ({"model": IMG, "images": [b""]},), 400),
        (app.classify_images, ({"model": IMG, "images": [_png_header_claiming(40_000, 40_000)]},), 413),
        (app.classify_images, ({"model": IMG, "images": ["not base64 (nor bytes)"]},), 400),
        (app.classify_images, ({"model": IMG, "images": [b"\xff", "mixed"]},), 400),
        (app.classify_images, ("efficientnet-lite0",), 400),  # the old positional form: told what to send
        (app.text2text, ({"model": "t5-tiny-demo", "input": []},), 400),
    ]
    for method, args, want in handle_cases:
        with pytest.raises(MaasError) as info:
            method.remote(*args).result()
        statuses[f"handle {args!r:.60}"] = int(info.value.status_code)
        assert info.value.status_code == want

    grouped = collections.Counter(statuses.values())
    print(f"\n{len(statuses)} bad/awkward inputs; statuses: {dict(sorted(grouped.items()))}")
    assert all(s < 500 for s in statuses.values())

    # Every replica that was running still runs, and a normal request still gets the right answer.
    assert _replica_actor_ids() == before
    out = requests.post(f"{url}/v1/classifications/image", data={"model": IMG, "top_k": "3"}, timeout=60,
                        files=[("file", ("c.jpg", chelsea_jpeg, "image/jpeg"))]).json()
    assert CAT_CLASSES & {c["index"] for c in out["data"][0]["top_k"]}


def test_awkward_images_are_right(served_app):
    """EXIF-rotated, CMYK, palette and 16-bit inputs give the answers their upright RGB versions give."""
    url = served_app["url"]
    imgs = _images()

    def top(raw: bytes) -> list[int]:
        r = requests.post(f"{url}/v1/classifications/image", data={"model": IMG, "top_k": "3"}, timeout=60,
                          files=[("file", ("x", raw, "image/jpeg"))])
        return [c["index"] for c in r.json()["data"][0]["top_k"]]

    upright = top(encode(data.chelsea(), "JPEG", quality=95))
    assert top(imgs["exif orientation 6"][0])[0] == upright[0]
    assert top(imgs["cmyk jpeg"][0])[0] in CAT_CLASSES
    assert set(top(imgs["palette png with transparency"][0])) & CAT_CLASSES


def test_payloads_never_reach_the_logs(served_app):
    """After the corpus (which carried MARKER in texts, prompts and headers), no log file of the
    Ray session holds it; request ids are there.

    The test cluster flushes every replica log line at once (conftest sets Serve's request-path
    log buffer to 1), and a self-check proves the search sees the ingress's own lines: a request
    whose ``safety_identifier`` hint is a fresh marker makes the ingress log the *names* of the hints it
    ignores — that line must be found, the marker must not.
    """
    import glob
    import os

    import ray

    hint_marker = f"hint-{uuid.uuid4().hex}"
    requests.post(f"{served_app['url']}/v1/embeddings", json={"model": "minilm", "input": MARKER}, timeout=60)
    r = requests.post(f"{served_app['url']}/v1/embeddings", timeout=60,
                      json={"model": "minilm", "input": "hello", "safety_identifier": hint_marker})
    assert r.status_code == 200
    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")

    def scan():
        hits, ids, hint_lines = [], 0, 0
        for path in glob.glob(os.path.join(logs, "**", "*"), recursive=True):
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    content = f.read()
                if MARKER.encode() in content or hint_marker.encode() in content:
                    hits.append(path)
                ids += content.count(b"POST /v1/")
                hint_lines += content.count(b"ignoring optional OpenAI hint fields ['safety_identifier']")
        return hits, ids, hint_lines

    hits, ids, _ = wait_for(lambda: (lambda out: out if out[2] else None)(scan()), 30,
                            "the ingress's hint line in the session logs", 0.5)
    assert hits == []
    assert ids > 0  # access lines (with request ids) are logged
