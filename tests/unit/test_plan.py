"""Placement planning and the cluster manifests (no Ray)."""

import copy
import json
import os

import pytest
import yaml

from maas.manifest import render
from maas.plan import plan_config
from tests.conftest import ROOT

GPU_CONFIG = ROOT / "serve_configs" / "gpu-cluster.yaml"


@pytest.fixture(scope="module")
def gpu_config() -> dict:
    return yaml.safe_load(GPU_CONFIG.read_text())


def test_gpu_cluster_fits_two_80gib_gpus(gpu_config):
    plan = plan_config(gpu_config, gpus=2, gpu_memory_gib=80, cpus=32)
    assert plan.fits, plan.text()
    gpu_lines = [ln for ln in plan.lines if ln.startswith("GPU ")]
    assert all("1.00 of 1 allocated" in ln for ln in gpu_lines)


def test_too_small_a_node_names_deployments(gpu_config):
    plan = plan_config(gpu_config, gpus=1, gpu_memory_gib=24, cpus=16)
    assert not plan.fits
    assert any(e.startswith("minilm: replica") and "no GPU with room left" in e for e in plan.errors)
    assert any("CPU requests at max replicas total 29 > 16" in e for e in plan.errors)


def test_share_smaller_than_estimate_is_an_error(gpu_config):
    plan = plan_config(gpu_config, gpus=2, gpu_memory_gib=8, cpus=32)
    assert any(e.startswith("vgg16: a replica needs ~2.76 GiB but its share is num_gpus 0.25 × 8 GiB") for e in plan.errors)


def test_override_naming_no_deployment_is_an_error(gpu_config):
    cfg = copy.deepcopy(gpu_config)
    cfg["applications"][0]["deployments"].append({"name": "Tokenizer-typo", "num_replicas": 2})
    plan = plan_config(cfg, gpus=2, gpu_memory_gib=80, cpus=32)
    assert any("'Tokenizer-typo' names no deployment" in e for e in plan.errors)



def _with_entry(config: dict, entry: dict) -> dict:
    cfg = copy.deepcopy(config)
    deployments = cfg["applications"][0]["deployments"]
    deployments[:] = [d for d in deployments if d["name"] != entry["name"]] + [entry]
    return cfg


def test_num_replicas_auto_is_serves_autoscaling_defaults(gpu_config):
    """``num_replicas: auto`` (was a ValueError) plans Serve's default bound; the entry's own
    autoscaling_config fields override it, as Serve merges them."""
    from ray.serve.config import AutoscalingConfig

    from maas.plan import max_replicas

    serve_default = AutoscalingConfig.default().max_replicas
    assert serve_default == 100  # Ray 2.60's default for num_replicas="auto"
    assert max_replicas({"num_replicas": "auto"}) == serve_default
    assert max_replicas({"num_replicas": "auto", "autoscaling_config": {"max_replicas": 3}}) == 3
    assert max_replicas({"autoscaling_config": {"min_replicas": 1}}) == 1  # AutoscalingConfig's own default
    assert max_replicas({"num_replicas": 2}) == 2 and max_replicas({}) == 1

    bounded = plan_config(_with_entry(gpu_config, {"name": "t5-small", "num_replicas": "auto",
                                                   "autoscaling_config": {"min_replicas": 1, "max_replicas": 2}}),
                          gpus=2, gpu_memory_gib=80, cpus=32)
    assert bounded.fits, bounded.text()
    assert any(ln.split()[:2] == ["t5-small", "2"] for ln in bounded.lines), bounded.text()

    unbounded = plan_config(_with_entry(gpu_config, {"name": "t5-small", "num_replicas": "auto"}),
                            gpus=2, gpu_memory_gib=80, cpus=32)
    assert not unbounded.fits
    assert any(ln.split()[:2] == ["t5-small", "100"] for ln in unbounded.lines), unbounded.text()
    assert any("t5-small: num_replicas auto" in ln and "up to 100 replicas" in ln for ln in unbounded.lines)
    assert any("(largest: t5-small)" in e for e in unbounded.errors), unbounded.errors

def test_rayservice_manifest_is_generated_from_the_serve_config():
    committed = (ROOT / "cluster" / "rayservice.yaml").read_text()
    assert render(GPU_CONFIG.relative_to(ROOT)) == committed, "regenerate: python -m maas manifest ..."
    doc = yaml.safe_load(committed)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    assert doc["spec"]["serveConfigV2"] == GPU_CONFIG.read_text()
    cluster = doc["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus = cpus = 0
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus += group["replicas"] * int(limits.get("nvidia.com/gpu", 0))
        cpus += group["replicas"] * int(limits["cpu"])
    # The manifest's totals are a placement the plan accepts.
    plan = plan_config(yaml.safe_load(doc["spec"]["serveConfigV2"]), gpus=gpus, gpu_memory_gib=80,
                       cpus=cpus + int(head["cpu"]))
    assert gpus == 2 and plan.fits, plan.text()


def test_cluster_launcher_file_validates_against_rays_schema():
    import jsonschema
    import ray

    schema = json.load(open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")))
    doc = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    jsonschema.validate(doc, schema)
    gpu_nodes = [t for t in doc["available_node_types"].values() if t["resources"].get("GPU")]
    assert sum(t["resources"]["GPU"] * t["max_workers"] for t in gpu_nodes) == 2


def test_a_pool_budget_counts_against_its_gpu_share():
    from maas.variants import pool_config

    args = pool_config("/nonexistent-repository", 24 * 2**30, resources={"num_gpus": 0.25})
    cfg = {"applications": [{"name": "maas", "import_path": "maas.app:build_app", "args": args,
                             "deployments": [{"name": "Pool-minilm-classifiers", "num_replicas": 2}]}]}
    plan = plan_config(cfg, gpus=1, gpu_memory_gib=80, cpus=8)
    # 24 GiB budget (base and models) + 8 × 16 MiB activations + 0.5 GiB context > 0.25 × 80 GiB
    assert any(e.startswith("Pool-minilm-classifiers: a replica needs ~24.62 GiB but its share is num_gpus 0.25")
               for e in plan.errors), plan.text()
    args["pools"][0]["memory_budget_bytes"] = 16 * 2**30
    plan = plan_config(cfg, gpus=1, gpu_memory_gib=80, cpus=8)
    assert plan.fits, plan.text()
    assert any(ln.startswith("RepositoryIndex") for ln in plan.lines)
