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
#: The GPU-like forward: per batch, ms, and per item, ms (the figures the serving-path goals were set with).
GPU_LIKE = {"hold_ms": 2.0, "per_item_ms": 0.05}
#: Workload → (model, items per request).
WORKLOADS = {"embed-1": ("minilm", 1), "embed-16": ("minilm", 16), "image-150kb": ("efficientnet-lite0", 1)}
#: Connections per workload where it differs from :data:`CONCURRENCY`: 16-sentence requests at 64
#: connections hold 1024 sentences in flight, past the front queue's bound (``max_queued_items``), so
#: most would be 503s; 16 connections (256 sentences in flight) saturate without shedding.
WORKLOAD_CONCURRENCY = {"embed-16": 16}
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
    ``serve-proxy``, ``ray-core`` (GCS, raylet), ``ray-other`` (dashboard, its agent, log monitor,
    other Ray workers), ``other`` (``serve run`` itself). Peers are metered as ``main`` (the server
    program) and ``children`` (the processes it spawned: LitServe's API servers and workers,
    uvicorn's workers)."""
    try:
        name = proc.name()
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "other"
    title = cmd or name
    if name.startswith("haproxy") or "haproxy" in cmd.split(" ")[0]:
        return "haproxy"
    if "ServeReplica" in title:
        # "ray::ServeReplica:<app>:<deployment>", with ".<method>" appended while Ray runs one of its
        # tasks (a snapshot taken then once counted the Ingress as a model replica).
        deployment = title.split("ServeReplica:", 1)[1].split()[0].split(":")[-1].split(".")[0]
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
    return "other"


class CpuMeter:
    """CPU seconds (user + system) of a server's processes over a window, by :func:`role`.

    Counts every process of the server's session (the tree and what was re-parented, e.g.
    HAProxy), alive at the start or the end of the window; a process that exits inside the
    window loses its last seconds (none do under a steady load).
    """

    def __init__(self, server: systems.Server):
        self.server = server
        # Peers (one Python program and the processes it spawns) have no Ray roles: main / children.
        self.peer = not server.name.startswith("maas-serve")

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        pid = self.server.proc.pid
        pids = {p.pid for p in systems.memory.tree(pid)} | set(systems._session(pid))
        out = {}
        for p in pids:
            try:
                proc = psutil.Process(p)
                t = proc.cpu_times()
                r = ("main" if p == pid else "children") if self.peer else role(proc)
                out[p] = (r, t.user + t.system)
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
            concurrency: int | None = None) -> dict:
    """One saturation point: warm-up, then ``duration_s`` of closed-loop load with CPU metered
    (``concurrency`` default: :data:`WORKLOAD_CONCURRENCY`, else :data:`CONCURRENCY`)."""
    concurrency = concurrency or WORKLOAD_CONCURRENCY.get(workload, CONCURRENCY)
    b = bodies(workload)
    load.run(server.base_url, b, concurrency=8, duration_s=warmup_s)
    with CpuMeter(server) as meter:
        r = load.run(server.base_url, b, concurrency=concurrency, duration_s=duration_s, threads=2)
    items = WORKLOADS[workload][1]
    return {"workload": workload, "concurrency": concurrency, "requests_per_s": r["ok_per_s"], "items_per_s": round(r["ok_per_s"] * items, 1),
            "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "errors": r["errors"], "requests": r["ok"],
            "cores_used": round(sum(meter.by_role.values()) / meter.wall_s, 2),
            "cpu_ms_per_request": meter.per_request_ms(r["ok"])}


def maas_null_config(models: list[str], port: int, forward: dict, ingress_replicas: int | None = None) -> dict:
    """The shipped local config for ``models`` with ``null_forward: forward`` on each (and
    ``ingress_replicas`` Ingress replicas when given)."""
    config = systems.maas_config(models, batching=True, port=port)
    app = config["applications"][0]
    for m in app["args"]["models"]:
        m["null_forward"] = dict(forward)
    if ingress_replicas is not None:
        deps = app.setdefault("deployments", [])
        entry = next((d for d in deps if d["name"] == "Ingress"), None)
        if entry is None:
            entry = {"name": "Ingress"}
            deps.append(entry)
        entry["num_replicas"] = ingress_replicas
    return config


