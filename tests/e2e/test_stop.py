"""``make serve``'s launcher (``python -m maas serve``) stops cleanly on SIGTERM, on SIGINT and on a
second signal while shutting down: nothing of the cluster stays behind (HAProxy included), and
the next start gets the same ports. Each start is a cluster of its own (address "local") beside
the session's, serving one small model."""

import re
import signal
import subprocess
import sys
import time

import pytest
import requests
import yaml

from maas.launch import port_free, session_pids
from tests.conftest import LOCAL_CONFIG, ROOT, free_port, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def config_and_ports(tmp_path_factory):
    cfg = yaml.safe_load(LOCAL_CONFIG.read_text())
    port = free_port()
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]
    app["args"]["models"] = [m for m in app["args"]["models"] if m["name"] == "minilm"]
    app["deployments"] = [{"name": "Ingress", "num_replicas": 1}]
    path = tmp_path_factory.mktemp("stop") / "one-model.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ports = {"http": port, "stats": free_port(), "metrics": free_port()}
    return path, ports


def launch(config, ports, env_base, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """``python -m maas serve --address local config``: a cluster of its own beside the session's.

    Only HAProxy's stats and metrics ports are set here (the session's environment names the
    session cluster's, which the launcher would refuse); the launcher picks the rest, fallback-proxy
    ports included (the session's are dropped from the environment for the same reason)."""
    env = {k: v for k, v in env_base.items()
           if k != "RAY_ADDRESS" and not k.startswith("RAY_SERVE_FALLBACK_PROXY_")}
    env.update(RAY_SERVE_HAPROXY_STATS_PORT=str(ports["stats"]), RAY_SERVE_HAPROXY_METRICS_PORT=str(ports["metrics"]))
    return subprocess.Popen([sys.executable, "-m", "maas", "serve", "--address", "local", str(config)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)


def wait_ready(proc: subprocess.Popen, port: int) -> None:
    url = f"http://127.0.0.1:{port}/readyz"

    def ready_or_exited():
        return proc.poll() is not None or requests.get(url, timeout=5).status_code == 200

    wait_for(ready_or_exited, 240, "maas serve ready", 1.0)
    assert proc.poll() is None, f"maas serve exited with {proc.returncode}"  # at once, not after the deadline


def start(config, ports, env_base) -> subprocess.Popen:
    proc = launch(config, ports, env_base)
    wait_ready(proc, ports["http"])
    return proc


def _answers(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def serve_run_sid(launcher: subprocess.Popen) -> int:
    """The session of the `serve run` child (the launcher starts it as a session leader)."""
    import psutil

    child = wait_for(lambda: next(iter(psutil.Process(launcher.pid).children()), None), 30, "serve run child")
    return child.pid


def stop_and_check(proc: subprocess.Popen, ports: dict, signals: tuple) -> None:
    """Send ``signals`` (the second lands while the first shutdown is under way); the launcher
    exits 0 within 20 s leaving no process of its cluster (HAProxy included) and every port free."""
    sid = serve_run_sid(proc)
    assert session_pids(sid), "the cluster's processes run in serve run's session"
    started = time.monotonic()
    proc.send_signal(signals[0])
    if len(signals) > 1:
        wait_for(lambda: not _answers(ports["http"]), 30, "shutdown under way", 0.1)
        proc.send_signal(signals[1])
    code = proc.wait(timeout=90)
    took = time.monotonic() - started
    assert code == 0
    assert session_pids(sid) == []  # HAProxy, raylet, replicas: all gone
    for name, port in ports.items():
        assert port_free(port), f"{name} port {port} still taken"
    assert took < 20, f"stopping took {took:.1f} s"


def embeds(port: int, model: str, headers: dict | None = None) -> None:
    answer = requests.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"model": model, "input": "again"},
                           headers=headers or {}, timeout=60)
    assert answer.status_code == 200 and len(answer.json()["data"][0]["embedding"]) == 384, answer.text[:300]


# Ports a start of this module freed when it stopped, for the next start to take again.
FREED: dict = {}


def test_two_starts_side_by_side_each_answer_only_for_themselves(served_app, tmp_path):
    """Two launcher starts at once beside the session cluster, each with its own model name and API
    keys in the launcher's environment (MAAS_API_KEYS, as README's `make serve` takes them: the local
    cluster's processes inherit it): each port answers with its own app and keys only, through HAProxy and through its
    fallback proxy (the Serve proxy HAProxy falls back on while no ingress replica is up, on a port
    of its own per start; Serve's default 8500 was shared by every cluster on the host).

    Then each stops: ``a`` on Ctrl-C (SIGINT), ``b`` on SIGTERM with a second SIGTERM while the
    first shutdown is under way; both leave nothing behind (each start is a whole cluster, the
    suite's costliest setup on a busy machine, so the stop cases ride on these two starts)."""
    starts = {}
    for name in ("a", "b"):
        cfg = yaml.safe_load(LOCAL_CONFIG.read_text())
        cfg["http_options"]["port"] = free_port()
        app = cfg["applications"][0]
        app["args"]["models"] = [dict(m, name=f"minilm-{name}") for m in app["args"]["models"] if m["name"] == "minilm"]
        app["deployments"] = [{"name": "Ingress", "num_replicas": 1}]
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        ports = {"http": cfg["http_options"]["port"], "stats": free_port(), "metrics": free_port()}
        log = tmp_path / f"{name}.stderr"
        proc = launch(path, ports, {**served_app["env"], "MAAS_API_KEYS": f"spare-{name},key-{name}"}, stderr=log.open("w"))
        starts[name] = {"proc": proc, "port": ports["http"], "ports": ports, "config": path, "log": log,
                        "model": f"minilm-{name}"}
    stopped = set()
    try:
        for s in starts.values():
            wait_ready(s["proc"], s["port"])
            line = re.search(r"RAY_SERVE_FALLBACK_PROXY_HTTP_PORT=(\d+)", s["log"].read_text())
            assert line, "the launcher names the ports it chose on stderr"
            s["fallback"] = int(line.group(1))
            fallback = f"http://127.0.0.1:{s['fallback']}/-/healthz"
            wait_for(lambda: requests.get(fallback, timeout=5), 60, "fallback proxy listening")  # noqa: B023
        assert starts["a"]["fallback"] != starts["b"]["fallback"]
        assert 8500 not in (starts["a"]["fallback"], starts["b"]["fallback"])
        for me, other in (("a", "b"), ("b", "a")):
            embeds(starts[me]["port"], starts[me]["model"], {"Authorization": f"Bearer key-{me}"})
            for port in (starts[me]["port"], starts[me]["fallback"]):
                models = f"http://127.0.0.1:{port}/v1/models"
                for _ in range(5):  # a new connection each time: a shared port hands them to either listener
                    mine = requests.get(models, headers={"Authorization": f"Bearer key-{me}"}, timeout=30)
                    assert mine.status_code == 200, (port, mine.text[:200])
                    assert [m["id"] for m in mine.json()["data"]] == [starts[me]["model"]], port
                    theirs = requests.get(models, headers={"Authorization": f"Bearer key-{other}"}, timeout=30)
                    assert theirs.status_code == 401, (port, theirs.text[:200])
                    assert requests.get(models, timeout=30).status_code == 401, port
        for name, signals in (("a", (signal.SIGINT,)), ("b", (signal.SIGTERM, signal.SIGTERM))):
            stopped.add(name)
            stop_and_check(starts[name]["proc"], starts[name]["ports"], signals)
        FREED.update(config=starts["a"]["config"], ports=starts["a"]["ports"], keys="spare-a,key-a")
    finally:
        for name, s in starts.items():
            if name not in stopped:
                s["proc"].send_signal(signal.SIGTERM)
        for s in starts.values():
            s["proc"].wait(timeout=90)


def test_a_start_after_a_stop_gets_the_same_ports_and_stops_on_sigterm(config_and_ports, served_app):
    """A start on the ports the previous test's stop freed serves on them (an embeddings answer),
    then stops on SIGTERM leaving nothing behind. Run alone, it takes the module's own ports."""
    config, ports = (FREED["config"], FREED["ports"]) if FREED else config_and_ports
    env = {**served_app["env"], "MAAS_API_KEYS": FREED["keys"]} if FREED else served_app["env"]
    proc = start(config, ports, env)
    try:
        embeds(ports["http"], "minilm-a" if FREED else "minilm", {"Authorization": "Bearer key-a"} if FREED else {})
        stop_and_check(proc, ports, (signal.SIGTERM,))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=90)
