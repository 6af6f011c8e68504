"""The limit: the served work done in one process, with no serving at all.

For each batch size, for ``duration_s``: take the next ``batch`` inputs, run the whole
work (images: decode + transform + batched forward + top-5; sentences: tokenise + batched
forward + pooling), record the time of each batch. Items/s is items done / wall time; the
latency percentiles are per batch (at batch 1, per item). The torch thread count is the
one the served replica gets (:func:`bench.workloads.replica_threads`), so the limit is
"one replica's compute, no overhead".
"""

from __future__ import annotations

import statistics
import time

from bench import inputs, workloads


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0–100) by linear interpolation (numpy's default method)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def measure(work, items: list, batch: int, duration_s: float, warmup: int = 2) -> dict:
    """Run ``work.run`` on consecutive batches of ``items`` for ``duration_s``.

    Returns:
        ``{"batch", "items_per_s", "batches", "p50_ms", "p99_ms", "mean_ms"}``; latencies
        are per batch call, milliseconds.
    """
    def take(i: int) -> list:
        return [items[(i * batch + j) % len(items)] for j in range(batch)]

    for i in range(warmup):
        work.run(take(i))
    times_ms: list[float] = []
    started = time.perf_counter()
    i = 0
    while time.perf_counter() - started < duration_s or i < 3:
        t0 = time.perf_counter()
        work.run(take(i))
        times_ms.append(1000 * (time.perf_counter() - t0))
        i += 1
    wall = time.perf_counter() - started
    return {
        "batch": batch,
        "items_per_s": round(i * batch / wall, 2),
        "batches": i,
        "p50_ms": round(percentile(times_ms, 50), 2),
        "p99_ms": round(percentile(times_ms, 99), 2),
        "mean_ms": round(statistics.fmean(times_ms), 2),
    }


def run(model: str, batches: list[int], duration_s: float, threads: int | None = None) -> dict:
    """The limit of ``model`` at each batch size.

    Returns:
        ``{"model", "threads", "points": [measure(...) per batch], "best": point with most items/s}``.
    """
    threads = threads or workloads.replica_threads(model)
    work = workloads.load(model, threads)
    items = list(inputs.photo_jpegs().values()) if workloads.KINDS[model] == "image" else list(inputs.SENTENCES)
    points = [measure(work, items, b, duration_s) for b in batches]
    return {"model": model, "threads": threads, "points": points,
            "best": max(points, key=lambda p: p["items_per_s"])}


if __name__ == "__main__":  # python -m bench.limit MODEL BATCH... : one process per model
    import json
    import os
    import sys

    name, *sizes = sys.argv[1:]
    duration_s = float(os.environ.get("BENCH_DURATION_S", "5"))
    print(json.dumps(run(name, [int(s) for s in sizes] or [1], duration_s=duration_s)))
