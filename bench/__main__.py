"""``python -m bench`` (``make bench``): the limit, maas-serve and its peers in one run.

Order: the limit of each model (in a subprocess each), then each server in turn, with nothing
else running — maas-serve as shipped (batching on, Ray Serve's high-throughput mode as ``make
serve`` starts it), the baseline (the release before the batched request path, from a git
worktree, as it shipped), maas-serve with batching off, then LitServe and plain FastAPI, each
first swept over its documented tuning knobs at one loaded point and then run with its best
settings. Per server and model: one checked request (the answer must be right), a short
warm-up, then one closed-loop ``wrk`` run per concurrency level. maas-serve and the baseline
also get a graph-overhead run (concurrency 1, the smallest input only) and, for MiniLM, a
multi-item point (16 sentences per request at 4 and at 16 clients). Memory of each server's process tree
is read after start-up, sampled during the load (peak) and read after it; its idle CPU is
measured for 10 s before the load.

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

SYSTEMS = ("limit", "maas", "maas-baseline", "maas-nobatch", "maas-serve-defaults", "litserve", "fastapi",
           "generation", "generation-ab", "auto", "explain", "null", "repository", "tenants", "tracing")
#: What ``make bench`` runs (Serve's default proxy/threading is selectable, not run by default).
#: ``generation`` is the generation section (:mod:`bench.generation`: its own limit, maas-serve
#: and LitServe runs on SmolLM2-135M); ``auto`` the ``model: auto`` point (:mod:`bench.auto_routing`);
#: ``explain`` the explanation latencies (:mod:`bench.explain`); ``null`` the serving path alone
#: (:mod:`bench.null`: every system with a null forward, CPU per request by process); ``generation-ab`` (not run by default)
#: only the maas-serve generation point, on this tree and on ``--baseline-ref``, for an A/B of two trees;
#: ``repository`` the model repository and multiplexed pool (:mod:`bench.repository`: 100 variants, one pool).
#: ``tenants`` a noisy neighbour, priorities, accounting and the checks' cost (:mod:`bench.tenants`).
#: ``tracing`` tracing on against off, and whether traces account for latency (:mod:`bench.tracing`).
DEFAULT_SYSTEMS = ("limit", "maas", "maas-baseline", "maas-nobatch", "litserve", "fastapi", "generation", "auto",
                   "explain", "null", "repository", "tenants", "tracing")
#: maas-serve runs: system name → (mode label, batching on, Ray Serve high-throughput mode).
MAAS_RUNS = {
    "maas": ("batching on", True, True),
    "maas-baseline": ("baseline", True, True),
    "maas-nobatch": ("batching off", False, True),
    "maas-serve-defaults": ("batching on, Serve defaults", True, False),
}
#: The release before the batched request path (issue 10): ``maas-baseline`` runs it from a git
#: worktree, with its own config and Serve settings, in the same run as this tree.
DEFAULT_BASELINE_REF = "28058b3"
PEER_MODELS = ("efficientnet-lite0", "minilm")
DEFAULT_MODELS = ("efficientnet-lite0", "resnet50", "minilm")
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
#: The multi-item points: sentences per embeddings request, and the clients of each point: 4 (how bulk
#: clients call) and 16 (saturation: with 4 clients the 64 sentences in flight are exactly the two
#: MiniLM replicas' 32-item forwards, so every answer's round trip leaves a replica idle; 16 keeps
#: work queued in the ingress, as the single-sentence points at 64 clients do).
MULTI_ITEMS, MULTI_CONCURRENCY = 16, (4, 16)
#: Peers are swept at this concurrency (a loaded point) before their full run with the best settings.
SWEEP_CONCURRENCY = 32


def multi_bodies(model: str, items: int = MULTI_ITEMS) -> list[load.Body]:
    """Embeddings requests of ``items`` sentences each (consecutive sentences, rotating)."""
    s = list(inputs.SENTENCES)
    return [load.json_body("/v1/embeddings", {"model": model, "input": [s[(i + j) % len(s)] for j in range(items)]})
            for i in range(0, len(s), items // 2 or 1)]


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


def baseline_checkout(ref: str, workdir: Path) -> Path | None:
    """A git worktree of ``ref`` under ``workdir``; returns its ``src`` (None when git or the ref is missing)."""
    path = workdir / "baseline"
    proc = subprocess.run(["git", "-C", str(workloads.ROOT), "worktree", "add", "--detach", "--force", str(path), ref],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"bench: no baseline ({ref}): {proc.stderr.strip()[:300]}", flush=True)
        return None
    return path / "src"


def remove_checkout(src: Path | None) -> None:
    if src is not None:
        subprocess.run(["git", "-C", str(workloads.ROOT), "worktree", "remove", "--force", str(src.parent)],
                       capture_output=True)


def ceiling(model: str, limit: dict, config: dict) -> dict | None:
    """The machine's ceiling for ``model``: the one-thread limit's best items/s × the torch
    threads the graph's replicas of the model use together (replicas × threads each)."""
    lim = limit.get(model, {}).get("best")
    if not lim:
        return None
    threads = systems.maas_replicas(model, config) * workloads.replica_threads(model)
    return {"threads": threads, "items_per_s": round(lim["items_per_s"] * threads / limit[model]["threads"], 2)}


