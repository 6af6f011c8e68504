"""Model repositories and multiplexed pools on a real cluster: an app `repo` deployed next to the
session's (declaratively, as `serve deploy` does, with two pool replicas) over a repository of real
MiniLM variants the fixture trains (six head-only classifiers, three fine-tuned full checkpoints, one
broken checkpoint) and EfficientNet-Lite0 variants (two heads, one checkpoint in two versions) in
an image-classifier pool. Discovery by poll and by the repository API (tritonclient), load / unload / drain,
the byte budget and affinity, answers from the right variant in mixed batches, a failing load, and
every protocol and handles."""

import concurrent.futures
import copy
import shutil
import subprocess
import pytest
import requests
import yaml

from tests.conftest import BIN, wait_for

pytestmark = pytest.mark.integration

APP = "repo"
POOL = "Pool-minilm-classifiers"
#: A replica's memory (process, torch, the frozen base, then models): generous, so that machines
#: whose replicas start larger still hold a checkpoint; eviction order is tested in tests/unit/test_pool.py.
BUDGET = 1536 * 2**20
WEATHER = "It will rain tomorrow and the storm comes in the afternoon."


def classify(url, model, texts, **kw):
    return requests.post(f"{url}/v1/classifications/text", json={"model": model, "input": texts, **kw}, timeout=60)


@pytest.fixture(scope="module")
def repo(served_app, tmp_path_factory):
    import ray

    from maas.variants import (
        image_pool_spec,
        make_checkpoints,
        make_heads,
        make_image_checkpoints,
        make_image_heads,
        pool_config,
    )

    root = tmp_path_factory.mktemp("repository")
    make_heads(root, 6)
    make_checkpoints(root, 3, steps=2)
    broken = root / "broken"
    shutil.copytree(root / "ckpt-00", broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 4096)  # not safetensors: its load fails
    make_image_heads(root, 2)  # cats, cups
    make_image_checkpoints(root, 1)  # img-ckpt-00: version 1 cats, version 2 cups
    args = pool_config(root, BUDGET, resources={"num_cpus": 0.2}, poll_interval_s=1.0)
    args["pools"].append(image_pool_spec(BUDGET, resources={"num_cpus": 0.2}))
    base = yaml.safe_load(served_app["config"].read_text())
    app = {"name": APP, "route_prefix": f"/{APP}", "import_path": "maas.app:build_app", "args": args,
           "deployments": [{"name": POOL, "num_replicas": 2}]}
    cfg = copy.deepcopy(base)
    cfg["applications"].append(app)
    path = served_app["config"].with_name("repo-deploy.yaml")
    path.write_text(yaml.safe_dump(cfg))
    dashboard = ray._private.worker.global_worker.node.address_info["webui_url"]

    def deploy(config_path):
        out = subprocess.run([str(BIN / "serve"), "deploy", "--address", f"http://{dashboard}", str(config_path)],
                             env=served_app["env"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]

    deploy(path)
    url = f"{served_app['url']}/{APP}"
    wait_for(lambda: requests.get(f"{url}/readyz", timeout=10).status_code == 200
             and requests.get(f"{url}/readyz", timeout=10).json()["ready"], 300, "repo app ready", interval_s=1.0)
    try:
        yield {"url": url, "root": root}
    finally:
        path.write_text(yaml.safe_dump(base))
        deploy(path)
        wait_for(lambda: requests.get(f"{url}/readyz", timeout=10).status_code == 404, 120, "repo app deleted")


def held(pool: str = "minilm-classifiers") -> dict:
    """Replica of ``pool`` → {"pool", "models": {name: bytes}, "bytes"} from the index (the pools' reports)."""
    from ray import serve

    reports = serve.get_deployment_handle("RepositoryIndex", app_name=APP).held.remote().result()
    return {r: h for r, h in reports.items() if h["pool"] == pool}


def test_models_are_listed_and_answer_on_every_protocol_and_handles(repo):
    from ray import serve

    url = repo["url"]
    cards = {c["id"]: c for c in requests.get(f"{url}/v1/models", timeout=30).json()["data"]}
    assert {f"head-{i:02d}" for i in range(6)} | {"ckpt-00", "ckpt-01", "ckpt-02"} <= set(cards)
    assert "broken" in cards  # listed: its failure shows only when it loads
    card = cards["head-03"]
    assert card["deployment"] == POOL and card["repository"]["pool"] == "minilm-classifiers"
    assert card["repository"]["head_only"] and card["tasks"] == ["text-classification"]
    r = classify(url, "head-00", [WEATHER], top_k=2)  # head-00's task: weather or not
    assert r.status_code == 200, r.text
    top = r.json()["data"][0]["top_k"]
    assert top[0]["label"] == "head-00:yes" and {t["label"] for t in top} == {"head-00:yes", "head-00:no"}
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [WEATHER]}]}
    v2 = requests.post(f"{url}/v2/models/ckpt-00/infer", json=body, timeout=60)
    assert v2.status_code == 200, v2.text
    assert v2.json()["outputs"][0]["data"][0] == "ckpt-00:yes"
    out = serve.get_app_handle(APP).classify_text.remote({"model": "ckpt-01", "input": [WEATHER]}).result()
    assert out["data"][0]["top_k"][0]["label"].startswith("ckpt-01:")
    meta = requests.get(f"{url}/v2", timeout=10).json()
    assert "model_repository" in meta["extensions"]
    # auto picks among repository models some replica holds (never one that would load first)
    loaded = wait_for(lambda: {e["name"] for e in requests.post(f"{url}/v2/repository/index", timeout=30).json()
                               if e["loaded_on"]} >= {"head-00", "ckpt-00", "ckpt-01"} and True, 30, "loads reported")
    assert loaded
    auto = classify(url, "auto", [WEATHER])
    assert auto.status_code == 200, auto.text
    held_now = {e["name"] for e in requests.post(f"{url}/v2/repository/index", timeout=30).json() if e["loaded_on"]}
    assert auto.headers["x-maas-routed-model"] in held_now
    # explanations: full checkpoints yes, head-only models say why not
    ex = requests.post(f"{url}/v1/explanations/text", json={"model": "ckpt-00", "input": [WEATHER]}, timeout=120)
    assert ex.status_code == 200, ex.text
    assert ex.json()["target"]["label"] == "ckpt-00:yes"
    ex = requests.post(f"{url}/v1/explanations/text", json={"model": "head-00", "input": [WEATHER]}, timeout=60)
    assert ex.status_code == 400 and "head-only" in ex.json()["error"]["message"]


