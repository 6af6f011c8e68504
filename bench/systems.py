"""Starting and stopping the benchmarked servers, each as a subprocess tree.

* maas-serve: ``serve run --address local <config>`` on a config derived from
  ``serve_configs/local.yaml`` (:func:`maas_config`), so the model entries — batch sizes,
  waits and replica counts included — are the shipped ones. Ready when ``GET /readyz`` is 200.
  By default in Ray Serve's high-throughput mode (:data:`THROUGHPUT_ENV`, what ``make serve``
  sets), or with Serve's defaults.
* LitServe and FastAPI: :mod:`bench.peers`, ready when ``GET /health`` is 200.

Every server is stopped (SIGINT, then SIGKILL of its process group after a grace period)
before the next one starts, so systems never share the cores.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from bench import memory, workloads
# Ray Serve's high-throughput mode: HAProxy (C) takes the HTTP port and forwards to the ingress
# replica's own HTTP server, replacing the Python proxy hop; user code runs on the replica's
# event loop (two of the mode's settings turned back: see maas.manifest.THROUGHPUT_ENV). The
# same variables as `make serve` and the RayService manifest set.
from maas.manifest import LOCAL_SERVE_ENV as THROUGHPUT_ENV

#: The same variables at Ray Serve 2.60's own defaults (ray/serve/_private/constants.py).
SERVE_DEFAULT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0",
                     "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1", "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0"}
#: What the baseline release (before the batched request path) shipped: the mode with Ray's transport.
BASELINE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
                "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1", "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0"}

ROOT = workloads.ROOT
BIN = Path(sys.executable).parent


def save_result(name: str, result: dict, markdown: list[str]) -> None:
    """Write ``bench/results/<name>.json`` (``result``) and ``.md`` (``markdown``'s lines), and print the
    markdown: how the single-purpose benches (``bench.ab``, ``bench.contention``) record a run."""
    import json

    out = ROOT / "bench" / "results"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text("\n".join(markdown) + "\n")
    print("\n".join(markdown))



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status == 200
    except OSError:
        return False


def maas_config(models: list[str], *, batching: bool, port: int, source: Path = workloads.LOCAL_CONFIG,
                runtimes: dict[str, tuple[str, str]] | None = None) -> dict:
    """The serve config for a maas-serve run: ``source`` with only ``models`` kept (and, per model
    in ``runtimes``, its ``(runtime, precision)`` set, e.g. ``{"minilm": ("onnxruntime", "int8")}``).

    With ``batching=False`` every kept model gets ``max_batch_size: 1`` (no wait) and
    ``max_queued_requests: 1024``, so the highest concurrency (64) waits in a queue instead of
    being rejected, as it does with batching on (default queue 8 × max_ongoing ≥ 256).
    """
    raw = yaml.safe_load(Path(source).read_text())
    raw = copy.deepcopy(raw)
    raw["http_options"]["port"] = port
    app = raw["applications"][0]
    kept = [m for m in app["args"]["models"] if m["name"] in models]
    missing = set(models) - {m["name"] for m in kept}
    if missing:
        raise KeyError(f"{source} has no model(s) {sorted(missing)}")
    for m in kept:
        if runtimes and m["name"] in runtimes:
            m["runtime"], m["precision"] = runtimes[m["name"]]
        if not batching:
            m["batching"] = {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}
            m["max_queued_requests"] = 1024
    app["args"]["models"] = kept
    app["deployments"] = [d for d in app.get("deployments") or [] if d["name"] in set(models) | {"Ingress"}]
    return raw


def maas_replicas(model: str, config: dict) -> int:
    """``num_replicas`` of ``model`` in a serve config's ``deployments:`` (1 when unset)."""
    for d in config["applications"][0].get("deployments") or []:
        if d["name"] == model and isinstance(d.get("num_replicas"), int):
            return d["num_replicas"]
    return 1


class Server:
    """A server subprocess (and its whole process tree) with a readiness URL.

    Args:
        name: For logs and results.
        cmd: argv.
        ready_url: GET returns 200 once the server can take the benchmark's requests.
        log_path: stdout + stderr go here.
    """

    def __init__(self, name: str, cmd: list[str], ready_url: str, log_path: Path, env: dict | None = None):
        self.name, self.cmd, self.ready_url, self.log_path = name, cmd, ready_url, log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.ready_s: float | None = None

    def start(self, timeout_s: float = 300.0) -> "Server":
        """Start and wait until ready. Raises RuntimeError (with the log's tail) otherwise."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env,
                                     start_new_session=True)
        deadline = started + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if http_ok(self.ready_url):
                    self.ready_s = round(time.monotonic() - started, 1)
                    return self
                time.sleep(0.5)  # poll interval of the readiness deadline loop
        except BaseException:  # Ctrl-C while starting: leave no cluster behind
            self.stop()
            raise
        finally:
            log.close()  # the child keeps its own descriptor
        tail = self.log_path.read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready at {self.ready_url} within {timeout_s} s:\n{tail}")

    def memory(self) -> dict:
        return memory.usage(self.proc.pid) if self.proc else {}

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGINT the process group, wait up to ``grace_s`` for the tree to exit, then SIGKILL
        what is left of it — including processes of its session that were re-parented (Serve's
        HAProxy outlives a killed cluster otherwise and keeps the port)."""
        if self.proc is None:
            return
        pids = sorted({p.pid for p in memory.tree(self.proc.pid)} | set(_session(self.proc.pid)))
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            try:
                self.proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
            if self.proc.poll() is not None and not any(_alive(p) for p in pids):
                break
        for pid in pids:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self.proc = None


def _session(sid: int) -> list[int]:
    """Pids of the processes whose session id is ``sid`` (the server was started as a session leader)."""
    import psutil

    out = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid:
                out.append(pid)
        except OSError:
            continue
    return out


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def maas(models: list[str], *, batching: bool, workdir: Path, mode: str, throughput_mode: bool = True,
         src: Path | None = None, release_env: bool = True, runtimes: dict[str, tuple[str, str]] | None = None) -> Server:
    """A ``serve run`` server for ``models`` (not started), on :func:`maas_config`.

    Args:
        mode: Label for results and file names (``batching on``, ...).
        throughput_mode: Start the cluster with :data:`THROUGHPUT_ENV`.
        src: Run the maas-serve of another checkout (its ``src`` on ``PYTHONPATH``, ahead of this
            one's editable install; its own ``serve_configs/local.yaml`` and Serve settings), for
            the baseline; None runs this tree.
        release_env: With ``src``: run it with the Serve settings the batched-request-path release
            shipped (:data:`BASELINE_ENV`); False runs it with this tree's (an A/B of two recent trees).
        runtimes: per model, ``(runtime, precision)`` for this tree's run (see :func:`maas_config`;
            a baseline ref runs its own config).
    """
    port = free_port()
    source = (src.parent / "serve_configs" / "local.yaml") if src else workloads.LOCAL_CONFIG
    config = maas_config(models, batching=batching, port=port, source=source, runtimes=None if src else runtimes)
    slug = mode.replace(" ", "-").replace(",", "")
    path = workdir / f"maas-{slug}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # Set every variable either way, so the caller's environment does not decide the mode.
    env.update(BASELINE_ENV if src and release_env else THROUGHPUT_ENV if throughput_mode else SERVE_DEFAULT_ENV)
    if src:
        env["PYTHONPATH"] = str(src)
    server = Server(f"maas-serve ({mode})", [str(BIN / "serve"), "run", "--address", "local", str(path)],
                    f"http://127.0.0.1:{port}/readyz", workdir / f"{path.stem}.log", env)
    server.base_url = f"http://127.0.0.1:{port}"
    return server


def peer(kind: str, model: str, *, threads: int, workdir: Path, max_batch_size: int = 1,
         batch_wait_timeout_s: float = 0.0, workers: int = 1, api_servers: int = 1, fast_queue: bool = True,
         null_forward: dict | None = None, runtime: str | None = None) -> Server:
    """A peer server (``kind`` ``litserve`` or ``fastapi``) for one model (not started).

    Args:
        workers: LitServe inference workers, or uvicorn worker processes for FastAPI.
        api_servers: LitServe API-server processes.
        fast_queue: LitServe's ZeroMQ queue between API servers and workers (its docs recommend
            it above ~100 requests/s).
        null_forward: ``{"hold_ms", "per_item_ms"}``: serve the null model
            (:class:`bench.workloads.NullModel`) instead of the real one.
        runtime: FastAPI only: ``onnxruntime:<precision>`` serves maas-serve's ONNX export of the
            model (the plain FastAPI + ONNX Runtime server).
    """
    port = free_port()
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if kind == "litserve":
        cmd = [sys.executable, "-m", "bench.peers.litserve_server", "--model", model, "--port", str(port),
               "--threads", str(threads), "--max-batch-size", str(max_batch_size),
               "--batch-timeout-s", str(batch_wait_timeout_s), "--workers", str(workers),
               "--api-servers", str(api_servers)] + (["--fast-queue"] if fast_queue else [])
        name = "LitServe"
    else:
        cmd = [sys.executable, "-m", "bench.peers.fastapi_server", "--model", model, "--port", str(port),
               "--threads", str(threads), "--workers", str(workers)] + (["--runtime", runtime] if runtime else [])
        name = "FastAPI" if not runtime else f"FastAPI+{runtime.replace('onnxruntime:', 'ORT-')}"
    if null_forward is not None:
        cmd += ["--null-forward", f"{null_forward['hold_ms']},{null_forward['per_item_ms']}"]
    server = Server(name, cmd, f"http://127.0.0.1:{port}/health", workdir / f"{kind}-{model}.log", env)
    server.base_url = f"http://127.0.0.1:{port}"
    return server
