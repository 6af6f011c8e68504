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
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

#: Seconds the graceful stop may take before the session is killed.
DEFAULT_GRACE_S = 20.0


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
    """Run ``serve run *serve_args`` until it exits or a signal stops it (see the module docstring)."""
    serve_bin = Path(sys.executable).with_name("serve")
    child = subprocess.Popen([str(serve_bin), "run", *serve_args], start_new_session=True)
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
