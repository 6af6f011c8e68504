"""Image decoding and preprocessing parity with torchvision's presets (no Ray)."""

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data

from maas.config import ImagePreprocessingSpec
from maas.errors import InvalidRequest, PayloadTooLarge
from maas.models.image_classifier import nchw, normalize
from maas.preprocess.image import decode_image, preprocess_images
from tests.conftest import encode

V1 = ImagePreprocessingSpec(resize_px=256, crop_px=224, interpolation="bilinear")


def _exif_rotated_jpeg() -> tuple[bytes, Image.Image]:
    """A JPEG stored sideways with EXIF orientation 6 (display = rotate 90° clockwise)."""
    upright = Image.fromarray(data.astronaut())
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise on disk
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes()), upright


def _cases():
    chelsea = data.chelsea()
    rgba = Image.fromarray(data.coffee()).convert("RGBA")
    rgba.putalpha(Image.fromarray((np.arange(400 * 600) % 256).reshape(400, 600).astype(np.uint8)))
    exif_bytes, _ = _exif_rotated_jpeg()
    return {
        "jpeg": encode(chelsea, "JPEG", quality=90),
        "png-alpha": encode(rgba, "PNG"),
        "greyscale": encode(data.camera(), "PNG"),
        "exif-rotated": exif_bytes,
    }


@pytest.mark.parametrize("case", list(_cases()))
@pytest.mark.parametrize("arch,member", [("resnet50", "IMAGENET1K_V1"), ("resnet50", "IMAGENET1K_V2"),
                                         ("vgg16", "IMAGENET1K_V1")])
def test_parity_with_torchvision_preset(case, arch, member):
    """uint8 pipeline + model-side normalisation == torchvision weights.transforms().

    Reference: what a torchvision user does: PIL open, exif_transpose, convert('RGB'),
    weights.transforms(). Measured max abs difference: 0.0 (bit-identical); 1e-5 is allowed for
    float32 rounding differences across torch builds, far below what could change a top-5.
    """
    import torchvision
    from PIL import ImageOps

    from maas.config import ModelSpec
    from maas.models.image_classifier import resolve_image_preprocessing

    raw = _cases()[case]
    spec = resolve_image_preprocessing(ModelSpec(
        name="m", family="image-classifier", tasks=["image-classification"], library="torchvision",
        architecture=arch, weights={"source": "torchvision", "weights": member}))
    ours = normalize(nchw(preprocess_images([raw], spec, max_pixels=10**8).pixels), spec.mean, spec.std)
    preset = torchvision.models.get_model_weights(arch)[member].transforms()
    ref = preset(ImageOps.exif_transpose(Image.open(io.BytesIO(raw))).convert("RGB")).unsqueeze(0)
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    assert (ours - ref).abs().max().item() < 1e-5


def test_exif_orientation_applied():
    raw, upright = _exif_rotated_jpeg()
    img = decode_image(raw, max_pixels=10**8)
    assert img.size == upright.size  # width/height swapped back
    diff = np.abs(np.asarray(img, dtype=np.int16) - np.asarray(upright, dtype=np.int16)).mean()
    assert diff < 4  # JPEG noise only; an unrotated image differs by ~60


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_formats_decode_to_rgb(fmt):
    raw = encode(data.chelsea(), fmt)
    batch = preprocess_images([raw], V1, max_pixels=10**8)
    assert batch.pixels.dtype == np.uint8 and batch.pixels.shape == (1, 224, 224, 3)


def test_modes_convert_to_rgb():
    cmyk = encode(Image.fromarray(data.chelsea()).convert("CMYK"), "JPEG")
    deep = Image.fromarray(data.camera().astype(np.uint16) * 257)
    assert deep.mode.startswith("I;16")
    palette = Image.fromarray(data.chelsea()).convert("P")
    palette.info["transparency"] = 0
    for raw in (cmyk, encode(deep, "PNG"), encode(palette, "PNG", transparency=0)):
        img = decode_image(raw, max_pixels=10**8)
        assert img.mode == "RGB"
    # 16-bit grey is rescaled, not clipped to white.
    grey = np.asarray(decode_image(encode(deep, "PNG"), max_pixels=10**8))[..., 0]
    assert abs(int(grey.mean()) - int(data.camera().mean())) <= 1


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    img = decode_image(buf.getvalue(), max_pixels=10**8)
    r, g, b = img.getpixel((10, 10))
    assert r > 200 and b < 50


def test_bad_bytes_and_bombs():
    with pytest.raises(InvalidRequest, match=r"images\[0\] is empty"):
        decode_image(b"", max_pixels=100)
    with pytest.raises(InvalidRequest, match="not a decodable image"):
        decode_image(b"<html>hello</html>", max_pixels=100)
    with pytest.raises(InvalidRequest, match="truncated or corrupt"):
        decode_image(encode(data.chelsea(), "JPEG")[:2000], max_pixels=10**8)
    big = encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(PayloadTooLarge, match="3000x3000 = 9000000 pixels"):
        decode_image(big, max_pixels=1_000_000)


@pytest.mark.parametrize("case", list(_cases()))
def test_efficientnet_parity_with_timm_transform(case, local_args):
    """EfficientNet-Lite0's configured preprocessing == timm's eval transform with the same
    resize/crop/interpolation (timm computes resize as crop / crop_pct)."""
    from PIL import ImageOps
    from timm.data import create_transform

    from maas.config import ModelSpec

    spec = ModelSpec.model_validate(next(m for m in local_args["models"] if m["name"] == "efficientnet-lite0"))
    pre = spec.preprocessing
    raw = _cases()[case]
    ours = normalize(nchw(preprocess_images([raw], pre, max_pixels=10**8).pixels), pre.mean, pre.std)
    ref_tf = create_transform(input_size=pre.crop_px, crop_pct=pre.crop_px / pre.resize_px,
                              interpolation=pre.interpolation, mean=pre.mean, std=pre.std)
    ref = ref_tf(ImageOps.exif_transpose(Image.open(io.BytesIO(raw))).convert("RGB")).unsqueeze(0)
    assert (ours - ref).abs().max().item() < 1e-5
