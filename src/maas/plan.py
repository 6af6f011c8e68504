"""Placement planning: can a serve config's replicas be placed on the given nodes, before anything
starts? ``python -m maas plan serve_configs/gpu-cluster.yaml --gpus 2 --gpu-memory-gib 80 --cpus 32``

For every deployment of a maas application the plan takes the replica count Ray may reach (the
``autoscaling_config.max_replicas``, else ``num_replicas``, else 1, after the serve config's
``deployments:`` overrides; ``num_replicas: auto`` is Serve's autoscaling defaults, see
:func:`max_replicas`) and its ``ray_actor_options`` (``num_cpus``, ``num_gpus``). Each
GPU replica's memory is estimated as

    parameters × bytes per parameter (4 float32, 2 float16/bfloat16)
    + max_batch_size × ACTIVATION_BYTES_PER_ITEM[family]
    + CUDA_CONTEXT_BYTES

Parameters are counted by building the architecture on PyTorch's ``meta`` device (no weights,
no download); a hub checkpoint whose config is not cached needs ``estimated_params`` in its
spec. The activation allowances are deliberately generous round numbers for the model sizes
this project serves (a 224-px CNN at fp32 peaks well under 64 MiB of activations per image; a
GPT-2-small sequence of 1,024 tokens holds about 75 MiB of KV cache); raise them for bigger models.

Replicas are packed first-fit, largest GPU fraction first, onto GPUs that have both the
fraction and the memory left — Ray itself packs by fraction only. A replica whose estimate
exceeds its share (``num_gpus`` × GPU memory) is an error too: co-located replicas would then
run out of memory. Every error names the deployment.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from maas.app import parse_config, plan_graph
from maas.config import INGRESS_DEPLOYMENT, AppConfig, ModelSpec, RandomSource, validate_traffic
from maas.routing_keys import ROUTING_KEYS_DEPLOYMENT

GIB = 1024**3
MIB = 1024**2
CUDA_CONTEXT_BYTES = 512 * MIB
ACTIVATION_BYTES_PER_ITEM = {
    "image-classifier": 64 * MIB,
    "text-encoder": 16 * MIB,
    "text-generator": 128 * MIB,
    "seq2seq": 64 * MIB,
}
BYTES_PER_PARAM = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class Replica:
    deployment: str
    index: int
    count: int
    num_cpus: float
    num_gpus: float
    memory_bytes: int = 0


@dataclass
class Plan:
    lines: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: Problems of the config itself (an invalid traffic policy), not of placement.
    invalid: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        """Placement fits and the config is valid."""
        return not self.errors and not self.invalid

    def text(self) -> str:
        verdict = [""]
        if self.invalid:
            verdict += ["INVALID:"] + [f"  - {e}" for e in self.invalid]
        verdict += ["DOES NOT FIT:" if self.errors else "FITS"] + [f"  - {e}" for e in self.errors]
        return "\n".join(self.lines + verdict)


def count_parameters(spec: ModelSpec) -> int:
    """Parameters of the model's architecture, built on the ``meta`` device.

    Raises:
        ValueError: the architecture's config is not available locally and the spec has no
            ``estimated_params``.
    """
    import torch

    if spec.estimated_params:
        return spec.estimated_params
    with torch.device("meta"):
        if spec.family == "image-classifier":
            classes = len(spec.labels) if isinstance(spec.labels, list) else 1000
            if spec.library == "torchvision":
                import torchvision

                model = torchvision.models.get_model(spec.architecture, weights=None, num_classes=classes)
            else:
                import timm

                model = timm.create_model(spec.architecture, pretrained=False, num_classes=classes)
        else:
            from transformers import AutoConfig, AutoModel

            if isinstance(spec.weights, RandomSource):
                kwargs = dict(spec.hf_config or {})
                config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
            else:
                from maas.weights import hf_location

                try:
                    config = AutoConfig.from_pretrained(hf_location(spec.weights, spec.name))
                except Exception as exc:  # noqa: BLE001
                    raise ValueError(
                        f"model {spec.name!r}: cannot read its config to count parameters ({type(exc).__name__}); "
                        "set estimated_params in its spec"
                    ) from None
            model = AutoModel.from_config(config)
    return sum(p.numel() for p in model.parameters())


def estimate_memory_bytes(spec: ModelSpec) -> int:
    """Estimated GPU memory of one replica, bytes (see the module docstring for the formula)."""
    params = count_parameters(spec)
    return (params * BYTES_PER_PARAM[spec.dtype]
            + spec.batching.max_batch_size * ACTIVATION_BYTES_PER_ITEM[spec.family]
            + CUDA_CONTEXT_BYTES)


def estimate_pool_memory_bytes(pool) -> int:
    """Estimated GPU memory of one pool replica, bytes: its ``memory_budget_bytes`` (the frozen base
    and the repository models it holds) + activations and the CUDA context as for a model."""
    return (pool.memory_budget_bytes + pool.batching.max_batch_size * ACTIVATION_BYTES_PER_ITEM[pool.family]
            + CUDA_CONTEXT_BYTES)


def _overrides(app: dict) -> dict[str, dict]:
    return {d["name"]: d for d in app.get("deployments") or []}


def max_replicas(override: dict) -> int:
    """The most replicas Serve may run for a ``deployments:`` entry (``{}`` when there is none).

    ``num_replicas: auto`` is autoscaling with Serve's defaults for it
    (``AutoscalingConfig.default()``: up to 100 replicas), the entry's ``autoscaling_config``
    fields overriding them, as Serve merges them; an ``autoscaling_config`` alone defaults
    ``max_replicas`` to 1 (``AutoscalingConfig``'s field default); else ``num_replicas``, else 1.
    """
    auto = override.get("autoscaling_config")
    if override.get("num_replicas") == "auto":
        from ray.serve.config import AutoscalingConfig

        merged = AutoscalingConfig.default().model_dump(exclude_unset=True) | dict(auto or {})
        return int(merged["max_replicas"])
    if auto:
        return int(auto.get("max_replicas", 1))
    return int(override.get("num_replicas", 1) or 1)


def _replicas(name: str, num_cpus: float, num_gpus: float, override: dict) -> list[Replica]:
    opts = override.get("ray_actor_options") or {}
    num_cpus = float(opts.get("num_cpus", num_cpus))
    num_gpus = float(opts.get("num_gpus", num_gpus))
    count = max_replicas(override)
    return [Replica(name, i, count, num_cpus, num_gpus) for i in range(count)]


def plan_config(serve_config: dict, *, gpus: int, gpu_memory_gib: float, cpus: float) -> Plan:
    """Check that every maas application's replicas fit ``gpus`` GPUs of ``gpu_memory_gib`` and
    ``cpus`` CPUs. Returns a :class:`Plan` whose ``errors`` name the deployments that don't fit."""
    plan = Plan()
    replicas: list[Replica] = []
    specs: dict[str, ModelSpec] = {}
    pools: dict = {}
    notes: list[str] = []
    for app in serve_config.get("applications", []):
        if app.get("import_path") != "maas.app:build_app":
            continue
        config: AppConfig = parse_config(app.get("args") or {})
        graph = plan_graph(config)
        over = _overrides(app)
        for spec in config.models:
            specs[spec.deployment_name] = spec
            replicas += _replicas(spec.deployment_name, spec.resources.num_cpus, spec.resources.num_gpus,
                                  over.get(spec.deployment_name, {}))
        for dep in sorted(set(graph["preprocessors"].values())):
            cpus_each = config.image_preprocessors.num_cpus if dep.startswith("ImagePreprocessor") \
                else config.tokenizers.num_cpus
            replicas += _replicas(dep, cpus_each, 0.0, over.get(dep, {}))
        replicas += _replicas(INGRESS_DEPLOYMENT, config.ingress.num_cpus, 0.0, over.get(INGRESS_DEPLOYMENT, {}))
        known = set(graph["models"].values()) | set(graph["preprocessors"].values()) | {INGRESS_DEPLOYMENT}
        if config.pools:  # repository pools: each replica holds its base and up to its byte budget of models
            from maas.config import tokenizer_deployment_name
            from maas.repository import INDEX_DEPLOYMENT

            replicas += _replicas(INDEX_DEPLOYMENT, 0.05, 0.0, over.get(INDEX_DEPLOYMENT, {}))
            known.add(INDEX_DEPLOYMENT)
            for pool in config.pools:
                pools[pool.deployment_name] = pool
                replicas += _replicas(pool.deployment_name, pool.resources.num_cpus, pool.resources.num_gpus,
                                      over.get(pool.deployment_name, {}))
                known.add(pool.deployment_name)
                if pool.family == "image-classifier":
                    from maas.config import image_preprocessor_deployment_name
                    from maas.models.image_classifier import pool_image_preprocessing

                    pre, cpus_each = (image_preprocessor_deployment_name(pool_image_preprocessing(pool)),
                                      config.image_preprocessors.num_cpus)
                else:
                    pre, cpus_each = tokenizer_deployment_name(pool), config.tokenizers.num_cpus
                if pre not in known:
                    replicas += _replicas(pre, cpus_each, 0.0, over.get(pre, {}))
                    known.add(pre)
        if any(len(v) > 1 for v in config.versions().values()):
            replicas += _replicas(ROUTING_KEYS_DEPLOYMENT, 0.01, 0.0, over.get(ROUTING_KEYS_DEPLOYMENT, {}))
            known.add(ROUTING_KEYS_DEPLOYMENT)
        traffic = over.get(INGRESS_DEPLOYMENT, {}).get("user_config")
        if traffic is not None:  # the traffic policy, checked here as the ingress will (maas.config.validate_traffic)
            try:
                validate_traffic(config, traffic)
            except ValueError as exc:
                plan.invalid.append(f"{INGRESS_DEPLOYMENT} user_config: {exc}")
        for name in sorted(n for n, entry in over.items() if entry.get("num_replicas") == "auto"):
            notes.append(f"{name}: num_replicas auto = Serve's autoscaling defaults, up to {max_replicas(over[name])} "
                         "replicas; set autoscaling_config.max_replicas to bound it")
        for name in sorted(set(over) - known):
            plan.errors.append(f"deployments: entry {name!r} names no deployment of application "
                               f"{app.get('name', '?')!r}; its deployments are {sorted(known)}")

    gpu_mem = gpu_memory_gib * GIB
    plan.lines.append(f"nodes: {gpus} GPU(s) × {gpu_memory_gib:g} GiB, {cpus:g} CPUs")
    plan.lines.append(f"{'deployment':<38} {'replicas':>8} {'cpus':>6} {'gpus':>6} {'est GiB':>8}")
    seen: set[str] = set()
    for r in replicas:
        spec = specs.get(r.deployment)
        if r.num_gpus > 0 and (spec is not None or r.deployment in pools):
            try:
                r.memory_bytes = estimate_memory_bytes(spec) if spec is not None \
                    else estimate_pool_memory_bytes(pools[r.deployment])
            except ValueError as exc:
                plan.errors.append(f"{r.deployment}: {exc}")
        if r.deployment not in seen:
            seen.add(r.deployment)
            est = f"{r.memory_bytes / GIB:.2f}" if r.memory_bytes else "-"
            plan.lines.append(f"{r.deployment:<38} {r.count:>8} {r.num_cpus:>6g} {r.num_gpus:>6g} {est:>8}")
        if r.num_gpus > 0 and r.memory_bytes > r.num_gpus * gpu_mem and r.index == 0:
            plan.errors.append(
                f"{r.deployment}: a replica needs ~{r.memory_bytes / GIB:.2f} GiB but its share is num_gpus "
                f"{r.num_gpus:g} × {gpu_memory_gib:g} GiB = {r.num_gpus * gpu_memory_gib:.2f} GiB; raise num_gpus"
            )

    plan.lines += notes
    total_cpus = sum(r.num_cpus for r in replicas)
    if total_cpus > cpus + 1e-9:
        plan.errors.append(f"CPU requests at max replicas total {total_cpus:g} > {cpus:g} CPUs "
                           f"(largest: {max(replicas, key=lambda r: r.num_cpus * r.count).deployment})")

    free = [[1.0, gpu_mem, []] for _ in range(gpus)]
    for r in sorted((r for r in replicas if r.num_gpus > 0), key=lambda r: (-r.num_gpus, -r.memory_bytes)):
        if r.num_gpus > 1:
            whole = math.ceil(r.num_gpus)
            idle = [g for g in free if g[0] >= 1.0 - 1e-9 and g[1] >= r.memory_bytes / whole]
            if len(idle) < whole:
                plan.errors.append(f"{r.deployment}: replica {r.index + 1}/{r.count} needs {whole} whole GPUs")
                continue
            for g in idle[:whole]:
                g[0], g[1] = 0.0, g[1] - r.memory_bytes / whole
                g[2].append(f"{r.deployment}#{r.index + 1}")
            continue
        target = next((g for g in free if g[0] + 1e-9 >= r.num_gpus and g[1] >= r.memory_bytes), None)
        if target is None:
            plan.errors.append(
                f"{r.deployment}: replica {r.index + 1}/{r.count} (num_gpus {r.num_gpus:g}, "
                f"~{r.memory_bytes / GIB:.2f} GiB) has no GPU with room left"
            )
            continue
        target[0] -= r.num_gpus
        target[1] -= r.memory_bytes
        target[2].append(f"{r.deployment}#{r.index + 1}")
    plan.lines.append(f"CPU requests at max replicas: {total_cpus:g} of {cpus:g}")
    for i, (frac, mem, names) in enumerate(free):
        plan.lines.append(f"GPU {i}: {1 - frac:.2f} of 1 allocated, ~{(gpu_mem - mem) / GIB:.2f} of "
                          f"{gpu_memory_gib:g} GiB estimated; {', '.join(names) or 'empty'}")
    return plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maas plan", description=__doc__.split("\n")[0])
    parser.add_argument("config", type=Path, help="serve config YAML (serve run / serve deploy format)")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs available, in total (default 0)")
    parser.add_argument("--gpu-memory-gib", type=float, default=0.0, help="memory of each GPU, GiB (default 0)")
    parser.add_argument("--cpus", type=float, default=float(os.cpu_count() or 1),
                        help="CPUs available, in total (default: this machine's)")
    args = parser.parse_args(argv)
    plan = plan_config(yaml.safe_load(args.config.read_text()), gpus=args.gpus,
                       gpu_memory_gib=args.gpu_memory_gib, cpus=args.cpus)
    print(plan.text())
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
