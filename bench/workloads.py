"""The model work every system does, written as plain torch code (what a user writes).

The limit (:mod:`bench.limit`) and both peers (:mod:`bench.peers`) call these functions, so
they run the same model with the same weights and the same preprocessing as maas-serve:

* images: Pillow decode → RGB → resize (shorter side) → centre crop → float tensor →
  normalise → batched forward → softmax top-5. Same resize/crop/interpolation/mean/std as
  the model's entry in ``serve_configs/local.yaml``.
* sentences: tokenise (padding to the longest, truncation at the model's limit) →
  batched forward → mean pooling → L2 normalise (all-MiniLM-L6-v2's sentence-transformers
  recipe).

Weights come from maas's own loaders (the package weights the serve config names), so every
system computes the same numbers; only the hot path is written here.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
LOCAL_CONFIG = ROOT / "serve_configs" / "local.yaml"

#: The benchmarked models: name in the serve config → kind of work.
KINDS = {"efficientnet-lite0": "image", "resnet50": "image", "minilm": "text"}


def model_spec(name: str, config_path: Path = LOCAL_CONFIG):
    """The :class:`~maas.config.ModelSpec` of ``name`` in a serve config.

    Raises:
        KeyError: the config has no such model.
    """
    from maas.app import parse_config

    raw = yaml.safe_load(config_path.read_text())
    config = parse_config(raw["applications"][0]["args"])
    for spec in config.models:
        if spec.name == name:
            return spec
    raise KeyError(f"{config_path} has no model named {name!r}")


def replica_threads(name: str, config_path: Path = LOCAL_CONFIG) -> int:
    """Torch threads the served replica of ``name`` gets (:func:`maas.models.base.torch_threads_for`;
    a ``deployments:`` override of ``ray_actor_options.num_cpus`` wins over the model's ``resources``)."""
    from maas.models.base import torch_threads_for

    raw = yaml.safe_load(config_path.read_text())
    app = raw["applications"][0]
    spec = model_spec(name, config_path)
    if spec.resources.torch_threads:
        return spec.resources.torch_threads
    num_cpus = spec.resources.num_cpus
    for dep in app.get("deployments") or []:
        if dep.get("name") == name and "num_cpus" in (dep.get("ray_actor_options") or {}):
            num_cpus = dep["ray_actor_options"]["num_cpus"]
    return torch_threads_for(num_cpus)


@dataclass
class ImageWork:
    """An image classifier and its eval transform.

    Attributes:
        model: ``torch.nn.Module`` in eval mode, float32, CPU.
        transform: Pillow image → ``float32`` (3, crop, crop), normalised.
    """

    name: str
    model: torch.nn.Module
    transform: object

    def decode(self, jpeg: bytes) -> torch.Tensor:
        """Encoded image → normalised ``float32`` tensor (3, crop, crop)."""
        from PIL import Image

        return self.transform(Image.open(io.BytesIO(jpeg)).convert("RGB"))

    @torch.inference_mode()
    def classify(self, pixels: torch.Tensor, top_k: int = 5) -> list[list[tuple[int, float]]]:
        """Batched forward. ``pixels``: ``float32`` (N, 3, H, W) → per image ``[(class, prob)]``."""
        probs = torch.softmax(self.model(pixels), dim=-1)
        values, indices = probs.topk(top_k, dim=-1)
        return [list(zip(i.tolist(), v.tolist())) for i, v in zip(indices, values)]

    def run(self, jpegs: list[bytes]) -> list[list[tuple[int, float]]]:
        """Decode + transform + one batched forward for all of ``jpegs``."""
        return self.classify(torch.stack([self.decode(j) for j in jpegs]))


@dataclass
class TextWork:
    """A sentence encoder with its tokenizer and pooling."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    max_length: int

    @torch.inference_mode()
    def run(self, texts: list[str]) -> torch.Tensor:
        """Tokenise + one batched forward + mean pooling + L2 normalise.

        Returns:
            ``float32`` (len(texts), hidden) unit vectors.
        """
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        hidden = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


class NullModel(torch.nn.Module):
    """The peers' null forward, the same as maas-serve's (:class:`maas.config.NullForwardSpec`):
    correctly shaped outputs without computing, after holding the caller ``hold_ms + per_item_ms ×
    items`` (``time.sleep``: no CPU).

    Image: ``pixels`` (N, 3, H, W) → zero logits ``float32`` (N, classes). Text: ``input_ids``
    (N, L) → an object whose ``last_hidden_state`` (N, L, D) is e₀ at every position (pooled and
    normalised: the unit vector e₀, as maas-serve's null answer).
    """

    def __init__(self, classes: int = 0, dim: int = 0, hold_ms: float = 0.0, per_item_ms: float = 0.0):
        super().__init__()
        self.classes, self.dim, self.hold_ms, self.per_item_ms = classes, dim, hold_ms, per_item_ms

    def forward(self, pixels: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None):
        import time
        from types import SimpleNamespace

        x = pixels if pixels is not None else input_ids
        n = int(x.shape[0])
        hold_s = (self.hold_ms + self.per_item_ms * n) / 1000
        if hold_s > 0:
            time.sleep(hold_s)
        if pixels is not None:
            return torch.zeros(n, self.classes)
        hidden = torch.zeros(n, int(x.shape[1]), self.dim)
        hidden[..., 0] = 1.0
        return SimpleNamespace(last_hidden_state=hidden)


class OrtTextWork:
    """A sentence encoder on ONNX Runtime: the tokenizer and the exported session, nothing else —
    the plain server a careful user writes around an ONNX model. The session is the file
    maas-serve's replica serves (the same cache, exported by the same code), so a peer and
    maas-serve run the same int8 model.

    ``run(texts)`` → ``float32`` (len(texts), D) pooled, normalised embeddings.
    """

    def __init__(self, name: str, spec, threads: int, max_length: int):
        from transformers import AutoTokenizer

        from maas.models import ort
        from maas.models.onnx_serving import export_in_child
        from maas.preprocess.text import _tokenizer_dir

        artifact = ort.find_artifact(spec)
        if artifact is None:
            artifact = Path(export_in_child(spec, threads)["artifact"])
        self.name, self.max_length = name, max_length
        self.session = ort.OrtModel(artifact / "model.onnx", threads)
        self.tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir(spec.tokenizer_source, name))

    def run(self, texts: list[str]):
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="np")
        return self.session({"input_ids": enc["input_ids"].astype("int64"),
                             "attention_mask": enc["attention_mask"].astype("int64")})[0]


class OrtImageModule(torch.nn.Module):
    """An exported image classifier's ONNX Runtime session as ``pixels float32 (N, 3, H, W) →
    logits (N, C)``, in :class:`ImageWork`'s place of the torch model."""

    def __init__(self, spec, threads: int):
        super().__init__()
        from maas.models import ort
        from maas.models.onnx_serving import export_in_child

        artifact = ort.find_artifact(spec) or Path(export_in_child(spec, threads)["artifact"])
        self.session = ort.OrtModel(artifact / "model.onnx", threads)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session({"pixels": pixels.contiguous().numpy()})[0])


def load(name: str, threads: int, config_path: Path = LOCAL_CONFIG, null_forward: dict | None = None,
         runtime: str | None = None) -> ImageWork | TextWork | OrtTextWork:
    """Load ``name`` from the serve config for in-process use with ``threads`` torch threads.

    Args:
        null_forward: ``{"hold_ms", "per_item_ms"}``: replace the model's forward with
            :class:`NullModel` (the serving-path benchmark, :mod:`bench.null`); None = the real model.
        runtime: ``"onnxruntime:<precision>"``: run the model's ONNX export (:class:`OrtTextWork`,
            :class:`OrtImageModule`) instead of torch.

    Raises:
        KeyError: ``name`` is not a benchmarked model.
    """
    if runtime:
        kind, precision = runtime.split(":")
        spec = model_spec(name, config_path).model_copy(update={"runtime": kind, "precision": precision})
        torch.set_num_threads(threads)
        if KINDS[name] == "image":
            work = _load(name, threads, config_path)
            work.model = OrtImageModule(spec, threads)
            return work
        return OrtTextWork(name, spec, threads, _load(name, threads, config_path).max_length)
    work = _load(name, threads, config_path)
    if null_forward is not None:
        if isinstance(work, ImageWork):
            labels = model_spec(name, config_path).labels
            classes = len(labels) if isinstance(labels, list) else 1000  # "imagenet": ImageNet-1k
            work.model = NullModel(classes=classes, **null_forward)
        else:
            work.model = NullModel(dim=int(work.model.config.hidden_size), **null_forward)
    return work


def _load(name: str, threads: int, config_path: Path) -> ImageWork | TextWork:
    torch.set_num_threads(threads)
    spec = model_spec(name, config_path)
    kind = KINDS[name]
    if kind == "image":
        from torchvision import transforms as T

        from maas.models.image_classifier import ImageClassifierRunner

        runner = ImageClassifierRunner(spec, "cpu")
        runner.load()
        pre = runner.pre
        transform = T.Compose([
            T.Resize(pre.resize_px, interpolation=T.InterpolationMode(pre.interpolation), antialias=True),
            T.CenterCrop(pre.crop_px),
            T.ToTensor(),
            T.Normalize(pre.mean, pre.std),
        ])
        return ImageWork(name, runner.model, transform)
    from maas.models.text_encoder import TextEncoderRunner
    from maas.preprocess.text import load_tokenizer

    runner = TextEncoderRunner(spec, "cpu")
    runner.load()
    return TextWork(name, runner.model, load_tokenizer(spec.tokenizer_source, name), runner.max_input_tokens)
