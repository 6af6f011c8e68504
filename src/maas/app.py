"""``build_app``: serve config ``args:`` → the routing graph (an ``Application``).

Used by ``serve run serve_configs/local.yaml`` (``import_path: maas.app:build_app``).

Per model one deployment (named after the model), one preprocessing deployment per
distinct preprocessing key (shared by every model with that key), and the ``Ingress`` bound
over them. Each model deployment gets:

* ``ray_actor_options`` from the spec's ``resources`` (``num_cpus``, ``num_gpus``),
* ``user_config`` = the spec's ``batching`` (``max_batch_size``, ``batch_wait_timeout_s``),
* ``max_ongoing_requests`` = the spec's value or max(32, 2 × ``max_batch_size``) (batches fill;
  requests wait in the replica's batch queue, not in the router's backoff),
* ``max_queued_requests`` = the spec's value or 8 × ``max_ongoing_requests``.

Versions of one model name (``version:``) are separate deployments (``<name>_v<version>``) with their
own resources and autoscaling. How traffic is shared among them is the ``Ingress`` deployment's
``user_config`` (:class:`maas.config.TrafficConfig`), so a serve config moves traffic without
restarting a replica; ``build_app`` gives it an empty policy (each name's first listed version takes
all unpinned traffic).

All of these are Ray's own deployment options, so a serve config ``deployments:`` entry
with the deployment's name overrides them (and adds ``num_replicas`` or
``autoscaling_config``) without touching ``args``.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from ray.serve import Application
from ray.serve.config import BackpressureConfig

from maas.config import (
    INGRESS_DEPLOYMENT,
    AppConfig,
    ModelSpec,
    image_preprocessor_deployment_name,
    tokenizer_deployment_name,
    tokenizer_key,
)
from maas.ingress import Ingress
from maas.models.image_classifier import ImageClassifier, pool_image_preprocessing, resolve_image_preprocessing
from maas.models.onnx_serving import OnnxImageClassifier, OnnxTextEncoder
from maas.models.seq2seq import Seq2SeqGenerator
from maas.models.text_encoder import TextEncoder
from maas.models.text_generator import TextGenerator
from maas.preprocess.image import ImagePreprocessor
from maas.preprocess.text import Tokenizer
from maas.routing_keys import ROUTING_KEYS_DEPLOYMENT, RoutingKeys

FAMILY_DEPLOYMENTS = {
    "text-encoder": TextEncoder,
    "text-generator": TextGenerator,
    "seq2seq": Seq2SeqGenerator,
    "image-classifier": ImageClassifier,
}
#: Deployments of ``runtime: onnxruntime`` and ``openvino`` models: replicas that do not import torch.
ONNX_DEPLOYMENTS = {"text-encoder": OnnxTextEncoder, "image-classifier": OnnxImageClassifier}


#: Queue bounds (Serve's ``max_ongoing_requests`` / ``max_queued_requests``). Every queue is bounded;
#: past a bound Serve rejects at once (HTTP 503 from the proxy, ``BackPressureError`` on handles,
#: which the ingress answers with 503 + Retry-After). All are overridable per deployment.
#: Preprocessors take up to 128 at once for the same reason as models (ModelSpec.resolved_max_ongoing_requests):
#: a full replica makes callers' routers back off and poll, which left the CPU idle under load.
PREPROCESSOR_QUEUES = {"max_ongoing_requests": 128, "max_queued_requests": 1024}
#: The proxy rejects past the ingress's queue with 503 and ``Retry-After: 1`` (Serve's own response).
INGRESS_QUEUES = {"max_ongoing_requests": 256, "max_queued_requests": 1024,
                  "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=1)}


class ConfigError(ValueError):
    """The serve config's ``args`` are invalid; the message names each bad field."""


def parse_config(args: dict[str, Any] | AppConfig) -> AppConfig:
    """Validate ``args`` strictly.

    Raises:
        ConfigError: listing every bad field as ``models.0.weights.path: message``.
    """
    if isinstance(args, AppConfig):
        return args
    try:
        return AppConfig.model_validate(args)
    except ValidationError as exc:
        lines = []
        for e in exc.errors(include_url=False):
            loc = ".".join(str(p) for p in e["loc"])
            lines.append(f"  {loc}: {e['msg']}")
        raise ConfigError("invalid maas config (serve config 'args'):\n" + "\n".join(lines)) from None


def plan_graph(config: AppConfig) -> dict[str, dict[str, str]]:
    """The graph's deployment names without Ray: which preprocessor each model uses.

    Returns:
        ``{"models": {model: deployment}, "preprocessors": {model: preprocessor deployment}}``, keyed by
        each spec's address (``name``, or ``name@version`` for a versioned spec).

    Raises:
        ConfigError: two different preprocessing keys would share one deployment name.
    """
    pre_names: dict[str, str] = {}
    owners: dict[str, str] = {}
    for spec in config.models:
        if spec.family == "image-classifier":
            pre = resolve_image_preprocessing(spec)
            key, dep = f"image:{pre.key}", image_preprocessor_deployment_name(pre)
        else:
            key, dep = f"text:{tokenizer_key(spec)}", tokenizer_deployment_name(spec)
        if owners.setdefault(dep, key) != key:
            raise ConfigError(f"preprocessing keys {owners[dep]!r} and {key!r} map to one deployment name {dep!r}")
        pre_names[spec.key] = dep
    return {"models": {s.key: s.deployment_name for s in config.models}, "preprocessors": pre_names}


