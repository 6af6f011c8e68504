"""Pull batching on a model replica: the forward thread takes what is queued when it frees.

See :class:`PullBatcher`. Ray-free; :class:`maas.models.base.ModelDeployment` owns one per replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from maas import metrics
from maas.batching.jobs import take_whole

logger = logging.getLogger("ray.serve.maas.models")


@dataclass
class _Call:
    """One handle call waiting on a replica: where its jobs' answers go, and how many are still out."""

    results: list[Any]
    future: asyncio.Future
    remaining: int  # jobs not answered yet
    cancelled: bool = False

    def answered(self) -> None:
        """One more of its jobs is answered (or dropped): the call returns with the last one."""
        self.remaining -= 1
        if self.remaining <= 0 and not self.future.done():
            self.future.set_result(self.results)


@dataclass
class _Job:
    """One job (request) of a call in the replica's queue: its ``ModelRequest`` and its answer's position."""

    request: Any  # maas.models.base.ModelRequest
    call: _Call
    pos: int
    items: int


class PullBatcher:
    """Batches form where work is pulled: the forward thread takes what is queued.

    Calls queue here as their jobs (each call holds one or more jobs, each job one or more items).
    A worker task takes *everything* queued, up to ``max_batch_size`` items (whole jobs: a job
    larger than that runs alone), as soon as the previous batch is done, so a busy replica runs
    big batches and keeps its forward busy. A call that holds more than one forward's worth (the
    ingress sends up to ``max_forwards_per_call`` forwards' worth under load, see
    :class:`maas.batching.front.FrontBatcher`) runs as several forwards and returns with its last
    job. Only when the replica is idle (nothing ran since the queue last emptied) does the worker
    wait up to ``batch_wait_timeout_s`` for the batch to fill, and only if that is above 0.

    Why not ``@serve.batch``: it forms a batch on its timer and only then waits for the forward
    to be free, so under load it queues many small batches (a simulation of its loop measured
    mean batch 4.8 at 64 concurrent MiniLM requests, against 30.8 for a batcher that collects
    when the worker frees, +30 % items/s). This class is that second loop.

    Jobs whose caller left (cancelled call) or whose deadline passed are dropped before their
    batch runs and answered :class:`~maas.errors.ModelTimeout` (a deadline) or not at all (a
    cancelled caller is gone); a cancelled call's queued jobs leave the queue (and ``queued_items``)
    at once. A forward that fails (an exception, or a ``CancelledError`` from inside it), or returns a
    different number of results than it was given requests (a bug in a model's code), answers every job
    of its batch with a :class:`~maas.errors.MaasError` (500, logged) and the worker goes on: no caller
    is left waiting for a missing answer. An ``after_batch`` that raises is logged and the worker goes on.

    Each answer (a dict) carries ``compute_s``: the batch's run time, seconds, split across its
    jobs by item count — what a tenant's compute quota is priced in (:mod:`maas.tenants`). A traced
    job's answer also carries ``trace``: the replica's times for its spans (:mod:`maas.tracing`).

    Args:
        run: ``run(requests) -> results`` (one per request), awaited; it runs the forward.
        name: Model name for metrics.
        after_batch: Called after a batch's answers are delivered (metrics that can wait).
    """

    def __init__(self, run, name: str, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.0,
                 after_batch=None):
        self.run, self.name, self.after_batch = run, name, after_batch
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s
        self._queue: deque[_Job] = deque()
        self.queued_items = 0
        self.running_items = 0
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._idle = True
        self.batch_requests: Counter[int] = Counter()
        self.batch_items: Counter[int] = Counter()
        self.busy_s = 0.0  # batches' run time, summed, seconds (what the answers' compute_s add up to)

    def close(self) -> None:
        """Stop the worker task (an idle batcher that is dropped: its ``run`` and what that holds —
        a model's weights — are released with it instead of waiting for the cyclic GC)."""
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
        self._worker = None

    def configure(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s

    async def submit(self, requests: list, results: list[Any], pending: list[int]) -> list[Any]:
        """Queue ``requests`` (answers go to ``results[pending[i]]``); returns ``results`` once every
        one is answered.

        Raises:
            asyncio.CancelledError: the caller cancelled; its jobs are dropped if not started,
                and running generation stops at its next step.
        """
        if not requests:
            return results
        loop = asyncio.get_running_loop()
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work(), name=f"maas-batcher-{self.name}")
        now = time.perf_counter()
        call = _Call(results, loop.create_future(), len(requests))
        for pos, r in zip(pending, requests):
            r.enqueued_at = now
            job = _Job(r, call, pos, len(r.inputs))
            self._queue.append(job)
            self.queued_items += job.items
        self._wakeup.set()
        try:
            return await call.future
        except asyncio.CancelledError:
            call.cancelled = True
            for r in requests:
                r.cancelled = True
            self._withdraw(call)
            raise

    def _withdraw(self, call: _Call) -> None:
        """Take a cancelled call's queued jobs out now, so ``queued_items`` (the replica's load figure,
        what autoscaling and the ingress's routing read) stops counting them at once rather than when
        the worker next takes a batch. Jobs already in the running forward finish and are dropped."""
        if any(j.call is call for j in self._queue):
            kept = deque(j for j in self._queue if j.call is not call)
            for j in self._queue:
                if j.call is call:
                    self.queued_items -= j.items
            self._queue = kept

    def _take(self) -> list[_Job]:
        return take_whole(self._queue, self.max_batch_size, lambda j: j.items,
                          lambda j: j.call.cancelled or j.call.future.done(), self._removed)

    def _removed(self, job: _Job) -> None:
        self.queued_items -= job.items

    async def _work(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self._queue:
                self._idle = True
                self._wakeup.clear()
                await self._wakeup.wait()
            if self._idle and self.batch_wait_timeout_s > 0 and self.queued_items < self.max_batch_size:
                deadline = time.monotonic() + self.batch_wait_timeout_s
                while self.queued_items < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), timeout=left)
                    except asyncio.TimeoutError:
                        break
            self._idle = False
            jobs = self._take()
            if jobs:
                await self._run(jobs)

    async def _run(self, jobs: list[_Job]) -> None:
        from maas.errors import MaasError, ModelTimeout

        live: list[_Job] = []
        for job in jobs:
            r = job.request
            if r.cancelled:
                continue  # its caller is gone: nobody waits for the call
            if r.abandoned:
                job.call.results[job.pos] = ModelTimeout(
                    f"model {self.name!r} did not start this request before its deadline; retry later "
                    "or send less work per request")
                job.call.answered()
                continue
            live.append(job)
        requests = [j.request for j in live]
        waits_ms: list[float] = []
        items = 0
        if requests:
            now = time.perf_counter()
            items = sum(len(r.inputs) for r in requests)
            self.batch_requests[len(requests)] += 1
            self.batch_items[items] += 1
            waits_ms = [1000 * (now - r.enqueued_at) for r in requests]
            self.running_items = items
            try:
                started, started_ns = time.perf_counter(), time.time_ns()
                outputs = await self.run(requests)
                spent = time.perf_counter() - started
                if len(outputs) != len(requests):  # a model bug: never leave a caller waiting for a missing answer
                    raise RuntimeError(f"the forward returned {len(outputs)} results for {len(requests)} requests")
                self.busy_s += spent
                per_item_s = spent / max(1, items)
                ended_ns = 0
                for r, out in zip(requests, outputs):
                    if isinstance(out, dict):
                        out["compute_s"] = per_item_s * len(r.inputs)
                        if r.arrived_ns:  # a traced job (maas.tracing): the replica's times for its spans
                            from maas.tracing import replica_tag

                            ended_ns = ended_ns or time.time_ns()
                            out["trace"] = {"arrived": r.arrived_ns, "start": started_ns, "end": ended_ns,
                                            "items": items, "requests": len(requests), "replica": replica_tag(),
                                            "pre": r.pre_ns}
            except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - every job gets the error
                # A CancelledError from inside the forward (a cancelled inner awaitable) is the batch's failure,
                # not the worker's: the worker goes on. Only the worker's own cancellation (close()) stops it,
                # after its batch's callers have their answer.
                stopping = isinstance(exc, asyncio.CancelledError) and asyncio.current_task().cancelling() > 0
                if not isinstance(exc, MaasError):
                    logger.error("model %s: a batch of %d requests failed", self.name, len(requests),
                                 exc_info=not stopping)
                    exc = MaasError(f"model {self.name!r} failed")
                outputs = [exc] * len(requests)
            else:
                stopping = False
            finally:
                self.running_items = 0
            for job, out in zip(live, outputs):
                job.call.results[job.pos] = out
                job.call.answered()
            if stopping:
                raise asyncio.CancelledError
        if requests:  # metrics after the answers are on their way: ~5-10 µs each in-process (measured with
            # ray.util.metrics on the 2-vCPU build VM), and Ray's metrics agent replays every observation
            metrics.batch(self.name, items)
            for ms in waits_ms:
                metrics.stage(self.name, "queue", ms)
            if self.after_batch is not None:
                try:
                    self.after_batch()
                except Exception:  # noqa: BLE001 - a metrics callback must not stop the worker
                    logger.exception("model %s: after_batch failed", self.name)
