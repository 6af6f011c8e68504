"""Runtimes and precisions (maas.models.runtimes): export once and reuse, a corrupt cache file
rebuilt, the fidelity guard refusing a broken variant (or falling back to fp32), threads as
configured, and int8 / ONNX Runtime answers close to fp32 torch on real weights (MiniLM,
EfficientNet-Lite0) for inputs that are not the guard's probe set."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError

from maas.config import ModelSpec
from maas.errors import WeightsError
from maas.models import runtimes
from maas.models.image_classifier import ImageClassifierRunner
from maas.models.text_encoder import TextEncoderRunner
from tests.conftest import LOCAL_CONFIG

MODELS = {m["name"]: m for m in yaml.safe_load(LOCAL_CONFIG.read_text())["applications"][0]["args"]["models"]}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MAAS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def runner(name: str, **fields):
    spec = ModelSpec.model_validate({**MODELS[name], **fields})
    r = (TextEncoderRunner if spec.family == "text-encoder" else ImageClassifierRunner)(spec)
    r.load()
    r.prepare_runtime()
    return r


def tiny(**fields):
    """The random 2-layer BERT classifier of local.yaml (exports in about a second)."""
    return runner("sentiment-tiny-demo", **{"runtime": "onnxruntime", **fields})


def embed(r, texts):
    from maas.models.base import ModelRequest
    from maas.preprocess.text import TokenizedBatch, load_text_tokenizer, pad_right

    tok = load_text_tokenizer(r.spec.tokenizer_source, r.spec.name)
    rows, counts = tok.encode(texts, max_length=r.max_input_tokens, truncate=True)
    ids, mask = pad_right(rows, tok.pad_token_id or 0)
    return r.run([ModelRequest(TokenizedBatch(ids, mask, counts, tok.pad_token_id or 0), {"task": "embeddings"})])[0]["embeddings"]


def test_runtime_and_precision_pairs_that_do_not_exist_are_refused_by_the_config():
    for fields, words in [({"runtime": "torch", "precision": "int8"}, "int8 runs on runtime: onnxruntime"),
                          ({"runtime": "onnxruntime", "precision": "bf16"}, "bf16 runs on runtime: torch")]:
        with pytest.raises(ValidationError, match=words):
            ModelSpec.model_validate({**MODELS["minilm"], **fields})
    with pytest.raises(ValidationError, match="gpt2-tiny-demo.*runs on torch fp32"):
        ModelSpec.model_validate({**MODELS["gpt2-tiny-demo"], "runtime": "onnxruntime"})
    with pytest.raises(ValidationError, match="dtype float16 .* and precision bf16 both set the compute type"):
        ModelSpec.model_validate({**MODELS["minilm"], "precision": "bf16", "dtype": "float16"})
    with pytest.raises(ValidationError, match="runs on the CPU here.*num_gpus: 0"):
        ModelSpec.model_validate({**MODELS["minilm"], "runtime": "onnxruntime", "resources": {"num_gpus": 1}})


def test_export_once_reuse_it_and_rebuild_a_corrupt_file(cache, monkeypatch):
    first = tiny()
    art = first.runtime_info["artifact"]
    assert (art["reused"], art["rebuilt"]) == (False, False)
    assert first.runtime_info["name"] == "onnxruntime" and first.runtime_info["fidelity"]["mean_cosine"] > 0.9999

    exports = []
    real_export = runtimes._export
    monkeypatch.setattr(runtimes, "_export", lambda *a: (exports.append(1), real_export(*a))[1])
    second = tiny()  # another replica, or the next start: the file is loaded, not exported
    assert second.runtime_info["artifact"]["reused"] is True and exports == []
    assert second.runtime_info["artifact"]["path"] == art["path"]

    model_file = cache / "runtimes" / art["path"].rsplit("/", 1)[1] / "model.onnx"
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])  # a copy cut short
    third = tiny()
    assert third.runtime_info["artifact"] == {**art, "reused": False, "rebuilt": True}
    assert exports == [1]
    texts = ["a corrupt cache file is rebuilt", "not loaded"]
    np.testing.assert_allclose(embed(third, texts), embed(runner("sentiment-tiny-demo"), texts), atol=1e-5)


def stale_variant(cache, art_path: str) -> None:
    """Replace the cached file by the export of other weights (seed 1), with a matching checksum:
    a variant that loads and runs but is not this model."""
    other = runner("sentiment-tiny-demo", weights={"source": "random", "seed": 1})
    probe = other.fidelity_probe()
    folder = cache / "runtimes" / art_path.rsplit("/", 1)[1]
    for f in folder.iterdir():
        f.unlink()
    runtimes._export(other.spec.model_copy(update={"runtime": "onnxruntime"}), other.onnx_export(), probe, folder)


def test_the_fidelity_guard_refuses_a_broken_variant_and_says_the_numbers(cache):
    art = tiny().runtime_info["artifact"]
    stale_variant(cache, art["path"])
    with pytest.raises(WeightsError) as refused:
        tiny()
    message = str(refused.value)
    assert "onnxruntime fp32 fails its fidelity guard against torch fp32 on 32 probe items" in message
    assert "mean_cosine" in message and "< fidelity.min_cosine 0.99" in message
    assert "fidelity.on_failure: fp32" in message  # what to change

    fallback = tiny(fidelity={"on_failure": "fp32"})
    info = fallback.runtime_info
    assert (info["name"], info["precision"]) == ("torch", "fp32") and "mean_cosine" in info["fallback"]
    assert info["fidelity"]["mean_cosine"] < 0.99 and fallback.ort is None
    texts = ["served by fp32 torch after the refusal"]
    np.testing.assert_allclose(embed(fallback, texts), embed(runner("sentiment-tiny-demo"), texts), atol=1e-6)


def test_onnxruntime_threads_are_the_replicas():
    torch.set_num_threads(2)
    r = tiny()
    assert r.runtime_info["threads"] == 2
    opts = r.ort.session.get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (2, 1)


def test_openvino_serves_the_same_export_with_the_replicas_threads():
    r = tiny(runtime="openvino")
    assert (r.runtime_info["name"], r.runtime_info["threads"]) == ("openvino", 1)
    assert int(r.ort.compiled.get_property("INFERENCE_NUM_THREADS")) == 1
    assert r.runtime_info["fidelity"]["mean_cosine"] > 0.9999
    texts = ["OpenVINO answers as torch does"]
    np.testing.assert_allclose(embed(r, texts), embed(runner("sentiment-tiny-demo"), texts), atol=1e-5)
    with pytest.raises(ValidationError, match="int8 text encoders run on runtime: onnxruntime"):
        ModelSpec.model_validate({**MODELS["minilm"], "runtime": "openvino", "precision": "int8"})


def test_bf16_on_torch_is_guarded_and_close():
    r = runner("sentiment-tiny-demo", precision="bf16")
    assert r.runtime_info["precision"] == "bf16" and r.runtime_info["fidelity"]["mean_cosine"] >= 0.999
    assert next(r.model.parameters()).dtype == torch.bfloat16
    assert not hasattr(r, "fidelity_reference")  # a serving replica does not hold the probe after its guard


def held_out_sentences() -> list[str]:
    """bench.inputs' sentences: written for the benchmarks, none of them in the guard's probe set."""
    from bench.inputs import SENTENCES

    assert not set(SENTENCES) & set(runtimes.PROBE_SENTENCES)
    return list(SENTENCES)


def test_int8_minilm_on_onnxruntime_is_close_to_fp32_on_sentences_it_was_not_probed_with():
    int8 = runner("minilm", runtime="onnxruntime", precision="int8")
    assert int8.runtime_info["fidelity"]["mean_cosine"] >= 0.99
    texts = held_out_sentences()
    ref, out = embed(runner("minilm"), texts), embed(int8, texts)
    assert runtimes.embedding_fidelity(ref, out)["mean_cosine"] >= 0.99
    assert json.loads((Path(int8.runtime_info["artifact"]["path"]) / "meta.json").read_text())["precision"] == "int8"


def test_efficientnet_on_onnxruntime_classifies_other_views_as_torch_does():
    from maas.models.base import ModelRequest
    from maas.preprocess.image import ImageBatch

    ort_runner = runner("efficientnet-lite0", runtime="onnxruntime")
    assert ort_runner.runtime_info["fidelity"]["top1_agreement"] >= 0.97
    pre = ort_runner.pre
    views = runtimes.probe_images(pre.crop_px, pre.resize_px + 64, pre.interpolation)  # another scale
    ask = [ModelRequest(ImageBatch(views), {"top_k": 5})]
    ours = [item["top_k"][0]["index"] for item in ort_runner.run(ask)[0]["results"]]
    reference = [item["top_k"][0]["index"] for item in runner("efficientnet-lite0").run(ask)[0]["results"]]
    assert np.mean(np.array(ours) == np.array(reference)) >= 0.97


def generator(**fields):
    from maas.models.text_generator import TextGeneratorRunner

    spec = ModelSpec.model_validate({**MODELS["gpt2-tiny-demo"], "precision": "bf16", **fields})
    r = TextGeneratorRunner(spec)
    r.load()
    r.prepare_runtime()
    return r


def test_the_rescored_head_gives_fp32_logits_for_its_top_k():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 1000, bias=True)
    x = torch.randn(3, 1, 64)
    head = runtimes.RescoredHead(linear, k=8)
    exact, mixed = linear(x), head(x)
    top = mixed.topk(8, dim=-1).indices
    torch.testing.assert_close(mixed.gather(-1, top), exact.gather(-1, top), rtol=1e-5, atol=1e-5)
    assert (mixed.argmax(-1) == exact.argmax(-1)).all()
    assert not torch.equal(mixed, exact)  # the rest of the vocabulary is bf16's


def test_bf16_generator_is_guarded_by_its_greedy_text_and_refuses_a_broken_variant(monkeypatch):
    r = generator()
    info = r.runtime_info
    assert (info["name"], info["precision"]) == ("torch", "bf16") and info["fidelity"]["greedy_match"] >= 0.9
    kinds = [type(m).__name__ for m in r.model.modules()]
    assert "RescoredHead" in kinds and kinds.count("Bf16Linear") == 4 * 2  # GPT-2's Conv1D: 4 per layer, 2 layers
    with torch.inference_mode():
        assert r.fidelity_outputs(r.fidelity_probe()) == generator(precision="fp32").fidelity_outputs(r.fidelity_probe())
    # The continuous batch (how a replica serves) runs the variant as the plain generate path does.
    from maas.batching.continuous import ContinuousBatcher
    from tests.unit.test_continuous import PROMPTS, Call, reference

    engine = ContinuousBatcher(r, "bf16", max_batch_size=8)
    try:
        params = {"max_tokens": 16, "temperature": 0}
        calls = [Call(engine, r, [p], params) for p in PROMPTS]
        assert [c.result()["choices"][0] for c in calls] == [reference(r, p, params) for p in PROMPTS]
    finally:
        engine.stop()

    real = runtimes.bf16_generator

    def broken(model):
        out = real(model)
        for m in out.modules():
            if isinstance(m, runtimes.Bf16Linear):
                m.weight.data = m.weight.data[torch.randperm(m.weight.shape[0])]
        return out

    monkeypatch.setattr(runtimes, "bf16_generator", broken)
    with pytest.raises(WeightsError, match=r"torch bf16 fails its fidelity guard.*greedy_match .* < "
                                           r"fidelity.min_greedy_match 0.9"):
        generator()


ORT_REPLICA = """
import json, sys
import yaml
from maas.config import ModelSpec
from maas.models import onnx_serving

