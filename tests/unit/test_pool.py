"""A pool replica in process (no Ray cluster): loads on demand under the byte budget, least recently
used eviction, a busy model never evicted, mixed batches of head-only models through one base
forward, per-model batches of full checkpoints, and a failing load marking the model only. The
variants are real: MiniLM heads and fine-tuned checkpoints made by maas.variants."""

import asyncio
import shutil

import numpy as np
import pytest

from maas.config import PoolSpec
from maas.errors import ModelNotReady
from maas.models.pool import Head, TextEncoderPool
from maas.models.replica import ModelRequest
from maas.repository import RepositoryState

pytestmark = pytest.mark.unit

WEATHER = "It will rain tomorrow and the storm comes in the afternoon."


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from maas.variants import make_checkpoints, make_heads

    root = tmp_path_factory.mktemp("pool-repo")
    make_heads(root, 3)
    make_checkpoints(root, 3, steps=1)
    shutil.copytree(root / "ckpt-00", root / "broken")
    (root / "broken" / "model.safetensors").write_bytes(b"\0" * 1024)
    return root


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        async def call():
            return self.fn(*args)
        return call()


class FakeIndex:
    """The RepositoryIndex's handle methods over a RepositoryState, in process."""

    def __init__(self, state: RepositoryState):
        self.state = state
        self.snapshot = _Method(lambda known=-1, rescan=False, epoch=None: (
            state.scan() if rescan else None, state.snapshot())[1])
        self.report = _Method(lambda replica, pool, loaded, failed, facts=None: (
            state.report(replica, pool, loaded, {k: tuple(v) for k, v in failed.items()}, facts), state.version)[1])


@pytest.fixture(scope="module")
def pool(repo):
    from maas.variants import pool_config

    spec = pool_config(repo, 4 * 2**30, load_timeout_s=2.0)["pools"][0]
    state = RepositoryState(*_specs(repo, spec))
    state.scan()
    replica = TextEncoderPool.func_or_class(spec, FakeIndex(state), 1.0)
    return replica


def _specs(repo, spec):
    from maas.config import RepositorySpec

    return [RepositorySpec(path=str(repo))], [PoolSpec.model_validate(spec)]


_LOOP: asyncio.AbstractEventLoop | None = None


def run(coro):
    """Run on this module's own event loop: the pool replica's locks and tasks belong to the loop
    that first ran them, and other test modules may close or unset the default one."""
    global _LOOP
    if _LOOP is None or _LOOP.is_closed():
        _LOOP = asyncio.new_event_loop()
    return _LOOP.run_until_complete(coro)


def tokens(texts: list[str]):
    from maas.preprocess.text import TokenizedBatch, load_text_tokenizer, pad_right
    from maas.variants import MINILM
    from maas.config import PackageSource

    tok = load_text_tokenizer(PackageSource(**{k: v for k, v in MINILM.items() if k != "source"}), "test")
    rows, counts = tok.encode(texts, max_length=256, truncate=True)
    ids, mask = pad_right(rows, 0)
    return TokenizedBatch(input_ids=ids, attention_mask=mask, num_tokens=[len(r) for r in rows], pad_token_id=0)


def test_loads_on_demand_and_evicts_least_recently_used_by_bytes(pool):
    async def scenario():
        pool.cache.budget_bytes = 100 * 2**20  # one 91 MB checkpoint and the heads
        for name in list(pool.cache.held()):
            pool._evict(name, "test")
        a = await pool._ensure("ckpt-00")
        await pool._ensure("head-00")
        assert set(pool.cache.held()) == {"ckpt-00", "head-00"}
        nbytes = pool.cache.held()["ckpt-00"]
        assert 85e6 < nbytes < 95e6  # MiniLM (22.7 M params) + a 2 × 384 head, float32
        b = await pool._ensure("ckpt-01")
        assert a is not b
        # ckpt-00 was least recently used among what had to go; head-00 stays (evicting ckpt-00 made room)
        assert set(pool.cache.held()) == {"head-00", "ckpt-01"}
        assert pool.cache.bytes <= pool.cache.budget_bytes
        await pool._ensure("head-00")  # touch: now ckpt-01 is the least recently used
        await pool._ensure("head-01")
        assert list(pool.cache.held())[0] == "ckpt-01"

    run(scenario())


