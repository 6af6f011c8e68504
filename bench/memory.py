"""Resident memory of a process tree: a server and everything it started.

For ``serve run`` the tree holds the whole Ray cluster it started (GCS, raylet, dashboard,
the Serve controller, the HTTP proxy and every replica's worker process), so its sum is the
memory of the whole graph. PSS (proportional set size: shared pages divided among the
processes that map them) is the honest sum for many processes that share libraries; RSS
double-counts those pages and is reported beside it.
"""

from __future__ import annotations

import threading

import psutil


def tree(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants that are still alive."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def usage(pid: int) -> dict:
    """Memory of the tree under ``pid``, bytes: ``{"rss_bytes", "pss_bytes", "processes"}``."""
    rss = pss = n = 0
    for proc in tree(pid):
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
        n += 1
    return {"rss_bytes": rss, "pss_bytes": pss, "processes": n}


class PeakSampler:
    """Samples :func:`usage` every ``interval_s`` in a thread; ``peak`` is the sample with the
    largest PSS. Use as a context manager around the load."""

    def __init__(self, pid: int, interval_s: float = 1.0):
        self.pid, self.interval_s = pid, interval_s
        self.peak: dict = {"rss_bytes": 0, "pss_bytes": 0, "processes": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while True:
            sample = usage(self.pid)
            if sample["pss_bytes"] > self.peak["pss_bytes"]:
                self.peak = sample
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def cpu_cores(pid: int, seconds: float) -> float:
    """Cores the tree under ``pid`` used over the next ``seconds`` (CPU seconds ÷ wall seconds),
    counting processes alive at the start or the end of the window."""
    import time

    def times() -> dict[int, float]:
        out = {}
        for proc in tree(pid):
            try:
                t = proc.cpu_times()
                out[proc.pid] = t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    before = times()
    started = time.monotonic()
    time.sleep(seconds)  # the measurement window itself, not a wait for something to happen
    after = times()
    used = sum(after.get(p, before.get(p, 0.0)) - before.get(p, 0.0) for p in set(before) | set(after))
    return used / (time.monotonic() - started)