models = {m["name"]: m for m in yaml.safe_load(open(sys.argv[1]).read())["applications"][0]["args"]["models"]}
spec = ModelSpec.model_validate({**models["sentiment-tiny-demo"], "runtime": "onnxruntime"})
real_export = onnx_serving.export_in_child
first = onnx_serving.OrtTextEncoderRunner(spec)
first.load()  # no export on this machine yet: a child process makes it
answer = first.run([first.probe()])[0]


def exported_again(*args):
    raise AssertionError("the second start exported again")


onnx_serving.export_in_child = exported_again
second = onnx_serving.OrtTextEncoderRunner(spec)
second.load()
classified = second.run([onnx_serving.ModelRequest(first.probe().inputs, {"task": "text-classification", "top_k": 2})])
onnx_serving.export_in_child = real_export
# Same weights, another limit: the model file is shared, the facts are this spec's own.
short = onnx_serving.OrtTextEncoderRunner(spec.model_copy(update={"max_input_tokens": 16}))
short.load()
print(json.dumps({"torch": "torch" in sys.modules, "first": first.runtime_info, "second": second.runtime_info,
                  "embeddings": answer["embeddings"].tolist(), "info": second.info(), "classified": classified,
                  "short": {"info": short.info(), "runtime": short.runtime_info}}))
