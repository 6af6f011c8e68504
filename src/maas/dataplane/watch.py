"""What Serve says about the model deployments now: running replicas, status, messages.

The dataplane sizes its front batching by the running replica count (two batches out per
replica) and answers readiness from it, so it must follow autoscaling, restarts and dead
replicas. Two sources, cheapest first:

* the replicas the deployment handle's own router can send to right now (Serve keeps them
  current by long-polling the controller, and drops a replica the moment a call finds it
  dead). Read from the router's private state (Ray 2.60), so guarded: any change there falls
  back to the second source;
* ``serve.status()``, which also gives the status message that says why a deployment is not
  running. It is slow to ask — measured here: polling it twice a second took 26 % of the
  ingress replica's CPU samples under load, every 5 s still 11 % (pydantic models and
  cloudpickle per call, ~150 ms of CPU each) — so it is asked only on demand (a model reads
  as not ready, or no call has gone through its handle yet) and its answer kept ``period_s``.

While some deployment has no running replica (the app is starting, a model failed or is being
replaced), :meth:`DeploymentWatch.follow` asks ``serve.status()`` every :data:`STARTING_PERIOD_S` in
the background, so a request for a model that is still loading is answered 503 at once from what
is known, and readiness answers within a second from the moment the port opens.

Readers of :meth:`DeploymentWatch.running` never wait for the controller.
"""

from __future__ import annotations

import asyncio
import logging
import time

logger = logging.getLogger("ray.serve.maas.dataplane")

#: How long an answer of ``serve.status()`` is kept, seconds (the router's view is read on every call).
WATCH_PERIOD_S = 5.0
#: How often ``serve.status()`` is asked while some deployment has no running replica, seconds.
STARTING_PERIOD_S = 1.0
#: How long the watch asks every ``STARTING_PERIOD_S`` before it slows to ``period_s``, seconds.
FOLLOW_FAST_S = 60.0


def router_replicas(handle) -> int | None:
    """Replicas a deployment handle's router can send to now, or None when unknown (no call was
    made through the handle yet, its router has not heard of a running replica yet, or Serve's
    private router layout changed)."""
    try:
        router = handle._router
        if router is None:
            return None
        inner = router._asyncio_router
        if not getattr(inner, "_running_replicas_populated", True):
            return None  # no replica list has arrived yet: an empty one would read as "all dead"
        chooser = inner._request_router
        if chooser is not None:
            return len(chooser.curr_replicas)
        replicas = inner._running_replicas
        return None if replicas is None else len(replicas)
    except AttributeError:
        return None


class DeploymentWatch:
    """Running replica counts and status messages of ``deployments`` (of this replica's app).

    Args:
        deployments: Deployment names to follow.
        period_s: How long an answer of ``serve.status()`` is kept, seconds.
        handles: Deployment name → its handle, whose router's replica count is read first.
    """

    def __init__(self, deployments: list[str], period_s: float = WATCH_PERIOD_S, handles: dict | None = None):
        self.deployments = list(deployments)
        self.handles = handles or {}
        self.period_s = period_s
        self._running: dict[str, int] = {}
        self._status: dict[str, str] = {}
        self._message: dict[str, str] = {}
        self.known = False  # True once the controller has answered
        self.updated_at = 0.0
        self._lock = asyncio.Lock()
        self._follower: asyncio.Task | None = None
        self._down_since: dict[str, float] = {}  # deployment → monotonic time it was first seen not running

    def serving(self, deployment: str) -> bool | None:
        """Whether ``deployment`` has a running replica now: the handle router's count when it has
        one, else the controller's last answer; None before either has answered."""
        handle = self.handles.get(deployment)
        seen = router_replicas(handle) if handle is not None else None
        if seen is None and not self.known:
            return None
        up = (seen if seen is not None else self._running.get(deployment, 0)) > 0
        if up:
            self._down_since.pop(deployment, None)
        else:
            self._down_since.setdefault(deployment, time.monotonic())
        return up

    def down_for_s(self, deployment: str) -> float:
        """Seconds since ``deployment`` was first seen without a running replica (0 when serving)."""
        since = self._down_since.get(deployment)
        return 0.0 if since is None else time.monotonic() - since

    def follow(self) -> None:
        """Ask the controller every :data:`STARTING_PERIOD_S` in the background until every
        deployment runs a replica (started again whenever a request finds one that does not)."""
        if self._follower is not None and not self._follower.done():
            return
        self._follower = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        started = time.monotonic()
        while True:
            # Every second while starting; after FOLLOW_FAST_S only every period_s (a model that
            # stays down must not cost the ingress a status call, ~150 ms of CPU, each second).
            period = STARTING_PERIOD_S if time.monotonic() - started < FOLLOW_FAST_S else self.period_s
            await self.refresh(max_age_s=period)
            if self.known and all(self._running.get(d, 0) > 0 for d in self.deployments):
                return
            await asyncio.sleep(period)

    def running(self, deployment: str) -> int:
        """Running replicas of ``deployment``: the handle router's count when it has one, else
        replicas in state RUNNING at the last poll (0 before the first)."""
        handle = self.handles.get(deployment)
        seen = router_replicas(handle) if handle is not None else None
        return seen if seen is not None else self._running.get(deployment, 0)

    def reason(self, deployment: str) -> str:
        """Why a deployment is not serving: the last line of Serve's status message, or its status."""
        lines = [ln.strip() for ln in self._message.get(deployment, "").splitlines() if ln.strip()]
        if lines:
            return lines[-1][:500]
        if self.known and not self._running.get(deployment):
            return f"no running replica (deployment status {self._status.get(deployment, 'unknown')})"
        return f"deployment status {self._status.get(deployment, 'unknown')}"

    def update(self, statuses: dict) -> None:
        """Record one answer: ``{deployment: (status, running_replicas, message)}``."""
        for name, (status, running, message) in statuses.items():
            self._status[name], self._running[name], self._message[name] = status, running, message
        self.known = True
        self.updated_at = time.monotonic()

    async def refresh(self, max_age_s: float | None = None) -> None:
        """Ask ``serve.status()`` now unless the last answer is younger than ``max_age_s`` (default
        ``period_s``); failures keep the last answer (the caller answers from what is known)."""
        max_age_s = self.period_s if max_age_s is None else max_age_s
        if self.known and time.monotonic() - self.updated_at < max_age_s:
            return
        async with self._lock:
            if self.known and time.monotonic() - self.updated_at < max_age_s:
                return
            try:
                self.update(await asyncio.wait_for(asyncio.to_thread(self._fetch), timeout=5.0))
            except Exception as exc:  # noqa: BLE001 - the status is a courtesy; readiness stands without it
                logger.debug("serve.status() failed: %s", exc)

    def _fetch(self) -> dict:
        from ray import serve

        app = serve.get_replica_context().app_name
        deployments = serve.status().applications[app].deployments
        out = {}
        for name in self.deployments:
            d = deployments.get(name)
            if d is None:
                out[name] = ("UNKNOWN", 0, "")
                continue
            states = {str(getattr(k, "value", k)): v for k, v in (d.replica_states or {}).items()}
            out[name] = (str(getattr(d.status, "value", d.status)), int(states.get("RUNNING", 0)), d.message or "")
        return out
