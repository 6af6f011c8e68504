"""What crosses deployments: a front batch of jobs, as numpy, with per-job errors.

The ingress's front batcher (:mod:`maas.batching.front`) turns concurrent requests for one
model into one preprocessor call and one model call. Each request is a *job*; a job holds one
or more *items* (texts, images). The preprocessor answers with a :class:`Preprocessed`: the
items of every job that preprocessed cleanly, concatenated along axis 0, plus the job
boundaries and each failed job's error. The model deployment receives that object (chained,
``model.remote(pre.remote(...), params, deadlines)``) and answers one result or one error per
job, in order.

Everything here is plain Python + numpy (no torch): the ingress and the preprocessors never
import torch, and numpy arrays cross Ray's object store without a copy on read (pickle
protocol 5 out-of-band buffers), where torch tensors go through ``torch.save``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

from maas.errors import MaasError

T = TypeVar("T")


@dataclass
class Preprocessed(Generic[T]):
    """One preprocessor call's answer for a batch of jobs.

    Attributes:
        inputs: The items of every job without an error, concatenated along axis 0 (a
            :class:`~maas.preprocess.text.TokenizedBatch` or :class:`~maas.preprocess.image.ImageBatch`),
            or None when every job failed.
        rows: Items each job contributes to ``inputs``, in job order (0 for a failed job).
        errors: Per job, the 4xx error that preprocessing raised for it, or None.
        timing_ns: When the preprocessor worked on the batch (``time.time_ns()`` at start and end) and its job
            count: a traced request's ``maas.preprocess`` span (:mod:`maas.tracing`); a fourth element names
            the deployment that did it when that is not the preprocessor deployment (the ingress, for a batch
            it tokenized itself: :func:`maas.preprocess.text.tokenize_timed`).
    """

    inputs: T | None
    rows: list[int]
    errors: list[MaasError | None]
    timing_ns: tuple | None = None  # (start, end, jobs[, deployment]): the preprocessor's work, wall clock ns

    def __len__(self) -> int:
        return len(self.rows)

    def jobs(self) -> Iterator[tuple[Any, MaasError | None]]:
        """Per job: ``(its rows of inputs as a view, None)`` or ``(None, error)``."""
        start = 0
        for n, err in zip(self.rows, self.errors):
            if err is not None:
                yield None, err
                continue
            yield self.inputs.rows(start, start + n), None  # type: ignore[union-attr]
            start += n

    @classmethod
    def single(cls, inputs: T) -> "Preprocessed[T]":
        """One job holding all of ``inputs`` (tests and direct deployment calls)."""
        return cls(inputs=inputs, rows=[len(inputs)], errors=[None])  # type: ignore[arg-type]


def run_jobs(jobs: list[Any], one: Any) -> tuple[list[Any], list[MaasError | None]]:
    """Apply ``one(job, index)`` to each job, keeping a job's :class:`MaasError` as its result
    instead of failing the batch (one bad request never fails its neighbours).

    Returns:
        ``(outputs, errors)``: per job, its output (None when it failed) and its error (or None).
    """
    outputs: list[Any] = []
    errors: list[MaasError | None] = []
    for i, job in enumerate(jobs):
        try:
            outputs.append(one(job, i))
            errors.append(None)
        except MaasError as exc:
            outputs.append(None)
            errors.append(exc)
    return outputs, errors


def take_whole(queue: deque, max_items: int, items_of: Callable[[Any], int], dropped: Callable[[Any], bool],
               on_removed: Callable[[Any], None]) -> list:
    """Take whole entries from the head of ``queue`` while their items fit in ``max_items``.

    The one take rule of every batcher here (front and pull): entries (jobs or calls) are never
    split; the first entry is always taken, even when it alone holds more than ``max_items``
    (it then runs alone); entries for which ``dropped(entry)`` holds (their caller left) are
    removed and skipped. ``on_removed(entry)`` is called for every entry leaving the queue
    (the owner keeps its queued-item count with it).

    Returns:
        The taken entries, in queue order (empty when the queue held only dropped ones).
    """
    taken: list = []
    items = 0
    while queue:
        entry = queue[0]
        if dropped(entry):
            queue.popleft()
            on_removed(entry)
            continue
        n = items_of(entry)
        if taken and items + n > max_items:
            break
        queue.popleft()
        on_removed(entry)
        taken.append(entry)
        items += n
    return taken
