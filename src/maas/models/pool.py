"""Multiplexed pools: one deployment serves every repository model of one kind under a byte budget.

A :class:`TextEncoderPool` or :class:`ImageClassifierPool` replica (deployment ``Pool-<name>``, see
:class:`~maas.config.PoolSpec`) serves the repository's text encoders or image classifiers of its
``base``; :class:`PoolReplica` is what the two share (everything but building a model and running
a batch of heads). The ingress calls it with the model's name as
Serve's multiplexed model id (``handle.options(multiplexed_model_id=name)``), so Serve's router sends
a model's requests to a replica that holds it, and a model no replica holds to the replica with the
fewest models, which loads it (Ray Serve's multiplexing routing, used as it is).

What this module replaces, and why: ``@serve.multiplexed`` bounds a replica by a model *count* and
evicts by count; models of one pool range from a 3 KB head to a 90 MB checkpoint, so a replica here
holds models under a *byte* budget (:class:`~maas.models.cache.ModelCache`) and reports the models it
holds to Serve's router itself, with the same call the decorator makes (:func:`report_model_ids`).

* **The budget is the replica's memory** (``memory_budget_bytes``): at start the replica measures
  what it takes without repository models (its RSS after torch, the frozen base and a warm-up
  forward) and gives models the rest. Loads run one at a time on a loader thread (a forward of a
  loaded model is never blocked by a load). Before a load, least recently used idle models are
  evicted until the model's weight files fit; after it, its measured bytes (parameters and buffers)
  are what counts. A model in use (requests queued or running) is never evicted: a load that cannot
  make room waits for one to finish, up to ``load_timeout_s``. Evicted memory is handed back to the
  OS (``malloc_trim``) so the replica's RSS follows.
* **A request for a model being loaded** waits for the load up to ``load_timeout_s``, then gets 503
  with ``Retry-After``; the load goes on. **A load that fails** answers that model's requests with
  the reason and is reported to the index (the model reads ``UNAVAILABLE`` there), never the
  replica: the next request tries again only when the model's files change or the repository API
  loads it again.
* **Batches are grouped by model**: each full checkpoint has its own pull batcher (one forward per
  model and batch); head-only models share one batcher whose batch runs one base forward for every
  item and then each item's own head (a ``(C, D)`` linear layer on the base's features: a text base's
  pooled embeddings, an image base's pre-logits features — the input of its last linear layer).
* **Removed or unloaded** models (the index says so) are drained: evicted once no request of theirs
  is queued or running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from maas import metrics
from maas.batching.pull import PullBatcher
from maas.config import BatchingSpec, HuggingFaceSource, PoolSpec
from maas.errors import InvalidRequest, MaasError, ModelNotFound, ModelNotReady
from maas.models.cache import ModelCache
from maas.models.multiplex import (  # noqa: F401 - Head and load_head re-exported
    Head,
    failed_load,
    load_head,
    loaded_estimate,
    module_bytes,
    release_memory,
    report_model_ids,
    rss_bytes,
)
from maas.models.replica import ModelRequest, process_age_s, replica_num_cpus, split_jobs

logger = logging.getLogger("ray.serve.maas.models.pool")

#: How often a replica asks the index for removals and unloads and reports what it holds, seconds
#: (the repositories' smallest ``poll_interval_s`` is used when it is smaller).
INDEX_POLL_S = 2.0
#: A call to the index must answer within this, seconds (a hung mount must not stall the replica).
INDEX_TIMEOUT_S = 5.0


class PoolReplica:
    """A pool replica (see the module docstring); :class:`TextEncoderPool` and
    :class:`ImageClassifierPool` give it the family's base, model building and heads forward.

    Constructor args (from ``bind``): the :class:`~maas.config.PoolSpec` as a dict, the index's
    handle and the repositories' smallest poll interval, seconds.

    Handle methods: ``__call__(pre, params, deadlines_s, backlog_items)`` (a front batch for the
    model named by the multiplexed model id), ``info(model=None)``, ``load(model)`` (the repository
    API's load), ``record_autoscaling_stats()``. What each replica holds is in the index's reports
    (``GET /v1/pools``).
    """

    def __init__(self, pool: dict, index: Any, poll_s: float = INDEX_POLL_S):
        from maas.models.base import select_device, set_torch_threads

        self.pool = PoolSpec.model_validate(pool)
        self.index, self.poll_s = index, min(poll_s, INDEX_POLL_S)
        self.threads = set_torch_threads(replica_num_cpus(), self.pool.resources.torch_threads)
        self.device = select_device()
        self._forward_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"maas-forward-{self.pool.name}")
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"maas-load-{self.pool.name}")
        self._load_lock: asyncio.Lock | None = None
        self.inflight: dict[str, int] = {}
        self.cache = ModelCache(self.pool.memory_budget_bytes, in_use=self._in_use)
        self.fingerprints: dict[str, str] = {}  # held model → the fingerprint of the files it was loaded from
        self._facts: dict[tuple[str, str], dict] = {}  # (name, fingerprint) → facts read from its files
        self._unreported: set[str] = set()  # failures the index has not heard of yet (each is told once)
        self.loading: dict[str, asyncio.Future] = {}
        self.load_s: dict[str, float] = {}
        self.failed: dict[str, tuple[str, str]] = {}  # name → (fingerprint, reason)
        self.entries: dict[str, dict] = {}
        self.version, self._epoch = -1, None
        self.batching = self.pool.batching
        self.batchers: dict[str, PullBatcher] = {}
        self._batch_started: float | None = None
        self._explaining = 0
        self._backlog = (0.0, 0.0)
        self._tasks: set[asyncio.Task] = set()
        self._poller: asyncio.Task | None = None
        started = time.monotonic()
        self.base = self._load_base()
        # The budget is the replica's memory: models get what the process, torch and the frozen base
        # leave of it (measured now, after the base's warm-up forward).
        release_memory()
        if self.device.type == "cuda":  # models live in device memory there
            import torch

            self.baseline_bytes = int(torch.cuda.memory_allocated(self.device))
        else:
            self.baseline_bytes = rss_bytes()
        models_budget = self.pool.memory_budget_bytes - self.baseline_bytes
        if models_budget <= 0:
            raise ValueError(f"pool {self.pool.name!r}: memory_budget_bytes {self.pool.memory_budget_bytes} is below what "
                             f"the replica takes before any repository model ({self.baseline_bytes} bytes: process, torch"
                             f"{', base' if self.base else ''}); raise it")
        self.cache.budget_bytes = models_budget
        self.heads_batcher = PullBatcher(self._run_heads, f"{self.pool.name}/heads", self.batching.max_batch_size,
                                 self.batching.batch_wait_timeout_s)
        self.start_s = process_age_s() or (time.monotonic() - started)
        logger.info("pool %s ready on %s with %d threads; budget %d bytes, %d of them for repository models%s",
                    self.pool.name, self.device, self.threads, self.pool.memory_budget_bytes, models_budget,
                    " (frozen base loaded)" if self.base else "")

    # ------------------------------------------------------------------ loading

    # Family hooks (the subclasses').

    def _load_base(self):
        """The frozen base head-only models run on (None without ``base_weights``), warmed up; it has
        ``dimensions`` (D of the features a head takes)."""
        raise NotImplementedError

    def _build(self, entry: dict):
        """A full checkpoint's runner, loaded (on the loader thread)."""
        raise NotImplementedError

    def _heads_forward(self, requests: list[ModelRequest]) -> list[Any]:
        raise NotImplementedError

    def _check_head_job(self, request: ModelRequest, head: Head) -> None:
        from maas.models.answers import check_top_k

        check_top_k(request.params.get("top_k", 1), len(head.labels), "label count")

    def _head_facts(self, head_labels: list[str]) -> dict:
        return {"labels": head_labels, "dimensions": self.base.dimensions}

    def _read_facts(self, entry: dict) -> dict:
        raise NotImplementedError

    def _load_model(self, entry: dict):
        """On the loader thread: ``(model, bytes)`` — a warm runner for a full checkpoint, a
        :class:`Head` for a head-only model.

        Raises:
            WeightsError (or anything the loading library raises): the load failed.
        """
        spec = entry["spec"]
        if spec.get("head"):
            import os

            head = load_head(os.path.join(entry["path"], spec["head"]), spec["labels"], self.base.dimensions)
            return head, head.nbytes
        runner = self._build(entry)
        return runner, module_bytes(runner.model)

    async def _ensure(self, name: str) -> Any:
        """The loaded model ``name``, loading it when needed (waits at most ``load_timeout_s``).

        Raises:
            ModelNotFound: not in the index. ModelNotReady: unavailable there, or still loading
                after ``load_timeout_s`` (503 + Retry-After). WeightsError: its load failed.
        """
        if name in self.cache:
            return self.cache.get(name)
        entry = await self._entry(name)
        fp = entry["fingerprint"]
        if name in self.failed and self.failed[name][0] == fp:
            # Kept while the index marks it failed, or has not heard yet; once the index says READY
            # again (files changed, or the repository API loaded it on another replica) it is tried again.
            if entry["state"] != "READY" or name in self._unreported:
                raise failed_load(name)
            del self.failed[name]
        fut = self.loading.get(name)
        if fut is None:
            fut = asyncio.get_running_loop().create_task(self._load(entry))
            self.loading[name] = fut
            report_model_ids(self._model_ids())
            fut.add_done_callback(lambda _f: self._loaded(name))
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout=self.pool.load_timeout_s)
        except asyncio.TimeoutError:
            raise ModelNotReady(f"model {name!r} is still loading after {self.pool.load_timeout_s} s; retry after 5 s",
                                retry_after_s=5) from None

    def _loaded(self, name: str) -> None:
        self.loading.pop(name, None)
        report_model_ids(self._model_ids())
        self._spawn(self._report())

    async def _load(self, entry: dict) -> Any:
        name = entry["name"]
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        async with self._load_lock:
            if name in self.cache:
                return self.cache.get(name)
            estimate = loaded_estimate(entry)
            if estimate > self.cache.budget_bytes:
                raise self._fail(name, entry["fingerprint"], (
                    f"needs ~{estimate} bytes loaded, more than the {self.cache.budget_bytes} bytes a replica of pool "
                    f"{self.pool.name!r} has for models ({self.pool.memory_budget_bytes} budget less "
                    f"{self.baseline_bytes} the replica takes itself); raise memory_budget_bytes"))
            await self._make_room(estimate, name)
            started = time.monotonic()
            try:
                model, nbytes = await asyncio.get_running_loop().run_in_executor(self._loader, self._load_model, entry)
            except Exception as exc:  # noqa: BLE001 - a failed load marks the model, never the replica
                reason = str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__
                raise self._fail(name, entry["fingerprint"], reason) from None
            load_s = time.monotonic() - started
            if nbytes > self.cache.budget_bytes:
                del model
                release_memory()
                raise self._fail(name, entry["fingerprint"], f"takes {nbytes} bytes loaded, more than the "
                                 f"{self.cache.budget_bytes} bytes a replica has for models; raise memory_budget_bytes")
            # Its measured bytes may exceed the estimate: the rest is made room for now (the model is in
            # memory meanwhile, so the replica is over its models' budget by that difference for this moment).
            await self._make_room(nbytes, name)
            self.cache.add(name, model, nbytes)
            self.fingerprints[name] = entry["fingerprint"]
            self.load_s[name] = load_s
            metrics.pool_load(self.pool.name, "ok", load_s)
            metrics.pool_held(self.pool.name, len(self.cache), self.cache.bytes)
            logger.info("pool %s: loaded %s (%d bytes) in %.2f s; holding %d models, %d bytes", self.pool.name, name,
                        nbytes, load_s, len(self.cache), self.cache.bytes)
            return model

    async def _make_room(self, nbytes: int, for_name: str) -> None:
        """Evict least recently used idle models until ``nbytes`` fit; waits for busy ones to
        finish, up to ``load_timeout_s``.

        Raises:
            ModelNotReady: no room within ``load_timeout_s`` (every held model is busy).
        """
        deadline = time.monotonic() + self.pool.load_timeout_s
        while True:
            victims = self.cache.victims(nbytes)
            if victims is not None:
                for v in victims:
                    self._evict(v, "budget")
                return
            if time.monotonic() > deadline:
                raise ModelNotReady(f"pool {self.pool.name!r} has no room for model {for_name!r}: every model it holds "
                                    "is busy; retry after 1 s", retry_after_s=1)
            await asyncio.sleep(0.02)

    def _evict(self, name: str, reason: str) -> None:
        model = self.cache.pop(name)
        if model is None:
            return
        batcher = self.batchers.pop(name, None)
        if batcher is not None:
            batcher.close()
        self.load_s.pop(name, None)
        self.fingerprints.pop(name, None)
        if not isinstance(model, Head):
            # Drop the weights now: transformers maps safetensors files, and a runner kept alive by any
            # reference (a finished request's frame, a log record) would keep the mapping and its pages.
            model.model, model.ort, model.loaded = None, None, False
        del model
        release_memory()
        metrics.pool_eviction(self.pool.name, reason)
        metrics.pool_held(self.pool.name, len(self.cache), self.cache.bytes)
        report_model_ids(self._model_ids())
        logger.info("pool %s: evicted %s (%s); holding %d models, %d bytes", self.pool.name, name, reason,
                    len(self.cache), self.cache.bytes)

    def _in_use(self, name: str) -> bool:
        """Requests for ``name`` are being handled here, or its batcher holds queued or running work
        (a caller that left lowers ``inflight`` while its batch may still run)."""
        b = self.batchers.get(name)
        return self.inflight.get(name, 0) > 0 or (b is not None and (b.running_items > 0 or b.queued_items > 0))

    def _fail(self, name: str, fingerprint: str, reason: str) -> ModelNotReady:
        """Mark ``name``'s load failed (told to the index once) and the error its requests get."""
        self.failed[name] = (fingerprint, reason)
        self._unreported.add(name)
        metrics.pool_load(self.pool.name, "failed")
        logger.warning("pool %s: model %s failed to load: %s", self.pool.name, name, reason)
        return failed_load(name)

    def _model_ids(self) -> list[str]:
        return sorted(set(self.cache.held()) | set(self.loading))

    # ------------------------------------------------------------------ the index

    async def _entry(self, name: str) -> dict:
        entry = self.entries.get(name)
        if entry is None or entry["state"] != "READY":
            await self._refresh(rescan=entry is None)
            entry = self.entries.get(name)
        if entry is None or entry.get("pool") != self.pool.name:
            raise ModelNotFound(f"model {name!r} is not a model of pool {self.pool.name!r}'s repositories; "
                                "POST /v2/repository/index lists them")
        if entry["state"] != "READY" and not (name in self.failed and self.failed[name][0] == entry["fingerprint"]):
            from maas.repository import unavailable_message

            raise ModelNotReady(unavailable_message(name, entry.get("kind", ""), entry["reason"]))
        return entry

    async def _refresh(self, rescan: bool = False) -> None:
        snap = await asyncio.wait_for(self.index.snapshot.remote(self.version, rescan, self._epoch), INDEX_TIMEOUT_S)
        if "models" in snap:
            self.entries, self.version, self._epoch = snap["models"], snap["version"], snap.get("epoch")
            for name in [n for n in self.failed if n not in self.entries]:
                del self.failed[name]  # gone from the repository
                self._unreported.discard(name)

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        """Every ``poll_s``: drop models the index no longer serves (once drained) and report."""
        while True:
            try:
                await self._refresh()
                for name in list(self.cache.held()):
                    entry = self.entries.get(name)
                    changed = entry is not None and entry["fingerprint"] != self.fingerprints.get(name)
                    gone = entry is None or entry["state"] != "READY" or entry["pool"] != self.pool.name or changed
                    if gone and not self._in_use(name):  # drained: nothing of it queued or running
                        self._evict(name, "removed" if entry is None else "changed" if changed else "unloaded")
                await self._report()
            except Exception as exc:  # noqa: BLE001 - the index may be restarting; try again next round
                logger.debug("pool %s: index poll failed: %s", self.pool.name, exc)
            await asyncio.sleep(self.poll_s)

    async def _report(self) -> None:
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a Serve replica
            replica = "local"
        facts = {"rss_bytes": rss_bytes(), "baseline_bytes": self.baseline_bytes,
                 "budget_bytes": self.pool.memory_budget_bytes, "models_budget_bytes": self.cache.budget_bytes}
        news = {k: list(self.failed[k]) for k in self._unreported if k in self.failed}
        version = await asyncio.wait_for(
            self.index.report.remote(replica, self.pool.name, self.cache.held(), news, facts), INDEX_TIMEOUT_S)
        self._unreported -= set(news)
        if version != self.version:
            await self._refresh()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ serving

    async def __call__(self, pre: Any, params: list[dict] | dict | None = None,
                       deadlines_s: list[float | None] | None = None, backlog_items: float | None = None) -> list[Any]:
        """A front batch of jobs for the model named by the multiplexed model id; one result or one
        :class:`~maas.errors.MaasError` per job (see :meth:`maas.models.replica.ModelDeployment.__call__`)."""
        self._ensure_poller()
        if backlog_items is not None:
            self._backlog = (float(backlog_items), time.monotonic())
        name = serve.get_multiplexed_model_id()
        if not name:
            raise InvalidRequest(f"pool {self.pool.name!r} serves repository models: call it with "
                                 "handle.options(multiplexed_model_id=<model name>)")
        self.inflight[name] = self.inflight.get(name, 0) + 1
        try:
            model = await self._ensure(name)
            results, requests, pending = self._jobs(model, pre, params, deadlines_s)
            if not requests:
                return results
            if isinstance(model, Head):
                for r in requests:
                    r.params = {**r.params, "_head": model}
                return await self.heads_batcher.submit(requests, results, pending)
            batcher = self.batchers.get(name)
            if batcher is None:
                batcher = self.batchers[name] = PullBatcher(
                    lambda reqs, runner=model: self._in_forward(runner.run, reqs), name,
                    self.batching.max_batch_size, self.batching.batch_wait_timeout_s)
            return await batcher.submit(requests, results, pending)
        finally:
            self.inflight[name] -= 1
            if not self.inflight[name]:
                del self.inflight[name]

    async def heads(self, pre: Any, params: list[dict], deadlines_s: list[float | None] | None = None,
                    backlog_items: float | None = None) -> list[Any]:
        """A front batch that mixes head-only models (each job's ``params["model"]`` names its own):
        every model loaded here if needed (a head loads in milliseconds), then all jobs go to the
        shared batcher, whose batches run one base forward. One result or error per job."""
        self._ensure_poller()
        if backlog_items is not None:
            self._backlog = (float(backlog_items), time.monotonic())
        names = [p.get("model") for p in params]
        distinct = sorted({n for n in names if n})

        async def one(name: str) -> Any:
            try:
                model = await self._ensure(name)
            except MaasError as exc:
                return exc
            except Exception:  # noqa: BLE001 - one model's trouble fails its own jobs, not the batch
                logger.exception("pool %s: model %s could not be made ready", self.pool.name, name)
                return ModelNotReady(f"repository model {name!r} could not be loaded; retry")
            return model if isinstance(model, Head) else InvalidRequest(f"model {name!r} is not a head-only model")

        # Loads first, then the pins: a head pinned while another loads could be what that load must
        # evict (both would wait out load_timeout_s). An evicted head still serves its jobs here: each
        # job holds its Head.
        loaded = dict(zip(distinct, await asyncio.gather(*(one(n) for n in distinct))))
        for name in distinct:
            self.inflight[name] = self.inflight.get(name, 0) + 1
        try:
            models = [loaded.get(n) or InvalidRequest("a job without its model's name") for n in names]
            results, requests, pending = self._jobs(models, pre, params, deadlines_s)
            for r, i in zip(requests, pending):
                r.params = {**r.params, "_head": models[i]}
            if not requests:
                return results
            return await self.heads_batcher.submit(requests, results, pending)
        finally:
            for name in distinct:
                self.inflight[name] -= 1
                if not self.inflight[name]:
                    del self.inflight[name]

    def _jobs(self, model: Any, pre: Any, params, deadlines_s) -> tuple[list, list[ModelRequest], list[int]]:
        """Per-job requests (:func:`maas.models.replica.split_jobs`), validated against ``model``: one
        model, or a list with each job's own model or the error that loading it raised."""
        def validate(i: int, request: ModelRequest) -> None:
            m = model[i] if isinstance(model, list) else model
            if isinstance(m, MaasError):
                raise m
            if isinstance(m, Head):
                self._check_head_job(request, m)
            else:
                m.validate(request)

        return split_jobs(pre, params, deadlines_s, validate)

    async def explain(self, payload: Any, params: dict, deadline_s: float | None = None) -> dict:
        """Token attributions for a full-checkpoint repository model (as a model replica's
        ``explain``, :meth:`maas.models.text_encoder.TextEncoderRunner.explain_map`), between batches
        on the forward thread; at most 2 at once per replica.

        Raises:
            TaskNotSupported: a head-only model (its attribution would need the base's gradients per
                head; not built). ServiceOverloaded: 2 explanations already running here.
            ModelTimeout: the deadline passed before it could start.
        """
        from maas.errors import ModelTimeout, ServiceOverloaded, TaskNotSupported

        name = serve.get_multiplexed_model_id()
        if self._explaining >= 2:
            raise ServiceOverloaded(f"pool {self.pool.name!r} is computing 2 explanations already; retry after 1 s")
        self._explaining += 1
        self.inflight[name] = self.inflight.get(name, 0) + 1
        try:
            model = await self._ensure(name)
            if isinstance(model, Head):
                raise TaskNotSupported(f"model {name!r} is a head-only repository model; explanations are offered for "
                                       "full checkpoints")
            if deadline_s is not None and time.time() > deadline_s:
                raise ModelTimeout(f"model {name!r}: the explanation did not start within explain_timeout_s; retry later")
            from maas.models.replica import timed

            spent = [0.0]
            state = await self._in_forward(timed(model.explain_map, spent), payload, params)
            out = await self._in_forward(timed(model.explain_score, spent), state, params)
            return {**out, "compute_s": spent[0]}  # what the tenant is charged (maas.tenants)
        finally:
            self._explaining -= 1
            self.inflight[name] -= 1
            if not self.inflight[name]:
                del self.inflight[name]

    def _in_forward(self, fn, *args) -> asyncio.Future:
        async def run():
            self._batch_started = time.monotonic()
            try:
                return await asyncio.get_running_loop().run_in_executor(self._forward_thread, fn, *args)
            finally:
                self._batch_started = None
        return run()

    async def _run_heads(self, requests: list[ModelRequest]) -> list[Any]:
        return await self._in_forward(self._heads_forward, requests)

    # ------------------------------------------------------------------ facts

    async def info(self, model: str | None = None) -> dict:
        """Pool facts, and a model's when ``model`` names one it can see (never loads it):
        ``batching``, ``start_s``, ``memory_budget_bytes``, ``held`` (name → bytes), and for the model
        ``labels`` / ``max_input_tokens`` / ``dimensions`` when loaded, ``loaded``."""
        self._ensure_poller()
        if model is not None and model not in self.entries:
            try:
                await self._refresh(rescan=True)
            except Exception:  # noqa: BLE001 - the facts then come without the model's
                pass
        out: dict[str, Any] = {
            "name": model or self.pool.deployment_name, "family": self.pool.family, "pool": self.pool.name,
            "threads": self.threads, "device": str(self.device), "batching": self.batching.model_dump(),
            "start_s": round(self.start_s, 1), "memory_budget_bytes": self.pool.memory_budget_bytes,
            "held_bytes": self.cache.bytes, "held": self.cache.held(),
            "runtime": {"name": "torch", "precision": "fp32"},
        }
        if model is not None:
            out["loaded"] = model in self.cache
            entry = self.entries.get(model)
            if entry is not None and entry.get("spec") and model not in self.cache:
                out.update(self._static_facts(entry))
            if model in self.cache:
                m = self.cache._models[model][0]  # a look without marking it used
                if isinstance(m, Head):
                    out.update(self._head_facts(m.labels))
                else:
                    out.update({k: v for k, v in m.info().items() if k != "device"})
                out["load_s"] = round(self.load_s.get(model, 0.0), 3)
            if self.pool.family == "text-encoder" and "max_input_tokens" not in out:
                out["partial"] = True  # its facts are not known here yet: the ingress asks again, never keeps this
        return out

    def _static_facts(self, entry: dict) -> dict:
        """``max_input_tokens``, ``dimensions`` (and ``labels``) of a model that is not loaded, from its
        files (``config.json``, sentence-transformers' settings; a head's spec) — what the ingress
        needs to tokenise for it before its first load. Read once per version of its files: the
        ingress asks ``info`` every few seconds per model."""
        key = (entry["name"], entry["fingerprint"])
        if key not in self._facts:
            if len(self._facts) >= 4096:
                self._facts.clear()
            self._facts[key] = self._read_facts(entry)
        return self._facts[key]

    async def load(self, model: str) -> dict:
        """Load ``model`` on this replica now (the repository API's load): its :meth:`info`.

        Raises:
            As :meth:`_ensure`.
        """
        self._ensure_poller()
        await self._refresh(rescan=True)
        self.failed.pop(model, None)
        self.inflight[model] = self.inflight.get(model, 0) + 1
        try:
            await self._ensure(model)
        finally:
            self.inflight[model] -= 1
            if not self.inflight[model]:
                del self.inflight[model]
        return await self.info(model)

    def reconfigure(self, user_config: dict) -> None:
        """Batching settings from ``user_config`` (as a model deployment's)."""
        batching = BatchingSpec.model_validate({**self.pool.batching.model_dump(), **(user_config or {})})
        for b in [self.heads_batcher, *self.batchers.values()] if hasattr(self, "heads_batcher") else []:
            b.configure(batching.max_batch_size, batching.batch_wait_timeout_s)
        self.batching = batching

    async def check_health(self) -> None:
        """Unhealthy when a batch has run past ``health.stall_timeout_s`` (Serve replaces the replica)."""
        started = self._batch_started
        if started is not None and time.monotonic() - started > self.pool.health.stall_timeout_s:
            raise RuntimeError(f"pool {self.pool.name}: a batch has been running for {time.monotonic() - started:.0f} s")

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Items running and waiting on this replica (as a model replica's; see :mod:`maas.autoscaling`)."""
        from maas.autoscaling import BACKLOG_TTL_S

        batchers = [self.heads_batcher, *self.batchers.values()]
        backlog, at = self._backlog
        return {"running_items": float(sum(b.running_items for b in batchers)),
                "queued_items": float(sum(b.queued_items for b in batchers)),
                "backlog_items": backlog if time.monotonic() - at < BACKLOG_TTL_S else 0.0}


@serve.deployment(ray_actor_options={"num_cpus": 1})
class TextEncoderPool(PoolReplica):
    """A pool replica of text encoders (family ``text-encoder``): full checkpoints in Hugging Face
    layout, and heads over the base's pooled sentence embeddings (float32 (N, D), D = the base's
    hidden size)."""

    def _load_base(self):
        if self.pool.base_weights is None:
            return None
        from maas.models.text_encoder import TextEncoderRunner

        runner = TextEncoderRunner(self.pool.model_spec(f"{self.pool.name}-base", ["embeddings"],
                                                        self.pool.base_weights), self.device)
        runner.load()
        runner.run([runner.probe()])
        return runner

    def _build(self, entry: dict):
        from maas.models.text_encoder import TextEncoderRunner

        spec = self.pool.model_spec(entry.get("model") or entry["name"], entry["spec"]["tasks"],
                                    HuggingFaceSource(id=entry["path"]))
        runner = TextEncoderRunner(spec, self.device)
        runner.load()
        return runner

    def _check_head_job(self, request: ModelRequest, head: Head) -> None:
        if request.params.get("task", "embeddings") != "text-classification":
            raise InvalidRequest("a head-only repository model classifies texts; use the pool's base model "
                                 "for embeddings")
        super()._check_head_job(request, head)

    def _head_facts(self, head_labels: list[str]) -> dict:
        return {**super()._head_facts(head_labels), "max_input_tokens": self.base.max_input_tokens}

    def _heads_forward(self, requests: list[ModelRequest]) -> list[Any]:
        """One base forward for every item of a mixed batch of head-only models, then each
        request's own head on its rows of the pooled embeddings (float32 (N, D))."""
        import torch

        from maas.models.answers import encoder_results

        base = self.base
        with torch.inference_mode():
            emb = base.forward(base.preprocess(requests))["embeddings"].float().cpu().numpy()
        out, start = [], 0
        for r in requests:
            n = len(r.inputs)
            head: Head = r.params["_head"]
            rows = emb[start:start + n]
            logits = rows @ head.weight.T + head.bias
            out.extend(encoder_results(rows, logits, [r], head.labels, False))
            start += n
        return out

    def _read_facts(self, entry: dict) -> dict:
        import json
        import os

        from maas.models.text_encoder import read_pooling

        spec = entry["spec"]
        if spec.get("head"):
            base = self.base
            return {"labels": spec["labels"], "max_input_tokens": base.max_input_tokens, "dimensions": base.dimensions}
        try:
            cfg = json.loads(open(os.path.join(entry["path"], "config.json")).read())
        except (OSError, ValueError):
            return {}
        positions = int(cfg.get("max_position_embeddings") or 512)
        _, _, sbert_max = read_pooling(entry["path"])
        out = {"max_input_tokens": self.pool.max_input_tokens or min(sbert_max or positions, positions),
               "dimensions": int(cfg.get("hidden_size") or 0)}
        if "text-classification" in spec["tasks"] and isinstance(cfg.get("id2label"), dict):
            out["labels"] = [cfg["id2label"][k] for k in sorted(cfg["id2label"], key=int)]
        return out


def strip_classifier(model) -> int:
    """Replace the last ``torch.nn.Linear`` of an image classifier (its classifier: timm's
    ``classifier``/``head.fc``, torchvision's ``fc``/``classifier[-1]``) by ``Identity``, so the model
    returns its pre-logits features; returns their width D (that layer's ``in_features``).

    Raises:
        WeightsError: the architecture has no linear layer.
    """
    import torch

    last = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            last = name
    if last is None:
        from maas.errors import WeightsError

        raise WeightsError("the architecture has no linear classifier layer; head-only models need one")
    parent_name, _, child = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    dim = int(getattr(parent, child).in_features)
    setattr(parent, child, torch.nn.Identity())
    return dim


@serve.deployment(ray_actor_options={"num_cpus": 1})
class ImageClassifierPool(PoolReplica):
    """A pool replica of image classifiers (family ``image-classifier``) of one torchvision or timm
    architecture: full checkpoints (a state-dict file and labels) and heads over the base's
    pre-logits features (float32 (N, D); D = 1280 for EfficientNet-Lite0, 2048 for ResNet-50).
    Inputs come from the pool's image preprocessor: ``uint8`` (N, crop, crop, 3)."""

    def _load_base(self):
        if self.pool.base_weights is None:
            return None
        from maas.models.image_classifier import ImageClassifierRunner

        runner = ImageClassifierRunner(self.pool.model_spec(f"{self.pool.name}-base", ["image-classification"],
                                                            self.pool.base_weights), self.device)
        runner.load()
        runner.dimensions = strip_classifier(runner.model)
        self._base_features(runner, [runner.probe()])
        return runner

    def _build(self, entry: dict):
        import os

        from maas.config import TimmSource, TorchvisionSource
        from maas.models.image_classifier import ImageClassifierRunner

        spec = entry["spec"]
        path = os.path.join(entry["path"], spec["weights"])
        weights = TimmSource(path=path) if self.pool.library == "timm" else TorchvisionSource(path=path)
        runner = ImageClassifierRunner(self.pool.model_spec(entry.get("model") or entry["name"], spec["tasks"],
                                                            weights, spec["labels"]), self.device)
        runner.load()
        return runner

    @staticmethod
    def _base_features(base, requests: list[ModelRequest]):
        import torch

        with torch.inference_mode():
            return base.model(base.preprocess(requests)).float().cpu().numpy()

    def _heads_forward(self, requests: list[ModelRequest]) -> list[Any]:
        """One base forward for every image of a mixed batch of head-only models, then each
        request's own head on its rows of the features (float32 (N, D))."""
        from maas.models.answers import image_results

        feats = self._base_features(self.base, requests)
        out, start = [], 0
        for r in requests:
            n = len(r.inputs.pixels)
            head: Head = r.params["_head"]
            logits = feats[start:start + n] @ head.weight.T + head.bias
            out.extend(image_results(logits, [r], head.labels))
            start += n
        return out

    def _check_head_job(self, request: ModelRequest, head: Head) -> None:
        from maas.models.answers import check_top_k, image_top_k

        check_top_k(image_top_k(request.params, len(head.labels)), len(head.labels), "label count")

    def _head_facts(self, head_labels: list[str]) -> dict:
        return {**super()._head_facts(head_labels), "num_classes": len(head_labels),
                "preprocessing": self.base.pre.model_dump()}

    def _read_facts(self, entry: dict) -> dict:
        spec = entry["spec"]
        labels = spec.get("labels")
        if labels == "imagenet":
            from maas.models.image_classifier import imagenet_categories

            labels = imagenet_categories()
        return {"labels": labels, "num_classes": len(labels or [])}


#: The pool deployment of each family.
POOL_DEPLOYMENTS = {"text-encoder": TextEncoderPool, "image-classifier": ImageClassifierPool}
