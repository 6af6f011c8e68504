"""``python -m maas serve [serve run arguments]``: ``serve run`` that stops cleanly on any signal.

What ``make serve`` runs. ``serve run`` alone leaves work behind when it is stopped the way
services are stopped: on SIGTERM (systemd, docker, CI timeouts) it exits without shutting its
cluster down, and Serve's HAProxy process (started by a Serve actor, re-parented when the
cluster dies) keeps ports 8000, 8404 and 9101, so the next start fails with "Address already
in use". This launcher runs ``serve run`` as the leader of its own session and:

* on the first SIGINT or SIGTERM, asks it to shut down gracefully (SIGINT, which ``serve run``
  answers with ``serve.shutdown()`` and a cluster shutdown);
* if that takes longer than ``--grace-s`` (default 20 s), or on a second signal, kills every
  process of the session at once (SIGKILL), HAProxy included;
* once ``serve run`` has exited, kills whatever of its session is left, so nothing keeps a port.

It exits with ``serve run``'s exit status, or 0 when a signal asked it to stop (graceful or forced).

A clean stop takes a few seconds because the environment ``make serve`` sets shortens Serve's
direct-ingress drain (``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S``, 30 s by default, the
time an external load balancer needs to deregister a replica; HAProxy on the same node needs
well under a second). Without it the controller waits 30 s for the ingress replica and warns
"Controller failed to shut down within 30.0s".

One cluster never answers for another on the same host. With no ``--address`` (and no
``RAY_ADDRESS``) the launcher passes ``--address local``: ``serve run``'s own default attaches to the
last cluster started on the machine (``/tmp/ray/ray_current_cluster``, written by ``ray start`` and
by test clusters). When it starts a cluster of its own (address ``local``) it names that cluster's
ports in one line on stderr, and it also:

* drops ``RAY_ADDRESS`` from that cluster's environment, so nothing in it reaches another cluster;
* gives Serve's fallback proxy free ports of its own (``RAY_SERVE_FALLBACK_PROXY_HTTP_PORT`` and
  ``_GRPC_PORT``, unless set). In high-throughput mode every cluster starts this Python proxy on
  its head node at fixed ports (8500, 9500) with ``SO_REUSEPORT``, and its HAProxy sends requests
  there whenever the ingress replica is not up (starting, restarting, scaled to zero). Two clusters
  on one host then share 8500 without an error: the kernel hands each connection to either
  cluster's proxy, and a request to this cluster's port got the other's app, without its API keys
  (ray/serve/_private/proxy_state.py ``_start_fallback_proxy_if_needed``; proxy.py
  ``SOCKET_REUSE_PORT_ENABLED``, "1" by default). Ports are drawn at random from
  :data:`PORT_BAND`, below the kernel's ephemeral range so no outgoing connection takes one
  before the proxy binds it;
* refuses to start (one line on stderr, exit status 2) when a port it must bind is taken: the
  serve config's HTTP port (``http_options.port``, 8000 by default), its gRPC port if gRPC
  servicers are configured, a fallback port set by hand, and in HAProxy mode HAProxy's stats and
  metrics ports (8404, 9101 unless set). A port is free when a bind to it *without*
  ``SO_REUSEPORT`` succeeds; Linux refuses that bind on a port any other socket listens on, with
  or without ``SO_REUSEPORT`` (a probe with it would succeed beside another cluster's proxy).

The replicas' direct-ingress ports (``RAY_SERVE_DIRECT_INGRESS_*``, 30000-31000 and 40000-41000)
need nothing: a replica binds its port without ``SO_REUSEPORT`` and Serve moves on to the next
port when the bind fails (ray/serve/_private/replica.py ``allocate_and_start_server``).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

#: Seconds the graceful stop may take before the session is killed.
DEFAULT_GRACE_S = 20.0
#: Where the fallback proxy's ports are drawn from: above Ray's worker ports (10002-19999 by
#: default), below Serve's direct-ingress HTTP range (30000) and the usual ephemeral range (32768).
PORT_BAND = range(20000, 30000)
#: The fallback proxy's ports, chosen per start unless set (see the module docstring).
FALLBACK_PORT_ENV = ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")
#: HAProxy's fixed listeners (Serve's defaults), checked in HAProxy mode.
HAPROXY_PORT_ENV = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}


class PortTaken(Exception):
    """A port this start must bind is taken; the message says which and what to do."""


def port_free(port: int) -> bool:
    """Whether ``port`` can be bound on all IPv4 interfaces without ``SO_REUSEPORT``.

    False while any socket listens on it (another cluster's ``SO_REUSEPORT`` proxy included).
    ``SO_REUSEADDR`` is set so that connections left in TIME_WAIT by a previous run don't count.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def _ephemeral_range() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return range(low, high + 1)
    except (OSError, ValueError):
        return range(32768, 61000)  # Linux's default


def pick_free_ports(n: int, band: range = PORT_BAND, exclude: frozenset[int] = frozenset()) -> list[int]:
    """``n`` distinct ports of ``band``, in random order, each free (:func:`port_free`) and
    outside the kernel's ephemeral range and ``exclude``.

    Random, so that two starts at the same moment are unlikely to draw the same port.
    Raises :class:`PortTaken` when the band has fewer than ``n`` such ports.
    """
    ephemeral = _ephemeral_range()
    candidates = [p for p in band if p not in ephemeral and p not in exclude]
    random.SystemRandom().shuffle(candidates)
    chosen = []
    for port in candidates:
        if port_free(port):
            chosen.append(port)
            if len(chosen) == n:
                return chosen
    raise PortTaken(f"fewer than {n} free ports in {band.start}-{band.stop - 1}")


def _option(args: list[str], long: str, short: str) -> str | None:
    """The last value given to ``long``/``short`` in ``args`` (click's rule), or None."""
    value = None
    for i, arg in enumerate(args):
        if arg in (long, short) and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(long + "="):
            value = arg.split("=", 1)[1]
        elif arg.startswith(short) and len(arg) > len(short) and not arg.startswith("--"):
            value = arg[len(short):]
    return value


#: ``serve run`` options that take a value.
_VALUE_OPTIONS = {"--runtime-env", "--runtime-env-json", "--working-dir", "--app-dir", "-d", "--address", "-a",
                  "--route-prefix", "--name"}


def config_ports(serve_args: list[str]) -> dict[str, int]:
    """The listening ports the serve config in ``serve_args`` asks for: ``{"http_options.port": ...}``,
    and ``grpc_options.port`` when gRPC servicers are configured. The config is the first argument naming a
    file, as for ``serve run``; without one (an import path), Serve's default HTTP port 8000.

    Raises :class:`PortTaken` when the config file cannot be read as YAML.
    """
    values = {i + 1 for i, a in enumerate(serve_args) if a in _VALUE_OPTIONS}  # an option's value, not the config
    path = next((Path(a) for i, a in enumerate(serve_args)
                 if i not in values and not a.startswith("-") and Path(a).is_file()), None)
    try:
        cfg = yaml.safe_load(path.read_text()) if path else {}
    except (OSError, yaml.YAMLError) as exc:
        raise PortTaken(f"cannot read the serve config {path}: {exc}") from exc
    cfg = cfg if isinstance(cfg, dict) else {}
    http = cfg.get("http_options") or {}
    ports = {"http_options.port": int(http.get("port", 8000))}
    grpc = cfg.get("grpc_options") or {}
    if grpc.get("grpc_servicer_functions"):
        ports["grpc_options.port"] = int(grpc.get("port", 9000))
    return ports


def prepare(serve_args: list[str], environ: dict[str, str]) -> tuple[list[str], dict[str, str], dict[str, int]]:
    """``serve run``'s arguments and environment for this start (see the module docstring), and
    the ports of its own cluster by name (empty when it deploys onto an existing cluster).

    Raises :class:`PortTaken` when a port it must bind is taken.
    """
    args, env = list(serve_args), dict(environ)
    address = _option(args, "--address", "-a")
    if address is None:
        address = env.get("RAY_ADDRESS") or "local"
        if address == "local":
            args = ["--address", "local", *args]
    if address != "local":
        return args, env, {}  # an existing cluster: its ports are its own business
    env.pop("RAY_ADDRESS", None)
    ports = config_ports(args)
    named = dict(HAPROXY_PORT_ENV) if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else {}
    named.update({name: None for name in FALLBACK_PORT_ENV if env.get(name)})
    for name, default in named.items():
        try:
            ports[name] = int(env.get(name) or default)
        except ValueError:
            raise PortTaken(f"{name}={env[name]!r} is not a port number") from None
    for name, port in ports.items():
        if not port_free(port):
            raise PortTaken(f"{name}={port} is taken (another cluster or program listens on it); "
                            "free it or choose another port")
    unset = [name for name in FALLBACK_PORT_ENV if not env.get(name)]
    for name, port in zip(unset, pick_free_ports(len(unset), exclude=frozenset(ports.values()))):
        env[name] = str(port)
        ports[name] = port
    return args, env, ports


def session_pids(sid: int) -> list[int]:
    """Pids of live (not zombie) processes whose session id is ``sid`` (Linux ``/proc``),
    excluding this process."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if os.getsid(int(entry.name)) != sid:
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (ProcessLookupError, PermissionError, FileNotFoundError, IndexError):
            continue
        if state != "Z":
            out.append(int(entry.name))
    return out


def kill_session(sid: int, sig: int = signal.SIGKILL) -> int:
    """Send ``sig`` to every process of session ``sid``; returns how many were signalled."""
    n = 0
    for pid in session_pids(sid):
        try:
            os.kill(pid, sig)
            n += 1
        except ProcessLookupError:
            pass
    return n


def run(serve_args: list[str], grace_s: float = DEFAULT_GRACE_S) -> int:
    """Run ``serve run *serve_args`` until it exits or a signal stops it (see the module docstring).

    Returns its exit status (0 after a stop by signal), or 2 without starting it when a port it
    must bind is taken.
    """
    try:
        serve_args, env, ports = prepare(serve_args, dict(os.environ))
    except PortTaken as exc:
        print(f"maas serve: not starting: {exc}", file=sys.stderr, flush=True)
        return 2
    if ports:
        print("maas serve: a cluster of its own; ports " + ", ".join(f"{k}={v}" for k, v in ports.items()),
              file=sys.stderr, flush=True)
    serve_bin = Path(sys.executable).with_name("serve")
    child = subprocess.Popen([str(serve_bin), "run", *serve_args], env=env, start_new_session=True)
    signals = {"count": 0, "deadline": None}

    def on_signal(signum, _frame):
        signals["count"] += 1
        if signals["count"] == 1:
            print(f"maas serve: {signal.Signals(signum).name}: shutting down (again to force)", file=sys.stderr,
                  flush=True)
            try:
                os.kill(child.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            signals["deadline"] = time.monotonic() + grace_s
        else:
            kill_session(child.pid)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                code = child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if signals["deadline"] is not None and time.monotonic() > signals["deadline"]:
                    print(f"maas serve: not stopped after {grace_s:.0f} s; killing it", file=sys.stderr, flush=True)
                    kill_session(child.pid)
                    signals["deadline"] = None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        # What the cluster left behind (HAProxy, a worker that missed the shutdown) goes too.
        deadline = time.monotonic() + 5.0
        while kill_session(child.pid, signal.SIGTERM if time.monotonic() < deadline - 3 else signal.SIGKILL):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)  # poll interval while the leftovers exit
    return 0 if signals["count"] else code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maas serve", description=__doc__.split("\n")[0],
                                     epilog="Other arguments go to `serve run` unchanged.")
    parser.add_argument("--grace-s", type=float, default=DEFAULT_GRACE_S,
                        help="seconds a graceful stop may take before the session is killed")
    args, rest = parser.parse_known_args(argv)
    return run(rest, grace_s=args.grace_s)