def test_mixed_concurrent_requests_get_their_own_variants_answers(repo):
    """Heads share one base forward per batch; each item must still go through its own head."""
    names = [f"head-{i:02d}" for i in range(6)] + ["ckpt-00"]
    jobs = [names[i % len(names)] for i in range(42)]
    with concurrent.futures.ThreadPoolExecutor(14) as pool:
        answers = list(pool.map(lambda m: (m, classify(repo["url"], m, [WEATHER, "The striker scored twice."])), jobs))
    for model, r in answers:
        assert r.status_code == 200, (model, r.text)
        labels = {item["top_k"][0]["label"].split(":")[0] for item in r.json()["data"]}
        assert labels == {model}, (model, labels)


def test_byte_budget_eviction_and_affinity(repo):
    url = repo["url"]
    for model in ("ckpt-00", "ckpt-01", "ckpt-02", "ckpt-00", "ckpt-01", "ckpt-02"):
        assert classify(url, model, [WEATHER]).status_code == 200
    # No replica holds more than its budget leaves for models, nor uses more memory than its budget.
    reports = wait_for(lambda: (h := held()) and len(h) == 2 and h, 30, "both pool replicas reported")
    for replica, report in reports.items():
        assert report["bytes"] <= BUDGET - report["baseline_bytes"], (replica, report)
        assert report["rss_bytes"] <= 1.1 * BUDGET, (replica, report)
    # Affinity: once a replica holds a model, its requests go there (Serve's multiplexed routing with
    # the replica's own report); twenty more requests do not load it on the other replica.
    def ckpt02_holders():
        return {e["name"]: e for e in requests.post(f"{url}/v2/repository/index", timeout=30).json()}[
            "ckpt-02"]["loaded_on"]

    holder = wait_for(ckpt02_holders, 10, "ckpt-02 reported loaded")
    assert len(holder) == 1
    for _ in range(20):
        assert classify(url, "ckpt-02", [WEATHER]).status_code == 200
    after = {r: h["models"] for r, h in held().items()}
    assert [r for r, models in after.items() if "ckpt-02" in models] == holder


def test_a_copied_folder_answers_and_a_removed_one_goes_without_redeploy(repo):
    from maas.variants import make_heads

    url, root = repo["url"], repo["root"]
    assert classify(url, "head-09", [WEATHER]).status_code == 404
    make_heads(root / ".incoming", 1, start=9)  # copy beside, then rename: never read half-copied
    (root / ".incoming" / "head-09").rename(root / "head-09")
    r = wait_for(lambda: (r := classify(url, "head-09", [WEATHER])).status_code == 200 and r, 30, "head-09 answers")
    assert r.json()["data"][0]["top_k"][0]["label"].startswith("head-09:")
    shutil.rmtree(root / "head-09")
    wait_for(lambda: classify(url, "head-09", [WEATHER]).status_code == 404, 30, "head-09 gone")
    wait_for(lambda: all("head-09" not in h["models"] for h in held().values()), 30, "head-09 evicted everywhere")


def test_a_failing_load_marks_the_model_not_the_replica(repo):
    url = repo["url"]
    r = classify(url, "broken", [WEATHER])
    assert r.status_code == 503 and "failed to load; POST /v2/repository/index" in r.json()["error"]["message"], r.text
    entry = wait_for(lambda: next(e for e in requests.post(f"{url}/v2/repository/index", timeout=30).json()
                                  if e["name"] == "broken" and e["state"] == "UNAVAILABLE"), 30, "broken marked")
    assert "its load failed" in entry["reason"] and "SafetensorError" in entry["reason"]
    again = classify(url, "broken", [WEATHER])  # refused at the ingress now, with the reason
    msg = again.json()["error"]["message"]
    assert again.status_code == 503 and "(load failed)" in msg and "/v2/repository/index" in msg
    assert str(repo["root"]) not in msg  # the server's paths are for operators (the index), not in a 5xx body
    assert classify(url, "head-01", [WEATHER]).status_code == 200  # the replicas serve on


