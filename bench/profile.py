"""Where the serving path's CPU goes: py-spy on every process of the graph under load.

``python -m bench.profile --workload embed-1 --forward null --seconds 15``: starts maas-serve with
the null forward (:mod:`bench.null`), drives the workload at saturation with wrk, and records each
Python process of the graph (ingress, preprocessor and model replicas; HAProxy is C) with py-spy
(``--gil``: only the thread holding the GIL is sampled, so a thread blocked in C does not count). Prints, per role, the functions with the
most samples — self time and inclusive time — and writes py-spy's collapsed stacks
(``<out>/<role>-<pid>.txt``) for a flame graph (``flamegraph.pl`` or speedscope.app read them).
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import tempfile
import threading
from pathlib import Path

import psutil
import yaml

from bench import load, null, systems


def profile(server: systems.Server, workload: str, seconds: float, out: Path, rate: int = 250,
            concurrency: int = null.CONCURRENCY) -> dict:
    """py-spy every Python process of ``server`` while wrk drives ``workload``; returns
    ``{role: {"samples", "self": [(fn, share)], "inclusive": [(fn, share)]}}``."""
    pid = server.proc.pid
    procs = [psutil.Process(p) for p in {q.pid for q in systems.memory.tree(pid)} | set(systems._session(pid))
             if psutil.pid_exists(p)]
    targets = [(null.role(p), p.pid) for p in procs if null.role(p) in ("ingress", "preprocessor", "model")]
    out.mkdir(parents=True, exist_ok=True)
    load_done = threading.Event()

    def drive():
        load.run(server.base_url, null.bodies(workload), concurrency=concurrency, duration_s=seconds + 4,
                 threads=2)
        load_done.set()

    t = threading.Thread(target=drive, daemon=True)
    t.start()
    spies = []
    for role, p in targets:
        path = out / f"{role}-{p}.txt"
        spies.append((role, path, subprocess.Popen(
            [str(systems.BIN / "py-spy"), "record", "--pid", str(p), "--duration", str(int(seconds)), "--rate", str(rate),
             "--format", "raw", "--nonblocking", "--gil", "--output", str(path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    for _, _, sp in spies:
        sp.wait()
    t.join()
    report: dict = {}
    for role, path, _ in spies:
        if not path.exists():
            continue
        self_c: collections.Counter = collections.Counter()
        incl: collections.Counter = collections.Counter()
        total = 0
        for line in path.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if not n.isdigit():
                continue
            n = int(n)
            frames = stack.split(";")
            total += n
            self_c[_short(frames[-1])] += n
            for f in {_short(f) for f in frames}:
                incl[f] += n
        r = report.setdefault(role, {"samples": 0, "self": collections.Counter(), "inclusive": collections.Counter()})
        r["samples"] += total
        r["self"].update(self_c)
        r["inclusive"].update(incl)
    return report


def _short(frame: str) -> str:
    """``fn (path/to/module.py:123)`` → ``fn (module.py:123)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1]}" if where else name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="embed-1", choices=sorted(null.WORKLOADS))
    parser.add_argument("--forward", default="null", choices=("null", "gpu-like", "real"))
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--concurrency", type=int, default=null.CONCURRENCY, help="wrk connections")
    parser.add_argument("--out", default=None)
    parser.add_argument("--runtime", default="", help="with --forward real: MODEL=RUNTIME:PRECISION (see python -m bench)")
    a = parser.parse_args()
    from bench.__main__ import parse_runtimes

    workdir = Path(tempfile.mkdtemp(prefix="maas-profile-"))
    out = Path(a.out) if a.out else workdir / "stacks"
    model = null.WORKLOADS[a.workload][0]
    server = systems.maas([model], batching=True, workdir=workdir, mode=f"profile {a.forward}",
                          runtimes=parse_runtimes(a.runtime))
    if a.forward != "real":
        spec = {"hold_ms": 0.0, "per_item_ms": 0.0} if a.forward == "null" else null.GPU_LIKE
        port = int(server.base_url.rsplit(":", 1)[1])
        Path(server.cmd[-1]).write_text(yaml.safe_dump(null.maas_null_config([model], port, spec), sort_keys=False))
    server.start()
    try:
        null.measure(server, a.workload, 3.0)  # warm
        rep = profile(server, a.workload, a.seconds, out, concurrency=a.concurrency)
    finally:
        server.stop()
    for role, r in rep.items():
        print(f"\n=== {role}: {r['samples']} on-CPU samples")
        for title in ("self", "inclusive"):
            print(f"  -- {title}")
            for fn, n in r[title].most_common(a.top):
                print(f"  {100 * n / max(1, r['samples']):5.1f}%  {fn}")
    print(f"\nstacks: {out}")


if __name__ == "__main__":
    main()
