"""Readiness tells the truth about the replicas that exist now: it turns 503 within a second of a
model losing its last replica, and back to 200 when Serve's replacement serves (a side app with
one small model, so the session's app keeps its replicas)."""

import time

import pytest
import requests

from tests.conftest import one_model_args, side_app, wait_for

pytestmark = pytest.mark.integration


def _status(url: str) -> int:
    try:
        return requests.get(f"{url}/readyz", timeout=5).status_code
    except requests.RequestException:
        return -1


def test_readiness_follows_the_last_replica(served_app):
    import ray
    from ray.util.state import list_actors

    args = one_model_args("sentiment-tiny-demo", "ready-probe")
    with side_app(served_app, args, "readiness") as url:
        assert _status(url) == 200
        [replica] = list_actors(filters=[("class_name", "=", "ServeReplica:readiness:ready-probe"),
                                         ("state", "=", "ALIVE")])
        ray.kill(ray.get_actor(replica.name, namespace=replica.ray_namespace), no_restart=True)
        killed = time.monotonic()
        wait_for(lambda: _status(url) == 503, 5, "readiness 503 after the last replica died", 0.05)
        turned_s = time.monotonic() - killed
        body = requests.get(f"{url}/readyz", timeout=5).json()
        assert body["models"] == {"ready-probe": False} and body["reasons"]["ready-probe"]
        wait_for(lambda: _status(url) == 200, 180, "readiness back once the replacement serves", 0.5)
        back_s = time.monotonic() - killed
        r = requests.post(f"{url}/v1/classifications/text", json={"model": "ready-probe", "input": "x"}, timeout=60)
        assert r.status_code == 200
        print(f"\nreadiness: 503 after {turned_s:.2f} s, 200 again after {back_s:.1f} s")
        assert turned_s < 1.0
