"""Smoke test of the benchmark harness (``make bench`` itself is not part of the tests): a tiny
run — MiniLM only, concurrency 1, one second per point — of the limit, of the session's running
maas-serve and of the plain FastAPI peer, through wrk; then the JSON, markdown and PNG it writes."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def test_bench_harness_end_to_end(served_app, tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--models", "minilm", "--systems", "limit,maas,fastapi",
         "--concurrency", "1", "--duration-s", "1", "--warmup-s", "1", "--idle-window-s", "1", "--maas-url", served_app["url"],
         "--out", str(out), "--name", "smoke", "--no-sweep"],
        cwd=ROOT, env={**os.environ, **served_app["env"]}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((out / "smoke.json").read_text())

    limit = result["limit"]["minilm"]
    assert [p["batch"] for p in limit["points"]] == [1, 8, 32, 64]
    assert all(p["items_per_s"] > 0 for p in limit["points"])
    assert limit["threads"] == 1  # the served replica's torch threads (num_cpus 0.3 -> 1)

    runs = {(r["system"], r["concurrency"]): r for r in result["runs"]}
    assert set(runs) == {("maas-serve", 1), ("FastAPI", 1)}
    for r in runs.values():
        assert r["ok"] > 0 and r["errors"] == 0, r
        assert 0 < r["p50_ms"] <= r["p99_ms"]

    overhead = result["overhead"]["minilm"]["maas"]
    assert overhead["overhead_p50_ms"] == pytest.approx(overhead["maas_p50_ms"] - overhead["limit_p50_ms"], abs=0.02)
    assert result["memory"]["FastAPI (minilm)"]["after_start"]["pss_bytes"] > 100 * 2**20
    assert result["memory"]["FastAPI (minilm)"]["idle_cpu_cores"] >= 0
    ceiling = limit["ceiling"]
    assert ceiling["threads"] == 2  # two replicas of one torch thread in serve_configs/local.yaml
    assert ceiling["items_per_s"] == pytest.approx(2 * limit["best"]["items_per_s"], rel=1e-3)
    assert [m["concurrency"] for m in result["multi"]] == [4, 16]  # bulk clients, then saturation
    for multi in result["multi"]:
        assert multi["items_per_request"] == 16 and multi["errors"] == 0
        assert multi["items_per_s"] == pytest.approx(16 * multi["ok_per_s"], rel=1e-3)
    goals = {g["goal"]: g for g in result["goals"]}
    assert "minilm: graph overhead at c=1 p50 ≤ 8 ms, p99 ≤ 20 ms" in goals
    assert "minilm: items/s ≥ 0.7 × ceiling" in goals
    assert "minilm: 16 sentences per request at c=4 ≥ 0.8 × ceiling" in goals

    table = (out / "smoke.md").read_text()
    assert "| maas-serve | batching on | minilm | 1 |" in table
    assert "## Goals" in table and "![throughput" in table
    assert (out / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
