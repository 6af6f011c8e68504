"""Explanations on the model replica: Grad-CAM for CNN classifiers, Integrated Gradients for text
encoders, both through captum, each with a faithfulness score.

Why these methods: Grad-CAM (Selvaraju et al., 2017) is the standard class-localisation map for
CNNs — one forward and one backward — and its coarse map (7×7 to 14×14 cells) is readable as an
overlay. Integrated Gradients (Sundararajan et al., 2017) attributes to tokens through the
embedding layer with a baseline of padding tokens, satisfies completeness, and costs ``n_steps``
forward/backward passes (:data:`IG_STEPS`, batched in one pass here). Both come from captum rather
than hand-written hooks.

Faithfulness (a deletion test, as in RISE / ROAR-style checks): the drop in the target's score
when the most-attributed 20 % of the input is masked, against the mean drop over
:data:`RANDOM_MASKS` random 20 % masks (seeded). Image pixels are set to the normalisation mean
(0 after normalisation); the random masks are the top region moved to random offsets (same shape
and area, see :func:`shifted_masks`). Tokens are removed from attention, random ones at random. ``score = drop_top − drop_random``:
above 0 means the explanation points at what the model uses more than chance does.

Tensor conventions: images come in as the preprocessor's ``uint8`` (1, H, W, 3) crop; maps go
out as ``float32`` numpy arrays normalised to [0, 1] (sum not 1).
"""

from __future__ import annotations

import numpy as np
import torch

#: Share of the input masked by the faithfulness test.
MASK_FRACTION = 0.2
#: Random masks averaged for the baseline drop.
RANDOM_MASKS = 4
#: Integrated-gradients interpolation steps (one batched forward/backward of this many rows).
IG_STEPS = 32


