"""The forward's runtime and precision on a replica: torch fp32 (the reference), torch bf16, and
ONNX Runtime fp32 or int8 — each variant checked against the fp32 reference before the replica
reports ready (the fidelity guard).

Export once, reuse. An onnxruntime replica exports its model to ONNX (and quantises it) at first
start, into ``cache_dir()/runtimes/<name>-<precision>-<key>/``, and every later start or other
replica on the machine loads that file. The key hashes what the file depends on: the weights
(every parameter and buffer of the loaded model), the runtime, precision, export recipe and
the versions of torch, onnx and onnxruntime. The directory is written under a file lock into a
temporary directory and renamed into place (as the GGUF unpacking in :mod:`maas.weights`), and
its ``meta.json`` holds the SHA-256 of the model file: a file that does not match (a crash
mid-copy, a disk error, a hand edit) is rebuilt, never loaded.

A replica that serves ONNX Runtime does not import torch (:mod:`maas.models.onnx_serving`): it
runs :func:`main` (``python -m maas.models.runtimes``) in a child process when the machine has no
export yet, which loads the torch model, exports, guards, and leaves beside the model file what
the replica needs (:mod:`maas.models.ort`).

Recipes (measured on a 2-vCPU AMD EPYC with AVX-512 VNNI and bf16, no AMX, 1 thread):

* text encoders, int8: dynamic quantisation of MatMul weights only, per output channel
  (``quantize_dynamic(op_types_to_quantize=["MatMul"], per_channel=True)``). MiniLM-L6: mean
  cosine 0.993 to fp32 on 64 sentences; per-tensor weights (MatMul only, or every op with the
  embedding Gather) gave 0.965.
* image classifiers, int8: static QDQ quantisation, per channel, uint8 activations calibrated on
  the probe photos at another scale. EfficientNet-Lite0: 0.87 top-1 agreement on 240 held-out
  views, far below the default guard (depthwise convolutions quantise badly); its ONNX Runtime
  fp32 was 2.25× torch's speed with identical top-1, so ``onnxruntime fp32`` is its variant.
* bf16 (torch) for generators: bf16 linear layers (but attention's value and output
  projections) around an fp32 residual stream, the head rescored in fp32 (:func:`bf16_generator`); guarded by the greedy text of the probe sentences as
  prompts (32 new tokens each, one batch).
* bf16 (torch): MiniLM 1.8× fp32 at cosine ≥ 0.9999; EfficientNet-Lite0 2.25× but 0.946 top-1
  agreement on held-out views (bench/results/2026-12-06-runtimes.md).

Threads: ONNX Runtime's intra-op threads = the replica's torch threads (its CPUs), inter-op 1,
and its worker threads do not spin waiting for work (replicas share cores with the ingress and
the preprocessors on small machines; a spinning pool takes their CPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from maas.config import ModelSpec
from maas.errors import WeightsError
from maas.models.ort import (  # noqa: F401
    RECIPE_VERSION,
    OrtModel,
    open_model,
    embedding_fidelity,
    file_digest,
    greedy_fidelity,
    guard,
    logit_fidelity,
    refusal,
    valid,
    versions,
)

logger = logging.getLogger("ray.serve.maas.models.runtimes")


#: Fixed probe sentences of the fidelity guard (written for it: everyday topics, 5–25 words, some
#: questions, numbers and names). Held-out checks (bench.runtimes) use other sentences.
PROBE_SENTENCES = [
    "The train to the airport leaves every twenty minutes from platform four.",
    "How long should I boil an egg so that the yolk stays soft?",
    "Our quarterly revenue grew by 12 percent compared with last year.",
    "She planted tomatoes, basil and peppers along the south wall of the garden.",
    "The museum is closed on Mondays and on public holidays.",
    "Can you recommend a good book about the history of mathematics?",
    "Heavy rain is expected tonight, with winds up to 80 km/h near the coast.",
    "He fixed the leaking kitchen tap with a new washer.",
    "The council voted to extend the cycle lane to the station.",
    "Which programming language should a beginner learn first?",
    "The cat slept all afternoon in a patch of sunlight.",
    "Please send the signed contract back before Friday.",
    "A strong password mixes letters, digits and symbols.",
    "The orchestra played Beethoven's fifth symphony to a full hall.",
    "My laptop battery drains much faster since the last update.",
    "Volcanic ash closed several airports in the region for two days.",
    "Add the flour slowly and keep stirring until the sauce thickens.",
    "The new bridge will shorten the commute by fifteen minutes.",
    "Is it safe to swim in the lake after a thunderstorm?",
    "The striker scored twice in the second half.",
    "Customers can return unused items within thirty days.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "Our guest house sits on a quiet street behind the market square.",
    "Our team moved the weekly meeting to Thursday morning.",
    "What is the difference between a virus and a bacterium?",
    "The library lends e-books as well as printed ones.",
    "A sudden frost damaged most of the apple blossoms.",
    "He has been learning to play the cello for three years.",
    "The software crashes whenever I open a large spreadsheet.",
    "Fresh snow covered the mountain pass overnight.",
    "The recipe serves four people and takes forty minutes.",
    "Electric cars are getting cheaper to buy and to run.",
]

#: Photos of scikit-image's ``skimage.data`` (bundled with the package, no download) and the views
#: of each that the probe set uses: (left, top, right, bottom) crop fractions.
PROBE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
PROBE_CROPS = ((0, 0, 1, 1), (0, 0, 0.7, 0.7), (0.3, 0.3, 1, 1), (0.15, 0.1, 0.85, 0.9))


@dataclass
class Probe:
    """The fixed inputs of the fidelity guard, as the replica's ``preprocess`` would make them.

    Attributes:
        batch: what ``forward`` takes (a dict of tensors, or one tensor).
        feeds: the same as numpy arrays by ONNX input name (export and ONNX Runtime).
        calibration: int8 static quantisation's calibration feeds (other views), or None.
        items: texts or images in the probe.
        raw: the inputs before the runner's own collation (``pixels`` uint8 NHWC for images;
            ``input_ids``/``attention_mask`` for texts), so a torch-free replica can run them
            through its own input path.
    """

    batch: object
    feeds: dict[str, np.ndarray]
    calibration: list[dict[str, np.ndarray]] | None
    items: int
    raw: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Export:
    """How a family exports its forward to ONNX.

    Attributes:
        module: ``forward(*inputs)`` returning the tensors named in ``outputs`` (fp32).
        inputs: ONNX input names, in ``module.forward``'s order.
        outputs: ONNX output names.
        dynamic_axes: per input and output name, ``{axis: name}`` of its dynamic axes.
        recipe: what else changes the file (pooling, normalisation, …), hashed into the cache key.
    """

    module: torch.nn.Module
    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    recipe: dict = field(default_factory=dict)


def probe_images(crop_px: int, resize_px: int, interpolation: str, *, calibration: bool = False) -> np.ndarray:
    """The probe photos, each in its :data:`PROBE_CROPS` views and their mirror images, resized and
    centre-cropped as the model's preprocessing does. ``calibration=True`` gives the int8
    calibration set instead: the same views resized to 1.25 × ``resize_px`` (other pixels, the
    same kind of content), so the guard does not measure on what calibrated the model.

    Returns:
        ``uint8`` (32, crop_px, crop_px, 3) NHWC.

    Raises:
        WeightsError: scikit-image (the photos' package) is not installed.
    """
    try:
        from skimage import data
    except ImportError:
        raise WeightsError("the fidelity guard of an image classifier needs scikit-image for its probe photos: "
                           "pip install 'maas-serve[runtimes]' (`make install` installs it)") from None
    from PIL import Image

    from maas.config import ImagePreprocessingSpec
    from maas.preprocess.image import transform

    shorter = round(resize_px * 1.25) if calibration else resize_px
    spec = ImagePreprocessingSpec(resize_px=shorter, crop_px=crop_px, interpolation=interpolation)
    out = []
    for name in PROBE_PHOTOS:
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        w, h = img.size
        for left, top, right, bottom in PROBE_CROPS:
            view = img.crop((int(w * left), int(h * top), int(w * right), int(h * bottom)))
            out.append(transform(view, spec))
            out.append(transform(view.transpose(Image.Transpose.FLIP_LEFT_RIGHT), spec))
    return np.stack(out)


# ---------------------------------------------------------------------------- torch bf16 for generators


class Bf16Linear(torch.nn.Module):
    """A linear layer (``torch.nn.Linear``, or transformers' ``Conv1D`` of GPT-2) whose weight is bfloat16: ``float32 (..., in) -> float32 (..., out)``; the
    input is rounded to bfloat16 for the matmul (oneDNN accumulates in fp32) and the bias added
    in fp32, so the residual stream around it stays fp32."""

    def __init__(self, linear: torch.nn.Module):
        super().__init__()
        weight = linear.weight.detach()
        if not isinstance(linear, torch.nn.Linear):  # transformers' Conv1D (GPT-2): weight (in, out)
            weight = weight.t()
        self.weight = torch.nn.Parameter(weight.to(torch.bfloat16).contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().float(),
                                                                         requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x.to(torch.bfloat16), self.weight).float()
        return y if self.bias is None else y + self.bias


class RescoredHead(torch.nn.Module):
    """A language-model head that scores the vocabulary in bfloat16 and then its ``k`` best tokens
    again in fp32: ``float32 (..., D) -> float32 (..., V)`` logits whose top-``k`` entries are the
    fp32 values. Greedy decoding then picks fp32's token whenever that token is among bf16's top
    ``k``; sampling sees bf16 logits elsewhere (relative error 2⁻⁸). Measured on SmolLM2-135M with
    :class:`Bf16Linear` everywhere else: a bf16 head left 22 of 32 probe prompts with fp32's greedy
    text, an fp32 head 29 and this head 29 too, at 1.6–1.7× fp32's tokens/s (32 rows) against
    1.46× with the fp32 head.

    Args:
        linear: the fp32 head; its weight is kept as is (often tied to the input embeddings, so
            no second fp32 copy) beside a bfloat16 copy.
        k: tokens rescored per position (default 16).
    """

    def __init__(self, linear: torch.nn.Linear, k: int = 16):
        super().__init__()
        self.fp32 = linear.weight.detach()
        self.weight = torch.nn.Parameter(self.fp32.to(torch.bfloat16), requires_grad=False)
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self.k = min(k, self.fp32.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(x.to(torch.bfloat16), self.weight).float()
        top = logits.topk(self.k, dim=-1).indices  # (..., k)
        exact = (x.float().unsqueeze(-2) * self.fp32[top]).sum(-1)
        if self.bias is not None:
            exact = exact + self.bias[top]
        return logits.scatter_(-1, top, exact)


#: Linear layers of a generator kept fp32 in its bf16 variant (Llama-family names: attention's value
#: and output projections). See :func:`bf16_generator`.
FP32_PROJECTIONS = ("v_proj", "o_proj")


def bf16_generator(model: torch.nn.Module) -> torch.nn.Module:
    """The generator's bf16 variant: a copy of ``model`` whose linear layers (and GPT-2's ``Conv1D``
    projections) hold bfloat16 weights (:class:`Bf16Linear`), except attention's value and output
    projections (:data:`FP32_PROJECTIONS`), and whose output head is :class:`RescoredHead`;
    embeddings, norms and the residual stream stay fp32.

    Measured on SmolLM2-135M (2 threads; greedy text of 32 probe and 32 held-out prompts, 32 new
    tokens; tokens/s at 8 rows and 1 row against fp32): the whole model cast to bf16 kept 21/32 probe
    texts; every linear bf16 with this head 29/32 probe, 23/32 held-out at 1.49× / 1.41×; keeping
    ``v_proj`` and ``o_proj`` fp32, 30/32 and 29/32 at 1.45× / 1.47× (keeping all of attention fp32
    lost the speed, 1.03× at 8 rows; keeping the first and last two layers, 27/32 and 28/32).

    Returns:
        The new module (``model`` is left unchanged, as the fallback). It shares every fp32 tensor
        with ``model`` (embeddings, norms, the kept projections, the head's fp32 weight).
    """
    import copy

    # The copy shares every fp32 tensor with ``model`` (no second copy); its linear layers are
    # then swapped for bf16 ones.
    out = copy.deepcopy(model, {id(t): t for t in [*model.parameters(), *model.buffers()]})
    head = out.get_output_embeddings()
    for module in list(out.modules()):
        for name, child in list(module.named_children()):
            if child is head:
                setattr(module, name, RescoredHead(child))
            elif name in FP32_PROJECTIONS:
                continue
            elif isinstance(child, torch.nn.Linear) or type(child).__name__ == "Conv1D":
                setattr(module, name, Bf16Linear(child))
    return out


# ---------------------------------------------------------------------------- ONNX Runtime


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter's and buffer's name, dtype, shape and bytes (the weights as
    loaded, whatever their source)."""
    h = hashlib.sha256()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(spec: ModelSpec, export: Export) -> str:
    """The artifact's key: weights, runtime, precision, recipe and library versions (16 hex)."""
    parts = {"weights": weights_digest(export.module), "runtime": spec.runtime, "precision": spec.precision,
             "family": spec.family, "recipe": export.recipe, "recipe_version": RECIPE_VERSION, **versions()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _export(spec: ModelSpec, export: Export, probe: Probe, out_dir: Path) -> None:
    """Write ``model.onnx`` (fp32 or int8) and ``meta.json`` into ``out_dir``.

    The exporter's warnings and the quantiser's per-tensor notes (root-logger INFO lines) are
    silenced: they are about the exporter's internals, not something an operator can act on; the
    fidelity guard is what checks the result."""
    import warnings

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _export_quiet(spec, export, probe, out_dir)
    finally:
        root.setLevel(level)


def _export_quiet(spec: ModelSpec, export: Export, probe: Probe, out_dir: Path) -> None:
    fp32 = out_dir / "fp32.onnx"
    example = tuple(torch.from_numpy(probe.feeds[name][:2]) for name in export.inputs)
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(export.module, example, str(fp32), input_names=export.inputs, output_names=export.outputs,
                          dynamic_axes=export.dynamic_axes, opset_version=17, dynamo=False)
    target = out_dir / "model.onnx"
    if spec.precision == "int8":
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

        if spec.family == "text-encoder":
            quantize_dynamic(str(fp32), str(target), op_types_to_quantize=["MatMul"], per_channel=True,
                             weight_type=QuantType.QInt8)
        else:
            from onnxruntime.quantization import CalibrationDataReader
            from onnxruntime.quantization.shape_inference import quant_pre_process

            class Reader(CalibrationDataReader):
                def __init__(self, feeds):
                    self.it = iter(feeds)

                def get_next(self):
                    return next(self.it, None)

            pre = out_dir / "pre.onnx"
            # In out_dir: when its symbolic shape inference is incomplete, onnxruntime saves
            # sym_shape_infer_temp.onnx and a <uuid>.data file of every weight into the current directory
            # (a 90 MB one was once committed from the repository root). Here they go with out_dir.
            src, dst = str(fp32.resolve()), str(pre.resolve())  # absolute: resolved before the chdir
            with contextlib.chdir(out_dir):
                quant_pre_process(src, dst)
            quantize_static(str(pre), str(target), Reader(probe.calibration or []), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            pre.unlink()
        fp32.unlink()
    else:
        fp32.rename(target)
    (out_dir / "meta.json").write_text(json.dumps({"sha256": file_digest(target), "runtime": spec.runtime,
                                                   "precision": spec.precision, "recipe": export.recipe,
                                                   "bytes": target.stat().st_size, **versions()}, indent=1))


def onnx_model(spec: ModelSpec, export: Export, probe: Probe, threads: int) -> tuple[OrtModel, dict]:
    """The ONNX Runtime model of ``spec``: loaded from the cache, else exported (once per machine).

    Returns:
        ``(model, artifact)`` with ``artifact = {"path", "bytes", "reused", "rebuilt"}``:
        ``reused`` when the file came from the cache, ``rebuilt`` when a cached file failed its
        checksum or did not load and was made again.

    Raises:
        WeightsError: the export or quantisation failed (its message carries the cause).
    """
    import fcntl

    from maas.weights import cache_dir

    target = cache_dir() / "runtimes" / f"{spec.name}-{spec.precision}-{cache_key(spec, export)}"
    target.parent.mkdir(parents=True, exist_ok=True)
    rebuilt = False
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one export per machine: other replicas wait and reuse it
        if target.exists():
            if valid(target):
                try:
                    model = open_model(spec.runtime, target / "model.onnx", threads)
                    return model, _artifact(target, reused=True, rebuilt=False)
                except WeightsError:
                    raise
                except Exception as exc:  # noqa: BLE001 - any load failure of a cached file: make it again
                    logger.warning("model %s: cached %s does not load (%s); exporting it again", spec.name, target,
                                   str(exc)[:200])
            else:
                logger.warning("model %s: cached %s fails its checksum; exporting it again", spec.name, target)
            shutil.rmtree(target, ignore_errors=True)
            rebuilt = True
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            logger.info("model %s: exporting to ONNX (%s) into %s (once per machine)", spec.name, spec.precision, target)
            _export(spec, export, probe, tmp)
            tmp.chmod(0o755)
            os.rename(tmp, target)
        except Exception as exc:  # noqa: BLE001 - exporter and quantiser errors of any kind
            shutil.rmtree(tmp, ignore_errors=True)
            raise WeightsError(f"model {spec.name!r}: could not export to ONNX ({spec.precision}): "
                               f"{type(exc).__name__}: {str(exc)[:300]}") from None
    return open_model(spec.runtime, target / "model.onnx", threads), _artifact(target, reused=False, rebuilt=rebuilt)


def _artifact(path: Path, *, reused: bool, rebuilt: bool) -> dict:
    return {"path": str(path), "bytes": (path / "model.onnx").stat().st_size, "reused": reused, "rebuilt": rebuilt}


# ---------------------------------------------------------------------------- the switch


def prepare(spec: ModelSpec, *, reference: Callable[[], np.ndarray | dict], variant_setup: Callable[[], dict],
            variant: Callable[[], np.ndarray | dict], measure: Callable[[object, object], dict], items: int,
            fallback: Callable[[], None]) -> dict:
    """Switch a loaded fp32 torch model to the spec's runtime/precision, guarded.

    Args:
        reference: the fp32 torch outputs of the probe (run before the switch).
        variant_setup: makes the variant current (casts to bf16, or loads/exports the ONNX
            model); returns facts for ``info()`` (e.g. ``artifact``, ``threads``).
        variant: the variant's outputs of the probe.
        measure: ``(reference, variant) -> {metric: value}``.
        items: probe items (for messages).
        fallback: makes fp32 torch current again (``on_failure: fp32``).

    Returns:
        The ``runtime`` entry of ``info()``: ``name``, ``precision``, ``fidelity`` (the measured
        metrics and ``probe_items``), ``fallback`` (why fp32 serves instead, or absent) and the
        setup's facts.

    Raises:
        WeightsError: the variant misses a threshold and ``fidelity.on_failure`` is ``refuse``.
    """
    ref = reference()
    facts = variant_setup()
    measured = measure(ref, variant())
    entry = {"name": spec.runtime, "precision": spec.precision, "fidelity": {**measured, "probe_items": items}, **facts}
    misses = guard(spec, measured)
    if misses:
        message = refusal(spec, misses, items)
        if spec.fidelity.on_failure == "refuse":
            raise WeightsError(message)
        fallback()
        logger.warning("%s; serving torch fp32 (fidelity.on_failure: fp32)", message)
        entry.update(name="torch", precision="fp32", fallback=f"{spec.runtime} {spec.precision}: {'; '.join(misses)}")
    else:
        logger.info("model %s: %s %s holds its fidelity guard: %s", spec.name, spec.runtime, spec.precision, measured)
    from maas import metrics

    for metric, value in measured.items():
        metrics.fidelity(spec.key, metric, value)
    return entry


# ---------------------------------------------------------------------------- the export child process


def export_for_replica(spec: ModelSpec, threads: int) -> dict:
    """What a torch-free replica asks of its child process: load the torch runner, prepare its
    runtime (export or reuse, quantise, guard against fp32 torch), and leave in the artifact
    directory ``replica-<spec key>.json`` (the runner's facts) and ``probe-<spec key>.npz`` (the
    probe's raw inputs and fp32 torch outputs, named ``raw:<input>`` and ``ref:<output>``), then
    point the spec's source key at it.

    Returns:
        ``{"artifact": path, "runtime": runtime_info}``; ``artifact`` is None when the variant
        missed its guard and ``fidelity.on_failure`` is fp32 (the replica then serves torch).

    Raises:
        WeightsError: the variant fails its guard (``on_failure: refuse``) or cannot be exported.
    """
    from maas.models import ort
    from maas.models.image_classifier import ImageClassifierRunner
    from maas.models.text_encoder import TextEncoderRunner

    torch.set_num_threads(threads)
    runner = {"text-encoder": TextEncoderRunner, "image-classifier": ImageClassifierRunner}[spec.family](spec)
    runner.load()
    runner.prepare_runtime(keep_reference=True)
    info = runner.runtime_info
    if info["name"] != spec.runtime:
        return {"artifact": None, "runtime": info}
    artifact = Path(info["artifact"]["path"])
    probe, reference = runner.fidelity_reference
    outputs = reference if isinstance(reference, dict) else {"logits": reference}
    arrays = {f"raw:{k}": v for k, v in (probe.raw or probe.feeds).items()}
    arrays.update({f"ref:{k}": v.float().cpu().numpy() for k, v in outputs.items() if v is not None})
    facts = {"info": {k: v for k, v in runner.info().items() if k != "device"}, **runner.replica_facts()}
    # Several specs may share one export (same weights, other labels, preprocessing or limits):
    # each gets its own facts and probe files, named by its spec key.
    key = ort.spec_key(spec)
    import fcntl

    with open(artifact.parent / f".{artifact.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tmp = artifact / f".probe.{os.getpid()}.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, artifact / f"probe-{key}.npz")
        tmp = artifact / f".replica.{os.getpid()}.json"
        tmp.write_text(json.dumps(facts))
        os.replace(tmp, artifact / f"replica-{key}.json")
    ort.write_pointer(spec, artifact)
    return {"artifact": str(artifact), "runtime": info}


def main(argv: list[str] | None = None) -> int:
    """``python -m maas.models.runtimes THREADS`` with the model spec as JSON on stdin: runs
    :func:`export_for_replica` and prints its result as one JSON line on stdout (``{"error":
    message}`` for a WeightsError, exit status 2). Logs go to stderr."""
    import sys

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    args = argv if argv is not None else sys.argv[1:]
    spec = ModelSpec.model_validate_json(sys.stdin.read())
    # ONNX Runtime's shape inference writes a temporary file into the working directory when it
    # cannot finish; keep it in the cache, not wherever the replica was started.
    from maas.models import ort

    ort.runtimes_dir().mkdir(parents=True, exist_ok=True)
    os.chdir(ort.runtimes_dir())
    try:
        result = export_for_replica(spec, int(args[0]) if args else 1)
    except WeightsError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