def test_tritonclient_repository_index_unload_drain_and_load(repo, served_app):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    url = repo["url"]
    client = httpclient.InferenceServerClient(served_app["url"].removeprefix("http://") + f"/{APP}")
    index = {e["name"]: e for e in client.get_model_repository_index()}
    assert index["head-02"]["state"] == "READY" and index["broken"]["name"] == "broken"
    assert classify(url, "head-02", [WEATHER]).status_code == 200
    # Requests in flight when the unload comes finish; new ones are refused with the reason.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        inflight = [pool.submit(classify, url, "head-02", [WEATHER] * 4) for _ in range(16)]
        client.unload_model("head-02")
        codes = [f.result().status_code for f in inflight]
    assert set(codes) <= {200, 503}, codes  # 503 only for those that arrived after the unload
    r = classify(url, "head-02", [WEATHER])
    assert r.status_code == 503 and "unloaded" in r.json()["error"]["message"]
    index = {e["name"]: e for e in client.get_model_repository_index()}
    assert index["head-02"]["state"] == "UNAVAILABLE"
    wait_for(lambda: all("head-02" not in h["models"] for h in held().values()), 30, "head-02 evicted")
    client.load_model("head-02")  # returns once a pool replica has it loaded
    assert classify(url, "head-02", [WEATHER]).status_code == 200
    with pytest.raises(InferenceServerException, match="no model 'nope'"):
        client.load_model("nope")
    with pytest.raises(InferenceServerException, match="not supported"):
        client.load_model("head-02", config='{"backend": "python"}')


def chelsea_jpeg() -> bytes:
    import io

    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def classify_image(url, model, jpeg):
    return requests.post(f"{url}/v1/classifications/image", data={"model": model}, timeout=60,
                         files=[("file", ("cat.jpg", jpeg, "image/jpeg"))])


CATS = {"tabby", "tiger cat", "Egyptian cat"}
CUPS = {"espresso", "cup", "coffee mug", "coffeepot"}


def test_image_pool_heads_checkpoints_and_versions(repo):
    url, jpeg = repo["url"], chelsea_jpeg()
    cards = {c["id"]: c for c in requests.get(f"{url}/v1/models", timeout=30).json()["data"]}
    assert cards["img-head-00"]["deployment"] == "Pool-lite0-classifiers" and cards["img-head-00"]["repository"]["head_only"]
    assert cards["img-ckpt-00"]["version"] == "2"  # the highest version answers for the name
    assert {v["id"] for v in cards["img-ckpt-00"]["versions"]} == {"img-ckpt-00@1", "img-ckpt-00@2"}
    r = classify_image(url, "img-head-00", jpeg)
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["top_k"][0]["label"] in {f"img-head-00:{c}" for c in CATS}
    r = classify_image(url, "img-ckpt-00", jpeg)
    assert r.status_code == 200 and r.headers["x-maas-model-version"] == "2", r.text
    assert r.json()["data"][0]["top_k"][0]["label"].split(":")[1] in CUPS  # version 2 knows only cups
    r = classify_image(url, "img-ckpt-00@1", jpeg)
    assert r.status_code == 200 and r.headers["x-maas-model-version"] == "1", r.text
    assert r.json()["data"][0]["top_k"][0]["label"].split(":")[1] in CATS
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(__import__("io").BytesIO(jpeg)).convert("RGB"))
    body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, *pixels.shape],
                        "data": pixels.reshape(-1).tolist()}]}
    v2 = requests.post(f"{url}/v2/models/img-ckpt-00/versions/1/infer", json=body, timeout=60)
    assert v2.status_code == 200 and v2.json()["model_version"] == "1", v2.text
    assert requests.post(f"{url}/v2/models/img-ckpt-00/versions/7/infer", json=body, timeout=30).status_code == 404
    index = requests.post(f"{url}/v2/repository/index", timeout=30).json()
    assert {("img-ckpt-00", "1"), ("img-ckpt-00", "2")} <= {(e["name"], e["version"]) for e in index}
    # A mixed load of heads and checkpoints: every answer from its own variant.
    jobs = ["img-head-00", "img-head-01", "img-ckpt-00@1", "img-ckpt-00@2"] * 4
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda m: (m, classify_image(url, m, jpeg)), jobs))
    for model, r in answers:
        assert r.status_code == 200, (model, r.text)
        assert r.json()["data"][0]["top_k"][0]["label"].startswith(model.split("@")[0] + ":"), (model, r.text)


def test_an_app_without_repository_says_how_to_add_one(served_app):
    r = requests.post(f"{served_app['url']}/v2/repository/index", timeout=30)
    assert r.status_code == 404 and "repositories:" in r.json()["error"]
