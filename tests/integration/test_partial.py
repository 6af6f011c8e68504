"""A model whose weights path does not exist, and one whose int8 variant misses its fidelity guard,
each fail their own deployment with a message naming the model and the cause (the path; the
measured numbers); the rest of the app — here EfficientNet-Lite0 on ONNX Runtime — comes up and
serves, and readiness and /v1/models say which model is not ready and why, and what the served
variant's fidelity is."""

import time

import pytest
import requests
from ray import serve

from maas.app import build_app
from tests.conftest import one_model_args, wait_for
from tests.unit.test_models import CAT_CLASSES

pytestmark = pytest.mark.integration


def test_missing_weights_fail_one_model_only(served_app, chelsea_jpeg):
    args = one_model_args("efficientnet-lite0", "effnet-ok")
    good = dict(args["models"][0], runtime="onnxruntime")  # exported at start, guarded, served
    strict = dict(good, name="strict-int8", precision="int8",
                  fidelity={"min_top1_agreement": 1.0, "min_top5_overlap": 1.0})  # int8 loses some top-5 classes
    bad = {"name": "broken-resnet", "family": "image-classifier", "tasks": ["image-classification"],
           "library": "torchvision", "architecture": "resnet18", "resources": {"num_cpus": 0.1},
           "weights": {"source": "torchvision", "path": "/nonexistent/resnet18.pth"},
           "preprocessing": {"resize_px": 256, "crop_px": 224}}
    args["models"] = [good, bad, strict]
    url = f"{served_app['url']}/partial"
    try:
        # Serve reports the failed deployment by name; the other deployments keep running.
        with pytest.raises(RuntimeError, match=r"Deploying application partial failed"):
            serve.run(build_app(args), name="partial", route_prefix="/partial")
        def reason():
            r = requests.get(f"{url}/readyz", timeout=30)
            why = r.json().get("reasons", {}).get("broken-resnet", "")
            guard = r.json().get("reasons", {}).get("strict-int8", "")
            return r.status_code == 503 and "model 'broken-resnet'" in why and "fidelity guard" in guard and r.json()

        body = wait_for(reason, 240, "readiness naming the broken model", interval_s=2)
        assert body["models"] == {"effnet-ok": True, "broken-resnet": False, "strict-int8": False}
        assert "onnxruntime int8 fails its fidelity guard" in body["reasons"]["strict-int8"]
        assert "top5_overlap" in body["reasons"]["strict-int8"] and "< fidelity.min_top5_overlap 1.0" in body["reasons"]["strict-int8"]
        assert "model 'broken-resnet'" in body["reasons"]["broken-resnet"]
        assert "/nonexistent/resnet18.pth" in body["reasons"]["broken-resnet"]
        cards = {m["id"]: m for m in requests.get(f"{url}/v1/models", timeout=30).json()["data"]}
        assert cards["effnet-ok"]["ready"] and not cards["broken-resnet"]["ready"]
        assert "/nonexistent/resnet18.pth" in cards["broken-resnet"]["status_message"]
        r = requests.post(f"{url}/v1/classifications/image", data={"model": "effnet-ok", "top_k": "3"}, timeout=60,
                          files=[("file", ("c.jpg", chelsea_jpeg, "image/jpeg"))])
        assert r.status_code == 200
        assert CAT_CLASSES & {c["index"] for c in r.json()["data"][0]["top_k"]}  # the torch-free replica sees a cat
        runtime = wait_for(lambda: requests.get(f"{url}/v1/models/effnet-ok", timeout=30).json()["runtime"].get("fidelity")
                           and requests.get(f"{url}/v1/models/effnet-ok", timeout=30).json()["runtime"], 30,
                           "the served variant's fidelity in its card")
        assert (runtime["name"], runtime["precision"]) == ("onnxruntime", "fp32")
        assert runtime["fidelity"]["top1_agreement"] >= 0.97 and runtime["fidelity"]["probe_items"] == 32
        assert runtime["torch_imported"] is False  # an onnxruntime replica runs without torch
        # A request for the model without a replica is answered at once, not held in Serve's router
        # until the call timeout (30 s): 503 with a Retry-After and the reason.
        started = time.monotonic()
        r = requests.post(f"{url}/v1/classifications/image", data={"model": "broken-resnet"}, timeout=60,
                          files=[("file", ("c.jpg", chelsea_jpeg, "image/jpeg"))])
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        assert "broken-resnet" in r.json()["error"]["message"]
        assert time.monotonic() - started < 15
    finally:
        serve.delete("partial", _blocking=True)
