"""A front batcher's queue with tenants: priority classes first, then a weighted share per tenant.

Jobs wait in *flows*, one per (priority class, tenant). A batch takes from the ``interactive``
class before the ``batch`` class (work already sent is never taken back), and within a class
visits the tenants' flows in turn with deficit round robin over items (Shreedhar & Varghese,
1995): each visit adds ``weight × QUANTUM_ITEMS`` items of credit to a flow, which sends jobs
from its head while they fit its credit. So under contention tenants get batch slots in
proportion to their weights whatever their request sizes, and a tenant that floods the queue
delays only its own jobs. Within a flow jobs keep their order; a job is never split.

Jobs without a tenant (no tenants file, a handle call without a key) form one flow of the
``interactive`` class with weight 1; with that one flow the queue takes exactly as the plain
FIFO rule does (:func:`maas.batching.jobs.take_whole`), so an app without tenants batches as
before.

Ray-free and asyncio-free: :class:`maas.batching.front.FrontBatcher` owns one.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from maas.batching.jobs import take_whole

#: Items of credit a flow of weight 1 gets per visit (deficit round robin's quantum).
QUANTUM_ITEMS = 4
#: Priority classes, served in this order.
CLASSES = ("interactive", "batch")


class FairQueue:
    """Jobs by (priority class, tenant); see the module docstring.

    A job needs attributes ``priority`` (one of :data:`CLASSES`), ``tenant`` (an id or None) and
    ``weight`` (> 0).
    """

    def __init__(self):
        self._flows: dict[tuple[str, Any], deque] = {}
        self._turns: dict[str, deque] = {c: deque() for c in CLASSES}  # flow keys in visiting order
        self._credit: dict[tuple[str, Any], float] = {}
        self._count = 0

    def __bool__(self) -> bool:
        return self._count > 0

    def __len__(self) -> int:
        return self._count

    def append(self, job) -> None:
        key = (job.priority, job.tenant)
        flow = self._flows.get(key)
        if flow is None:
            flow = self._flows[key] = deque()
            self._turns[job.priority].append(key)
            self._credit[key] = 0.0
        flow.append(job)
        self._count += 1

    def remove(self, job) -> bool:
        """Withdraw a queued job (its caller left); False when it is not queued."""
        key = (job.priority, job.tenant)
        flow = self._flows.get(key)
        if flow is None:
            return False
        try:
            flow.remove(job)
        except ValueError:
            return False
        self._count -= 1
        if not flow:
            self._drop(key)
        return True

    def _drop(self, key) -> None:
        del self._flows[key]
        del self._credit[key]
        self._turns[key[0]].remove(key)

    def take(self, max_items: int, items_of: Callable[[Any], int], dropped: Callable[[Any], bool],
             on_removed: Callable[[Any], None]) -> list:
        """Whole jobs for one batch, at most ``max_items`` items (the first job always goes, even
        when larger); jobs for which ``dropped`` holds are removed and skipped.

        Returns:
            The taken jobs (empty when only dropped ones were queued).
        """
        if len(self._flows) == 1:  # one flow: the plain FIFO rule
            key = next(iter(self._flows))
            flow = self._flows[key]
            before = len(flow)
            taken = take_whole(flow, max_items, items_of, dropped, on_removed)
            self._count -= before - len(flow)
            if not flow:
                self._drop(key)
            return taken
        taken: list = []
        total = 0
        for cls in CLASSES:
            turns = self._turns[cls]
            idle_visits = 0
            while turns:
                key = turns[0]
                flow = self._flows[key]
                while flow and dropped(flow[0]):
                    on_removed(flow.popleft())
                    self._count -= 1
                if not flow:
                    self._drop(key)
                    idle_visits = 0
                    continue
                n = items_of(flow[0])
                if taken and total + n > max_items:
                    return taken  # the batch is full: this flow keeps its turn and its credit
                if self._credit[key] < n and taken:
                    self._credit[key] += QUANTUM_ITEMS * flow[0].weight
                    if self._credit[key] < n:
                        turns.rotate(-1)
                        idle_visits += 1
                        if idle_visits > 4 * len(turns) * max(1, n):  # cannot happen; bounded all the same
                            return taken
                        continue
                job = flow.popleft()
                on_removed(job)
                self._count -= 1
                self._credit[key] = max(0.0, self._credit[key] - n)
                taken.append(job)
                total += n
                idle_visits = 0
                if not flow:
                    self._drop(key)
                elif self._credit[key] < items_of(flow[0]):
                    turns.rotate(-1)  # its credit is spent: the next tenant's turn
        return taken
