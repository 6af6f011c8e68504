"""The serving path alone: every system with a null forward (``python -m bench --systems null``).

Model replicas answer correctly shaped outputs without computing
(:class:`maas.config.NullForwardSpec`), so what is measured is everything around the forward:
HTTP, parsing, routing, batching, the preprocessor (tokenising, JPEG decode and resize — that is
serving work every system does), the Ray hops, rendering. Two forwards:

* ``null``: instant (0 ms) — the CPU cost of the path itself;
* ``gpu-like``: the forward thread is held ``2 ms + 0.05 ms × items`` per batch without using a
  CPU (``time.sleep``), as a GPU forward holds its replica.

Systems, each alone on the machine: maas-serve as ``make serve`` starts it (the shipped
``serve_configs/local.yaml`` entries with ``null_forward`` added), LitServe with the same null
model (swept over its documented knobs at the loaded point, best kept) and plain FastAPI.

Workloads: one-sentence embeddings, 16-sentence embeddings, a ~150 KB JPEG classification.

Per point: requests/s at saturation (closed loop, :data:`CONCURRENCY` connections) and the CPU
each process group used per request (process CPU accounting from ``/proc`` via psutil: user +
system seconds over the run ÷ requests answered), grouped by role (:func:`role`).
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import psutil

from bench import inputs, load, systems

#: Closed-loop connections of the saturation point.
CONCURRENCY = 64
#: The GPU-like forward: per batch, ms, and per item, ms (issue 28's figures).
GPU_LIKE = {"hold_ms": 2.0, "per_item_ms": 0.05}
#: Workload → (model, items per request).
WORKLOADS = {"embed-1": ("minilm", 1), "embed-16": ("minilm", 16), "image-150kb": ("efficientnet-lite0", 1)}
#: Target size of the image workload's JPEG, bytes.
JPEG_BYTES = 150_000


def jpeg_150kb() -> bytes:
    """A camera-like JPEG of about :data:`JPEG_BYTES` (scikit-image's astronaut, upscaled to
    768×768, at the Pillow quality whose size comes closest)."""
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut()).convert("RGB").resize((768, 768), Image.Resampling.BICUBIC)
    best = b""
    for quality in range(60, 100, 2):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        if not best or abs(buf.tell() - JPEG_BYTES) < abs(len(best) - JPEG_BYTES):
            best = buf.getvalue()
    return best


def bodies(workload: str) -> list[load.Body]:
    """The requests of ``workload`` (rotating sentences; one fixed JPEG)."""
    model, items = WORKLOADS[workload]
    if workload.startswith("image"):
        ctype, body = load.multipart({"model": model}, [("file", "photo.jpg", jpeg_150kb())])
        return [load.Body("/v1/classifications/image", ctype, body)]
    s = list(inputs.SENTENCES)
    if items == 1:
        return [load.json_body("/v1/embeddings", {"model": model, "input": t}) for t in s]
    return [load.json_body("/v1/embeddings", {"model": model, "input": [s[(i + j) % len(s)] for j in range(items)]})
            for i in range(0, len(s), 4)]


def role(proc: psutil.Process) -> str:
    """The role of one server process, from its name and command line: ``haproxy``, ``ingress``,
    ``preprocessor`` (tokenizer / image preprocessor replicas), ``model``, ``serve-controller``,
    ``serve-proxy``, ``ray-core`` (GCS, raylet), ``ray-other`` (dashboard, log monitor, other Ray
    workers), ``litserve-api``/``litserve-worker``, ``uvicorn``, ``other``."""
    try:
        name = proc.name()
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "other"
    title = cmd or name
    if name.startswith("haproxy") or "haproxy" in cmd.split(" ")[0]:
        return "haproxy"
    if "ServeReplica" in title:
        deployment = title.split("ServeReplica:", 1)[1].split()[0].split(":")[-1]
        if deployment == "Ingress":
            return "ingress"
        if deployment.startswith(("Tokenizer", "ImagePreprocessor", "Preprocessor")):
            return "preprocessor"
        return "model"
    if "ServeController" in title:
        return "serve-controller"
    if "ProxyActor" in title:
        return "serve-proxy"
    if name in ("gcs_server", "raylet") or "gcs_server" in title or "/raylet" in title:
        return "ray-core"
    if "ray" in title:
        return "ray-other"
    if "litserve" in title:
        return "litserve-main"
    if "multiprocessing" in title or "spawn_main" in title:
        return "litserve-worker"  # LitServe's API servers and inference workers (spawned)
    if "uvicorn" in title or "fastapi_server" in title:
        return "uvicorn"
    return "other"


class CpuMeter:
    """CPU seconds (user + system) of a server's processes over a window, by :func:`role`.

    Counts every process of the server's session (the tree and what was re-parented, e.g.
    HAProxy), alive at the start or the end of the window; a process that exits inside the
    window loses its last seconds (none do under a steady load).
    """

    def __init__(self, server: systems.Server):
        self.server = server

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        pid = self.server.proc.pid
        pids = {p.pid for p in systems.memory.tree(pid)} | set(systems._session(pid))
        out = {}
        for p in pids:
            try:
                proc = psutil.Process(p)
                t = proc.cpu_times()
                out[p] = (role(proc), t.user + t.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def __enter__(self) -> "CpuMeter":
        self.before = self._snapshot()
        self.started = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.monotonic() - self.started
        after = self._snapshot()
        self.by_role: dict[str, float] = {}
        for pid in set(self.before) | set(after):
            r, t1 = after.get(pid, self.before.get(pid))
            t0 = self.before.get(pid, (r, 0.0))[1]
            self.by_role[r] = self.by_role.get(r, 0.0) + max(0.0, t1 - t0)

    def per_request_ms(self, requests: int) -> dict[str, float]:
        """CPU milliseconds per answered request by role, plus ``total``."""
        n = max(1, requests)
        out = {r: round(1000 * s / n, 3) for r, s in sorted(self.by_role.items(), key=lambda kv: -kv[1])}
        out["total"] = round(1000 * sum(self.by_role.values()) / n, 3)
        return out


def measure(server: systems.Server, workload: str, duration_s: float, warmup_s: float = 2.0,
            concurrency: int = CONCURRENCY) -> dict:
    """One saturation point: warm-up, then ``duration_s`` of closed-loop load with CPU metered."""
    b = bodies(workload)
    load.run(server.base_url, b, concurrency=8, duration_s=warmup_s)
    with CpuMeter(server) as meter:
        r = load.run(server.base_url, b, concurrency=concurrency, duration_s=duration_s, threads=2)
    items = WORKLOADS[workload][1]
    return {"workload": workload, "requests_per_s": r["ok_per_s"], "items_per_s": round(r["ok_per_s"] * items, 1),
            "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "errors": r["errors"], "requests": r["ok"],
            "cores_used": round(sum(meter.by_role.values()) / meter.wall_s, 2),
            "cpu_ms_per_request": meter.per_request_ms(r["ok"])}


def maas_null_config(models: list[str], port: int, forward: dict) -> dict:
    """The shipped local config for ``models`` with ``null_forward: forward`` on each."""
    config = systems.maas_config(models, batching=True, port=port)
    for m in config["applications"][0]["args"]["models"]:
        m["null_forward"] = dict(forward)
    return config


def run(workdir: Path, duration_s: float = 8.0, systems_: tuple[str, ...] = ("maas", "litserve", "fastapi"),
        workloads_: tuple[str, ...] = tuple(WORKLOADS), forwards: tuple[str, ...] = ("null", "gpu-like")) -> dict:
    """Every (forward, system, workload) point; returns ``{"points": [...], "settings": {...}}``."""
    import yaml

    points: list[dict] = []
    models = sorted({WORKLOADS[w][0] for w in workloads_})
    for forward in forwards:
        spec = {"hold_ms": 0.0, "per_item_ms": 0.0} if forward == "null" else GPU_LIKE
        if "maas" in systems_:
            server = systems.maas(models, batching=True, workdir=workdir, mode=f"null {forward}")
            path = Path(server.cmd[-1])
            port = int(server.base_url.rsplit(":", 1)[1])
            path.write_text(yaml.safe_dump(maas_null_config(models, port, spec), sort_keys=False))
            print(f"bench null: starting maas-serve ({forward})", flush=True)
            server.start()
            try:
                for w in workloads_:
                    p = measure(server, w, duration_s)
                    p.update(system="maas-serve", forward=forward)
                    points.append(p)
                    _print(p)
            finally:
                server.stop()
        for kind in ("litserve", "fastapi"):
            if kind not in systems_:
                continue
            for w in workloads_:
                model = WORKLOADS[w][0]
                best = None
                for settings in _peer_settings(kind, w):
                    server = systems.peer(kind, model, threads=1, workdir=workdir, null_forward=spec, **settings)
                    server.start()
                    try:
                        p = measure(server, w, duration_s)
                    finally:
                        server.stop()
                    p.update(system="LitServe" if kind == "litserve" else "FastAPI", forward=forward,
                             settings=settings)
                    print(f"  sweep {kind} {w} {settings}: {p['requests_per_s']} req/s", flush=True)
                    if best is None or p["requests_per_s"] > best["requests_per_s"]:
                        best = p
                points.append(best)
                _print(best)
    return {"points": points, "settings": {"concurrency": CONCURRENCY, "duration_s": duration_s,
                                           "gpu_like": GPU_LIKE, "jpeg_bytes": len(jpeg_150kb())}}


def _peer_settings(kind: str, workload: str) -> list[dict]:
    if kind == "fastapi":
        return [{"workers": w} for w in (1, 2)]
    sizes = (8, 32) if workload.startswith("image") else (32, 64)
    return [{"workers": w, "api_servers": a, "max_batch_size": b, "batch_wait_timeout_s": 0.001, "fast_queue": True}
            for w in (1, 2) for a in (1, 2) for b in sizes]


def _print(p: dict) -> None:
    cpu = p["cpu_ms_per_request"]
    parts = ", ".join(f"{k} {v}" for k, v in cpu.items() if k != "total")
    print(f"  {p['system']:10s} {p['forward']:8s} {p['workload']:12s} {p['requests_per_s']:8.1f} req/s "
          f"p50 {p['p50_ms']:6.1f} ms  CPU {cpu['total']:.2f} ms/request ({parts})  errors {p['errors']}", flush=True)


if __name__ == "__main__":
    import argparse
    import json
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--systems", default="maas,litserve,fastapi")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--forwards", default="null,gpu-like")
    parser.add_argument("--duration-s", type=float, default=8.0)
    parser.add_argument("--out", default=None, help="write the JSON result here")
    a = parser.parse_args()
    res = run(Path(tempfile.mkdtemp(prefix="maas-null-")), a.duration_s, tuple(a.systems.split(",")),
              tuple(a.workloads.split(",")), tuple(a.forwards.split(",")))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
