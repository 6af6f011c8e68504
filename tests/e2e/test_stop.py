"""``make serve``'s launcher (``python -m maas serve``) stops cleanly on SIGTERM, on SIGINT and on a
second signal while shutting down: nothing of the cluster stays behind (HAProxy included), and
the next start gets the same ports. Each start is a cluster of its own (address "local") beside
the session's, serving one small model."""

import itertools
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
import yaml

from maas.launch import session_pids
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


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


_starts = itertools.count()


def start(config, ports, env_base) -> subprocess.Popen:
    env = {k: v for k, v in env_base.items() if k != "RAY_ADDRESS"}  # a cluster of its own
    env.update(RAY_SERVE_HAPROXY_STATS_PORT=str(ports["stats"]), RAY_SERVE_HAPROXY_METRICS_PORT=str(ports["metrics"]))
    # Each Ray cluster hands out its replicas' direct-ingress ports from the same default ranges
    # (HTTP 30000-31000, gRPC 40000-41000) without knowing of the other: this cluster's HAProxy
    # then forwarded to the session cluster's ingress replica on 30000 (seen as a 200 where keys
    # were on, and a model list that wasn't this app's). A second cluster on one machine needs
    # ranges of its own; here every start gets fresh ones too (500 ports each, gRPC 10000 above),
    # so no start can meet a replica of an earlier one that is still on its way out.
    port_base = 32000 + 500 * next(_starts)
    env.update(RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(port_base),
               RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(port_base + 499),
               RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT=str(port_base + 10000),
               RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT=str(port_base + 10499))
    proc = subprocess.Popen([sys.executable, "-m", "maas", "serve", "--address", "local", str(config)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{ports['http']}/readyz"

    def ready():
        assert proc.poll() is None, f"maas serve exited with {proc.returncode}"
        return requests.get(url, timeout=5).status_code == 200

    wait_for(ready, 240, "maas serve ready", 1.0)
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


@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGINT,), (signal.SIGTERM, signal.SIGTERM)],
                         ids=["sigterm", "sigint", "second-signal"])
def test_stop_leaves_nothing_and_the_ports_come_back(config_and_ports, served_app, signals):
    config, ports = config_and_ports
    proc = start(config, ports, served_app["env"])
    sid = serve_run_sid(proc)
    assert session_pids(sid), "the cluster's processes run in serve run's session"
    started = time.monotonic()
    proc.send_signal(signals[0])
    if len(signals) > 1:  # the second signal lands while the first shutdown is under way
        wait_for(lambda: not _answers(ports["http"]), 30, "shutdown under way", 0.1)
        proc.send_signal(signals[1])
    code = proc.wait(timeout=90)
    took = time.monotonic() - started
    assert code == 0
    assert session_pids(sid) == []  # HAProxy, raylet, replicas: all gone
    for name, port in ports.items():
        assert port_free(port), f"{name} port {port} still taken"
    assert took < 20, f"stopping took {took:.1f} s"


def test_a_second_start_after_a_stop_gets_the_same_ports(config_and_ports, served_app):
    """Two starts in a row on the same ports, each serving, each stopped by SIGTERM."""
    config, ports = config_and_ports
    embed = f"http://127.0.0.1:{ports['http']}/v1/embeddings"
    for _ in range(2):
        proc = start(config, ports, served_app["env"])
        assert requests.post(embed, json={"model": "minilm", "input": "again"}, timeout=60).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        for name, port in ports.items():
            assert port_free(port), f"{name} port {port} still taken"


def test_api_keys_in_the_launchers_environment_reach_the_ingress(config_and_ports, served_app):
    """README: MAAS_API_KEYS in the environment `make serve` starts from turns keys on (the local
    cluster's processes inherit the launcher's environment)."""
    config, ports = config_and_ports
    models = f"http://127.0.0.1:{ports['http']}/v1/models"
    # This test got a 200 without a key in two full-suite runs (not alone), from a server that was
    # not this start's, before each start had direct-ingress ports of its own (see start()).
    proc = start(config, ports, {**served_app["env"], "MAAS_API_KEYS": "test-key-1,test-key-2"})
    try:
        listed = requests.get(models, headers={"Authorization": "Bearer test-key-2"}, timeout=30)
        assert listed.status_code == 200
        assert [m["id"] for m in listed.json()["data"]] == ["minilm"]  # this app answered, not another cluster's
        assert requests.get(models, timeout=30).status_code == 401
        assert requests.get(models, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