#: Ingress replicas of the front-scaling points (one-sentence embeddings, null forward).
FRONT_REPLICAS = (1, 2, 3)


def scale_front(workdir: Path, duration_s: float, replicas: tuple[int, ...] = FRONT_REPLICAS) -> list[dict]:
    """Requests/s and CPU per request of one-sentence embeddings (null forward) with 1, 2, …
    Ingress replicas behind HAProxy: how far more CPU for the front takes the graph here."""
    import yaml

    out = []
    for n in replicas:
        server = systems.maas(["minilm"], batching=True, workdir=workdir, mode=f"null ingress x{n}")
        port = int(server.base_url.rsplit(":", 1)[1])
        Path(server.cmd[-1]).write_text(yaml.safe_dump(
            maas_null_config(["minilm"], port, {"hold_ms": 0.0, "per_item_ms": 0.0}, ingress_replicas=n),
            sort_keys=False))
        print(f"bench null: starting maas-serve with {n} ingress replica(s)", flush=True)
        server.start()
        try:
            p = measure(server, "embed-1", duration_s)
        finally:
            server.stop()
        p.update(system="maas-serve", forward="null", ingress_replicas=n)
        out.append(p)
        _print(p)
    return out


def run(workdir: Path, duration_s: float = 8.0, systems_: tuple[str, ...] = ("maas", "litserve", "fastapi"),
        workloads_: tuple[str, ...] = tuple(WORKLOADS), forwards: tuple[str, ...] = ("null", "gpu-like"),
        sweep: bool = True, baseline: tuple[str, Path] | None = None) -> dict:
    """Every (forward, system, workload) point; returns ``{"points": [...], "settings": {...}}``.

    Peers are swept over their knobs (:func:`_peer_settings`, 3 s per setting) on the first
    forward, per workload; the best settings are kept for the other forwards. ``baseline``
    (``(git ref, its src)``, a tree that has ``null_forward``) adds the same maas-serve points on
    that tree, as ``maas-serve @<ref>``: a before/after of the serving path in one run.
    """
    import yaml

    points: list[dict] = []
    models = sorted({WORKLOADS[w][0] for w in workloads_})
    kept: dict[tuple[str, str], dict] = {}
    for forward in forwards:
        spec = {"hold_ms": 0.0, "per_item_ms": 0.0} if forward == "null" else GPU_LIKE
        trees = [("maas-serve", None)] + ([(f"maas-serve @{baseline[0]}", baseline[1])] if baseline else [])
        for name, src in (trees if "maas" in systems_ else []):
            server = systems.maas(models, batching=True, workdir=workdir, mode=f"null {forward} {name[-8:]}",
                                  src=src, release_env=False)
            path = Path(server.cmd[-1])
            port = int(server.base_url.rsplit(":", 1)[1])
            path.write_text(yaml.safe_dump(maas_null_config(models, port, spec), sort_keys=False))
            print(f"bench null: starting {name} ({forward})", flush=True)
            server.start()
            try:
                for w in workloads_:
                    p = measure(server, w, duration_s)
                    p.update(system=name, forward=forward)
                    points.append(p)
                    _print(p)
            finally:
                server.stop()
        for kind in ("litserve", "fastapi"):
            if kind not in systems_:
                continue
            for w in workloads_:
                model = WORKLOADS[w][0]
                if (kind, w) not in kept:
                    tried = []
                    for settings in (_peer_settings(kind, w) if sweep else _peer_settings(kind, w)[:1]):
                        server = systems.peer(kind, model, threads=1, workdir=workdir, null_forward=spec, **settings)
                        server.start()
                        try:
                            p = measure(server, w, 3.0, warmup_s=1.0)
                        finally:
                            server.stop()
                        tried.append((p["requests_per_s"], settings))
                        print(f"  sweep {kind} {forward} {w} {settings}: {p['requests_per_s']} req/s", flush=True)
                    kept[(kind, w)] = max(tried, key=lambda t: t[0])[1]
                settings = kept[(kind, w)]
                server = systems.peer(kind, model, threads=1, workdir=workdir, null_forward=spec, **settings)
                server.start()
                try:
                    p = measure(server, w, duration_s)
                finally:
                    server.stop()
                p.update(system="LitServe" if kind == "litserve" else "FastAPI", forward=forward, settings=settings)
                points.append(p)
                _print(p)
    front = scale_front(workdir, duration_s) if "maas" in systems_ and "embed-1" in workloads_ else []
    return {"points": points, "front": front, "settings": {"concurrency": CONCURRENCY, "duration_s": duration_s,
                                           "gpu_like": GPU_LIKE, "jpeg_bytes": len(jpeg_150kb())}}


