"""``python -m bench`` (``make bench``): the limit, maas-serve and its peers in one run.

Order: the limit of each model (in a subprocess each), then each server in turn — maas-serve
as shipped (batching on, Ray Serve's high-throughput mode as ``make serve`` starts it), the same
with Serve's default proxy and threading, maas-serve with batching off, LitServe, plain
FastAPI — with nothing else running. Per server and model: one checked request (the answer must be right), a short
warm-up, then one closed-loop ``wrk`` run per concurrency level. maas-serve with batching on
also gets a graph-overhead run (concurrency 1, the smallest input only). Memory of each
server's process tree is read after start-up, sampled during the load (peak) and read after it.

Writes ``<out>/<date>.json``, ``<date>.md`` and ``<date>.png`` (see :mod:`bench.report`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench import inputs, load, memory, report, systems, workloads

SYSTEMS = ("limit", "maas", "maas-serve-defaults", "maas-nobatch", "litserve", "fastapi")
#: maas-serve runs: system name → (mode label, batching on, Ray Serve high-throughput mode).
MAAS_RUNS = {
    "maas": ("batching on", True, True),
    "maas-serve-defaults": ("batching on, Serve defaults", True, False),
    "maas-nobatch": ("batching off", False, True),
}
PEER_MODELS = ("efficientnet-lite0", "minilm")
DEFAULT_MODELS = ("efficientnet-lite0", "resnet50", "minilm")
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def bodies_for(model: str, smallest_only: bool = False) -> list[load.Body]:
    """The requests for ``model``: each photo as a multipart upload, or each sentence as an
    OpenAI embeddings request; one item per request."""
    if workloads.KINDS[model] == "image":
        photos = inputs.photo_jpegs()
        if smallest_only:
            name = min(photos, key=lambda n: len(photos[n]))
            photos = {name: photos[name]}
        out = []
        for name, data in photos.items():
            ctype, body = load.multipart({"model": model}, [("file", f"{name}.jpg", data)])
            out.append(load.Body("/v1/classifications/image", ctype, body))
        return out
    sentences = [min(inputs.SENTENCES, key=len)] if smallest_only else inputs.SENTENCES
    return [load.json_body("/v1/embeddings", {"model": model, "input": s}) for s in sentences]


def check(base_url: str, model: str) -> dict:
    """One request through the system; the answer must be right (chelsea → a cat class for a
    pretrained classifier; a 384-d unit vector for MiniLM). Raises AssertionError."""
    body = bodies_for(model)[0]
    req = urllib.request.Request(base_url + body.path, data=body.data, headers={"Content-Type": body.content_type})
    with urllib.request.urlopen(req, timeout=120) as resp:
        out = json.loads(resp.read())
    if workloads.KINDS[model] == "image":
        top = out["data"][0]["top_k"][0]["index"]
        if model == "efficientnet-lite0":  # real weights: chelsea is a tabby/tiger/Egyptian cat
            assert top in (281, 282, 285), f"{base_url}: chelsea classified as {top}"
        return {"top1_index": top}
    vec = out["data"][0]["embedding"]
    norm = sum(v * v for v in vec) ** 0.5
    assert len(vec) == 384 and abs(norm - 1) < 1e-3, f"{base_url}: embedding of dim {len(vec)}, norm {norm}"
    return {"dimensions": len(vec)}


def machine() -> dict:
    """What the run ran on: CPU model, cores, memory, and the versions that matter."""
    import psutil
    import ray
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    versions = {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__}
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("litserve", "fastapi", "uvicorn"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    wrk = subprocess.run([load.WRK, "--version"], capture_output=True, text=True)
    versions["wrk"] = (wrk.stdout or wrk.stderr).split("[")[0].strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "versions": versions}


def run_limit(models: list[str], duration_s: float) -> dict:
    """Each model's limit in its own process (so models and thread settings don't mix)."""
    out = {}
    for model in models:
        batches = [1, 4, 8] if workloads.KINDS[model] == "image" else [1, 8, 32, 64]
        proc = subprocess.run([sys.executable, "-m", "bench.limit", model, *map(str, batches)],
                              capture_output=True, text=True, cwd=workloads.ROOT,
                              env={**os.environ, **ENV, "BENCH_DURATION_S": str(duration_s)})
        if proc.returncode != 0:
            raise RuntimeError(f"limit of {model} failed:\n{proc.stderr[-3000:]}")
        out[model] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  limit {model}: best {out[model]['best']['items_per_s']} items/s at batch "
              f"{out[model]['best']['batch']}; batch 1 p50 {out[model]['points'][0]['p50_ms']} ms", flush=True)
    return out


def sweep(server: systems.Server, system: str, mode: str, model: str, args, runs: list) -> None:
    """Check, warm up, then one wrk run per concurrency level against ``server``."""
    bodies = bodies_for(model)
    check(server.base_url, model)
    load.run(server.base_url, bodies, concurrency=4, duration_s=args.warmup_s)
    for c in args.concurrency:
        r = load.run(server.base_url, bodies, concurrency=c, duration_s=args.duration_s)
        r.update(system=system, mode=mode, model=model, items_per_s=r["ok_per_s"])
        runs.append(r)
        print(f"  {system:10s} {mode:12s} {model:18s} c={c:<3d} {r['items_per_s']:8.1f} items/s  "
              f"p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}", flush=True)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from {SYSTEMS}")
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated concurrency levels")
    parser.add_argument("--duration-s", type=float, default=10.0, help="seconds per measured point")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="seconds of warm-up per server and model")
    parser.add_argument("--maas-url", default=None,
                        help="benchmark an already running maas-serve at this URL instead of starting one")
    parser.add_argument("--out", default=str(workloads.ROOT / "bench" / "results"))
    parser.add_argument("--name", default=None, help="result file stem (default: today's date)")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    models = [m for m in args.models.split(",") if m]
    chosen = [s for s in args.systems.split(",") if s]
    for s in chosen:
        if s not in SYSTEMS:
            parser.error(f"unknown system {s!r}; choose from {SYSTEMS}")
    for m in models:
        if m not in workloads.KINDS:
            parser.error(f"unknown model {m!r}; choose from {sorted(workloads.KINDS)}")
    if not load.available():
        parser.error("wrk is not installed; run `make bench-deps` (apt-get install wrk)")
    os.environ.update(ENV)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or dt.date.today().isoformat()
    workdir = Path(tempfile.mkdtemp(prefix="maas-bench-"))
    started = time.monotonic()
    result: dict = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "settings": {"models": models, "systems": chosen, "concurrency": args.concurrency,
                     "duration_s": args.duration_s, "warmup_s": args.warmup_s, "load_generator": "wrk",
                     "items_per_request": 1},
        "limit": {}, "runs": [], "overhead": {}, "memory": {}, "servers": {},
    }
    print(f"bench: logs in {workdir}", flush=True)
    if "limit" in chosen:
        result["limit"] = run_limit(models, min(args.duration_s, 5.0))
        for model in models:  # single-item latency on the smallest input, for the graph overhead
            result["limit"][model]["smallest"] = _limit_smallest(model, min(args.duration_s, 3.0))

    for system, (mode, batching, throughput_mode) in MAAS_RUNS.items():
        if system not in chosen:
            continue
        if args.maas_url and system == "maas":
            server = systems.Server("maas-serve (running)", [], args.maas_url + "/readyz", workdir / "unused.log")
            server.base_url = args.maas_url.rstrip("/")
        elif args.maas_url:
            continue
        else:
            server = systems.maas(models, batching=batching, workdir=workdir, mode=mode,
                                          throughput_mode=throughput_mode)
            print(f"bench: starting maas-serve ({mode})", flush=True)
            server.start()
            result["servers"][f"maas-serve ({mode})"] = {"ready_s": server.ready_s, "log": str(server.log_path)}
        try:
            mem = {"after_start": server.memory()} if server.proc else {}
            with memory.PeakSampler(server.proc.pid) if server.proc else _Nothing() as sampler:
                for model in models:
                    sweep(server, "maas-serve", mode, model, args, result["runs"])
                    if system == "maas":
                        r = load.run(server.base_url, bodies_for(model, smallest_only=True), concurrency=1,
                                     duration_s=args.duration_s)
                        result["overhead"][model] = {"maas_p50_ms": r["p50_ms"], "maas_p99_ms": r["p99_ms"],
                                                     "requests": r["requests"], "errors": r["errors"]}
            if server.proc:
                mem["peak_during_load"] = sampler.peak
                mem["after_load"] = server.memory()
                result["memory"][f"maas-serve ({mode})"] = mem
        finally:
            server.stop()

    for system in ("litserve", "fastapi"):
        if system not in chosen:
            continue
        for model in models:
            if model not in PEER_MODELS:
                continue
            spec = workloads.model_spec(model)
            # LitServe gets as many model workers as maas-serve has replicas of the model;
            # FastAPI's thread pool already runs requests on every core.
            replicas = systems.maas_replicas(model, systems.maas_config([model], batching=True, port=0))
            server = systems.peer(
                system, model, threads=workloads.replica_threads(model), workdir=workdir,
                max_batch_size=spec.batching.max_batch_size, batch_wait_timeout_s=spec.batching.batch_wait_timeout_s,
                workers=replicas)
            print(f"bench: starting {server.name} for {model}", flush=True)
            server.start()
            name = f"{server.name} ({model})"
            result["servers"][name] = {"ready_s": server.ready_s, "log": str(server.log_path)}
            try:
                mem = {"after_start": server.memory()}
                mode = "batching on" if system == "litserve" else "no batching"
                with memory.PeakSampler(server.proc.pid) as sampler:
                    sweep(server, server.name, mode, model, args, result["runs"])
                mem.update(peak_during_load=sampler.peak, after_load=server.memory())
                result["memory"][name] = mem
            finally:
                server.stop()

    for model, o in result["overhead"].items():
        single = result["limit"].get(model, {}).get("smallest")
        if single:
            o.update(limit_p50_ms=single["p50_ms"], limit_p99_ms=single["p99_ms"],
                     overhead_p50_ms=round(o["maas_p50_ms"] - single["p50_ms"], 2),
                     overhead_p99_ms=round(o["maas_p99_ms"] - single["p99_ms"], 2))
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    result["goals"] = report.goals(result)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(report.markdown(result, plot_name=f"{stem}.png"))
    report.plot(result, out_dir / f"{stem}.png")
    print(f"bench: wrote {json_path}, {stem}.md and {stem}.png in {result['elapsed_s']} s", flush=True)
    return json_path


def _limit_smallest(model: str, duration_s: float) -> dict:
    """The limit's batch-1 latency on the smallest input alone (same input as the overhead run)."""
    code = (
        "import json, sys\n"
        "from bench import limit, workloads, inputs\n"
        f"model = {model!r}\n"
        "work = workloads.load(model, workloads.replica_threads(model))\n"
        "if workloads.KINDS[model] == 'image':\n"
        "    photos = inputs.photo_jpegs(); items = [min(photos.values(), key=len)]\n"
        "else:\n"
        "    items = [min(inputs.SENTENCES, key=len)]\n"
        f"print(json.dumps(limit.measure(work, items, 1, {duration_s!r}, warmup=5)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=workloads.ROOT,
                          env={**os.environ, **ENV})
    if proc.returncode != 0:
        raise RuntimeError(f"limit (smallest input) of {model} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class _Nothing:
    peak: dict = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


if __name__ == "__main__":
    main()