def test_a_busy_model_is_never_evicted(pool):
    async def scenario():
        pool.cache.budget_bytes = 100 * 2**20
        await pool._ensure("ckpt-01")
        pool.inflight["ckpt-01"] = 1  # a request is queued on it
        try:
            with pytest.raises(ModelNotReady, match="no room for model 'ckpt-02'"):
                await pool._load(pool.entries["ckpt-02"])
            assert "ckpt-01" in pool.cache
        finally:
            del pool.inflight["ckpt-01"]
        await pool._ensure("ckpt-02")  # idle now: it goes
        assert "ckpt-01" not in pool.cache and "ckpt-02" in pool.cache

    run(scenario())


def test_mixed_head_batch_runs_one_base_forward_and_each_head(pool):
    async def scenario():
        heads = [await pool._ensure(f"head-{i:02d}") for i in range(3)]
        assert all(isinstance(h, Head) for h in heads)
        texts = [WEATHER, "The striker scored a penalty kick.", "Fresh basil goes in the soup."]
        requests = [ModelRequest(tokens([t]), {"task": "text-classification", "top_k": 2, "_head": h})
                    for t, h in zip(texts, heads)]
        calls = []
        forward = pool.base.forward
        pool.base.forward = lambda batch: (calls.append(batch["input_ids"].shape[0]), forward(batch))[1]
        try:
            mixed = pool._heads_forward(requests)
        finally:
            pool.base.forward = forward
        assert calls == [3]  # one base forward for the three models' items
        for i, (res, h) in enumerate(zip(mixed, heads)):
            top = res["results"][0]["top_k"]
            assert {t["label"] for t in top} == set(h.labels)
            alone = pool._heads_forward([requests[i]])[0]["results"][0]["top_k"]
            assert [t["label"] for t in alone] == [t["label"] for t in top]
            np.testing.assert_allclose([t["score"] for t in alone], [t["score"] for t in top], atol=1e-5)
        assert mixed[0]["results"][0]["top_k"][0]["label"] == "head-00:yes"  # head-00's task is weather

    run(scenario())


def test_full_checkpoints_answer_with_their_own_labels(pool):
    async def scenario():
        pool.cache.budget_bytes = 4 * 2**30
        for name in ("ckpt-00", "ckpt-01"):
            runner = await pool._ensure(name)
            req = ModelRequest(tokens([WEATHER]), {"task": "text-classification", "top_k": 2})
            top = runner.run([req])[0]["results"][0]["top_k"]
            assert {t["label"].split(":")[0] for t in top} == {name}

    run(scenario())


def test_a_failing_load_marks_the_model_and_is_not_retried(pool):
    async def scenario():
        with pytest.raises(ModelNotReady, match="'broken' failed to load; POST /v2/repository/index"):
            await pool._ensure("broken")
        assert "broken" in pool.failed and "broken" not in pool.cache
        calls = []
        original = pool._load_model
        pool._load_model = lambda entry: (calls.append(entry["name"]), original(entry))[1]
        try:
            with pytest.raises(ModelNotReady, match="failed to load"):
                await pool._ensure("broken")
        finally:
            pool._load_model = original
        assert calls == []  # same files: not loaded again
        await pool._report()
        entry = pool.index.state.entries["broken"]
        assert entry.state == "UNAVAILABLE" and "its load failed" in entry.reason
        assert (await pool._ensure("head-02")) is not None  # the replica serves on
        # The repository API's load (through whichever replica) clears the index's mark: this replica
        # then tries again on its next request instead of answering from its own old failure.
        pool.index.state.load("broken")
        await pool._refresh()
        pool._load_model = lambda entry: (calls.append(entry["name"]), original(entry))[1]
        try:
            with pytest.raises(ModelNotReady, match="failed to load"):
                await pool._ensure("broken")
        finally:
            pool._load_model = original
        assert calls == ["broken"]

    run(scenario())