"""


def test_an_onnxruntime_replica_never_imports_torch_and_its_next_start_reuses_the_export(cache):
    """The torch-free runner (maas.models.onnx_serving) in a fresh interpreter: the export runs in
    a child process, this process never imports torch, the next start finds the export through its
    pointer, and the answers are the torch runner's."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", ORT_REPLICA, str(LOCAL_CONFIG)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "MAAS_CACHE_DIR": str(cache)})
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["torch"] is False
    first, second = out["first"], out["second"]
    assert first["artifact"]["reused"] is False and second["artifact"]["reused"] is True
    assert first["artifact"]["path"] == second["artifact"]["path"] and second["torch_imported"] is False
    assert second["fidelity"]["mean_cosine"] > 0.9999 and second["fidelity"]["probe_items"] == 32
    reference = runner("sentiment-tiny-demo")
    assert out["info"]["labels"] == reference.info()["labels"] and out["info"]["dimensions"] == reference.dimensions
    expected = reference.run([reference.probe()])[0]["embeddings"]
    np.testing.assert_allclose(np.array(out["embeddings"]), expected, atol=1e-5)
    from maas.models.base import ModelRequest

    torch_classified = reference.run([ModelRequest(reference.probe().inputs, {"task": "text-classification",
                                                                              "top_k": 2})])
    got, want = out["classified"][0]["results"][0]["top_k"], torch_classified[0]["results"][0]["top_k"]
    assert [c["label"] for c in got] == [c["label"] for c in want]
    np.testing.assert_allclose([c["score"] for c in got], [c["score"] for c in want], atol=1e-5)
    short = out["short"]
    assert short["runtime"]["artifact"]["path"] == first["artifact"]["path"] and short["runtime"]["artifact"]["reused"]
    assert short["info"]["max_input_tokens"] == 16 and out["info"]["max_input_tokens"] != 16