def last_spatial_layer(model: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    """The module whose output Grad-CAM uses: the last to finish (forward hooks fire after a
    module's children) with a 4-D output of spatial size > 1 — ResNet's ``layer4``, timm
    EfficientNet's ``bn2``, VGG's ``features``/``avgpool``."""
    last: list[torch.nn.Module] = []

    def hook(module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-1] > 1 and output.shape[-2] > 1:
            last.append(module)

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    if not last:
        raise ValueError("the model has no layer with a spatial (N, C, H, W) output to explain with Grad-CAM")
    return last[-1]


def grad_cam(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor, target: int) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM of class ``target`` for one image.

    Args:
        x: ``float32`` (1, 3, H, W), normalised.

    Returns:
        ``(cam, probs)``: ``float32`` (H, W) in [0, 1] (bilinear upsampling of the layer's map,
        ReLU, divided by its max; all zeros when nothing is positive) and the softmax
        probabilities ``float32`` (num_classes,).
    """
    from captum.attr import LayerAttribution, LayerGradCam

    x = x.detach().clone().requires_grad_(True)
    gc = LayerGradCam(model, layer)
    attr = gc.attribute(x, target=int(target), relu_attributions=True)
    up = LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), interpolate_mode="bilinear")[0, 0]
    cam = up.detach().float().clamp_min(0)
    peak = float(cam.max())
    cam = cam / peak if peak > 0 else cam
    with torch.no_grad():
        probs = torch.softmax(model(x.detach()).float(), dim=-1)[0]
    return cam.cpu().numpy().astype(np.float32), probs.cpu().numpy().astype(np.float32)


def top_mask(scores: np.ndarray, fraction: float = MASK_FRACTION) -> np.ndarray:
    """Boolean mask of the ``fraction`` highest entries of ``scores`` (ties broken by position)."""
    flat = scores.reshape(-1)
    k = max(1, int(round(fraction * flat.size)))
    order = np.argsort(-flat, kind="stable")[:k]
    mask = np.zeros(flat.size, dtype=bool)
    mask[order] = True
    return mask.reshape(scores.shape)


def random_masks(shape: tuple[int, ...], seed: int, count: int = RANDOM_MASKS,
                 fraction: float = MASK_FRACTION, allowed: np.ndarray | None = None) -> list[np.ndarray]:
    """``count`` random masks of ``fraction`` of the positions (of ``allowed`` ones), seeded."""
    rng = np.random.default_rng(seed)
    idx = np.flatnonzero(allowed.reshape(-1)) if allowed is not None else np.arange(int(np.prod(shape)))
    k = max(1, int(round(fraction * idx.size)))
    out = []
    for _ in range(count):
        m = np.zeros(int(np.prod(shape)), dtype=bool)
        m[rng.choice(idx, size=k, replace=False)] = True
        out.append(m.reshape(shape))
    return out


def faithfulness(base: float, top: float, randoms: list[float]) -> dict:
    """The faithfulness record from the target's score unmasked, top-masked and random-masked."""
    rand = float(np.mean(randoms))
    return {"target_score": round(base, 6), "masked_top_score": round(top, 6), "masked_random_score": round(rand, 6),
            "drop_top": round(base - top, 6), "drop_random": round(base - rand, 6),
            "score": round((base - top) - (base - rand), 6), "mask_fraction": MASK_FRACTION,
            "random_masks": len(randoms)}


def shifted_masks(top: np.ndarray, seed: int, count: int = RANDOM_MASKS) -> list[np.ndarray]:
    """Random masks of the same shape and area as ``top``: ``top`` moved by a random offset (rolled
    around the image edges, so exactly as many pixels), seeded.

    The same shape on purpose: the first version masked 20 % random *pixels* against the top
    *region*, and scattered pixel noise hurts a CNN far more than one solid blob, so sensible maps of
    the cat photo scored −0.27 (found by a trial run); random square patches still scored below 0
    on photos the object fills. A moved copy of the top region asks only whether *where* the map
    points matters.
    """
    rng = np.random.default_rng(seed)
    h, w = top.shape
    out = []
    for _ in range(count):
        dy = int(rng.integers(h // 4, h - h // 4 + 1)) if h >= 4 else 0
        dx = int(rng.integers(w // 4, w - w // 4 + 1)) if w >= 4 else 0
        out.append(np.roll(top, (dy, dx), axis=(0, 1)))
    return out


def image_faithfulness(model: torch.nn.Module, x: torch.Tensor, cam: np.ndarray, target: int, seed: int) -> dict:
    """Deletion test for an image map: the most-attributed 20 % of the pixels set to 0 (the
    normalisation mean) against the same region moved to random places (:func:`shifted_masks`);
    all masks in one batch."""
    top = top_mask(cam)
    masks = [top] + shifted_masks(top, seed)
    keep = torch.from_numpy(~np.stack(masks)).to(x.device)[:, None, :, :]
    batch = x.detach().expand(len(masks), -1, -1, -1) * keep.to(x.dtype)
    with torch.no_grad():
        p = torch.softmax(model(torch.cat([x.detach(), batch])).float(), dim=-1)[:, int(target)].cpu().numpy()
    return faithfulness(float(p[0]), float(p[1]), [float(v) for v in p[2:]])


def integrated_gradients(forward, embeddings: torch.nn.Module, input_ids: torch.Tensor, baseline_ids: torch.Tensor,
                         additional: tuple = ()) -> np.ndarray:
    """Token attributions (summed over the embedding dimension) of ``forward(input_ids, *additional)``
    (a scalar per row) through the ``embeddings`` layer, from ``baseline_ids``.

    Returns:
        ``float32`` (L,) for the one row of ``input_ids`` (1, L).
    """
    from captum.attr import LayerIntegratedGradients

    lig = LayerIntegratedGradients(forward, embeddings)
    attr = lig.attribute(input_ids, baselines=baseline_ids, additional_forward_args=additional, n_steps=IG_STEPS,
                         internal_batch_size=IG_STEPS)
    return attr.sum(dim=-1)[0].detach().float().cpu().numpy().astype(np.float32)
