"""Runtimes and precisions of the forward, in process: speed and fidelity to fp32 torch on
held-out inputs (``python -m bench.runtimes``).

For each model (MiniLM, EfficientNet-Lite0, ResNet-50 with its demo weights: speed only matters
there; the SmolLM2-135M generator) and each variant the project serves (torch fp32, torch bf16,
onnxruntime fp32, onnxruntime int8; the generator: torch fp32 and bf16), the replica's own runner
(``maas.models``) is loaded as a replica loads it — export to the cache, fidelity guard and all —
and measured:

* items/s at a fixed batch (MiniLM 32 sentences, images 16) with 1 and 2 intra-op threads;
* the generator: tokens/s of greedy decoding (64 new tokens) at 1 and 8 rows, and the share of 32
  held-out prompts whose greedy 32-token text equals fp32's, both at the last thread count (bf16
  greedy text depends on the threads: SmolLM2 kept 25 of 32 texts at 1 thread, 29 at 2);
* fidelity to the fp32 torch runner on **held-out** inputs, none of them in the guard's probe set:
  sentences (default 1,000) taken from the docstrings of Python's standard library (first
  sentences of its public functions and classes, 6–40 words; reproducible offline, and everyday
  technical English), and for images every photo scikit-image ships (those of the probe set
  included, at other crops) in 5 crops × 2 flips × 3 scales.

The served comparison (the graph with a variant against LitServe's best) is ``python -m bench
--runtime minilm=onnxruntime:int8,...`` (see bench.__main__). Results go to
``bench/results/<name>.{json,md}`` with the CPU's model and flags.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = (("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32"),
            ("openvino", "int8"))
STDLIB_MODULES = ("argparse", "asyncio", "calendar", "collections", "configparser", "csv", "dataclasses", "datetime",
                  "decimal", "difflib", "email.message", "email.utils", "fractions", "ftplib", "functools", "gzip",
                  "http.client", "http.cookiejar", "imaplib", "inspect", "ipaddress", "json", "logging",
                  "logging.handlers", "mailbox", "multiprocessing.pool", "os", "pathlib", "pickle", "poplib", "pprint",
                  "queue", "random", "sched", "shutil", "smtplib", "socket", "socketserver", "sqlite3", "statistics",
                  "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "tkinter", "turtle",
                  "typing", "unittest.case", "unittest.mock", "urllib.parse", "urllib.request", "uuid", "wave",
                  "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile")
NOT_PHOTOS = ("chessboard", "logo", "text", "page", "phantom", "cell", "clock_motion", "color")


def held_out_sentences(n: int = 1000) -> list[str]:
    """``n`` distinct sentences from the standard library's docstrings (see the module docstring);
    the guard's probe sentences are excluded."""
    import importlib

    from maas.models.runtimes import PROBE_SENTENCES

    seen: set[str] = set(PROBE_SENTENCES)
    out: list[str] = []
    for name in STDLIB_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        objects = [module] + [v for k, v in sorted(vars(module).items()) if not k.startswith("_")
                              and (inspect.isfunction(v) or inspect.isclass(v))]
        for obj in objects:
            doc = inspect.getdoc(obj) or ""
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                words = sentence.split()
                if 6 <= len(words) <= 40 and sentence[0].isupper() and sentence not in seen and ">>>" not in sentence:
                    seen.add(sentence)
                    out.append(sentence)
                    if len(out) == n:
                        return out
    return out


