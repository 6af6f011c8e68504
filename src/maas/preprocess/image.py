"""Image preprocessing: decode, orient, convert to RGB, resize, centre-crop, to ``uint8``.

The pure functions here are what the :class:`ImagePreprocessor` deployment runs; they need
no Ray and are unit-tested against torchvision's presets. One deployment serves every image
model whose :class:`~maas.config.ImagePreprocessingSpec` has the same key (resize, crop,
interpolation); mean/std normalisation runs on the model replica, on its device.

Colour policy: alpha is dropped (``Image.convert("RGB")``), as torchvision's ``ImageFolder``
loader does, so results equal what a torchvision user gets; 16-bit and 32-bit integer
greyscale are scaled to 0..255 by their bit depth (Pillow's own conversion would clip them).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from maas.config import ImagePreprocessingSpec
from maas.errors import InvalidRequest, PayloadTooLarge

logger = logging.getLogger("ray.serve.maas.preprocess.image")

SUPPORTED_FORMATS = "JPEG, PNG, WebP, BMP, TIFF, GIF"
_INTERPOLATION = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


@dataclass
class ImageBatch:
    """A batch of preprocessed images, handed from preprocessor to model replica.

    Attributes:
        pixels: ``torch.uint8`` of shape ``(N, 3, crop_px, crop_px)``, RGB, not normalised.
    """

    pixels: torch.Tensor

    def __len__(self) -> int:
        return int(self.pixels.shape[0])


def decode_image(data: bytes, *, max_pixels: int, index: int = 0) -> Image.Image:
    """Decode encoded image bytes into an upright RGB Pillow image.

    GIF and other multi-frame files give their first frame. EXIF orientation is applied.

    Args:
        data: The encoded file (JPEG, PNG, WebP, BMP, TIFF or GIF).
        max_pixels: Width × height above which the image is refused *before* its pixels are
            decoded (decompression-bomb guard).
        index: Position of the image in the request, for error messages.

    Raises:
        InvalidRequest: empty, undecodable or truncated data.
        PayloadTooLarge: the header declares more than ``max_pixels`` pixels.
    """
    param = f"images[{index}]"
    if not data:
        raise InvalidRequest(f"{param} is empty; send the bytes of a {SUPPORTED_FORMATS} file", param=param)
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise PayloadTooLarge(
            f"{param} declares more pixels than Pillow's own safety limit allows (and above this service's limit "
            f"of {max_pixels}); downscale it before sending",
            param=param,
        ) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidRequest(
            f"{param} is not a decodable image ({type(exc).__name__}); supported formats: {SUPPORTED_FORMATS}",
            param=param,
        ) from None
    width, height = img.size
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"{param} is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}; "
            "downscale it before sending",
            param=param,
        )
    try:
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidRequest(
            f"{param} could not be decoded ({type(exc).__name__}: {str(exc)[:200]}); "
            "the file may be truncated or corrupt",
            param=param,
        ) from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (alpha dropped, deep greyscale rescaled)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        depth = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "I" and arr.max(initial=0) > 65535:
            depth = float(2**31 - 1)
        arr8 = np.clip(np.rint(arr / depth * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def transform(img: Image.Image, spec: ImagePreprocessingSpec) -> torch.Tensor:
    """Resize the shorter side to ``resize_px`` and centre-crop ``crop_px``, as torchvision's
    ``ImageClassification`` preset does on a PIL image (Pillow resampling, antialiased).

    Returns:
        ``torch.uint8`` of shape ``(3, crop_px, crop_px)``.
    """
    img = F.resize(img, [spec.resize_px], interpolation=_INTERPOLATION[spec.interpolation], antialias=True)
    img = F.center_crop(img, [spec.crop_px])
    return F.pil_to_tensor(img)


def image_from_array(array: np.ndarray, *, max_pixels: int, index: int = 0) -> Image.Image:
    """An RGB Pillow image from decoded pixels, ``uint8`` of shape ``(H, W, 3)``.

    Raises:
        InvalidRequest: wrong dtype or shape. PayloadTooLarge: above ``max_pixels``.
    """
    param = f"images[{index}]"
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise InvalidRequest(f"{param} must be uint8 pixels of shape (H, W, 3), got {array.dtype} {array.shape}",
                             param=param)
    if array.shape[0] * array.shape[1] > max_pixels:
        raise PayloadTooLarge(f"{param} has {array.shape[0] * array.shape[1]} pixels, above the limit of {max_pixels}",
                              param=param)
    return Image.fromarray(np.ascontiguousarray(array))


def preprocess_images(
    images: list[bytes | np.ndarray], spec: ImagePreprocessingSpec, *, max_pixels: int
) -> ImageBatch:
    """Decode and transform every image of one request.

    Args:
        images: Encoded files, or decoded ``uint8`` (H, W, 3) RGB arrays (Open Inference
            Protocol ``UINT8`` tensors), in request order.

    Returns:
        :class:`ImageBatch` with ``pixels`` of shape ``(len(images), 3, crop_px, crop_px)``.

    Raises:
        InvalidRequest / PayloadTooLarge: from :func:`decode_image`, naming the image index.
    """
    if not images:
        raise InvalidRequest("no images in the request; send at least one", param="images")
    tensors = [
        transform(
            image_from_array(b, max_pixels=max_pixels, index=i) if isinstance(b, np.ndarray)
            else decode_image(b, max_pixels=max_pixels, index=i),
            spec,
        )
        for i, b in enumerate(images)
    ]
    return ImageBatch(pixels=torch.stack(tensors))


def normalize(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], dtype=torch.float32) -> torch.Tensor:
    """Model-side normalisation: ``(pixels / 255 - mean) / std``.

    Args:
        pixels: ``torch.uint8`` of shape ``(N, 3, H, W)`` on the model's device.

    Returns:
        ``dtype`` tensor of shape ``(N, 3, H, W)``, equal to torchvision's
        ``convert_image_dtype`` + ``Normalize``.
    """
    x = pixels.to(dtype).div_(255.0)
    m = torch.tensor(mean, dtype=dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=dtype, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)


from ray import serve  # noqa: E402 - the deployment below is the only Ray-dependent part


@serve.deployment(ray_actor_options={"num_cpus": 0.2})
class ImagePreprocessor:
    """Shared image preprocessing deployment (CPU only), one per preprocessing key.

    Args:
        spec: :class:`~maas.config.ImagePreprocessingSpec` as a dict.
        max_image_pixels: Decompression-bomb limit, pixels (width × height).
    """

    def __init__(self, spec: dict, max_image_pixels: int):
        from maas.models.base import replica_num_cpus, set_torch_threads

        set_torch_threads(replica_num_cpus())
        self.spec = ImagePreprocessingSpec.model_validate(spec)
        self.max_image_pixels = max_image_pixels

    def __call__(self, images: list[bytes | np.ndarray], model: str = "-") -> ImageBatch:
        """Decode and transform one request's images for ``model`` (a metrics tag) into
        ``uint8`` (N, 3, crop, crop)."""
        import time

        from maas import metrics

        started = time.perf_counter()
        out = preprocess_images(images, self.spec, max_pixels=self.max_image_pixels)
        metrics.stage(model, "preprocess", 1000 * (time.perf_counter() - started))
        return out