#: Issue 28's goals on the null forward: one-sentence embeddings ≥ this × LitServe's requests/s ...
NULL_X_LITSERVE = 1.5
#: ... with at most this much CPU per request across every process, ms.
NULL_CPU_MS = 1.5


def goals(res: dict | None) -> list[dict]:
    """The null-forward goals, ``[{"goal", "measured", "met"}]`` (none without the data)."""
    if not res:
        return []
    pts = {(p["system"], p["forward"], p["workload"]): p for p in res["points"]}
    ours, lit = pts.get(("maas-serve", "null", "embed-1")), pts.get(("LitServe", "null", "embed-1"))
    out = []
    if ours and lit:
        x = ours["requests_per_s"] / max(lit["requests_per_s"], 1e-9)
        out.append({"goal": f"null forward, one-sentence embeddings: requests/s ≥ {NULL_X_LITSERVE} × LitServe's",
                    "measured": f"{ours['requests_per_s']:.0f} / {lit['requests_per_s']:.0f} = {x:.2f} ×",
                    "met": x >= NULL_X_LITSERVE})
    if ours:
        cpu = ours["cpu_ms_per_request"]["total"]
        out.append({"goal": f"null forward, one-sentence embeddings: CPU per request (all processes) ≤ {NULL_CPU_MS} ms",
                    "measured": f"{cpu:.2f} ms", "met": cpu <= NULL_CPU_MS})
    return out


#: Issue 28's goals for real weights (the serving path must not be what bounds a forward), beside
#: issue 10's older, looser rows of :func:`bench.report.goals`: × the in-process ceiling at
#: saturation, and the graph's overhead at c=1 (ms over the limit's batch-1 latency). MiniLM's
#: 0.7 × ceiling is issue 10's row already.
REAL_X_CEILING = {"efficientnet-lite0": 0.85}
MULTI_X_CEILING = 0.85
OVERHEAD_MS = {"minilm": (5.0, 15.0)}


def real_goals(result: dict) -> list[dict]:
    """Issue 28's real-weights goals from a whole bench result (``runs``, ``limit``, ``multi``,
    ``overhead``), ``[{"goal", "measured", "met"}]``; rows whose data the run lacks are left out."""
    out = []
    ceilings = {m: lim.get("ceiling") for m, lim in result.get("limit", {}).items()}
    for model, x in REAL_X_CEILING.items():
        ceil = ceilings.get(model)
        best = max((r for r in result.get("runs", []) if r.get("system") == "maas-serve"
                    and r.get("mode") == "batching on" and r.get("model") == model),
                   key=lambda r: r["items_per_s"], default=None)
        if ceil and best:
            ratio = best["items_per_s"] / ceil["items_per_s"]
            out.append({"goal": f"issue 28: {model} items/s ≥ {x} × ceiling",
                        "measured": f"{best['items_per_s']:.1f} (c={best['concurrency']}) / "
                                    f"{ceil['items_per_s']:.1f} = {ratio:.2f} ×", "met": ratio >= x})
    # As the single-item goal above: the best point (saturation), every point named.
    multis = [r for r in result.get("multi", []) if r["mode"] == "batching on" and r["model"] == "minilm"]
    if multis and ceilings.get("minilm"):
        ceil = ceilings["minilm"]["items_per_s"]
        best = max(multis, key=lambda r: r["items_per_s"])
        ratio = best["items_per_s"] / ceil
        out.append({"goal": f"issue 28: minilm {best['items_per_request']} sentences per request ≥ "
                            f"{MULTI_X_CEILING} × ceiling",
                    "measured": ", ".join(f"{r['items_per_s']:.1f} (c={r['concurrency']})" for r in multis)
                                + f" / {ceil:.1f} = {ratio:.2f} × at best",
                    "met": ratio >= MULTI_X_CEILING})
    for model, (p50, p99) in OVERHEAD_MS.items():
        o = result.get("overhead", {}).get(model, {}).get("maas")
        if o and "overhead_p50_ms" in o:
            out.append({"goal": f"issue 28: {model} graph overhead at c=1 p50 ≤ {p50:g} ms, p99 ≤ {p99:g} ms",
                        "measured": f"p50 {o['overhead_p50_ms']:.1f} ms, p99 {o['overhead_p99_ms']:.1f} ms",
                        "met": o["overhead_p50_ms"] <= p50 and o["overhead_p99_ms"] <= p99})
    return out


