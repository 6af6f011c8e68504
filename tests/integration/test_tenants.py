"""Tenants on a real cluster: a side app (``/tenants``) with EfficientNet-Lite0 and the tiny
sentiment demo and a tenants file. Model permissions on every protocol and handles, the request
rate and compute quota with their 429 headers, usage per tenant and for an admin, revocation by
editing the file, and no key in any log file."""

import pytest
import requests
import yaml

from maas.tenants import hash_key
from tests.conftest import LOCAL_CONFIG, side_app, wait_for

pytestmark = pytest.mark.integration

KEY_A, KEY_B, KEY_C, KEY_ADMIN = ("tenant-a-secret-7f3a", "tenant-b-secret-91bc", "tenant-c-secret-02de",
                                  "tenant-ops-secret-5e6f")


def write_tenants(path, revoke_a: bool = False):
    tenants = [
        {"id": "team-a", "keys": [hash_key("replaced" if revoke_a else KEY_A)], "models": ["effnet-*"],
         "requests_per_s": 0.5, "burst": 3},
        {"id": "team-b", "keys": [hash_key(KEY_B)], "priority": "batch"},
        {"id": "team-c", "keys": [hash_key(KEY_C)], "compute_s_per_min": 0.05, "compute_burst_s": 0.05},
        {"id": "ops", "keys": [hash_key(KEY_ADMIN)], "admin": True},
    ]
    path.write_text(yaml.safe_dump({"tenants": tenants}))


@pytest.fixture(scope="module")
def app(served_app, tmp_path_factory):
    path = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    write_tenants(path)
    args = yaml.safe_load(LOCAL_CONFIG.read_text())["applications"][0]["args"]
    models = {m["name"]: m for m in args["models"]}
    args["models"] = [dict(models["efficientnet-lite0"], name="effnet-t"),
                      dict(models["sentiment-tiny-demo"], name="sent-t")]
    args["ingress"]["tenants_file"] = str(path)
    with side_app(served_app, args, "tenants") as url:
        yield {"url": url, "path": path}


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def image(url, key, jpeg, model="effnet-t"):
    return requests.post(f"{url}/v1/classifications/image", headers=auth(key), data={"model": model}, timeout=60,
                         files=[("file", ("c.jpg", jpeg, "image/jpeg"))])


#: A text no log line may hold (requests of every tenant send it, refused ones included).
PROMPT = "good zebra-marker-4c1d prompt"


def text(url, key, model="sent-t"):
    return requests.post(f"{url}/v1/classifications/text", headers=auth(key), json={"model": model, "input": [PROMPT]},
                         timeout=60)


def test_model_permissions_on_every_protocol_and_handles(app, chelsea_jpeg):
    from ray import serve

    from maas.tenants import Forbidden, Unauthorized

    url = app["url"]
    assert image(url, KEY_A, chelsea_jpeg).status_code == 200
    r = text(url, KEY_A)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", r.text
    assert "effnet-*" in r.json()["error"]["message"]
    r = text(url, KEY_A, "auto")  # auto has nothing the key may use for this task
    assert r.status_code == 403, r.text
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["good"]}]}
    r = requests.post(f"{url}/v2/models/sent-t/infer", json=body, headers=auth(KEY_A), timeout=60)
    assert r.status_code == 403 and "may not use model 'sent-t'" in r.json()["error"]
    bad = {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["good"]}]}  # permission before schema
    assert requests.post(f"{url}/v2/models/sent-t/infer", json=bad, headers=auth(KEY_A), timeout=60).status_code == 403
    assert requests.get(f"{url}/v2/models/sent-t", headers=auth(KEY_A), timeout=30).status_code == 403
    listed = requests.get(f"{url}/v1/models", headers=auth(KEY_A), timeout=30).json()["data"]
    assert [m["id"] for m in listed] == ["effnet-t"]  # a tenant lists the models it may use
    assert requests.get(f"{url}/v1/models/sent-t", headers=auth(KEY_A), timeout=30).status_code == 403
    # the repository API is for admin keys (this app has no repository: the admin gets the 404 saying so)
    assert requests.post(f"{url}/v2/repository/index", headers=auth(KEY_B), timeout=30).status_code == 403
    assert requests.post(f"{url}/v2/repository/index", headers=auth(KEY_ADMIN), timeout=30).status_code == 404
    assert requests.get(f"{url}/v1/models", headers=auth("not-a-key"), timeout=30).status_code == 401
    assert text(url, KEY_B).status_code == 200  # team-b may use every model
    handle = serve.get_app_handle("tenants")
    with pytest.raises(Forbidden):
        handle.classify_text.remote({"model": "sent-t", "input": ["good"]}, api_key=KEY_A).result()
    with pytest.raises(Unauthorized):
        handle.classify_text.remote({"model": "sent-t", "input": ["good"]}, api_key="not-a-key").result()
    out = handle.classify_images.remote({"model": "effnet-t", "images": [chelsea_jpeg]}, api_key=KEY_A).result()
    assert out["data"][0]["top_k"]
    # Without a key a handle call is the cluster's own (inside Ray's trust boundary).
    assert handle.classify_text.remote({"model": "sent-t", "input": ["good"]}).result()["data"]


