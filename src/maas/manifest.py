"""KubeRay ``RayService`` manifest generated from a serve config, so the two never drift.

``python -m maas manifest serve_configs/gpu-cluster.yaml > cluster/rayservice.yaml``

The serve config is embedded unchanged as ``spec.serveConfigV2`` (a string, as KubeRay
expects). The cluster has a CPU head group and one GPU worker group whose ``nvidia.com/gpu``
limits add up to ``--gpus``; check the same totals with ``python -m maas plan``. The image is
built from ``cluster/Dockerfile`` (Ray's GPU image plus this package).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

#: Ray Serve's high-throughput mode (Ray >= 2.55, Ray's "Enable High Throughput on Ray Serve with
#: KubeRay" guide), set on every Ray container as ``make serve`` sets it locally: HAProxy in front
#: of the ingress replicas instead of the Python proxy actor, user code on the replica's event
#: loop, gRPC between replicas, buffered access logs. README "Benchmarks" has the measured effect.
#:
#: * gRPC between replicas (the mode's default) is kept: every request carries its deadline to the
#:   replica (``maas.batching``), which drops a job still queued past it and stops generation at it,
#:   so timeouts hold whatever the transport does with cancellation. Measured against Ray's
#:   transport in one session (2 cores): MiniLM 236 -> 267 sentences/s at 64 clients, c=1 p50
#:   25.6 -> 21.6 ms; EfficientNet-Lite0 c=1 p50 43.6 -> 35.0 ms.
#: * ``RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=1`` is turned back: the mode runs a handle's router on
#:   the caller's event loop, which makes synchronous ``handle.method.remote(...).result()`` from a
#:   driver or a Ray job fail ("No event loop running").
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
                  "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1", "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}
#: What ``make serve``, the tests and the benchmark set on one machine: the same mode, with the
#: direct-ingress drain shortened from Serve's 30 s (time for an external load balancer to
#: deregister a replica) to 2 s (HAProxy on the same node needs well under one), so a stop or a
#: redeploy of the ingress takes seconds (see maas.launch).
LOCAL_SERVE_ENV = {**THROUGHPUT_ENV, "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}

DEFAULTS = {"name": "maas", "image": "maas-serve:0.1.0", "ray_version": "2.60.0", "head_cpus": 8,
            "head_memory": "32Gi", "workers": 1, "gpus_per_worker": 2, "worker_cpus": 24, "worker_memory": "160Gi"}


class _Literal(str):
    """A string dumped as a YAML block scalar (``|``), so the embedded config stays readable."""


yaml.add_representer(_Literal, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|"),
                     Dumper=yaml.SafeDumper)


def rayservice(serve_config_text: str, **options) -> dict:
    """The ``RayService`` object (``ray.io/v1``) for ``serve_config_text``; options as :data:`DEFAULTS`."""
    o = {**DEFAULTS, **options}
    yaml.safe_load(serve_config_text)  # must parse; raises yaml.YAMLError otherwise

    def container(name: str, cpus, memory: str, gpus: int = 0) -> dict:
        limits = {"cpu": str(cpus), "memory": memory}
        if gpus:
            limits["nvidia.com/gpu"] = gpus
        c = {"name": name, "image": o["image"], "resources": {"limits": limits, "requests": dict(limits)},
             "env": [{"name": k, "value": v} for k, v in THROUGHPUT_ENV.items()]}
        if name == "ray-head":
            c["ports"] = [{"containerPort": p, "name": n} for p, n in
                          ((6379, "gcs"), (8265, "dashboard"), (10001, "client"), (8000, "serve"))]
        return c

    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": o["name"]},
        "spec": {
            "serveConfigV2": _Literal(serve_config_text),
            "rayClusterConfig": {
                "rayVersion": o["ray_version"],
                "enableInTreeAutoscaling": True,
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
                    "template": {"spec": {"containers": [container("ray-head", o["head_cpus"], o["head_memory"])]}},
                },
                "workerGroupSpecs": [{
                    "groupName": "gpu",
                    "replicas": o["workers"],
                    "minReplicas": o["workers"],
                    "maxReplicas": o["workers"],
                    "rayStartParams": {},
                    "template": {"spec": {
                        "containers": [container("ray-worker", o["worker_cpus"], o["worker_memory"],
                                                 o["gpus_per_worker"])],
                        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    }},
                }],
            },
        },
    }


def render(serve_config_path: Path, **options) -> str:
    header = (f"# Generated by `python -m maas manifest {serve_config_path}`; do not edit by hand.\n"
              "# GPUs: workers × gpus_per_worker; check placement with `python -m maas plan`.\n")
    body = rayservice(serve_config_path.read_text(), **options)
    return header + yaml.safe_dump(body, sort_keys=False, width=1000, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maas manifest", description=__doc__.split("\n")[0])
    parser.add_argument("config", type=Path)
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    path = args.pop("config")
    sys.stdout.write(render(path, **args))
    return 0
