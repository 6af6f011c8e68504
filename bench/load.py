"""HTTP load with ``wrk`` (Debian package ``wrk``, a C load generator).

Why wrk: it is event-driven C (one epoll thread keeps 64 connections busy for a few percent
of one core, which matters on a 2-core machine where a Python client would take the cores it
measures), it keeps connections alive as real clients do, and its Lua hooks let one run
cycle through several different bodies (four photos, 32 sentences) and print its latency
histogram as JSON. ``hey`` and ``oha`` send one fixed body per run; locust is Python.

Latency is measured by wrk per request, from write to full response, in microseconds; we
report milliseconds. Requests that time out (``timeout_s``) or answer non-2xx/3xx are
counted as errors and reported, never dropped silently.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

WRK = "wrk"

_LUA = r"""
local bodies = {}
local requests = {}
local counter = 0

init = function(args)
  local manifest = io.open(args[1], "r")
  for line in manifest:lines() do
    local body_path, ctype, path, auth, trace = line:match("^(%S+)\t(%S+)\t(%S+)\t?(%S*)\t?(%S*)$")
    local f = io.open(body_path, "rb")
    local body = f:read("*a")
    f:close()
    local headers = {["Content-Type"] = ctype}
    if auth ~= nil and auth ~= "" then
      headers["Authorization"] = "Bearer " .. auth
    end
    if trace ~= nil and trace ~= "" then
      headers["traceparent"] = trace
    end
    requests[#requests + 1] = wrk.format("POST", path, headers, body)
  end
  manifest:close()
  counter = math.random(0, #requests - 1)
end

request = function()
  counter = counter + 1
  return requests[(counter % #requests) + 1]
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nWRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "errors": {"connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d}, "latency_us": {"min": %d, "mean": %.1f, "max": %d, ' ..
    '"p50": %d, "p90": %d, "p99": %d}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


@dataclass
class Body:
    """One request the load generator sends: ``POST path`` with ``content_type`` (and
    ``Authorization: Bearer <api_key>`` when ``api_key`` is set: no spaces in it; a W3C ``traceparent``
    header when ``traceparent`` is set: every request of the body then continues that one trace)."""

    path: str
    content_type: str
    data: bytes
    api_key: str = ""
    traceparent: str = ""


def multipart(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> tuple[str, bytes]:
    """A ``multipart/form-data`` body. ``files``: ``(field, filename, bytes)``.

    Returns:
        ``(content_type, body)``.
    """
    boundary = "maasbench" + uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, filename, data in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(parts)


def json_body(path: str, obj: dict) -> Body:
    return Body(path, "application/json", json.dumps(obj).encode())


def available() -> bool:
    """Whether the ``wrk`` binary is on PATH."""
    return shutil.which(WRK) is not None


def run(base_url: str, bodies: list[Body], *, concurrency: int, duration_s: float, timeout_s: float = 60.0,
        threads: int = 1) -> dict:
    """Drive ``base_url`` with ``concurrency`` keep-alive connections for ``duration_s``.

    Each connection sends the next body of ``bodies`` as soon as its previous response
    arrived (closed loop), so ``concurrency`` is the number of requests in flight.

    Returns:
        ``{"concurrency", "requests", "ok", "errors", "requests_per_s", "ok_per_s",
        "p50_ms", "p90_ms", "p99_ms", "mean_ms", "max_ms"}``; ``ok`` counts 2xx/3xx answers.

    Raises:
        FileNotFoundError: wrk is not installed (``apt-get install wrk``).
        RuntimeError: wrk failed or printed no summary.
    """
    if not available():
        raise FileNotFoundError("wrk is not installed; `apt-get install wrk` (make bench-deps does it)")
    with tempfile.TemporaryDirectory(prefix="maas-wrk-") as tmp:
        tmpdir = Path(tmp)
        lines = []
        for i, body in enumerate(bodies):
            p = tmpdir / f"body{i}"
            p.write_bytes(body.data)
            lines.append(f"{p}\t{body.content_type.replace(' ', '')}\t{body.path}"
                         + (f"\t{body.api_key}" if body.api_key or body.traceparent else "")
                         + (f"\t{body.traceparent}" if body.traceparent else ""))
        manifest = tmpdir / "manifest.tsv"
        manifest.write_text("\n".join(lines) + "\n")
        script = tmpdir / "bench.lua"
        script.write_text(_LUA)
        cmd = [WRK, f"-t{max(1, min(threads, concurrency))}", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s",
               f"--timeout={int(timeout_s)}s", "-s", str(script), base_url.rstrip("/") + "/", "--", str(manifest)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + timeout_s + 30)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    raw = json.loads(line[len("WRK_JSON "):])
    errors = sum(raw["errors"].values())
    ok = raw["requests"] - raw["errors"]["status"] - raw["errors"]["timeout"]
    secs = raw["duration_us"] / 1e6
    lat = raw["latency_us"]
    return {
        "concurrency": concurrency,
        "requests": raw["requests"],
        "ok": ok,
        "errors": errors,
        "error_kinds": {k: v for k, v in raw["errors"].items() if v},
        "requests_per_s": round(raw["requests"] / secs, 2),
        "ok_per_s": round(ok / secs, 2),
        "p50_ms": round(lat["p50"] / 1000, 2),
        "p90_ms": round(lat["p90"] / 1000, 2),
        "p99_ms": round(lat["p99"] / 1000, 2),
        "mean_ms": round(lat["mean"] / 1000, 2),
        "max_ms": round(lat["max"] / 1000, 2),
    }
