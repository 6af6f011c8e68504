"""Explanations with real weights on the session's app: Grad-CAM of EfficientNet-Lite0 on a photo
with the cat on the left and the coffee on the right, token attributions of MiniLM's similarity,
faithfulness against random masks, the v2 route and handles, and the concurrency bound."""

import base64
import io
import threading

import numpy as np
import pytest
import requests
from PIL import Image

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cat_and_coffee() -> bytes:
    """448 × 224: scikit-image's chelsea (a tabby) on the left half, its coffee (an espresso) on the right."""
    from skimage import data

    img = Image.new("RGB", (448, 224))
    img.paste(Image.fromarray(data.chelsea()).resize((224, 224)), (0, 0))
    img.paste(Image.fromarray(data.coffee()).resize((224, 224)), (224, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def explain(url, image: bytes, **fields):
    return requests.post(f"{url}/v1/explanations/image", timeout=120,
                         data={"model": "efficientnet-lite0", **{k: str(v) for k, v in fields.items()}},
                         files=[("file", ("pair.png", image, "image/png"))])


def left_share(grid) -> float:
    g = np.asarray(grid, dtype=np.float64)
    return float(g[:, : g.shape[1] // 2].sum() / g.sum())


@pytest.mark.parametrize("target, side", [("tabby", "left"), ("espresso", "right")])
def test_grad_cam_points_at_the_object_and_beats_random_masks(served_app, cat_and_coffee, target, side):
    for seed in range(3):
        r = explain(served_app["url"], cat_and_coffee, target=target, seed=seed, overlay=seed == 0)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["target"]["label"] == target and body["method"] == "grad-cam"
        assert body["image_size"] == [448, 224] and body["heatmap"]["cols"] == 16 and body["heatmap"]["rows"] == 8
        share = left_share(body["heatmap"]["grid"])
        assert (share if side == "left" else 1 - share) >= 0.8, (target, share)
        f = body["faithfulness"]
        assert f["drop_top"] > f["drop_random"] and f["score"] > 0, f
        box = body["regions"][0]["box"]
        centre = (box[0] + box[2]) / 2
        assert (centre < 224) == (side == "left"), body["regions"]
        if seed == 0:
            png = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
            assert png.size == (448, 224)


def test_served_view_maps_back_through_the_crop(served_app, cat_and_coffee):
    body = explain(served_app["url"], cat_and_coffee, target="tabby", view="served", overlay=False).json()
    grid = np.asarray(body["heatmap"]["grid"])
    # resize 224 -> 256 makes 512 × 256; the 224 crop covers original x 126..322: columns 0-3 and 12-15 see nothing
    assert body["heatmap"]["covers_box"][0] == pytest.approx(126, abs=1)
    assert grid[:, :4].sum() == 0 and grid[:, 12:].sum() == 0 and grid.sum() > 0


def test_text_similarity_attributes_fox(served_app):
    r = requests.post(f"{served_app['url']}/v1/explanations/text", timeout=120, json={
        "model": "minilm", "input": ["The quick brown fox jumps over the lazy dog", "a fox"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["kind"] == "similarity" and 0 < body["similarity"] < 1
    first = body["texts"][0]
    best = max((t for t in first["tokens"] if not t["special"]), key=lambda t: t["attribution"])
    assert best["token"] == "fox"
    assert first["text"][best["start"]:best["end"]] == "fox"
    assert first["faithfulness"]["drop_top"] > first["faithfulness"]["drop_random"]


def test_text_classification_and_bad_requests(served_app):
    url = served_app["url"]
    r = requests.post(f"{url}/v1/explanations/text", timeout=60,
                      json={"model": "sentiment-tiny-demo", "input": "What a wonderful film", "target": "positive"})
    assert r.status_code == 200 and r.json()["target"]["label"] == "positive" and r.json()["demo_weights"] is True
    bad = [
        ({"model": "minilm", "input": "one text"}, "does not offer text-classification"),
        ({"model": "sentiment-tiny-demo", "input": ["a", "b"]}, "does not offer embeddings"),
        ({"model": "sentiment-tiny-demo", "input": "x", "target": "joyful"}, "not a label"),
        ({"model": "minilm", "input": ["a", "b", "c"]}, "one text"),
    ]
    for body, message in bad:
        r = requests.post(f"{url}/v1/explanations/text", timeout=60, json=body)
        assert r.status_code in (400, 404) and message in r.json()["error"]["message"], (body, r.text)
    r = requests.post(f"{url}/v1/explanations/image", timeout=60, data={"model": "efficientnet-lite0",
                      "target": "tabbby"}, files=[("file", ("x.png", b"not an image", "image/png"))])
    assert r.status_code == 400
    r = requests.post(f"{url}/v1/explanations/image", timeout=60, data={"model": "efficientnet-lite0", "topk": "3"},
                      files=[("file", ("x.png", b"not an image", "image/png"))])
    assert r.status_code == 400 and "unknown form field(s) ['topk']" in r.json()["error"]["message"]


def test_v2_explain_and_handles(served_app, cat_and_coffee):
    from ray import serve

    url = served_app["url"]
    pixels = np.asarray(Image.open(io.BytesIO(cat_and_coffee)).convert("RGB"))
    body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, *pixels.shape],
                        "data": pixels.reshape(-1).tolist()}], "parameters": {"target": "espresso"}}
    r = requests.post(f"{url}/v2/models/efficientnet-lite0/explain", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["heatmap"]["shape"] == [8, 16] and out["target_label"]["data"] == ["espresso"]
    heat = np.asarray(out["heatmap"]["data"]).reshape(8, 16)
    assert 1 - left_share(heat) >= 0.8
    assert r.json()["parameters"]["drop_top"] > r.json()["parameters"]["drop_random"]
    text = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a fox", "the fox"]}]}
    r = requests.post(f"{url}/v2/models/minilm/explain", json=text, timeout=120)
    assert r.status_code == 200 and "similarity" in r.json()["parameters"]
    handle = serve.get_app_handle("maas")
    got = handle.explain_image.remote({"model": "efficientnet-lite0", "image": cat_and_coffee, "target": "tabby", "overlay": False}).result(timeout_s=120)
    assert got["target"]["label"] == "tabby" and left_share(got["heatmap"]["grid"]) >= 0.8
    sim = handle.explain_text.remote({"model": "minilm", "input": ["a fox", "a dog"]}).result(timeout_s=120)
    assert sim["kind"] == "similarity"


def test_concurrent_explanations_are_bounded_with_503_and_retry_after(served_app, cat_and_coffee):
    """Each efficientnet-lite0 replica takes 2 at once (max_concurrent_explanations); 12 at once over
    2 replicas must see some 503s with Retry-After and every other answer whole."""
    results = []

    def one():
        r = explain(served_app["url"], cat_and_coffee, overlay=False)
        results.append((r.status_code, r.headers.get("retry-after"), r.json()))

    threads = [threading.Thread(target=one) for _ in range(12)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    codes = sorted(c for c, _, _ in results)
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    assert all(ra for c, ra, _ in results if c == 503)
    assert all("heatmap" in b for c, _, b in results if c == 200)
