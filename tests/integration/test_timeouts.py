"""A model call past the ingress timeout ends with 504 + Retry-After, and the generation behind
it stops on the replica (checked on a separate app with a short timeout)."""

import time

import pytest
import requests
from ray import serve

from tests.conftest import one_model_args, side_app, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def slow_app(served_app):
    args = one_model_args("gpt2-tiny-demo", "gpt-timeout")
    args["ingress"]["model_call_timeout_s"] = 0.3
    with side_app(served_app, args, "timeouts") as url:
        yield url


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