def test_the_numpy_answers_rank_as_torch_topk_and_the_onnx_image_input_is_torchs_normalisation():
    from maas.config import ImagePreprocessingSpec
    from maas.models import answers
    from maas.models.image_classifier import nchw, normalize
    from maas.models.onnx_serving import OrtImageClassifierRunner
    from maas.preprocess.image import ImageBatch

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 1000)).astype(np.float32)
    values, idx = answers.top_k(answers.softmax(logits), 5)
    t_values, t_idx = torch.softmax(torch.from_numpy(logits), -1).topk(5, dim=-1)
    np.testing.assert_array_equal(idx, t_idx.numpy())
    np.testing.assert_allclose(values, t_values.numpy(), rtol=1e-5)
    np.testing.assert_allclose(answers.sigmoid(np.array([-200.0, 0.0, 3.0])), torch.sigmoid(torch.tensor(
        [-200.0, 0.0, 3.0])).numpy(), rtol=1e-6)

    pre = ImagePreprocessingSpec(resize_px=256, crop_px=224)
    ort_runner = OrtImageClassifierRunner(ModelSpec.model_validate({**MODELS["efficientnet-lite0"],
                                                                    "runtime": "onnxruntime"}))
    ort_runner.facts = {"info": {"preprocessing": pre.model_dump()}, "labels": [str(i) for i in range(1000)]}
    from maas.models.base import ModelRequest

    pixels = rng.integers(0, 256, size=(3, 224, 224, 3), dtype=np.uint8)
    feeds = ort_runner.feeds([ModelRequest(ImageBatch(pixels[:1])), ModelRequest(ImageBatch(pixels[1:]))])
    expected = normalize(nchw(pixels), pre.mean, pre.std).contiguous().numpy()
    assert feeds["pixels"].flags["C_CONTIGUOUS"] and feeds["pixels"].shape == (3, 3, 224, 224)
    np.testing.assert_allclose(feeds["pixels"], expected, atol=1e-5)