def parse_runtimes(text: str) -> dict[str, tuple[str, str]]:
    """``--runtime minilm=onnxruntime:int8,…`` as ``{"minilm": ("onnxruntime", "int8")}``.

    Raises:
        SystemExit: a malformed entry (the message shows the expected form).
    """
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        model, _, variant = part.partition("=")
        runtime, _, precision = variant.partition(":")
        if not (model and runtime and precision):
            raise SystemExit(f"--runtime: {part!r} is not MODEL=RUNTIME:PRECISION (e.g. minilm=onnxruntime:int8)")
        out[model] = (runtime, precision)
    return out


def idle_cpu(server: systems.Server, seconds: float = 10.0) -> float:
    """Cores the server's whole process tree used while idle (ready, no load), over ``seconds``."""
    if server.proc is None:
        return float("nan")
    return round(memory.cpu_cores(server.proc.pid, seconds), 3)


def run_maas(system: str, models: list[str], args, workdir: Path, result: dict, src: Path | None) -> None:
    """One maas-serve configuration: start, sweep every model, the extra points, stop."""
    mode, batching, throughput_mode = MAAS_RUNS[system]
    kept = models if system != "maas-nobatch" else [m for m in models if m in PEER_MODELS]
    if args.maas_url and system == "maas":
        server = systems.Server("maas-serve (running)", [], args.maas_url + "/readyz", workdir / "unused.log")
        server.base_url = args.maas_url.rstrip("/")
    elif args.maas_url:
        return
    else:
        # The release baseline runs with the Serve settings it shipped; another ref with this tree's.
        server = systems.maas(kept, batching=batching, workdir=workdir, mode=mode, throughput_mode=throughput_mode,
                              src=src, release_env=args.baseline_ref == DEFAULT_BASELINE_REF,
                              runtimes=parse_runtimes(args.runtime))
        print(f"bench: starting maas-serve ({mode})", flush=True)
        server.start()
        result["servers"][f"maas-serve ({mode})"] = {"ready_s": server.ready_s, "log": str(server.log_path)}
    try:
        mem = {"after_start": server.memory()} if server.proc else {}
        if server.proc:
            for model in kept:
                check(server.base_url, model)
            mem["idle_cpu_cores"] = idle_cpu(server, args.idle_window_s)
        with memory.PeakSampler(server.proc.pid) if server.proc else _Nothing() as sampler:
            for model in kept:
                sweep(server, "maas-serve", mode, model, args, result["runs"])
                if system in ("maas", "maas-baseline"):
                    r = load.run(server.base_url, bodies_for(model, smallest_only=True), concurrency=1,
                                 duration_s=args.duration_s)
                    result["overhead"].setdefault(model, {})[system] = {
                        "maas_p50_ms": r["p50_ms"], "maas_p99_ms": r["p99_ms"], "requests": r["requests"],
                        "errors": r["errors"]}
                    for clients in MULTI_CONCURRENCY if workloads.KINDS[model] == "text" else ():
                        r = load.run(server.base_url, multi_bodies(model), concurrency=clients,
                                     duration_s=args.duration_s)
                        r.update(system="maas-serve", mode=mode, model=model, items_per_request=MULTI_ITEMS,
                                 items_per_s=round(r["ok_per_s"] * MULTI_ITEMS, 2))
                        result["multi"].append(r)
                        print(f"  maas-serve {mode:12s} {model:18s} {MULTI_ITEMS} items/request c={clients}"
                              f" {r['items_per_s']:8.1f} items/s  p50 {r['p50_ms']:7.1f} ms", flush=True)
        if server.proc:
            mem["peak_during_load"] = sampler.peak
            mem["after_load"] = server.memory()
            result["memory"][f"maas-serve ({mode})"] = mem
    finally:
        server.stop()


