"""The explanations point of ``make bench`` (issue 14): explanation latency per model, and what an
explanation costs the serving requests of the same replica.

``serve run`` of a graph with serve_configs/local.yaml's efficientnet-lite0, minilm and
sentiment-tiny-demo (one replica each, Ray Serve's high-throughput mode). Per model, ``REQUESTS``
explanations one at a time (client-side latency, ms: p50 and p90): Grad-CAM of the benchmark
photos (``view: full``, no overlay and with it), MiniLM's similarity of two sentences, the demo
classifier's label. Then EfficientNet-Lite0 classification latency alone and while one client
explains in a loop on the same replica (explanations share the replica's forward thread, so a
classification waits at most one explanation step).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import yaml

from bench import inputs, systems

REQUESTS = 20
MODELS = ("efficientnet-lite0", "minilm", "sentiment-tiny-demo")


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 1) if values else 0.0


def _timed(fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        r = fn(i)
        if r.status_code != 200:
            raise RuntimeError(f"explanation failed: {r.status_code} {r.text[:300]}")
        out.append(1000 * (time.perf_counter() - t0))
    return out


def run(workdir: Path) -> dict:
    import requests

    port = systems.free_port()
    raw = yaml.safe_load((systems.ROOT / "serve_configs" / "local.yaml").read_text())
    raw["http_options"]["port"] = port
    app = raw["applications"][0]
    app["args"]["models"] = [m for m in app["args"]["models"] if m["name"] in MODELS]
    app["deployments"] = [{"name": "Ingress", "num_replicas": 1}]
    path = workdir / "maas-explain.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           **systems.THROUGHPUT_ENV}
    server = systems.Server("maas-serve (explain)", [str(systems.BIN / "serve"), "run", "--address", "local",
                                                     str(path)], f"http://127.0.0.1:{port}/readyz",
                            workdir / "maas-explain.log", env)
    url = f"http://127.0.0.1:{port}"
    photos = list(inputs.photo_jpegs().values())
    s = requests.Session()

    def image(i, overlay=False):
        return s.post(f"{url}/v1/explanations/image", data={"model": "efficientnet-lite0", "overlay": str(overlay)},
                      files=[("file", ("p.jpg", photos[i % len(photos)], "image/jpeg"))], timeout=120)

    def classify(i, session=s):
        return session.post(f"{url}/v1/classifications/image", data={"model": "efficientnet-lite0"},
                            files=[("file", ("p.jpg", photos[i % len(photos)], "image/jpeg"))], timeout=120)

    calls = {
        "efficientnet-lite0 (grad-cam)": image,
        "efficientnet-lite0 (grad-cam + overlay PNG)": lambda i: image(i, True),
        "minilm (similarity, IG)": lambda i: s.post(f"{url}/v1/explanations/text", timeout=120, json={
            "model": "minilm", "input": ["The quick brown fox jumps over the lazy dog", f"a fox number {i}"]}),
        "sentiment-tiny-demo (classification, IG)": lambda i: s.post(f"{url}/v1/explanations/text", timeout=120, json={
            "model": "sentiment-tiny-demo", "input": f"What a wonderful film, part {i}"}),
    }
    server.start()
    try:
        out: dict = {"requests": REQUESTS, "explain": {}}
        for label, fn in calls.items():
            _timed(fn, 3)  # warm-up
            lat = _timed(fn, REQUESTS)
            out["explain"][label] = {"p50_ms": _pct(lat, 0.5), "p90_ms": _pct(lat, 0.9)}
            print(f"bench: explain {label}: p50 {out['explain'][label]['p50_ms']} ms", flush=True)
        _timed(classify, 5)
        alone = _timed(classify, 40)
        stop = threading.Event()

        def explain_loop():
            other = requests.Session()
            i = 0
            while not stop.is_set():
                other.post(f"{url}/v1/explanations/image", data={"model": "efficientnet-lite0", "overlay": "false"},
                           files=[("file", ("p.jpg", photos[i % len(photos)], "image/jpeg"))], timeout=120)
                i += 1

        t = threading.Thread(target=explain_loop)
        t.start()
        try:
            time.sleep(1.0)
            beside = _timed(classify, 40)
        finally:
            stop.set()
            t.join()
        out["classification_ms"] = {"alone_p50": _pct(alone, 0.5), "alone_p99": _pct(alone, 0.99),
                                    "beside_explanations_p50": _pct(beside, 0.5),
                                    "beside_explanations_p99": _pct(beside, 0.99)}
        print(f"bench: classification beside explanations: {out['classification_ms']}", flush=True)
        return out
    finally:
        server.stop()


def markdown(section: dict | None) -> list[str]:
    if not section:
        return []
    lines = [f"## Explanations ({section['requests']} one at a time per model, one replica each)", "",
             "| model (method) | p50 ms | p90 ms |", "|---|---|---|"]
    for label, r in section["explain"].items():
        lines.append(f"| {label} | {r['p50_ms']} | {r['p90_ms']} |")
    c = section["classification_ms"]
    lines += ["", f"EfficientNet-Lite0 classification, one client: p50 {c['alone_p50']} ms / p99 {c['alone_p99']} ms "
                  f"alone; p50 {c['beside_explanations_p50']} ms / p99 {c['beside_explanations_p99']} ms while another "
                  "client explains on the same replica in a loop.", ""]
    return lines


if __name__ == "__main__":  # python -m bench.explain [OUT.json]
    import tempfile

    result = run(Path(tempfile.mkdtemp(prefix="maas-bench-explain-")))
    print("\n".join(markdown(result)))
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(result, indent=2) + "\n")
