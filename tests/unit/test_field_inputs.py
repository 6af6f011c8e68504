"""What real clients send (issue 16): OpenAI values and nulls the API accepts, and every image
mode Pillow opens either classifying like its 8-bit RGB equivalent or refused with a 400."""

import io
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from skimage import data

from maas.config import ModelSpec
from maas.errors import InvalidRequest
from maas.models.base import ModelRequest
from maas.models.image_classifier import ImageClassifierRunner
from maas.models.sampling import SamplingParams
from maas.preprocess.image import decode_image, preprocess_images
from maas.protocol import parse
from maas.protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from tests.conftest import encode

# ---------------------------------------------------------------------------- OpenAI values


def test_top_p_zero_is_accepted_and_decodes_greedily():
    req = parse(CompletionRequest, {"model": "m", "prompt": "x", "temperature": 0.8, "top_p": 0})
    sp = SamplingParams.from_params(req.to_params())
    assert sp.temperature == 0.0  # only the most likely token survives: greedy


def test_nulls_mean_the_defaults():
    emb = parse(EmbeddingRequest, {"model": "m", "input": "x", "encoding_format": None, "dimensions": None})
    assert emb.encoding_format == "float"
    comp = parse(CompletionRequest, {"model": "m", "prompt": "x", "n": None, "temperature": None, "top_p": None,
                                     "max_tokens": None, "stop": None, "stream": None, "stream_options": None,
                                     "logprobs": None, "echo": None, "suffix": None, "best_of": None, "seed": None,
                                     "presence_penalty": None, "frequency_penalty": None, "logit_bias": None,
                                     "user": None})
    sp = SamplingParams.from_params(comp.to_params())
    assert (sp.n, sp.temperature, sp.top_p, sp.stop, sp.max_tokens) == (1, 1.0, 1.0, (), None)
    chat = parse(ChatCompletionRequest, {
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": None, "tool_choice": None,
        "response_format": None, "logprobs": None, "top_logprobs": None, "audio": None, "modalities": None,
        "prediction": None, "reasoning_effort": None, "verbosity": None, "web_search_options": None,
        "functions": None, "function_call": None, "parallel_tool_calls": None, "max_completion_tokens": None,
        "stream_options": {"include_usage": None}, "service_tier": None, "metadata": None, "store": None})
    assert chat.to_params()["max_tokens"] is None and not chat.include_usage


def test_values_openai_accepts_that_change_nothing():
    comp = parse(CompletionRequest, {"model": "m", "prompt": "x", "stop": ["", "END"], "best_of": 1, "echo": False,
                                     "presence_penalty": 0, "logit_bias": {}, "max_tokens": 0})
    sp = SamplingParams.from_params(comp.to_params())
    assert sp.stop == ("END",) and sp.max_tokens == 0
    parse(ChatCompletionRequest, {"model": "m", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "assistant", "content": None, "refusal": None},
        {"role": "user", "content": "hi", "name": "ann"}],
        "tool_choice": "none", "response_format": {"type": "text"}, "modalities": ["text"], "verbosity": "medium"})


@pytest.mark.parametrize("body,field,words", [
    ({"n": 9}, "n", "n ≤ 8"),
    ({"logprobs": 2}, "logprobs", "omit it or send null"),
    ({"presence_penalty": 0.5}, "presence_penalty", "send 0"),
    ({"best_of": 3}, "best_of", "equal to n"),
    ({"echo": True}, "echo", "never echoed"),
    ({"top_p": 1.5}, "top_p", "less than or equal to 1"),
])
def test_completion_values_we_cannot_honour_name_the_field(body, field, words):
    with pytest.raises(InvalidRequest) as info:
        parse(CompletionRequest, {"model": "m", "prompt": "x", **body})
    assert info.value.param == field and words in info.value.message


@pytest.mark.parametrize("body,param,words", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     "messages.0.content.0", "text only"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, "messages.0.role", "tool results"),
    ({"reasoning_effort": "high"}, "reasoning_effort", "do not reason"),
    ({"response_format": {"type": "json_object"}}, "response_format", "only text responses"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tool calling"),
])
def test_chat_values_we_cannot_honour_name_the_field(body, param, words):
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(InvalidRequest) as info:
        parse(ChatCompletionRequest, {**base, **body})
    assert info.value.param == param and words in info.value.message


# ---------------------------------------------------------------------------- image modes