def held_out_images(crop_px: int, resize_px: int, interpolation: str) -> np.ndarray:
    """Every scikit-image photo in 5 crops × 2 flips × 3 scales, preprocessed as the model's
    preprocessing does: ``uint8`` (N, crop_px, crop_px, 3)."""
    import skimage
    from PIL import Image

    from maas.config import ImagePreprocessingSpec
    from maas.preprocess.image import transform

    folder = Path(skimage.__file__).parent / "data"
    files = sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg")
                   and not any(p.stem.startswith(bad) for bad in NOT_PHOTOS))
    crops = ((0, 0, 1, 1), (0, 0, 0.6, 0.6), (0.4, 0.4, 1, 1), (0.4, 0, 1, 0.6), (0.2, 0.2, 0.8, 0.8))
    out = []
    for path in files:
        img = Image.open(path).convert("RGB")
        w, h = img.size
        for left, top, right, bottom in crops:
            view = img.crop((int(w * left), int(h * top), int(w * right), int(h * bottom)))
            for flip in (False, True):
                v = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else view
                for scale in (1.0, 1.25, 0.875):
                    spec = ImagePreprocessingSpec(resize_px=max(crop_px, round(resize_px * scale)), crop_px=crop_px,
                                                  interpolation=interpolation)
                    out.append(transform(v, spec))
    return np.stack(out)


def spec_of(name: str, runtime: str, precision: str):
    import yaml

    from bench import workloads
    from maas.config import ModelSpec

    models = yaml.safe_load(workloads.LOCAL_CONFIG.read_text())["applications"][0]["args"]["models"]
    raw = next(m for m in models if m["name"] == name)
    # Every variant is measured here, whatever its fidelity: the guard's thresholds are set to
    # nothing, and the report says whether the default guard would have let it serve.
    return ModelSpec.model_validate({**raw, "runtime": runtime, "precision": precision, "fidelity": OPEN_GUARD})


#: A guard that lets every variant serve (for measuring it).
OPEN_GUARD = {"min_cosine": -1.0, "min_top1_agreement": 0.0, "min_top5_overlap": 0.0, "min_greedy_match": 0.0}


def default_guard(spec, probe_fidelity: dict | None) -> str:
    """``pass``, or the thresholds of the default guard (:class:`maas.config.FidelitySpec`) the
    variant's probe fidelity misses."""
    from maas.config import FidelitySpec
    from maas.models import ort

    if not probe_fidelity:
        return "pass"
    misses = ort.guard(spec.model_copy(update={"fidelity": FidelitySpec()}), probe_fidelity)
    return "pass" if not misses else "refused: " + "; ".join(misses)


def load(name: str, runtime: str, precision: str, threads: int):
    import torch

    from maas.models.image_classifier import ImageClassifierRunner
    from maas.models.text_encoder import TextEncoderRunner
    from maas.models.text_generator import TextGeneratorRunner

    torch.set_num_threads(threads)
    spec = spec_of(name, runtime, precision)
    runner = {"text-encoder": TextEncoderRunner, "image-classifier": ImageClassifierRunner,
              "text-generator": TextGeneratorRunner}[spec.family](spec)
    started = time.perf_counter()
    runner.load()
    runner.prepare_runtime()
    return runner, time.perf_counter() - started


def text_requests(runner, texts: list[str]):
    from maas.models.base import ModelRequest
    from maas.preprocess.text import TokenizedBatch, load_text_tokenizer, pad_right

    tok = load_text_tokenizer(runner.spec.tokenizer_source, runner.spec.name)
    rows, counts = tok.encode(texts, max_length=runner.max_input_tokens, truncate=True)
    pad = tok.pad_token_id or 0
    ids, mask = pad_right(rows, pad)
    return [ModelRequest(TokenizedBatch(ids, mask, counts, pad), {"task": "embeddings"})]


def image_requests(pixels: np.ndarray):
    from maas.models.base import ModelRequest
    from maas.preprocess.image import ImageBatch

    return [ModelRequest(ImageBatch(np.ascontiguousarray(pixels)), {"top_k": 5, "return_logits": True})]


def outputs(runner, inputs, batch: int) -> np.ndarray:
    """The runner's embeddings (N, D) or logits (N, C) for every input, ``batch`` at a time."""
    rows = []
    for start in range(0, len(inputs), batch):
        part = inputs[start:start + batch]
        if runner.spec.family == "text-encoder":
            rows.append(runner.run(text_requests(runner, part))[0]["embeddings"])
        else:
            rows.append(np.array([r["logits"] for r in runner.run(image_requests(part))[0]["results"]]))
    return np.concatenate(rows)


