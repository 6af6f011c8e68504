"""A trace as a waterfall picture, drawn from the OTLP spans a receiver got (``tests/otlp_receiver.py``): one
row per span in tree order (children under their parent, by start time), a bar from its start to its end on a
common time axis, its duration and its main attributes. What Jaeger's or Grafana Tempo's trace view shows;
used for the picture in docs/tracing.md, since neither runs on the offline build machine.

``python -m bench.trace_view spans.json out.png`` redraws a saved trace (:func:`to_json`'s format).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

#: Attributes shown next to a span's bar (ids and counts only; spans carry no payloads).
SHOWN = ("http.route", "http.response.status_code", "maas.address", "maas.model.version", "maas.deployment",
         "maas.batch.jobs", "maas.batch.items", "maas.batch.requests", "maas.replica", "maas.ttft_ms")


def to_json(spans) -> list[dict]:
    """OTLP ``Span`` messages → plain dicts (ids hex, times ns, attributes, link span ids)."""
    out = []
    for s in spans:
        attrs = {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in s.attributes}
        out.append({"name": s.name, "span_id": s.span_id.hex(), "parent_id": s.parent_span_id.hex(),
                    "start_ns": s.start_time_unix_nano, "end_ns": s.end_time_unix_nano, "kind": s.kind,
                    "attributes": attrs, "links": [lk.span_id.hex() for lk in s.links],
                    "events": [e.name for e in s.events], "status": s.status.code})
    return out


def ordered(spans: list[dict]) -> list[tuple[int, dict]]:
    """``(depth, span)`` in tree order: each span followed by its children, by start time."""
    ids = {s["span_id"] for s in spans}
    kids: dict[str, list[dict]] = {}
    for s in spans:
        kids.setdefault(s["parent_id"] if s["parent_id"] in ids else "", []).append(s)
    out: list[tuple[int, dict]] = []

    def walk(parent: str, depth: int) -> None:
        for s in sorted(kids.get(parent, []), key=lambda x: x["start_ns"]):
            out.append((depth, s))
            walk(s["span_id"], depth + 1)
    walk("", 0)
    return out


def draw(spans: list[dict], path: Path, title: str) -> None:
    """Render the waterfall of one trace to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ordered(spans)
    t0 = min(s["start_ns"] for s in spans)
    total_ms = (max(s["end_ns"] for s in spans) - t0) / 1e6
    fig, ax = plt.subplots(figsize=(13, 0.42 * len(rows) + 1.4))
    colours = {"maas.http": "#9aa5b1", "maas.front_batch": "#e8a33d", "maas.preprocess": "#4c9f70",
               "maas.model": "#3f7cc4", "maas.handle": "#7d5ba6"}
    for i, (depth, s) in enumerate(rows):
        start, end = (s["start_ns"] - t0) / 1e6, (s["end_ns"] - t0) / 1e6
        colour = next((c for prefix, c in colours.items() if s["name"].startswith(prefix)), "#6c7a89")
        if s["status"] == 2:
            colour = "#c44536"
        ax.barh(i, max(end - start, total_ms / 400), left=start, color=colour, height=0.62)
        ax.text(-0.34 + 0.018 * depth, i, s["name"], transform=ax.get_yaxis_transform(), ha="left", va="center",
                fontsize=9, family="monospace")
        shown = {k: s["attributes"][k] for k in SHOWN if k in s["attributes"]}
        if "maas.deployment" in shown and shown["maas.deployment"] == shown.get("maas.address"):
            shown.pop("maas.deployment", None)
        notes = [f"{end - start:.2f} ms"] + [f"{k.split('.')[-1]}={v}" for k, v in shown.items()]
        if s["links"]:
            notes.append(f"links={len(s['links'])}")
        if s["events"]:
            notes.append("events=" + ",".join(s["events"]))
        ax.text(end + total_ms * 0.01, i, "  ".join(notes), va="center", fontsize=8, color="#333333")
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, total_ms * 1.75)
    ax.set_yticks([])
    ax.set_xlabel("ms since the request reached the ingress")
    ax.set_title(title, fontsize=10, loc="left")
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.subplots_adjust(left=0.26, right=0.99, top=0.93, bottom=0.4 / (0.42 * len(rows) + 1.4) + 0.04)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    saved = json.loads(Path(sys.argv[1]).read_text())
    draw(saved["spans"], Path(sys.argv[2]), saved.get("title", "trace"))