def _model_deployment(spec: ModelSpec):
    classes = FAMILY_DEPLOYMENTS if spec.runtime == "torch" else ONNX_DEPLOYMENTS
    return classes[spec.family].options(
        name=spec.deployment_name,
        ray_actor_options={"num_cpus": spec.resources.num_cpus, "num_gpus": spec.resources.num_gpus},
        max_ongoing_requests=spec.resolved_max_ongoing_requests,
        max_queued_requests=spec.resolved_max_queued_requests,
        user_config=spec.batching.model_dump(),
    ).bind(spec.model_dump(mode="json"))


def build_app(args: dict[str, Any]) -> Application:
    """Build the maas graph from the serve config's ``args``.

    Raises:
        ConfigError: invalid args (before anything is deployed).
    """
    config = parse_config(args)
    plan = plan_graph(config)
    models: dict[str, Any] = {}
    preprocessors: dict[str, Any] = {}
    bound_pre: dict[str, Any] = {}
    for spec in config.models:
        models[spec.key] = _model_deployment(spec)
        dep = plan["preprocessors"][spec.key]
        if dep not in bound_pre:
            if spec.family == "image-classifier":
                pre = resolve_image_preprocessing(spec)
                bound_pre[dep] = ImagePreprocessor.options(
                    name=dep, ray_actor_options={"num_cpus": config.image_preprocessors.num_cpus},
                    **PREPROCESSOR_QUEUES,
                ).bind(pre.model_dump(mode="json"), config.image_preprocessors.max_image_pixels)
            else:
                bound_pre[dep] = Tokenizer.options(
                    name=dep, ray_actor_options={"num_cpus": config.tokenizers.num_cpus}, **PREPROCESSOR_QUEUES,
                ).bind(spec.tokenizer_source.model_dump(mode="json"), dep)
        preprocessors[spec.key] = bound_pre[dep]
    versioned = any(len(specs) > 1 for specs in config.versions().values())
    keys = RoutingKeys.options(name=ROUTING_KEYS_DEPLOYMENT).bind() if versioned else None
    index, pools, pool_tokenizers = _pools(config, bound_pre)
    return Ingress.options(
        name=INGRESS_DEPLOYMENT, ray_actor_options={"num_cpus": config.ingress.num_cpus}, **INGRESS_QUEUES,
        user_config={"traffic": {}},  # the traffic policy (maas.config.TrafficConfig); serve configs override it
    ).bind(config.model_dump(mode="json"), models, preprocessors, keys, index, pools, pool_tokenizers)


def _pools(config: AppConfig, bound_pre: dict[str, Any]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The ``RepositoryIndex`` and one ``Pool-<name>`` deployment per pool with its preprocessor (a
    tokenizer or an image preprocessor, shared with the config's models of the same preprocessing):
    ``(index or None, {pool: app}, {pool: preprocessor app})``."""
    if not config.pools:
        return None, {}, {}
    from maas.models.pool import POOL_DEPLOYMENTS
    from maas.repository import INDEX_DEPLOYMENT, index_deployment

    index = index_deployment().options(name=INDEX_DEPLOYMENT).bind(
        [r.model_dump(mode="json") for r in config.repositories], [p.model_dump(mode="json") for p in config.pools],
        sorted(config.versions()))
    poll_s = min(r.poll_interval_s for r in config.repositories)
    pools, tokenizers = {}, {}
    for p in config.pools:
        if p.family == "image-classifier":
            pre = pool_image_preprocessing(p)
            dep = image_preprocessor_deployment_name(pre)
            if dep not in bound_pre:
                bound_pre[dep] = ImagePreprocessor.options(
                    name=dep, ray_actor_options={"num_cpus": config.image_preprocessors.num_cpus},
                    **PREPROCESSOR_QUEUES,
                ).bind(pre.model_dump(mode="json"), config.image_preprocessors.max_image_pixels)
        else:
            dep = tokenizer_deployment_name(p)
            if dep not in bound_pre:
                bound_pre[dep] = Tokenizer.options(
                    name=dep, ray_actor_options={"num_cpus": config.tokenizers.num_cpus}, **PREPROCESSOR_QUEUES,
                ).bind(p.tokenizer.model_dump(mode="json"), dep)
        tokenizers[p.name] = bound_pre[dep]
        pools[p.name] = POOL_DEPLOYMENTS[p.family].options(
            name=p.deployment_name,
            ray_actor_options={"num_cpus": p.resources.num_cpus, "num_gpus": p.resources.num_gpus},
            max_ongoing_requests=p.max_ongoing_requests or max(32, 2 * p.batching.max_batch_size),
            max_queued_requests=8 * (p.max_ongoing_requests or max(32, 2 * p.batching.max_batch_size)),
            user_config=p.batching.model_dump(),
        ).bind(p.model_dump(mode="json"), index, poll_s)
    return index, pools, tokenizers


__all__ = ["build_app", "parse_config", "plan_graph", "ConfigError"]