@pytest.fixture(scope="module")
def efficientnet(local_args):
    spec = ModelSpec.model_validate(next(m for m in local_args["models"] if m["name"] == "efficientnet-lite0"))
    runner = ImageClassifierRunner(spec, "cpu")
    runner.load()
    return runner


def top1(runner, raw: bytes) -> int:
    pixels = preprocess_images([raw], runner.pre, max_pixels=10**8)
    return runner.run([ModelRequest(pixels, {"top_k": 1})])[0]["results"][0]["top_k"][0]["index"]


def _tiff(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    return buf.getvalue()


def _png_with_xmp(img: Image.Image, inflated_bytes: int) -> bytes:
    """A PNG carrying a compressed iTXt XMP chunk that inflates to ``inflated_bytes``."""
    rng = np.random.default_rng(0)
    words = " ".join(rng.choice(["<rdf:li>", "photo", "edit", "</rdf:li>", "x:xmpmeta", "2026"], inflated_bytes // 5))
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", words[:inflated_bytes], zip=True)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_every_mode_classifies_like_its_8bit_rgb_equivalent(efficientnet):
    rgb = Image.fromarray(data.chelsea())
    grey = rgb.convert("L")
    grey_top = top1(efficientnet, encode(grey.convert("RGB"), "PNG"))
    rgb_top = top1(efficientnet, encode(rgb, "PNG"))
    la = grey.copy()
    la.putalpha(200)
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    frames = io.BytesIO()
    rgb.save(frames, format="GIF", save_all=True, append_images=[Image.new("RGB", rgb.size, (0, 0, 255))])
    cases = {  # encoded file -> the 8-bit RGB image it should classify like
        "float 0..1 TIFF": (_tiff(Image.fromarray(np.asarray(grey, dtype=np.float32) / 255.0, mode="F")), grey_top),
        "float 0..255 TIFF": (_tiff(Image.fromarray(np.asarray(grey, dtype=np.float32), mode="F")), grey_top),
        "16-bit PNG": (encode(Image.fromarray(np.asarray(grey, dtype=np.uint16) * 257), "PNG"), grey_top),
        "LA PNG": (encode(la, "PNG"), grey_top),
        "RGBA PNG": (encode(rgb.convert("RGBA"), "PNG"), rgb_top),
        "CMYK JPEG": (encode(rgb.convert("CMYK"), "JPEG", quality=95), rgb_top),
        "CMYK TIFF": (_tiff(rgb.convert("CMYK")), rgb_top),
        "palette + transparency PNG": (encode(palette, "PNG", transparency=0), top1(efficientnet,
                                                                                   encode(palette.convert("RGB"), "PNG"))),
        "multi-frame GIF": (frames.getvalue(), top1(efficientnet, encode(palette.convert("RGB"), "PNG"))),
        "PNG with 1.4 MB XMP": (_png_with_xmp(rgb, 1_400_000), rgb_top),
    }
    got = {name: top1(efficientnet, raw) for name, (raw, _) in cases.items()}
    assert got == {name: want for name, (_, want) in cases.items()}


def test_xmp_png_is_small_on_the_wire_but_large_inflated():
    raw = _png_with_xmp(Image.new("RGB", (8, 8)), 1_400_000)
    assert len(raw) < 1_000_000 and decode_image(raw, max_pixels=10**8).size == (8, 8)


@pytest.mark.parametrize("make,words", [
    (lambda g: Image.fromarray(np.asarray(g, dtype=np.float32) * 4.0 - 10.0, mode="F"), "values from"),
    (lambda g: Image.fromarray(np.full(np.asarray(g).shape, np.nan, dtype=np.float32), mode="F"), "NaN"),
    (lambda g: g.convert("RGB").convert("LAB"), "colour mode LAB"),
])
def test_modes_without_a_faithful_conversion_are_refused(make, words):
    grey = Image.fromarray(data.chelsea()).convert("L")
    raw = _tiff(make(grey))
    with pytest.raises(InvalidRequest, match=words) as info:
        decode_image(raw, max_pixels=10**8)
    assert info.value.param == "images[0]"


def test_compressed_metadata_past_the_bound_is_refused_clearly():
    raw = _png_with_xmp(Image.new("RGB", (8, 8)), 20 * 2**20)
    assert len(raw) < 5 * 2**20 and zlib  # zlib: the chunk really is compressed
    with pytest.raises(InvalidRequest, match="images\\[0\\]"):
        decode_image(raw, max_pixels=10**8)
