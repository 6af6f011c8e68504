"""A model whose weights path does not exist fails its own deployment with a message naming the
model and the path; the rest of the app comes up and serves, and readiness says which model is
not ready and why."""

import time

import pytest
import requests
from ray import serve

from maas.app import build_app
from tests.conftest import one_model_args, wait_for

pytestmark = pytest.mark.integration


def test_missing_weights_fail_one_model_only(served_app, chelsea_jpeg):
    args = one_model_args("efficientnet-lite0", "effnet-ok")
    good = args["models"][0]
    bad = {"name": "broken-resnet", "family": "image-classifier", "tasks": ["image-classification"],
           "library": "torchvision", "architecture": "resnet18", "resources": {"num_cpus": 0.1},
           "weights": {"source": "torchvision", "path": "/nonexistent/resnet18.pth"},
           "preprocessing": {"resize_px": 256, "crop_px": 224}}
    args["models"] = [good, bad]
    url = f"{served_app['url']}/partial"
    try:
        # Serve reports the failed deployment by name; the other deployments keep running.
        with pytest.raises(RuntimeError, match=r"Deploying application partial failed.*broken-resnet"):
            serve.run(build_app(args), name="partial", route_prefix="/partial")
        def reason():
            r = requests.get(f"{url}/readyz", timeout=30)
            why = r.json().get("reasons", {}).get("broken-resnet", "")
            return r.status_code == 503 and "model 'broken-resnet'" in why and r.json()

        body = wait_for(reason, 240, "readiness naming the broken model", interval_s=2)
        assert body["models"] == {"effnet-ok": True, "broken-resnet": False}
        assert "model 'broken-resnet'" in body["reasons"]["broken-resnet"]
        assert "/nonexistent/resnet18.pth" in body["reasons"]["broken-resnet"]
        cards = {m["id"]: m for m in requests.get(f"{url}/v1/models", timeout=30).json()["data"]}
        assert cards["effnet-ok"]["ready"] and not cards["broken-resnet"]["ready"]
        assert "/nonexistent/resnet18.pth" in cards["broken-resnet"]["status_message"]
        r = requests.post(f"{url}/v1/classifications/image", data={"model": "effnet-ok", "top_k": "1"}, timeout=60,
                          files=[("file", ("c.jpg", chelsea_jpeg, "image/jpeg"))])
        assert r.status_code == 200
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
