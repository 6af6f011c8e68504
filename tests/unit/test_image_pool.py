"""An image-classifier pool replica in process (no Ray cluster): head-only EfficientNet-Lite0
variants through one base forward per mixed batch, full checkpoints built from their state dicts,
and versions of a folder of versions. The variants are real: heads of ImageNet classes over the
shipped EfficientNet-Lite0 (maas.variants), and scikit-image's photos."""

import numpy as np
import pytest

from maas.config import ImagePreprocessingSpec, PoolSpec, RepositorySpec
from maas.models.pool import Head, ImageClassifierPool
from maas.models.replica import ModelRequest
from maas.preprocess.image import ImageBatch
from maas.repository import RepositoryState
from tests.unit.test_pool import FakeIndex, run

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from maas.variants import make_image_checkpoints, make_image_heads

    root = tmp_path_factory.mktemp("image-pool-repo")
    make_image_heads(root, 3)  # cats, cups, dogs
    make_image_checkpoints(root, 2)  # img-ckpt-00 in versions 1 (cats) and 2 (cups); img-ckpt-01 (cups)
    return root


@pytest.fixture(scope="module")
def pool(repo):
    from maas.variants import image_pool_spec

    spec = image_pool_spec(4 * 2**30, load_timeout_s=10.0)
    state = RepositoryState([RepositorySpec(path=str(repo))], [PoolSpec.model_validate(spec)])
    state.scan()
    return ImageClassifierPool.func_or_class(spec, FakeIndex(state), 1.0)


def photo(name: str) -> np.ndarray:
    """scikit-image's photo ``name`` as the pool's preprocessor gives it: uint8 (224, 224, 3)."""
    from PIL import Image
    from skimage import data

    from maas.preprocess.image import transform

    return transform(Image.fromarray(getattr(data, name)()),
                     ImagePreprocessingSpec(resize_px=256, crop_px=224, interpolation="bilinear"))


def top(result: dict) -> list[tuple[str, float]]:
    return [(t["label"], t["score"]) for t in result["results"][0]["top_k"]]


def test_the_base_gives_pre_logits_features(pool):
    assert pool.base.dimensions == 1280  # EfficientNet-Lite0's classifier input
    feats = pool._base_features(pool.base, [ModelRequest(ImageBatch(photo("chelsea")[None]), {})])
    assert feats.shape == (1, 1280) and feats.dtype == np.float32


def test_mixed_head_batch_runs_one_base_forward_and_each_head(pool):
    async def scenario():
        return [await pool._ensure(f"img-head-{i:02d}") for i in range(3)]

    heads = run(scenario())
    assert all(isinstance(h, Head) and h.weight.shape[1] == 1280 for h in heads)
    images = [photo("chelsea"), photo("coffee"), photo("chelsea")]
    requests = [ModelRequest(ImageBatch(img[None]), {"top_k": 2, "_head": h}) for img, h in zip(images, heads)]
    calls = []
    model = pool.base.model
    pool.base.model = lambda x: (calls.append(int(x.shape[0])), model(x))[1]
    try:
        mixed = pool._heads_forward(requests)
    finally:
        pool.base.model = model
    assert calls == [3]  # one base forward for the three models' images
    assert top(mixed[0])[0][0] in ("img-head-00:tabby", "img-head-00:tiger cat", "img-head-00:Egyptian cat")
    assert top(mixed[1])[0][0] in ("img-head-01:espresso", "img-head-01:cup", "img-head-01:coffee mug")
    assert all(label.startswith("img-head-02:") for label, _ in top(mixed[2]))  # the dogs head, on a cat
    for i, res in enumerate(mixed):
        alone = top(pool._heads_forward([requests[i]])[0])
        assert [lab for lab, _ in alone] == [lab for lab, _ in top(res)]
        np.testing.assert_allclose([s for _, s in alone], [s for _, s in top(res)], atol=1e-5)


def test_a_full_checkpoint_answers_as_its_head_does(pool):
    """img-ckpt-01 is the shipped features with the cups head (img-head-01's rows): a full forward of
    the checkpoint and the base + head path must give the same scores."""
    async def scenario():
        return await pool._ensure("img-ckpt-01"), await pool._ensure("img-head-01")

    runner, head = run(scenario())
    coffee = photo("coffee")[None]
    full = top(runner.run([ModelRequest(ImageBatch(coffee), {"top_k": 4})])[0])
    via_head = top(pool._heads_forward([ModelRequest(ImageBatch(coffee), {"top_k": 4, "_head": head})])[0])
    assert [lab.split(":")[1] for lab, _ in full] == [lab.split(":")[1] for lab, _ in via_head]
    assert all(lab.startswith("img-ckpt-01:") for lab, _ in full)
    np.testing.assert_allclose([s for _, s in full], [s for _, s in via_head], atol=1e-4)


def test_versions_of_a_checkpoint_are_separate_models(pool):
    async def scenario():
        return await pool._ensure("img-ckpt-00@1"), await pool._ensure("img-ckpt-00@2")

    v1, v2 = run(scenario())
    assert v1 is not v2 and {"img-ckpt-00@1", "img-ckpt-00@2"} <= set(pool.cache.held())
    assert pool.entries["img-ckpt-00@2"]["default"] and not pool.entries["img-ckpt-00@1"]["default"]
    cat = ModelRequest(ImageBatch(photo("chelsea")[None]), {"top_k": 1})
    assert top(v1.run([cat])[0])[0][0] in ("img-ckpt-00:tabby", "img-ckpt-00:tiger cat", "img-ckpt-00:Egyptian cat")
    assert top(v2.run([cat])[0])[0][0].split(":")[1] in ("espresso", "cup", "coffee mug", "coffeepot")


def test_top_k_beyond_a_heads_labels_is_a_400(pool):
    from maas.errors import InvalidRequest

    async def scenario():
        return await pool._ensure("img-head-00")

    head = run(scenario())
    results, requests, _ = pool._jobs(head, ImageBatch(photo("chelsea")[None]), [{"top_k": 9}], [None])
    assert not requests and isinstance(results[0], InvalidRequest) and "label count" in results[0].message


def test_facts_of_a_model_not_loaded_come_from_its_spec(pool):
    info = run(pool.info("img-head-02"))
    assert info["labels"][0].startswith("img-head-02:") and info["num_classes"] == 4 and "partial" not in info
