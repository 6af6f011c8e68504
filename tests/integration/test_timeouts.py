"""A model call past the ingress timeout ends with 504 + Retry-After, and the generation behind
it stops on the replica (checked on a separate app with a short timeout)."""

import time

import pytest
import requests
import yaml
from ray import serve

from maas.app import build_app
from tests.conftest import LOCAL_CONFIG, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def slow_app(served_app):
    args = yaml.safe_load(LOCAL_CONFIG.read_text())["applications"][0]["args"]
    args["models"] = [m for m in args["models"] if m["name"] == "gpt2-tiny-demo"]
    args["models"][0]["name"] = "gpt-timeout"
    args["ingress"]["model_call_timeout_s"] = 0.3
    serve.run(build_app(args), name="timeouts", route_prefix="/timeouts", blocking=False)
    url = f"{served_app['url']}/timeouts"
    wait_for(lambda: requests.get(f"{url}/readyz", timeout=10).status_code == 200, 180, "timeouts app ready")
    yield url
    serve.delete("timeouts")


def test_timeout_is_504_and_generation_stops(slow_app):
    handle = serve.get_deployment_handle("gpt-timeout", app_name="timeouts")
    before = handle.stats.remote().result()["cancelled_generations"]
    started = time.monotonic()
    r = requests.post(f"{slow_app}/v1/completions", timeout=60,
                      json={"model": "gpt-timeout", "prompt": "x", "max_tokens": 510, "temperature": 0})
    assert r.status_code == 504 and r.headers["retry-after"] == "1"
    assert "did not answer within 0.3 s" in r.json()["error"]["message"]
    assert time.monotonic() - started < 5
    wait_for(lambda: handle.stats.remote().result()["cancelled_generations"] > before, 30,
             "generation stopped on the replica")
