"""Explanations in the ingress: a Grad-CAM map (from the model replica) mapped back onto the
original image's pixel grid and rendered for people (numpy and Pillow only, no torch).

What an image explanation answers with (``POST /v1/explanations/image``):

* ``heatmap.grid``: ``rows × cols`` numbers in [0, 1] over the *original* image (``cols`` =
  :data:`GRID_COLS`, rows in proportion), each the mean of the map over its cell; cells outside the
  region the model saw (``view: served`` crops) are 0. ``heatmap.cell_px`` is a cell's size in
  original pixels.
* ``overlay_png``: the original image (longer side at most :data:`OVERLAY_MAX_PX`) with the map
  blended over it (transparent blue-yellow-red ramp), base64 PNG.
* ``regions``: the connected groups of cells at ≥ half the map's peak, as boxes ``[x0, y0, x1, y1]``
  in original pixels, largest share of the map's mass first (``mass``: that share, 0..1).
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

#: Columns of the heatmap grid over the original image.
GRID_COLS = 16
#: Longer side of the overlay PNG, pixels.
OVERLAY_MAX_PX = 512
#: A region is a group of cells at or above this share of the map's peak.
REGION_THRESHOLD = 0.5


def original_map(cam: np.ndarray, size: tuple[int, int], box: tuple[float, float, float, float],
                 out_size: tuple[int, int]) -> np.ndarray:
    """The map ``cam`` (h, w) over the original image, at ``out_size`` (w, h) pixels.

    ``box`` is where the map's pixels sit in the original image (original pixels); outside it 0.

    Returns:
        ``float32`` (out_h, out_w) in [0, 1].
    """
    width, height = size
    ow, oh = out_size
    sx, sy = ow / width, oh / height
    x0, y0, x1, y1 = box
    left, top = int(round(x0 * sx)), int(round(y0 * sy))
    right, bottom = max(left + 1, int(round(x1 * sx))), max(top + 1, int(round(y1 * sy)))
    part = Image.fromarray(cam.astype(np.float32), mode="F").resize((right - left, bottom - top), Image.BILINEAR)
    out = np.zeros((oh, ow), dtype=np.float32)
    region = np.asarray(part, dtype=np.float32)
    t, l_ = max(top, 0), max(left, 0)
    b, r = min(bottom, oh), min(right, ow)
    out[t:b, l_:r] = region[t - top:b - top, l_ - left:r - left]
    return np.clip(out, 0.0, 1.0)


def grid(heat: np.ndarray, cols: int = GRID_COLS) -> np.ndarray:
    """Block means of ``heat`` (h, w) in a ``rows × cols`` grid (rows in proportion to h / w)."""
    h, w = heat.shape
    rows = max(1, int(round(cols * h / w)))
    ys = np.linspace(0, h, rows + 1).astype(int)
    xs = np.linspace(0, w, cols + 1).astype(int)
    out = np.zeros((rows, cols), dtype=np.float32)
    for i in range(rows):
        for j in range(cols):
            cell = heat[ys[i]:max(ys[i + 1], ys[i] + 1), xs[j]:max(xs[j + 1], xs[j] + 1)]
            out[i, j] = float(cell.mean()) if cell.size else 0.0
    return out


def regions(cells: np.ndarray, size: tuple[int, int], limit: int = 3) -> list[dict]:
    """Connected (4-neighbour) groups of cells at ≥ :data:`REGION_THRESHOLD` × the peak, as boxes in
    original pixels with their share of the grid's mass, largest first."""
    peak = float(cells.max())
    total = float(cells.sum())
    if peak <= 0 or total <= 0:
        return []
    rows, cols = cells.shape
    hot = cells >= REGION_THRESHOLD * peak
    seen = np.zeros_like(hot)
    width, height = size
    cw, ch = width / cols, height / rows
    found = []
    for i in range(rows):
        for j in range(cols):
            if not hot[i, j] or seen[i, j]:
                continue
            stack, members = [(i, j)], []
            seen[i, j] = True
            while stack:
                a, b = stack.pop()
                members.append((a, b))
                for da, db in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                    na, nb = a + da, b + db
                    if 0 <= na < rows and 0 <= nb < cols and hot[na, nb] and not seen[na, nb]:
                        seen[na, nb] = True
                        stack.append((na, nb))
            rs = [a for a, _ in members]
            cs = [b for _, b in members]
            mass = float(sum(cells[a, b] for a, b in members)) / total
            found.append({"box": [round(min(cs) * cw), round(min(rs) * ch), round((max(cs) + 1) * cw),
                                  round((max(rs) + 1) * ch)], "mass": round(mass, 4)})
    return sorted(found, key=lambda r: -r["mass"])[:limit]


def colormap(values: np.ndarray) -> np.ndarray:
    """A blue → yellow → red ramp for values in [0, 1]: ``uint8`` (..., 3)."""
    v = np.clip(values, 0, 1)[..., None]
    blue, yellow, red = np.array([40, 70, 220.0]), np.array([250, 220, 40.0]), np.array([220, 30, 30.0])
    low = blue + (yellow - blue) * np.clip(v * 2, 0, 1)
    high = yellow + (red - yellow) * np.clip(v * 2 - 1, 0, 1)
    return np.where(v < 0.5, low, high).astype(np.uint8)


def overlay_png(image: Image.Image, heat: np.ndarray) -> str:
    """Base64 PNG of ``image`` with ``heat`` (same size as the image) blended over it; the blend's
    opacity follows the map (0.6 at the peak), so cold parts show the photo as it is."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    alpha = (0.6 * np.clip(heat, 0, 1))[..., None]
    mixed = base * (1 - alpha) + colormap(heat).astype(np.float32) * alpha
    buf = io.BytesIO()
    Image.fromarray(mixed.astype(np.uint8)).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def render_image(result: dict, view: dict) -> dict:
    """The ``heatmap``, ``regions`` and (when ``view`` has a ``thumb``) ``overlay_png`` of an image
    explanation.

    Args:
        result: the replica's answer (``cam`` float32 (h, w) in [0, 1]).
        view: ``ImagePreprocessor.explain_view``'s ``size``, ``box`` and optional ``thumb`` (the
            original image, longer side ≤ :data:`OVERLAY_MAX_PX`).
    """
    width, height = view["size"]
    thumb = view.get("thumb")
    if thumb is not None:
        out_size = (thumb.shape[1], thumb.shape[0])
    else:
        scale = min(1.0, OVERLAY_MAX_PX / max(width, height))
        out_size = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
    heat = original_map(np.asarray(result["cam"], dtype=np.float32), (width, height), tuple(view["box"]), out_size)
    cells = grid(heat)
    body = {"heatmap": {"grid": np.round(cells, 4).tolist(), "rows": int(cells.shape[0]), "cols": int(cells.shape[1]),
                        "cell_px": [round(width / cells.shape[1], 2), round(height / cells.shape[0], 2)],
                        "covers_box": [round(float(v), 1) for v in view["box"]]},
            "regions": regions(cells, (width, height)), "image_size": [width, height]}
    if thumb is not None:
        body["overlay_png"] = overlay_png(Image.fromarray(thumb), heat)
    return body