def markdown(res: dict | None) -> list[str]:
    """The null-forward section: requests/s and CPU per request by process role, per point."""
    if not res:
        return []
    roles = list(dict.fromkeys(r for p in res["points"] for r in p["cpu_ms_per_request"] if r != "total"))
    st = res["settings"]
    lines = [f"## The serving path alone (null forward; c={st['concurrency']} (16-sentence requests: "
             f"c={WORKLOAD_CONCURRENCY['embed-16']}), {st['duration_s']} s per point)", "",
             f"`null`: instant forward; `gpu-like`: the replica held {st['gpu_like']['hold_ms']} ms + "
             f"{st['gpu_like']['per_item_ms']} ms per item per batch without CPU. Image: one "
             f"{st['jpeg_bytes'] / 1000:.0f} KB JPEG per request. CPU = user + system seconds of each process "
             "role over the run ÷ requests answered (ms).", ""] + ([f"Note: {res['notes']}.", ""] if res.get("notes") else []) + [
             "| forward | workload | system | requests/s | items/s | p50 ms | p99 ms | errors | cores used | "
             "CPU ms/request | " + " | ".join(roles) + " |",
             "|" + "---|" * (10 + len(roles))]
    for p in sorted(res["points"], key=lambda p: (p["forward"], p["workload"], p["system"])):
        cpu = p["cpu_ms_per_request"]
        lines.append(f"| {p['forward']} | {p['workload']} | {p['system']} | {p['requests_per_s']:.0f} | "
                     f"{p['items_per_s']:.0f} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {p['errors']} | "
                     f"{p['cores_used']} | {cpu['total']:.2f} | " + " | ".join(
                         f"{cpu[r]:.2f}" if r in cpu else "-" for r in roles) + " |")
    lines.append("")
    if res.get("front"):
        lines += ["### Scaling the front: Ingress replicas (one-sentence embeddings, null forward)", "",
                  "| Ingress replicas | requests/s | p50 ms | p99 ms | cores used | CPU ms/request | ingress | haproxy |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in res["front"]:
            cpu = p["cpu_ms_per_request"]
            lines.append(f"| {p['ingress_replicas']} | {p['requests_per_s']:.0f} | {p['p50_ms']:.1f} | "
                         f"{p['p99_ms']:.1f} | {p['cores_used']} | {cpu['total']:.2f} | {cpu.get('ingress', 0):.2f} | "
                         f"{cpu.get('haproxy', 0):.2f} |")
        lines.append("")
    return lines


def plot(res: dict | None, path: Path) -> Path | None:
    """A PNG: requests/s per workload and system (bars), one panel per forward."""
    if not res:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    forwards = list(dict.fromkeys(p["forward"] for p in res["points"]))
    fig, axes = plt.subplots(1, len(forwards), figsize=(5.5 * len(forwards), 3.6), squeeze=False)
    for ax, fwd in zip(axes[0], forwards):
        pts = [p for p in res["points"] if p["forward"] == fwd]
        works = list(dict.fromkeys(p["workload"] for p in pts))
        names = list(dict.fromkeys(p["system"] for p in pts))
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            ys = [next((p["requests_per_s"] for p in pts if p["system"] == name and p["workload"] == w), 0)
                  for w in works]
            ax.bar([j + i * width for j in range(len(works))], ys, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(works))], works)
        ax.set(title=f"{fwd} forward: requests/s at saturation", ylabel="requests/s")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _peer_settings(kind: str, workload: str) -> list[dict]:
    if kind == "fastapi":
        return [{"workers": w} for w in (1, 2)]
    size = 8 if workload.startswith("image") else 32
    return [{"workers": w, "api_servers": a, "max_batch_size": size, "batch_wait_timeout_s": 0.001, "fast_queue": True}
            for w in (1, 2) for a in (1, 2)]


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
