"""Front batching in the ingress: concurrent requests for one model become one call.

A :class:`FrontBatcher` per (model, operation) queues *jobs* (one per request; a job holds one
or more items) and sends them to the graph as one preprocessor call chained into one model
call (``model.remote(pre.remote(jobs), params, deadlines)``), so a Ray hop is paid per batch,
not per request.

Batches form where work is pulled, as on the replica (:class:`maas.batching.pull.PullBatcher`):
at most ``max_inflight()`` batches are out at once (the model's ``pipeline_depth`` per
running replica: 1 on CPU, 2 on GPU so one batch collates while one computes). While they
are out, requests queue here; when one comes back, everything queued (up to
``max_batch_items`` items, whole jobs only) leaves as the next batch. An idle model gets a
lone request at once: there is no timer. When more than one forward's worth is queued, a batch
may carry up to ``max_forwards_per_call`` forwards' worth (its share of the queue,
:meth:`FrontBatcher.call_items`), which the replica's pull batcher runs as separate forwards: the
per-call cost of Serve is then paid once per several forwards.

Each job keeps its own answer, error, deadline and cancellation inside the batch:

* the model answers one result or one :class:`~maas.errors.MaasError` per job;
* the deadline travels with the job (wall-clock ``time.time()``), so the replica drops a job
  still queued past it and generation stops at it, whatever the transport does with
  cancellation;
* a caller who leaves (disconnect, timeout) takes its job out of the queue; a batch already
  sent is cancelled on the replica once every caller in it has left.

Every queue is bounded: past ``max_queued_items`` items waiting, a new request gets
:class:`~maas.errors.ServiceOverloaded` (503 + Retry-After) at once.

With tenants (:mod:`maas.tenants`) the queue is a :class:`~maas.batching.fair.FairQueue`: a batch
takes ``interactive`` work before ``batch`` work and shares each class among tenants by weight, so
a tenant flooding a model delays its own jobs, not the others'.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from maas import metrics
from maas.batching.fair import FairQueue
from maas.errors import MaasError, ServiceOverloaded

logger = logging.getLogger("ray.serve.maas.batching")

#: Seconds a client should wait before retrying a 503 (sent as ``Retry-After``).
RETRY_AFTER_S = 1


@dataclass(eq=False)
class Job:
    """One request inside a front batch.

    Attributes:
        payload: What the preprocessor receives for this request (a ``TextJob``, or a list of
            encoded images / pixel arrays).
        params: Per-request options for the model (``top_k``, ``task``).
        items: Texts or images in the request (counted against batch and queue bounds).
        deadline_s: Wall-clock time after which the answer is no longer wanted, or None.
        tenant: The tenant's id (None: no tenant). priority: Its class (``interactive``, ``batch``).
        weight: Its share within the class.
    """

    payload: Any
    params: dict
    items: int
    deadline_s: float | None
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    batch: "_Batch | None" = None
    tenant: str | None = None
    priority: str = "interactive"
    weight: float = 1.0
    trace: Any = None  # the request's operation span (maas.tracing.Span) when it is traced
    enqueued_ns: int = 0  # wall clock, ns: set for traced jobs only


@dataclass(eq=False)
class _Batch:
    jobs: list[Job]
    response: Any = None  # the model call (a DeploymentResponse), once sent

    def maybe_cancel(self) -> None:
        """Cancel the model call when every job in it was abandoned."""
        if self.response is not None and all(j.cancelled for j in self.jobs):
            self.response.cancel()


class FrontBatcher:
    """Queue of jobs for one (model, operation) in the ingress; see the module docstring.

    Args:
        name: Model name (errors, metrics).
        dispatch: ``dispatch(jobs) -> response``: starts the batch's calls and returns an
            awaitable with ``cancel()`` (Serve's ``DeploymentResponse``) whose result is one
            answer (or MaasError) per job. Exceptions it raises are mapped by ``map_error``.
        map_error: Turns a failed call's exception into the MaasError each job then gets.
        max_batch_items: Items per forward at most: a batch's size unless more is queued (a job larger than
            this goes alone).
        max_queued_items: Items waiting at most; beyond, 503 at once.
        max_inflight: Batches out at once at most (called at each decision, so it follows
            the model's running replica count).
        max_forwards_per_call: Under load, a batch carries up to this many forwards' worth (:meth:`call_items`).
    """

    def __init__(self, name: str, dispatch: Callable[[list[Job]], Any], map_error: Callable[[BaseException], MaasError],
                 *, max_batch_items: int, max_queued_items: int, max_inflight: Callable[[], int],
                 max_forwards_per_call: int = 1, trace_attrs: tuple[dict, dict] = ({}, {})):
        self.name = name
        self.trace_attrs = trace_attrs  # (the model's, the preprocessor's) span attributes (maas.tracing)
        self.dispatch, self.map_error = dispatch, map_error
        self.max_batch_items, self.max_queued_items, self.max_inflight = max_batch_items, max_queued_items, max_inflight
        self.max_forwards_per_call = max_forwards_per_call
        self._queue = FairQueue()
        self.queued_items = 0
        self.inflight = 0
        self.batches_sent = 0
        self.jobs_per_batch: Counter[int] = Counter()

    async def submit(self, payload: Any, params: dict, items: int, deadline_s: float | None, tenant=None,
                     trace=None) -> Any:
        """Queue one request (of ``tenant``, a :class:`maas.tenants.Tenant`, or None) and wait for its answer.
        ``trace``: the request's span when it is traced (its batch's spans are recorded, see
        :func:`maas.tracing.batch_spans`).

        Raises:
            ServiceOverloaded: the queue holds ``max_queued_items`` already.
            MaasError: the job's own error from the preprocessor or the model.
            asyncio.CancelledError: the caller left; the job is withdrawn.
        """
        if self.queued_items and self.queued_items + items > self.max_queued_items:
            raise ServiceOverloaded(f"model {self.name!r} is at capacity ({self.queued_items} items queued); "
                                    f"retry after {RETRY_AFTER_S} s")
        job = Job(payload, params, items, deadline_s, asyncio.get_running_loop().create_future())
        if tenant is not None:
            job.tenant, job.priority, job.weight = tenant.id, tenant.priority, tenant.weight
        if trace is not None:
            job.trace, job.enqueued_ns = trace, time.time_ns()
        self._queue.append(job)
        self.queued_items += items
        self._pump()
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled = True
            if job.batch is not None:  # sent: cancel the call if every caller in it has left
                job.batch.maybe_cancel()
            elif self._queue.remove(job):  # still queued: withdraw it (False once answered: nothing to do)
                self.queued_items -= job.items
            raise
        finally:
            # A job's error is raised from here, so its traceback holds this frame, and the frame (through
            # ``job.future``) the error: without this, a reference cycle keeping the payload until Python's
            # cycle collector runs.
            del job

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch out."""
        return not self._queue and self.inflight == 0

    def stats(self) -> dict:
        """``{"batches", "jobs_per_batch": {jobs: count}, "queued_items", "inflight"}``."""
        return {"batches": self.batches_sent, "jobs_per_batch": dict(self.jobs_per_batch),
                "queued_items": self.queued_items, "inflight": self.inflight}

    def call_items(self) -> int:
        """Items the next batch may carry: one forward's worth (``max_batch_items``), or, when more is queued,
        the queue shared among the batches that can be out (``max_inflight()``) up to ``max_forwards_per_call``
        forwards' worth. A light load sends what it did before; under load the per-call cost is paid once per
        several forwards, and the queue is still spread over every replica (a call never takes more than its
        share, so one replica is not handed all the work while another idles)."""
        if self.max_forwards_per_call <= 1 or self.queued_items <= self.max_batch_items:
            return self.max_batch_items
        share = -(-self.queued_items // max(1, self.max_inflight()))  # ceil
        return max(self.max_batch_items, min(self.max_forwards_per_call * self.max_batch_items, share))

    def _take(self) -> list[Job]:
        return self._queue.take(self.call_items(), lambda j: j.items, lambda j: j.cancelled or j.future.done(),
                                self._removed)

    def _removed(self, job: Job) -> None:
        self.queued_items -= job.items

    def _pump(self) -> None:
        """Send batches while fewer than ``max_inflight()`` are out."""
        while self._queue and self.inflight < max(1, self.max_inflight()):
            jobs = self._take()
            if not jobs:
                return
            batch = _Batch(jobs)
            for j in jobs:
                j.batch = batch
            self.inflight += 1
            self.batches_sent += 1
            self.jobs_per_batch[len(jobs)] += 1
            asyncio.get_running_loop().create_task(self._send(batch))

    async def _call(self, batch: _Batch) -> list:
        """Dispatch ``batch`` and await its answers; a call that fails with an unexpected error
        (one that maps to a plain 500: not a MaasError, not overload, not a lost replica) is sent
        once more. Forwards are pure (embeddings, classifications), so a second send costs compute
        only, and it turns a transient fault of the transport into an answer: one such 500 came
        from inside Serve's handle call, before the request reached the replica. A bug fails twice
        and is answered 500, logged both times."""
        for attempt in (1, 2):
            batch.response = self.dispatch(batch.jobs)
            if all(j.cancelled for j in batch.jobs):  # every caller left while it was being sent
                batch.response.cancel()
            try:
                return await batch.response
            except (MaasError, asyncio.CancelledError):
                raise
            except Exception as exc:  # noqa: BLE001 - sorted by what it maps to
                err = self.map_error(exc)  # logs an unexpected error once per attempt
                if attempt == 2 or int(err.status_code) != 500 or all(j.cancelled for j in batch.jobs):
                    raise err from None  # mapped already: the caller does not map (and log) it again
                logger.warning("model %s: a batch call failed with %s; sending it once more", self.name,
                               type(exc).__name__)
        raise AssertionError("unreachable")

    async def _send(self, batch: _Batch) -> None:
        now = time.perf_counter()
        waits_ms = [1000 * (now - j.enqueued_at) for j in batch.jobs]
        traced = any(j.trace is not None for j in batch.jobs)
        sent_ns = time.time_ns() if traced else 0
        results = failed = None
        try:
            results = await self._call(batch)
        except BaseException as exc:  # noqa: BLE001 - each job gets the mapped error; nothing is lost
            failed = exc
            err = exc if isinstance(exc, MaasError) else self.map_error(exc)  # logs an unexpected one, traceback too
            # Dropped before the futures get it (a future keeps the traceback it was given, to raise with): it
            # holds this frame and _call's, whose locals hold the error and the batch — a cycle keeping every
            # job's payload until Python's cycle collector runs.
            exc.__traceback__ = err.__traceback__ = None
            for j in batch.jobs:
                if not j.future.done():
                    j.future.set_exception(err)
                    j.future.exception()  # a job whose caller left would warn "never retrieved"
            if isinstance(exc, asyncio.CancelledError) and not all(j.cancelled for j in batch.jobs):
                logger.warning("model %s: a batch was cancelled with callers still waiting", self.name)
        else:
            for j, res in zip(batch.jobs, results):
                if j.future.done():
                    continue
                if isinstance(res, BaseException):
                    j.future.set_exception(res)
                    j.future.exception()
                else:
                    j.future.set_result(res)
        finally:
            # Every job has its answer now: drop the job -> batch links. A job and its batch refer to each
            # other, so without this each answered request (its job, future, payload and answer, and Serve's
            # call objects of its batch) stayed allocated until Python's cycle collector found it, surviving
            # into older generations. Measured in the ingress at ~1,150 one-sentence requests/s: ~8 such
            # objects per request; the gen-2 collections' time halved once they were gone (3.8 ms on average).
            for j in batch.jobs:
                j.batch = None
            self.inflight -= 1
            self._pump()
        if traced:  # the spans are built on the tracer's export thread (maas.tracing.Tracer.defer)
            from maas import tracing

            t = tracing.tracer()
            if t is not None:
                info = next((r["trace"] for r in results if isinstance(r, dict) and "trace" in r),
                            None) if results else None
                t.defer(tracing.batch_spans, [(j.trace, j.enqueued_ns) for j in batch.jobs if j.trace is not None],
                        len(batch.jobs), sum(j.items for j in batch.jobs), sent_ns, time.time_ns(),
                        self.trace_attrs[0], info, self.trace_attrs[1],
                        None if failed is None else tracing.error_of(failed))
        for ms in waits_ms:  # after the answers: ~5-10 µs each in-process (Ray replays each in its agent)
            metrics.stage(self.name, "front_queue", ms)
