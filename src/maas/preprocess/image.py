"""Image preprocessing: decode, orient, convert to RGB, resize, centre-crop, to ``uint8`` NHWC.

The pure functions here are what the :class:`ImagePreprocessor` deployment runs; they need
no Ray and no torch (Pillow + numpy only, so a preprocessor replica stays small), and they are
unit-tested against torchvision's presets, bit for bit. One deployment serves every image
model whose :class:`~maas.config.ImagePreprocessingSpec` has the same key (resize, crop,
interpolation); mean/std normalisation runs on the model replica, on its device.

Pixels leave as ``uint8`` of shape ``(N, H, W, 3)`` (NHWC): that is the layout decoders
produce, four times fewer bytes than float32, and on the model replica
``torch.from_numpy(x).permute(0, 3, 1, 2)`` is already the ``channels_last`` tensor the CNNs
run fastest on, with no copy. (DESIGN.md says (N, 3, H, W); NHWC saves a transpose here and
a reorder on the model.)

Colour policy: alpha is dropped (``Image.convert("RGB")``), as torchvision's ``ImageFolder``
loader does, so results equal what a torchvision user gets; 16-bit and 32-bit integer
greyscale are scaled to 0..255 by their bit depth, and 32-bit float greyscale (``F``, as
scientific and medical pipelines write TIFFs) by its range, 0..1 or 0..255 (Pillow's own
conversions clip them: a 0..1 float image would read as black). A mode with no faithful RGB
conversion (LAB, HSV, float values outside both ranges, NaN) gets a 400 that says so: a
silently wrong picture would give a confident wrong answer. Multi-frame files (GIF, APNG,
multi-page TIFF) give their first frame.

Metadata is not read: a PNG's compressed text chunks (XMP, as photo editors write) may inflate
up to :data:`MAX_METADATA_BYTES` each before Pillow refuses them, instead of Pillow's 1 MB.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from maas.batching.jobs import Preprocessed, run_jobs
from maas.config import ImagePreprocessingSpec
from maas.errors import InvalidRequest, PayloadTooLarge

logger = logging.getLogger("ray.serve.maas.preprocess.image")

#: Largest decompressed PNG text chunk (bytes) accepted before the file is refused; Pillow's
#: default (1 MiB) refused real photos carrying XMP (a 284 KB file whose text inflates to 1.4 MB).
MAX_METADATA_BYTES = 16 * 2**20
PngImagePlugin.MAX_TEXT_CHUNK = MAX_METADATA_BYTES
PngImagePlugin.MAX_TEXT_MEMORY = 4 * MAX_METADATA_BYTES

SUPPORTED_FORMATS = "JPEG, PNG, WebP, BMP, TIFF, GIF"
#: Pillow resampling filters, as torchvision maps its InterpolationMode names (pil_modes_mapping).
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


@dataclass
class ImageBatch:
    """A batch of preprocessed images, handed from preprocessor to model replica.

    Attributes:
        pixels: ``numpy.uint8`` of shape ``(N, crop_px, crop_px, 3)``, RGB, not normalised.
    """

    pixels: np.ndarray

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def rows(self, start: int, stop: int) -> "ImageBatch":
        """Images ``start:stop`` (a view)."""
        return ImageBatch(self.pixels[start:stop])


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
        # In place: without an orientation tag this is a no-op, not a copy of the decoded image. Measured on
        # the build VM (bench.null's 156 KB 768×768 JPEG, in process): decode_image 3.3-3.8 -> 2.1-2.4 ms.
        ImageOps.exif_transpose(img, in_place=True)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidRequest(
            f"{param} could not be decoded ({type(exc).__name__}: {str(exc)[:200]}); "
            "the file may be truncated or corrupt",
            param=param,
        ) from None
    return to_rgb(img, param)


def _scaled_to_8bit(arr: np.ndarray, param: str, mode: str) -> Image.Image:
    """Float greyscale → 8-bit: values in 0..1 scale by 255, values in 0..255 pass as they are."""
    if not np.isfinite(arr).all():
        raise InvalidRequest(f"{param} is a {mode} image holding NaN or infinite values; send finite values "
                             "(0..1 or 0..255) or an 8-bit image", param=param)
    low, high = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
    if low >= 0.0 and high <= 1.0:
        arr = arr * 255.0
    elif low < 0.0 or high > 255.0:
        raise InvalidRequest(f"{param} is a {mode} image with values from {low:g} to {high:g}; this service reads "
                             "float pixels in 0..1 or 0..255 — rescale it, or send an 8-bit image", param=param)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, param: str = "image") -> Image.Image:
    """Convert a Pillow image to 8-bit RGB (alpha dropped, deep and float greyscale rescaled).

    Raises:
        InvalidRequest: a mode with no faithful conversion (LAB, HSV, out-of-range floats).
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        depth = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "I" and arr.max(initial=0) > 65535:
            depth = float(2**31 - 1)
        arr8 = np.clip(np.rint(arr / depth * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "F":
        return _scaled_to_8bit(np.asarray(img, dtype=np.float64), param, "32-bit float").convert("RGB")
    if img.mode in ("LAB", "HSV"):
        raise InvalidRequest(f"{param} is in colour mode {img.mode}, which this service does not convert; send RGB, "
                             "greyscale, palette or CMYK", param=param)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise InvalidRequest(f"{param} is in image mode {img.mode}, which cannot be converted to RGB "
                             f"({str(exc)[:120]}); send RGB or greyscale", param=param) from None


def resized_size(width: int, height: int, shorter_px: int) -> tuple[int, int]:
    """``(new_width, new_height)`` with the shorter side at ``shorter_px``: torchvision's
    ``_compute_resized_output_size`` (the longer side is ``int(shorter_px * long / short)``)."""
    if width <= height:
        return shorter_px, int(shorter_px * height / width)
    return int(shorter_px * width / height), shorter_px


def transform(img: Image.Image, spec: ImagePreprocessingSpec) -> np.ndarray:
    """Resize the shorter side to ``resize_px`` and centre-crop ``crop_px``, exactly as
    torchvision's ``ImageClassification`` preset does on a PIL image (Pillow resampling,
    antialiased; the crop offset rounds half to even like torchvision's ``round``).

    Returns:
        ``numpy.uint8`` of shape ``(crop_px, crop_px, 3)``.
    """
    size = resized_size(img.width, img.height, spec.resize_px)
    if size != img.size:
        img = img.resize(size, resample=_RESAMPLE[spec.interpolation])
    crop = spec.crop_px
    top = int(round((img.height - crop) / 2.0))
    left = int(round((img.width - crop) / 2.0))
    # Pillow fills any part of the box outside the image with zeros, as torchvision's padding does
    # (unreachable here: the config keeps crop_px <= resize_px).
    return np.asarray(img.crop((left, top, left + crop, top + crop)))


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
        :class:`ImageBatch` with ``pixels`` of shape ``(len(images), crop_px, crop_px, 3)``.

    Raises:
        InvalidRequest / PayloadTooLarge: from :func:`decode_image`, naming the image index.
    """
    if not images:
        raise InvalidRequest("no images in the request; send at least one", param="images")
    out = np.empty((len(images), spec.crop_px, spec.crop_px, 3), dtype=np.uint8)
    for i, b in enumerate(images):
        img = (image_from_array(b, max_pixels=max_pixels, index=i) if isinstance(b, np.ndarray)
               else decode_image(b, max_pixels=max_pixels, index=i))
        out[i] = transform(img, spec)
    return ImageBatch(out)


def preprocess_jobs(jobs: list[list[bytes | np.ndarray]], spec: ImagePreprocessingSpec, *,
                    max_pixels: int) -> Preprocessed[ImageBatch]:
    """:func:`preprocess_images` for each job of a front batch; a job whose image fails keeps
    its error (naming the image's index in that job) and the others go on.

    Returns:
        :class:`~maas.batching.jobs.Preprocessed` whose ``inputs`` hold the good jobs' images,
        ``uint8`` (N_ok, crop_px, crop_px, 3).
    """
    outputs, errors = run_jobs(jobs, lambda images, _: preprocess_images(images, spec, max_pixels=max_pixels))
    good = [o.pixels for o in outputs if o is not None]
    inputs = ImageBatch(good[0] if len(good) == 1 else np.concatenate(good)) if good else None
    return Preprocessed(inputs=inputs, rows=[len(o) if o is not None else 0 for o in outputs], errors=errors)


#: The "full" explanation view's longer side is capped at this many times ``resize_px`` (a panorama
#: would otherwise make a huge input for one explanation).
EXPLAIN_MAX_ASPECT = 3


def explain_view(data: bytes | np.ndarray, spec: ImagePreprocessingSpec, view: str, *, max_pixels: int,
                 thumb_px: int | None = None) -> dict:
    """The pixels an explanation runs on and where they sit in the original image.

    ``view="served"``: exactly what classification sees (resize the shorter side to ``resize_px``,
    centre-crop ``crop_px``). ``view="full"``: the whole image at the same scale, no crop (a CNN
    with global pooling takes any size; the crop would hide the outer parts of a wide or tall
    photo), the longer side capped at :data:`EXPLAIN_MAX_ASPECT` × ``resize_px``.

    Returns:
        ``{"pixels": uint8 (1, h, w, 3), "size": (W, H) of the original, "box": (x0, y0, x1, y1)}``,
        the box being the original-pixel region the pixels cover (floats); with ``thumb_px`` also
        ``"thumb"``: the original image, longer side at most ``thumb_px``, ``uint8`` (h, w, 3), for
        the overlay (so the ingress never decodes the file a second time).

    Raises:
        InvalidRequest / PayloadTooLarge: as :func:`decode_image`.
    """
    img = (to_rgb(decode_image(data, max_pixels=max_pixels)) if isinstance(data, (bytes, bytearray))
           else image_from_array(data, max_pixels=max_pixels))
    width, height = img.size
    if view == "served":
        pixels = transform(img, spec)
        rw, rh = resized_size(width, height, spec.resize_px)
        sx, sy = width / rw, height / rh
        top = int(round((rh - spec.crop_px) / 2.0))
        left = int(round((rw - spec.crop_px) / 2.0))
        box = (left * sx, top * sy, (left + spec.crop_px) * sx, (top + spec.crop_px) * sy)
    else:
        rw, rh = resized_size(width, height, spec.resize_px)
        cap = EXPLAIN_MAX_ASPECT * spec.resize_px
        if max(rw, rh) > cap:
            f = cap / max(rw, rh)
            rw, rh = max(1, int(rw * f)), max(1, int(rh * f))
        pixels = np.asarray(img.resize((rw, rh), resample=_RESAMPLE[spec.interpolation]))
        box = (0.0, 0.0, float(width), float(height))
    out = {"pixels": pixels[None], "size": (width, height), "box": box}
    if thumb_px is not None:
        scale = min(1.0, thumb_px / max(width, height))
        size = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
        out["thumb"] = np.asarray(img if size == img.size else img.resize(size, Image.BILINEAR))
    return out


from ray import serve  # noqa: E402 - the deployment below is the only Ray-dependent part


@serve.deployment(ray_actor_options={"num_cpus": 0.2})
class ImagePreprocessor:
    """Shared image preprocessing deployment (CPU only, no torch), one per preprocessing key.

    Args:
        spec: :class:`~maas.config.ImagePreprocessingSpec` as a dict.
        max_image_pixels: Decompression-bomb limit, pixels (width × height).
    """

    def __init__(self, spec: dict, max_image_pixels: int):
        self.spec = ImagePreprocessingSpec.model_validate(spec)
        self.max_image_pixels = max_image_pixels

    async def __call__(self, jobs: list[list[bytes | np.ndarray]], model: str = "-") -> Preprocessed[ImageBatch]:
        """Decode and transform a front batch of jobs (each a request's images) for ``model``
        (a metrics tag). See :func:`preprocess_jobs`.

        ``async`` although the work is synchronous: Serve runs a plain ``def`` method in a
        thread pool, a hand-off per call; the replica has nothing else to do meanwhile."""
        from maas import metrics

        started, started_ns = time.perf_counter(), time.time_ns()
        out = preprocess_jobs(jobs, self.spec, max_pixels=self.max_image_pixels)
        out.timing_ns = (started_ns, time.time_ns(), len(jobs))  # a traced batch's preprocess span
        metrics.stage(model, "preprocess", 1000 * (time.perf_counter() - started))
        return out

    async def explain_view(self, data: bytes | np.ndarray, view: str = "full", thumb_px: int | None = None) -> dict:
        """One image prepared for an explanation (see :func:`explain_view`)."""
        return explain_view(data, self.spec, view, max_pixels=self.max_image_pixels, thumb_px=thumb_px)