def test_request_rate_answers_429_with_the_ratelimit_fields(app, chelsea_jpeg):
    codes = []
    for _ in range(6):
        r = image(app["url"], KEY_A, chelsea_jpeg)
        codes.append(r.status_code)
        if r.status_code == 429:
            break
    assert codes[-1] == 429, codes
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["ratelimit-policy"] == '"requests";q=3;w=6'
    assert r.headers["ratelimit"].startswith('"requests";r=0;t=')
    err = r.json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"


def test_compute_quota_and_usage(app, chelsea_jpeg):
    url = app["url"]
    codes = []
    for _ in range(40):  # 50 ms of replica time per minute: a few images spend it
        r = image(url, KEY_C, chelsea_jpeg)
        codes.append(r.status_code)
        if r.status_code == 429:
            break
    assert codes[-1] == 429 and set(codes[:-1]) == {200}, codes
    assert "compute quota" in r.json()["error"]["message"] and '"compute"' in r.headers["ratelimit"]
    mine = requests.get(f"{url}/v1/usage", headers=auth(KEY_C), timeout=30).json()["data"]
    assert [u["tenant"] for u in mine] == ["team-c"]
    assert mine[0]["compute_s"] > 0.05 and mine[0]["rejected"]["compute"] >= 1 and mine[0]["items"] == len(codes) - 1
    every = requests.get(f"{url}/v1/usage", headers=auth(KEY_ADMIN), timeout=30).json()["data"]
    assert {u["tenant"] for u in every} == {"team-a", "team-b", "team-c", "ops"}


def test_a_revoked_key_stops_working_without_a_restart(app, chelsea_jpeg):
    url = app["url"]
    assert requests.get(f"{url}/v1/usage", headers=auth(KEY_A), timeout=30).status_code == 200
    write_tenants(app["path"], revoke_a=True)
    try:
        wait_for(lambda: requests.get(f"{url}/v1/usage", headers=auth(KEY_A), timeout=30).status_code == 401, 30,
                 "the revoked key refused", interval_s=0.2)
    finally:
        write_tenants(app["path"])


def test_no_key_or_prompt_in_any_log_file(app):
    import os

    import ray

    root = ray._private.worker.global_worker.node.get_logs_dir_path()
    read = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                data = open(os.path.join(dirpath, f), "rb").read()
            except OSError:
                continue
            read += len(data)
            for secret in (KEY_A, KEY_B, KEY_C, KEY_ADMIN, "zebra-marker-4c1d"):
                assert secret.encode() not in data, (f, secret)
    assert read > 100_000, f"only {read} bytes of logs under {root}"  # the cluster's logs, ingress included
