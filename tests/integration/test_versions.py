"""Model versions on serve_configs/rollout.yaml's real classifiers (EfficientNet-Lite0 as version 1,
Lite2 as version 2) plus a version 3 whose weights path is broken, deployed declaratively (as
`serve deploy` does) as an app `rollout` next to the session's: the 90/10 split by routing key,
pinned addresses on every protocol and handles, promote and rollback under steady load as
Ingress user_config edits (no failed request, no replica restarted), a broken version taking no
traffic, and a refused live policy leaving the previous one in force."""

import collections
import copy
import random
import subprocess
import threading
import time

import pytest
import requests
import yaml

from tests.conftest import BIN, ROOT, encode, wait_for

pytestmark = pytest.mark.integration

APP = "rollout"


def small_jpeg():
    from skimage import data
    from PIL import Image

    return encode(Image.fromarray(data.chelsea()).resize((300, 200)), "JPEG", quality=90)


class Deployer:
    """Deploys the session's app plus the rollout app with one traffic policy, as `serve deploy` does."""

    def __init__(self, served_app, dashboard: str):
        self.served_app, self.dashboard = served_app, dashboard
        self.base = yaml.safe_load(served_app["config"].read_text())
        rollout = yaml.safe_load((ROOT / "serve_configs" / "rollout.yaml").read_text())["applications"][0]
        rollout.update(name=APP, route_prefix=f"/{APP}")
        models = rollout["args"]["models"]
        for m in models:
            m["resources"] = {"num_cpus": 0.1}
        broken = copy.deepcopy(models[0])
        broken.update(version="3", weights=dict(broken["weights"], path="models/no-such-file.pth"))
        models.append(broken)
        self.rollout = rollout
        self.path = served_app["config"].with_name("rollout-deploy.yaml")

    def deploy(self, traffic: dict | None) -> float:
        """`serve deploy` of both apps (only the rollout app when traffic is given); seconds it took."""
        cfg = copy.deepcopy(self.base)
        if traffic is not None:
            app = copy.deepcopy(self.rollout)
            ingress = next(d for d in app["deployments"] if d["name"] == "Ingress")
            ingress["user_config"] = {"traffic": traffic}  # its num_replicas: 2 stays (rollout.yaml says why)
            cfg["applications"].append(app)
        self.path.write_text(yaml.safe_dump(cfg))
        started = time.monotonic()
        out = subprocess.run([str(BIN / "serve"), "deploy", "--address", f"http://{self.dashboard}", str(self.path)],
                             env=self.served_app["env"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return time.monotonic() - started


@pytest.fixture(scope="module")
def rollout(served_app):
    import ray

    dashboard = ray._private.worker.global_worker.node.address_info["webui_url"]
    deployer = Deployer(served_app, dashboard)
    deployer.deploy({"imagenet": {"weights": {"1": 90, "2": 10}}})
    url = f"{served_app['url']}/{APP}"

    def ready():
        body = requests.get(f"{url}/readyz", timeout=10).json()
        return body["models"]["imagenet@1"] and body["models"]["imagenet@2"]

    try:
        wait_for(ready, 300, "rollout app versions 1 and 2 ready", interval_s=1.0)
        yield {"url": url, "deploy": deployer.deploy}
    finally:
        deployer.deploy(None)  # the session's app alone: the rollout app is deleted
        wait_for(lambda: requests.get(f"{url}/readyz", timeout=10).status_code == 404, 120, "rollout app deleted")


def applied_everywhere(url: str, seen, what: str) -> dict:
    """Wait until a new traffic policy is in effect on every Ingress replica of the rollout app: ``seen(body)``
    true on the ``/readyz`` body of the replica that answers (so Serve has begun applying it), then the Ingress
    deployment HEALTHY again (Serve reconfigures its two replicas one after the other and reports UPDATING until
    both run the new ``user_config``: a request to the other replica meanwhile follows the old policy).
    Returns the ``/readyz`` body that showed it."""
    from ray import serve

    body = wait_for(lambda: (b := requests.get(f"{url}/readyz", timeout=10).json()) and seen(b) and b, 30,
                    f"{what} applied", interval_s=0.2)

    def healthy():
        app = serve.status().applications.get(APP)
        return app is not None and app.deployments["Ingress"].status == "HEALTHY"
    wait_for(healthy, 60, f"{what} on every Ingress replica", interval_s=0.2)
    return body


def classify(url, model, jpeg, key=None, session=requests):
    headers = {"X-Maas-Routing-Key": key} if key else {}
    return session.post(f"{url}/v1/classifications/image", data={"model": model}, headers=headers, timeout=60,
                        files=[("file", ("p.jpg", jpeg, "image/jpeg"))])


def replica_actor_ids() -> list[str]:
    from ray.util.state import list_actors

    # imagenet_v3 is the deliberately broken version: Serve keeps replacing it, by design.
    return sorted(a.actor_id for a in list_actors(filters=[("state", "=", "ALIVE")], limit=2000)
                  if a.class_name.startswith(f"ServeReplica:{APP}:")
                  and a.class_name != f"ServeReplica:{APP}:imagenet_v3")


def test_models_list_each_version_and_the_default(rollout):
    card = next(c for c in requests.get(f"{rollout['url']}/v1/models", timeout=30).json()["data"]
                if c["id"] == "imagenet")
    versions = {v["version"]: v for v in card["versions"]}
    assert card["version"] == "1" and card["ready"]
    assert versions["1"]["default"] and versions["1"]["weight"] == 90 and versions["2"]["weight"] == 10
    assert "lite0" in versions["1"]["weights"] and "lite2" in versions["2"]["weights"]
    assert versions["3"]["ready"] is False and versions["3"]["weight"] == 0
    one = requests.get(f"{rollout['url']}/v1/models/imagenet", timeout=30)
    assert one.status_code == 200 and one.json()["id"] == "imagenet" and one.json()["version"] == "1"
    pinned = requests.get(f"{rollout['url']}/v1/models/imagenet@2", timeout=30).json()
    assert pinned["id"] == "imagenet@2" and pinned["version"] == "2" and pinned["weight"] == 10
    assert "lite2" in pinned["weights"]
    for bad in ("imagenet@9", "imagenet@"):
        r = requests.get(f"{rollout['url']}/v1/models/{bad}", timeout=30)
        assert r.status_code == 404, (bad, r.text)


def test_200_requests_over_100_keys_split_90_10_and_each_key_sticks(rollout):
    """The split is per key (a hash of it): 100 keys decide the share, 2 requests per key show each
    key sticks to its version (were each request split at random, all 100 keys would agree with
    probability 0.82^100 ≈ 2e-9)."""
    jpeg = small_jpeg()
    keys = [f"user-{i}" for i in range(100)]
    order = [keys[i % 100] for i in range(200)]
    random.Random(0).shuffle(order)
    seen: dict[str, set] = collections.defaultdict(set)
    statuses = collections.Counter()
    lock = threading.Lock()

    def worker(part):
        s = requests.Session()
        for key in part:
            r = classify(rollout["url"], "imagenet", jpeg, key, s)
            with lock:
                statuses[r.status_code] += 1
                seen[key].add(r.headers.get("x-maas-model-version"))

    threads = [threading.Thread(target=worker, args=(order[i::8],)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert statuses == {200: 200}, statuses
    assert all(len(v) == 1 for v in seen.values()), {k: v for k, v in seen.items() if len(v) > 1}
    share = sum(1 for k in keys if seen[k] == {"2"}) / len(keys)
    assert 0.07 <= share <= 0.13, share


def test_pinned_addresses_answer_from_that_version_on_every_protocol(rollout):
    import numpy as np
    from PIL import Image
    from ray import serve

    jpeg = small_jpeg()
    for version in ("1", "2"):
        r = classify(rollout["url"], f"imagenet@{version}", jpeg)
        assert r.status_code == 200, r.text
        assert r.headers["x-maas-model-version"] == version == r.json()["model_version"]
        assert r.json()["model"] == "imagenet"
    pixels = np.asarray(Image.open(__import__("io").BytesIO(jpeg)).convert("RGB"))
    body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, *pixels.shape],
                        "data": pixels.reshape(-1).tolist()}]}
    for version in ("1", "2"):
        r = requests.post(f"{rollout['url']}/v2/models/imagenet/versions/{version}/infer", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["model_version"] == version == r.headers["x-maas-model-version"]
    meta = requests.get(f"{rollout['url']}/v2/models/imagenet", timeout=30).json()
    assert meta["versions"] == ["1", "2", "3"] and meta["parameters"]["default_version"] == "1"
    assert requests.post(f"{rollout['url']}/v2/models/imagenet/versions/9/infer", json=body,
                         timeout=30).status_code == 404
    handle = serve.get_app_handle(APP)
    out = handle.classify_images.remote({"model": "imagenet@2", "images": [jpeg]}).result(timeout_s=60)
    assert out["model_version"] == "2"
    # Lite0 and Lite2 are different networks: their top-1 scores for one photo differ
    s1 = classify(rollout["url"], "imagenet@1", jpeg).json()["data"][0]["top_k"][0]["score"]
    s2 = classify(rollout["url"], "imagenet@2", jpeg).json()["data"][0]["top_k"][0]["score"]
    assert abs(s1 - s2) > 1e-3


def test_promote_and_rollback_under_load_fail_nothing_and_restart_no_replica(rollout):
    jpeg = small_jpeg()
    before = replica_actor_ids()
    log: list[tuple[float, int, str | None]] = []
    failed: list[dict] = []  # every answer that is not a 200: when, status, body, headers
    events: list[tuple[float, str]] = []  # (time, what) of each serve deploy, for the failure message
    stop = threading.Event()
    t0 = time.monotonic()

    def load(i):
        s = requests.Session()
        while not stop.is_set():
            sent = time.monotonic()
            r = classify(rollout["url"], "imagenet", jpeg, f"load-{i}-{sent}", s)
            log.append((time.monotonic(), r.status_code, r.headers.get("x-maas-model-version")))
            if r.status_code != 200:
                failed.append({"sent_s": round(sent - t0, 3), "answered_s": round(time.monotonic() - t0, 3),
                               "status": r.status_code, "body": r.text[:1000], "headers": dict(r.headers)})

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    effect_s = {}
    try:
        wait_for(lambda: len(log) > 20, 60, "steady load running", interval_s=0.1)
        for label, weights, wanted in [("promote", {"1": 0, "2": 100}, "2"), ("rollback", {"1": 100, "2": 0}, "1")]:
            started = time.monotonic()
            events.append((round(started - t0, 3), f"{label} deploy starts"))
            deploy_s = rollout["deploy"]({"imagenet": {"weights": weights}})
            events.append((round(time.monotonic() - t0, 3), f"{label} deploy returned"))

            def only_wanted():
                recent = [v for t, _, v in log if t > time.monotonic() - 0.5]
                return len(recent) >= 4 and set(recent) == {wanted}

            wait_for(only_wanted, 30, f"{label} in effect", interval_s=0.05)
            last_other = max((t for t, _, v in log if t >= started and v != wanted), default=started)
            effect_s[label] = (round(deploy_s, 2), round(last_other - started, 2))
    finally:
        stop.set()
        [t.join() for t in threads]
        rollout["deploy"]({"imagenet": {"weights": {"1": 90, "2": 10}}})
    print("seconds (serve deploy command, last answer from the old version after it started):", effect_s)
    statuses = collections.Counter(status for _, status, _ in log)
    failures = "\n".join(
        f"  {f['status']} sent {f['sent_s']} answered {f['answered_s']} x-request-id "
        f"{f['headers'].get('x-request-id')} content-type {f['headers'].get('content-type')}: {f['body'][:400]}"
        for f in failed)
    assert statuses.keys() == {200}, (f"{dict(statuses)}; every failed request (seconds from the load's start):\n"
                                      f"{failures}\n  deploys: {events}")
    assert replica_actor_ids() == before


def test_a_broken_version_takes_no_traffic_and_readyz_says_so(rollout):
    rollout["deploy"]({"imagenet": {"weights": {"1": 50, "3": 50}}})
    jpeg = small_jpeg()

    try:
        applied_everywhere(rollout["url"], lambda b: b["traffic"]["imagenet"]["3"]["weight"] == 50,
                           "policy 50/50 with version 3")
        versions = {classify(rollout["url"], "imagenet", jpeg, f"u{i}").headers["x-maas-model-version"]
                    for i in range(40)}
        assert versions == {"1"}
        ready = requests.get(f"{rollout['url']}/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["ready"] is True
        assert "version 3 takes no traffic, its share goes to version(s) ['1']" in ready.json()["reasons"]["imagenet@3"]
        pinned = classify(rollout["url"], "imagenet@3", jpeg)
        assert pinned.status_code == 503 and "retry-after" in pinned.headers
    finally:
        rollout["deploy"]({"imagenet": {"weights": {"1": 90, "2": 10}}})


def test_an_invalid_live_policy_is_refused_and_the_previous_one_stands(rollout):
    rollout["deploy"]({"imagenet": {"weights": {"1": 90, "7": 10}}})
    try:
        body = wait_for(lambda: (b := requests.get(f"{rollout['url']}/readyz", timeout=10).json()).get("traffic_error")
                        and b, 30, "refusal visible", interval_s=0.2)
        assert "names version '7'" in body["traffic_error"]
        assert body["traffic"]["imagenet"]["2"]["weight"] == 10
        assert classify(rollout["url"], "imagenet", small_jpeg(), "k").status_code == 200
    finally:
        rollout["deploy"]({"imagenet": {"weights": {"1": 90, "2": 10}}})


def test_shadow_copies_are_compared_and_counted_never_returned(rollout):
    rollout["deploy"]({"imagenet": {"weights": {"1": 100}, "shadow": {"version": "2", "fraction": 1.0}}})
    jpeg = small_jpeg()

    def shadow_counts():
        return requests.get(f"{rollout['url']}/readyz", timeout=10).json()["traffic"]["imagenet"]["2"].get("shadow")

    try:
        applied_everywhere(rollout["url"], lambda b: b["traffic"]["imagenet"]["2"].get("shadow"), "shadow policy")
        answers = [classify(rollout["url"], "imagenet", jpeg, f"s{i}") for i in range(10)]
        assert {r.headers["x-maas-model-version"] for r in answers} == {"1"}  # the shadow never answers
        # Two ingress replicas share the requests and /readyz answers from one of them: poll until it
        # shows comparisons of its share.
        counts = wait_for(lambda: (lambda c: c if c.get("agree", 0) + c.get("disagree", 0) >= 1 else None)(
            shadow_counts()), 30, "shadow comparisons counted", interval_s=0.2)
        assert counts.get("error", 0) == 0 and counts["fraction"] == 1.0
    finally:
        rollout["deploy"]({"imagenet": {"weights": {"1": 90, "2": 10}}})
