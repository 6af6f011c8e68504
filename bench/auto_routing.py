"""The ``model: auto`` point of ``make bench`` (issue 13): scenario routing under steady load.

``serve run`` of ``serve_configs/auto.yaml`` (EfficientNet-Lite0/1/2, real weights, Ray Serve's
high-throughput mode). A closed loop of ``CONCURRENCY`` clients (httpx, multipart uploads of the
benchmark photos) runs ``DURATION_S`` against each fixed model, then against ``auto`` at three
latency budgets placed from the fixed runs' p50s: tight (between Lite0's and Lite1's), middle
(between Lite1's and Lite2's) and generous (twice Lite2's p99). Per run: requests/s, latency
p50/p99 (client-side, ms), the share of requests answered within their budget, and which models
``auto`` used.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

from bench import inputs, systems

CONCURRENCY = 4
DURATION_S = 15.0
MODELS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def drive(url: str, model: str, budget_ms: float | None, duration_s: float = DURATION_S) -> dict:
    """A closed loop of ``CONCURRENCY`` clients for ``duration_s``."""
    import httpx

    photos = list(inputs.photo_jpegs().values())
    headers = {"X-Maas-Latency-Budget-Ms": f"{budget_ms:.1f}"} if budget_ms is not None else {}
    latencies: list[float] = []
    routed: Counter[str] = Counter()
    errors = 0

    async def client(i: int, client_):
        nonlocal errors
        k = i
        end = time.perf_counter() + duration_s
        while time.perf_counter() < end:
            photo = photos[k % len(photos)]
            k += 1
            t0 = time.perf_counter()
            r = await client_.post(url, data={"model": model}, headers=headers,
                                   files=[("file", ("p.jpg", photo, "image/jpeg"))])
            ms = 1000 * (time.perf_counter() - t0)
            if r.status_code != 200:
                errors += 1
                continue
            latencies.append(ms)
            routed[r.headers.get("x-maas-routed-model", model)] += 1

    async def go():
        async with httpx.AsyncClient(timeout=120) as c:
            await asyncio.gather(*[client(i, c) for i in range(CONCURRENCY)])

    started = time.perf_counter()
    asyncio.run(go())
    wall = time.perf_counter() - started
    out = {"model": model, "budget_ms": budget_ms, "requests": len(latencies), "errors": errors,
           "requests_per_s": round(len(latencies) / wall, 1), "p50_ms": round(_pct(latencies, 0.5), 1),
           "p99_ms": round(_pct(latencies, 0.99), 1), "routed": dict(routed)}
    if budget_ms is not None:
        out["within_budget"] = round(sum(ms <= budget_ms for ms in latencies) / max(1, len(latencies)), 3)
    return out


def run(workdir: Path) -> dict:
    port = systems.free_port()
    raw = yaml.safe_load((systems.ROOT / "serve_configs" / "auto.yaml").read_text())
    raw["http_options"]["port"] = port
    path = workdir / "maas-auto.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           **systems.THROUGHPUT_ENV}
    server = systems.Server("maas-serve (auto)", [str(systems.BIN / "serve"), "run", "--address", "local", str(path)],
                            f"http://127.0.0.1:{port}/readyz", workdir / "maas-auto.log", env)
    url = f"http://127.0.0.1:{port}/v1/classifications/image"
    server.start()
    try:
        fixed = {}
        for m in MODELS:
            drive(url, m, None, 3.0)  # warm-up
            fixed[m] = drive(url, m, None)
            print(f"bench: auto section, {m}: p50 {fixed[m]['p50_ms']} ms, p99 {fixed[m]['p99_ms']} ms", flush=True)
        p = {m: fixed[m]["p50_ms"] for m in MODELS}
        budgets = {"tight": (p[MODELS[0]] + p[MODELS[1]]) / 2, "middle": (p[MODELS[1]] + p[MODELS[2]]) / 2,
                   "generous": 2 * fixed[MODELS[2]]["p99_ms"]}
        auto = {}
        for label, budget in budgets.items():
            auto[label] = drive(url, "auto", budget)
            print(f"bench: auto {label} ({budget:.0f} ms): within budget {auto[label]['within_budget']:.1%}, "
                  f"routed {auto[label]['routed']}", flush=True)
        return {"concurrency": CONCURRENCY, "duration_s": DURATION_S, "fixed": fixed, "auto": auto}
    finally:
        server.stop()


def markdown(section: dict | None) -> list[str]:
    if not section:
        return []
    lines = [f"## `model: auto` (serve_configs/auto.yaml, {section['concurrency']} clients, "
             f"{section['duration_s']:.0f} s per run)", "",
             "| model | budget ms | requests/s | p50 ms | p99 ms | within budget | answered by |",
             "|---|---|---|---|---|---|---|"]
    for r in list(section["fixed"].values()) + list(section["auto"].values()):
        budget = f"{r['budget_ms']:.0f}" if r["budget_ms"] is not None else "-"
        within = f"{r['within_budget']:.1%}" if "within_budget" in r else "-"
        routed = ", ".join(f"{k} {v}" for k, v in sorted(r["routed"].items()))
        lines.append(f"| {r['model']} | {budget} | {r['requests_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {within} | "
                     f"{routed} |")
    lines.append("")
    return lines


if __name__ == "__main__":  # python -m bench.auto_routing [OUT.json]
    import tempfile

    result = run(Path(tempfile.mkdtemp(prefix="maas-bench-auto-")))
    print("\n".join(markdown(result)))
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(result, indent=2) + "\n")