def speed(runner, inputs, batch: int, seconds: float) -> float:
    """Items per second of ``runner.run`` on one batch of ``batch`` inputs, over ``seconds``."""
    reqs = text_requests(runner, inputs[:batch]) if runner.spec.family == "text-encoder" else image_requests(inputs[:batch])
    runner.run(reqs)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        runner.run(reqs)
        done += batch
    return done / (time.perf_counter() - started)


def cpu() -> dict:
    """The CPU's model name and the flags that decide int8/bf16 speed."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "unknown")
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return {"model": model, "flags": [f for f in wanted if f in flags]}


GENERATOR_ROWS = (1, 8)
GENERATOR_TOKENS = 64


def tokens_per_s(runner, prompts: list[str], rows: int, seconds: float) -> float:
    """Greedy decoding tokens/s: ``rows`` prompts at once, :data:`GENERATOR_TOKENS` new tokens each
    (no early end), repeated for ``seconds``."""
    import torch

    batch = runner.fidelity_probe(prompts[:rows]).batch
    kwargs = dict(max_new_tokens=GENERATOR_TOKENS, min_new_tokens=GENERATOR_TOKENS, do_sample=False,
                  temperature=None, top_p=None, top_k=None, pad_token_id=runner.pad_token_id)
    with torch.inference_mode():
        runner.model.generate(**batch, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            runner.model.generate(**batch, **kwargs)
            done += rows * GENERATOR_TOKENS
    return done / (time.perf_counter() - started)


def run_generator(name: str, threads: list[int], seconds: float) -> dict:
    """fp32 and bf16 torch of a generator: tokens/s at :data:`GENERATOR_ROWS` rows for each thread
    count, and greedy-text agreement with fp32 on 32 held-out prompts."""
    import torch

    from maas.models import runtimes

    prompts = held_out_sentences(32)
    reference, _ = load(name, "torch", "fp32", threads[-1])
    with torch.inference_mode():
        ref_out = reference.fidelity_outputs(reference.fidelity_probe(prompts))
    rows = []
    for precision in ("fp32", "bf16"):
        row = {"runtime": "torch", "precision": precision}
        for t in threads:
            runner, load_s = load(name, "torch", precision, t)
            for n in GENERATOR_ROWS:
                row[f"tokens_per_s_{n}rows_{t}t"] = round(tokens_per_s(runner, prompts, n, seconds), 1)
            if t == threads[-1]:  # the reference's threads: greedy text depends on the reduction order
                info = runner.runtime_info
                with torch.inference_mode():
                    out = runner.fidelity_outputs(runner.fidelity_probe(prompts))
                row.update(load_s=round(load_s, 1), served_as=f"{info['name']} {info['precision']}",
                           probe_fidelity=info.get("fidelity"), held_out=runtimes.greedy_fidelity(ref_out, out),
                           held_out_items=len(prompts), default_guard=default_guard(runner.spec, info.get("fidelity")))
        print(name, json.dumps(row), flush=True)
        rows.append(row)
    keys = [k for k in rows[0] if k.startswith("tokens_per_s_")]
    for row in rows:
        row["speedup"] = {k.removeprefix("tokens_per_s_"): round(row[k] / rows[0][k], 2) for k in keys}
    return {"batch": f"{'/'.join(map(str, GENERATOR_ROWS))} rows × {GENERATOR_TOKENS} tokens",
            "demo_weights": reference.spec.is_demo, "generator": True, "variants": rows}


def run(models: list[str], threads: list[int], seconds: float, sentences: int, max_images: int | None,
        variants: tuple[tuple[str, str], ...] = VARIANTS) -> dict:
    """Every model × variant (torch fp32 always first: the speed-ups' base); see the module docstring."""
    from maas.models import runtimes

    result = {"cpu": cpu(), "models": {}}
    for name in models:
        if spec_of(name, "torch", "fp32").family == "text-generator":
            result["models"][name] = run_generator(name, threads, seconds)
            continue
        reference, _ = load(name, "torch", "fp32", 1)
        family = reference.spec.family
        if family == "text-encoder":
            inputs, batch = held_out_sentences(sentences), 32
        else:
            pre = reference.pre
            inputs, batch = held_out_images(pre.crop_px, pre.resize_px, pre.interpolation), 16
            if max_images:
                inputs = inputs[np.random.default_rng(0).permutation(len(inputs))[:max_images]]
        ref_out = outputs(reference, inputs, batch)
        rows = []
        for runtime, precision in (("torch", "fp32"), *(v for v in variants if v != ("torch", "fp32"))):
            if (runtime, precision, family) == ("openvino", "int8", "text-encoder"):
                continue  # refused by the config (see maas.config.ModelSpec)
            row = {"runtime": runtime, "precision": precision}
            for t in threads:
                runner, load_s = load(name, runtime, precision, t)
                info = runner.runtime_info
                row[f"items_per_s_{t}t"] = round(speed(runner, inputs, batch, seconds), 1)
                if t == threads[0]:
                    row.update(load_s=round(load_s, 1), served_as=f"{info['name']} {info['precision']}",
                               probe_fidelity=info.get("fidelity"), artifact_bytes=info.get("artifact", {}).get("bytes"),
                               default_guard=default_guard(runner.spec, info.get("fidelity")))
                    out = outputs(runner, inputs, batch)
                    row["held_out"] = (runtimes.embedding_fidelity(ref_out, out) if family == "text-encoder"
                                       else runtimes.logit_fidelity(ref_out, out))
                    row["held_out_items"] = len(inputs)
            print(name, json.dumps(row), flush=True)
            rows.append(row)
        base = {t: rows[0][f"items_per_s_{t}t"] for t in threads}
        for row in rows:
            row["speedup"] = {f"{t}t": round(row[f"items_per_s_{t}t"] / base[t], 2) for t in threads}
        result["models"][name] = {"batch": batch, "demo_weights": reference.spec.is_demo, "variants": rows}
    return result


def markdown(result: dict, threads: list[int]) -> str:
    lines = [f"CPU: {result['cpu']['model']} (flags: {', '.join(result['cpu']['flags'])})", ""]
    for name, m in result["models"].items():
        if m.get("generator"):
            keys = list(m["variants"][0]["speedup"])
            lines += [f"### {name}{' (demo weights)' if m['demo_weights'] else ''}, greedy, {m['batch']}", "",
                      "| runtime | precision | default guard | " + " | ".join(f"tokens/s {k.replace('_', ' ')}" for k in keys)
                      + " | speed-up | held-out greedy text | probe fidelity |",
                      "|---|---|---|" + "---|" * len(keys) + "---|---|---|"]
            for r in m["variants"]:
                held = ", ".join(f"{k} {v}" for k, v in r["held_out"].items()) + f" ({r['held_out_items']} prompts)"
                probe = ", ".join(f"{k} {v}" for k, v in (r["probe_fidelity"] or {}).items() if k != "probe_items") or "-"
                lines.append(f"| {r['runtime']} | {r['precision']} | {r.get('default_guard', '-')} | "
                             + " | ".join(str(r[f"tokens_per_s_{k}"]) for k in keys)
                             + f" | {' / '.join(f'{v}×' for v in r['speedup'].values())} | {held} | {probe} |")
            lines.append("")
            continue
        lines += [f"### {name}{' (demo weights)' if m['demo_weights'] else ''}, batch {m['batch']}", "",
                  "| runtime | precision | default guard | " + " | ".join(f"items/s {t} thr" for t in threads)
                  + " | speed-up | held-out fidelity | probe fidelity | file MB |",
                  "|---|---|---|" + "---|" * len(threads) + "---|---|---|---|"]
        for r in m["variants"]:
            held = ", ".join(f"{k} {v}" for k, v in r["held_out"].items()) + f" ({r['held_out_items']} items)"
            probe = ", ".join(f"{k} {v}" for k, v in (r["probe_fidelity"] or {}).items() if k != "probe_items") or "-"
            size = f"{r['artifact_bytes'] / 1e6:.1f}" if r.get("artifact_bytes") else "-"
            lines.append(f"| {r['runtime']} | {r['precision']} | {r.get('default_guard', '-')} | "
                         + " | ".join(str(r[f"items_per_s_{t}t"]) for t in threads)
                         + f" | {' / '.join(f'{v}×' for v in r['speedup'].values())} | {held} | {probe} | {size} |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path, threads: int = 2) -> None:
    """One panel per model: each variant's speed-up over torch fp32 at ``threads`` threads (the
    generator: at 8 rows), bars hatched where the default guard refuses the variant, labelled with
    its held-out fidelity (cosine, top-1 agreement, or greedy-text match)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"].items())
    fig, axes = plt.subplots(1, len(models), figsize=(3.4 * len(models), 3.6), squeeze=False)
    for ax, (name, m) in zip(axes[0], models):
        rows = m["variants"]
        key = f"8rows_{threads}t" if m.get("generator") else f"{threads}t"
        speeds = [r["speedup"].get(key, 0) for r in rows]
        labels = [f"{r['runtime'].replace('onnxruntime', 'ort')}\n{r['precision']}" for r in rows]
        refused = [not str(r.get("default_guard", "pass")).startswith("pass") for r in rows]
        bars = ax.bar(labels, speeds, color=["#bbbbbb" if x else "#4c72b0" for x in refused],
                      hatch=None)
        for bar, x in zip(bars, refused):
            if x:
                bar.set_hatch("//")
        for bar, r in zip(bars, rows):
            held = r["held_out"]
            fid = held.get("mean_cosine", held.get("top1_agreement", held.get("greedy_match")))
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{fid:.3g}", ha="center", va="bottom",
                    fontsize=8)
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_title(f"{name}{' (demo)' if m['demo_weights'] else ''}", fontsize=10)
        ax.set_ylabel(f"speed-up vs torch fp32 ({'tokens' if m.get('generator') else 'items'}/s, {threads} thr)",
                      fontsize=8)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"{result['cpu']['model']}: numbers = held-out fidelity; hatched = refused by the default guard",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="minilm,efficientnet-lite0,resnet50,smollm2-135m")
    parser.add_argument("--variants", default="", help="RUNTIME:PRECISION,… (default: all; torch:fp32 always runs)")
    parser.add_argument("--threads", default="1,2", help="intra-op threads to measure (comma-separated)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per variant and thread count")
    parser.add_argument("--sentences", type=int, default=1000, help="held-out sentences for text encoders")
    parser.add_argument("--max-images", type=int, default=None, help="held-out image views at most (random subset)")
    parser.add_argument("--name", default=time.strftime("%Y-%m-%d") + "-runtimes")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--plot", default=None, help="only plot: result JSON files (comma-separated) into one "
                        "figure named --name")
    args = parser.parse_args(argv)
    if args.plot:
        merged: dict = {"models": {}}
        for f in args.plot.split(","):
            part = json.loads(Path(f).read_text())
            merged["cpu"] = part["cpu"]
            merged["models"].update(part["models"])
        plot(merged, Path(args.out) / f"{args.name}.png")
        return
    threads = [int(t) for t in args.threads.split(",")]
    variants = tuple(tuple(v.split(":")) for v in args.variants.split(",")) if args.variants else VARIANTS
    result = run(args.models.split(","), threads, args.seconds, args.sentences, args.max_images, variants)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{args.name}.md").write_text(markdown(result, threads))
    plot(result, out / f"{args.name}.png", threads[-1])
    print(markdown(result, threads))


if __name__ == "__main__":
    main()