def peer_settings(system: str, model: str) -> list[dict]:
    """The settings a peer is swept over (its documented tuning knobs), best taken per model."""
    if system == "fastapi":
        return [{"workers": w} for w in (1, 2)]
    sizes = (4, 8) if workloads.KINDS[model] == "image" else (32, 64)
    return [{"workers": w, "max_batch_size": b, "batch_wait_timeout_s": t, "fast_queue": True}
            for w in (1, 2) for b in sizes for t in (0.0, 0.005)]


def run_peer(system: str, model: str, args, workdir: Path, result: dict) -> None:
    """Sweep the peer's settings at one loaded point, then run the best over every concurrency."""
    threads = workloads.replica_threads(model)
    bodies = bodies_for(model)
    best, tried = None, []
    candidates = peer_settings(system, model)
    if args.no_sweep:
        candidates, best = [], (candidates[0], 0.0)
    # FastAPI serves the model's runtime variant when --runtime names one (the plain FastAPI + ONNX
    # Runtime server a careful user would write); LitServe stays torch fp32 (the peer).
    runtime = ":".join(parse_runtimes(args.runtime)[model]) if system == "fastapi" and model in \
        parse_runtimes(args.runtime) else None
    for settings in candidates:
        server = systems.peer(system, model, threads=threads, workdir=workdir, runtime=runtime, **settings)
        server.start()
        try:
            check(server.base_url, model)
            load.run(server.base_url, bodies, concurrency=4, duration_s=1)
            r = load.run(server.base_url, bodies, concurrency=SWEEP_CONCURRENCY, duration_s=max(3.0, args.duration_s / 2))
        finally:
            server.stop()
        tried.append({**settings, "items_per_s": r["ok_per_s"], "errors": r["errors"]})
        print(f"  sweep {server.name:8s} {model:18s} {settings} -> {r['ok_per_s']:.1f} items/s", flush=True)
        if best is None or r["ok_per_s"] > best[1]:
            best = (settings, r["ok_per_s"])
    settings = best[0]
    server = systems.peer(system, model, threads=threads, workdir=workdir, runtime=runtime, **settings)
    print(f"bench: starting {server.name} for {model} with {settings}", flush=True)
    server.start()
    name = f"{server.name} ({model})"
    result["servers"][name] = {"ready_s": server.ready_s, "log": str(server.log_path), "settings": settings,
                               "sweep": tried}
    try:
        mem = {"after_start": server.memory()}
        check(server.base_url, model)
        mem["idle_cpu_cores"] = idle_cpu(server, args.idle_window_s)
        mode = "batching on" if system == "litserve" else "no batching"
        with memory.PeakSampler(server.proc.pid) as sampler:
            sweep(server, server.name, mode, model, args, result["runs"])
        mem.update(peak_during_load=sampler.peak, after_load=server.memory())
        result["memory"][name] = mem
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help=f"comma-separated, from {SYSTEMS}")
    parser.add_argument("--concurrency", default="1,4,16,32,64", help="comma-separated concurrency levels")
    parser.add_argument("--duration-s", type=float, default=8.0, help="seconds per measured point")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="seconds of warm-up per server and model")
    parser.add_argument("--runtime", default="",
                        help="maas-serve's runtime and precision per model, e.g. minilm=onnxruntime:int8,"
                        "efficientnet-lite0=onnxruntime:fp32 (default: each model's own, torch fp32); the limit and "
                        "the peers stay torch fp32")
    parser.add_argument("--idle-window-s", type=float, default=10.0,
                        help="seconds over which a started server's idle CPU is measured")
    parser.add_argument("--baseline-ref", default=DEFAULT_BASELINE_REF,
                        help="git ref of the maas-serve that maas-baseline runs (default: the release before "
                        "the batched request path)")
    parser.add_argument("--no-sweep", action="store_true",
                        help="run each peer with its first settings instead of sweeping them (smoke runs)")
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
                     "items_per_request": 1, "multi": {"items_per_request": MULTI_ITEMS,
                                                       "concurrency": list(MULTI_CONCURRENCY)},
                     "sweep_concurrency": SWEEP_CONCURRENCY,
                     "baseline_ref": args.baseline_ref if "maas-baseline" in chosen else None,
                     "maas_runtimes": {m: "/".join(v) for m, v in parse_runtimes(args.runtime).items()}},
        "limit": {}, "runs": [], "multi": [], "overhead": {}, "memory": {}, "servers": {},
    }
    print(f"bench: logs in {workdir}", flush=True)
    if "limit" in chosen:
        result["limit"] = run_limit(models, min(args.duration_s, 5.0))
        config = systems.maas_config(models, batching=True, port=0)
        for model in models:  # single-item latency on the smallest input, for the graph overhead
            result["limit"][model]["smallest"] = _limit_smallest(model, min(args.duration_s, 3.0))
            result["limit"][model]["ceiling"] = ceiling(model, result["limit"], config)

    for system in MAAS_RUNS:
        if system not in chosen:
            continue
        src = baseline_checkout(args.baseline_ref, workdir) if system == "maas-baseline" else None
        if system == "maas-baseline" and src is None:
            continue
        try:
            run_maas(system, models, args, workdir, result, src)
        finally:
            remove_checkout(src)

    for system in ("litserve", "fastapi"):
        if system not in chosen:
            continue
        for model in models:
            if model in PEER_MODELS:
                run_peer(system, model, args, workdir, result)

    if "generation" in chosen:
        from bench import generation

        result["generation"] = generation.run(workdir)
    if "generation-ab" in chosen:
        from bench import generation

        src = baseline_checkout(args.baseline_ref, workdir)
        try:
            result["generation_ab"] = {"ref": args.baseline_ref, "this": generation.run_maas(workdir),
                                       "baseline": generation.run_maas(workdir, src) if src else None}
        finally:
            remove_checkout(src)
    if "auto" in chosen:
        from bench import auto_routing

        result["auto"] = auto_routing.run(workdir)
    if "explain" in chosen:
        from bench import explain

        result["explain"] = explain.run(workdir)
    if "repository" in chosen:
        from bench import repository

        result["repository"] = repository.run(workdir)
    if "tenants" in chosen:
        from bench import tenants

        result["tenants"] = tenants.run(workdir / "tenants")
    if "tracing" in chosen:
        from bench import tracing

        result["tracing"] = tracing.run(workdir / "tracing")
    if "null" in chosen:
        from bench import null

        # With maas-baseline chosen, the baseline tree's maas-serve runs the null points too (a tree
        # from before the null forward has no null_forward: choose a later --baseline-ref).
        src = baseline_checkout(args.baseline_ref, workdir) if "maas-baseline" in chosen else None
        try:
            result["null"] = null.run(workdir, args.duration_s, sweep=not args.no_sweep,
                                      baseline=(args.baseline_ref, src) if src else None)
        finally:
            remove_checkout(src)

    for model, by_system in result["overhead"].items():
        single = result["limit"].get(model, {}).get("smallest")
        for o in by_system.values():
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
    if result.get("null"):
        from bench import null

        null.plot(result["null"], out_dir / f"{stem}-null.png")
    if result.get("tracing"):
        from bench import tracing

        tracing.picture(result["tracing"], out_dir / f"{stem}-trace.png")
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
