"""Repository models in the ingress: routes that appear and go without a redeploy.

:class:`RepositoryRoutes` follows the app's :class:`~maas.repository.RepositoryIndex` (every poll
interval, and at once when a request names a model this replica does not know) and keeps one route
per ``READY`` repository model in the call path: its spec is a
:class:`~maas.config.PoolModelSpec` (deployment: its pool), its model handle the pool's with the
model's name as Serve's multiplexed model id (:class:`PoolModelHandle`), its preprocessor the
pool's tokenizer. From there every protocol, front batching, readiness and the cards treat it as
any model. A model that leaves the index (folder removed, unloaded through the API) loses its route
at once: new requests get 404/503, requests already routed finish (the pool drains before it evicts).
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray.serve.handle import DeploymentHandle

from maas.config import AppConfig, FolderSpec, PoolModelSpec, PoolSpec
from maas.errors import ModelNotFound, ModelNotReady
from maas.repository import unavailable_message

logger = logging.getLogger("ray.serve.maas.dataplane")

#: The index must answer within this, seconds (else the routes stay as they are).
INDEX_TIMEOUT_S = 5.0


class _Info:
    """``handle.info`` of a repository model: the pool's ``info(model=name)`` on any replica (a probe
    never asks for the model's replica, which would make Serve's router wait for a match)."""

    def __init__(self, handle: DeploymentHandle, name: str):
        self._handle, self._name = handle, name

    def remote(self):
        return self._handle.info.remote(model=self._name)


class PoolModelHandle:
    """The model handle of a repository model's route: calls go to the pool with the model's name
    as multiplexed model id (Serve routes them to a replica that holds it); ``info`` goes to any
    replica."""

    def __init__(self, pool: DeploymentHandle, name: str):
        self.name, self._pool = name, pool
        self._model = pool.options(multiplexed_model_id=name)
        self.info = _Info(pool, name)
        self.explain = self._model.explain
        self.heads = pool.heads  # head-only models: one call per mixed batch, any replica

    def remote(self, *args, **kwargs):
        return self._model.remote(*args, **kwargs)

    def options(self, **kwargs):
        return self._model.options(**kwargs)

    @property
    def _router(self):  # the watch reads the pool handle's router (maas.dataplane.watch.router_replicas)
        return self._pool._router


def pool_model_spec(entry: dict, pool: PoolSpec) -> PoolModelSpec:
    """The :class:`~maas.config.PoolModelSpec` the ingress routes a repository entry with (``name``
    the model's, ``version`` the entry's version subfolder, so its key is the entry's address)."""
    import os

    from maas.config import HuggingFaceSource, TimmSource, TorchvisionSource

    folder = FolderSpec.model_validate(entry["spec"])
    common = dict(name=entry.get("model") or entry["name"], version=entry.get("version"), family=folder.family,
                  tasks=folder.tasks, batching=pool.batching, resources=pool.resources,
                  max_queued_items=pool.max_queued_items, quality=folder.quality, quality_source=folder.quality_source,
                  pool=pool.name, pool_deployment=pool.deployment_name, path=entry["path"], head=folder.head)
    if pool.family == "image-classifier":
        # The preprocessing stays the pool's (its preprocessor deployment); the ingress never reads it.
        path = os.path.join(entry["path"], folder.weights or folder.head or "")
        weights = TimmSource(path=path) if pool.library == "timm" else TorchvisionSource(path=path)
        return PoolModelSpec(**common, weights=weights, architecture=pool.architecture, library=pool.library,
                             labels=folder.labels)
    return PoolModelSpec(**common, weights=HuggingFaceSource(id=entry["path"]), tokenizer=pool.tokenizer,
                         max_input_tokens=pool.max_input_tokens)


class RepositoryRoutes:
    """The repository models' routes of one ingress replica (see the module docstring).

    Args:
        config: The app config (its pools and repositories).
        index: The ``RepositoryIndex`` handle. pools: Pool name → its handle.
        tokenizers: Pool name → its tokenizer deployment's handle.
        calls, traffic: The dataplane's call path and traffic state, whose routes and names this
            keeps (``calls.routes``, ``traffic.specs``).
    """

    def __init__(self, config: AppConfig, index: DeploymentHandle, pools: dict[str, DeploymentHandle],
                 tokenizers: dict[str, DeploymentHandle], calls, traffic):
        self.pools = {p.name: p for p in config.pools}
        self.index, self.handles, self.tokenizers = index, pools, tokenizers
        self.calls, self.traffic = calls, traffic
        self.poll_s = min(r.poll_interval_s for r in config.repositories)
        self.version, self.epoch = -1, None
        self.entries: dict[str, dict] = {}
        self.fingerprints: dict[str, str] = {}  # routed address → the fingerprint it was routed with
        self.names: set[str] = set()  # model names whose versions this keeps in traffic.specs
        self._loop_task: asyncio.Task | None = None
        self._refreshing: asyncio.Future | None = None
        self.refreshed_at = 0.0

    def start(self) -> None:
        """Follow the index in the background (from the first request on; idempotent)."""
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        while True:
            try:
                await self.refresh(whole=True)  # loaded_on (what auto and the cards read) has no version
            except Exception as exc:  # noqa: BLE001 - the index may be restarting; the routes stay
                logger.debug("repository index did not answer: %s", exc)
            await asyncio.sleep(self.poll_s)

    async def refresh(self, rescan: bool = False, whole: bool = False) -> None:
        """Ask the index and apply what changed. Plain refreshes share one call in flight; a
        ``rescan`` (the index scans the repositories after the call arrives) or a ``whole`` snapshot
        (fresh ``loaded_on``, which does not change the index's version) asks on its own."""
        if not (rescan or whole) and self._refreshing is not None and not self._refreshing.done():
            return await asyncio.shield(self._refreshing)

        async def ask():
            known = -1 if whole else self.version
            snap = await asyncio.wait_for(self.index.snapshot.remote(known, rescan, self.epoch), INDEX_TIMEOUT_S)
            if "models" in snap:
                self.apply(snap)
            self.refreshed_at = time.monotonic()

        task = asyncio.ensure_future(ask())
        if not (rescan or whole):
            self._refreshing = task
        await task

    async def ready(self) -> None:
        """Follow the index, and have its first answer before listing models (``/v1/models`` right after
        the start lists the repository's)."""
        self.start()
        if self.refreshed_at == 0.0:
            try:
                await self.refresh(whole=True)
            except Exception as exc:  # noqa: BLE001 - listed without repository models until it answers
                logger.debug("repository index did not answer: %s", exc)

    def apply(self, snap: dict) -> None:
        """Make the routes match an index snapshot: add READY models, drop the rest. Routes are keyed
        by address (``name``, or ``name@v`` for a version subfolder); ``traffic.specs[name]`` lists a
        name's routed versions with its default first (what ``name`` alone answers with)."""
        from maas.dataplane.calls import Route

        if snap.get("epoch") == self.epoch and snap["version"] < self.version:
            return  # an answer older than one applied already (a slow call): it would re-add what left
        self.entries, self.version, self.epoch = snap["models"], snap["version"], snap.get("epoch")
        routes, specs = self.calls.routes, self.traffic.specs
        live = {n: e for n, e in self.entries.items() if e["state"] == "READY" and e["pool"] in self.handles}
        for address in [a for a, r in routes.items() if isinstance(r.spec, PoolModelSpec)]:
            entry = live.get(address)
            if entry is None or entry["fingerprint"] != self.fingerprints.get(address):
                self._drop(address)
        for address, entry in live.items():
            model = entry.get("model") or address
            if address in routes or (model in specs and model not in self.names):
                continue  # routed already, or a model of the app config (the index refuses those; belt and braces)
            try:
                spec = pool_model_spec(entry, self.pools[entry["pool"]])
            except Exception as exc:  # noqa: BLE001 - the index validated it; a mismatch is logged, not served
                logger.warning("repository model %s not routed: %s", address, exc)
                continue
            routes[address] = Route(spec, PoolModelHandle(self.handles[entry["pool"]], address),
                                    self.tokenizers[entry["pool"]])
            self.fingerprints[address] = entry["fingerprint"]
        self._index_versions()

    def _index_versions(self) -> None:
        """``traffic.specs`` of the repository's names from the routes: the default version first."""
        by_name: dict[str, list] = {}
        for address, route in self.calls.routes.items():
            if isinstance(route.spec, PoolModelSpec):
                by_name.setdefault(route.spec.name, []).append(route.spec)
        for name in self.names - set(by_name):
            self.traffic.specs.pop(name, None)

        def order(spec) -> tuple:
            entry = self.entries.get(spec.key, {})
            return (not entry.get("default", True), -int(spec.version) if (spec.version or "").isdigit() else 0)

        for name, group in by_name.items():
            self.traffic.specs[name] = sorted(group, key=order)
        self.names = set(by_name)

    def _drop(self, address: str) -> None:
        self.calls.routes.pop(address, None)
        self.fingerprints.pop(address, None)
        self.calls.forget(address)
        self._index_versions()

    async def ensure_known(self, model: str) -> None:
        """Before routing a request for ``model``: when this replica has no route for it, ask the
        index (rescanning the repositories) once; an index entry that is unavailable raises.

        Raises:
            ModelNotReady: the repository has the model but cannot serve it now (the reason).
        """
        self.start()
        name = model.partition("@")[0]
        if model in self.calls.routes or (name in self.traffic.specs and "@" not in model):
            return
        try:
            await self.refresh(rescan=True)
        except Exception as exc:  # noqa: BLE001 - the caller gets the usual 404
            logger.debug("repository index did not answer: %s", exc)
        entry = self.entries.get(model) or next(
            (e for e in self.entries.values() if e.get("model") == name and e.get("default")), None)
        if entry is not None and entry["state"] != "READY" and model not in self.calls.routes \
                and ("@" in model or name not in self.traffic.specs):
            raise ModelNotReady(unavailable_message(model, entry.get("kind", ""), entry["reason"]))

    def loaded_on(self, name: str) -> list[str]:
        """Replicas that hold ``name`` (as of the index's last snapshot)."""
        return list(self.entries.get(name, {}).get("loaded_on", ()))

    def card_extra(self, name: str) -> dict:
        """What a repository model's card adds: ``repository`` (path, pool, loaded_on, size_bytes, head) of
        ``name`` (an address), or of the default version of the model ``name``."""
        e = self.entries.get(name) or next(
            (e for e in self.entries.values() if e.get("model") == name and e.get("default")), None)
        if e is None:
            return {}
        return {"repository": {"path": e["path"], "pool": e["pool"], "loaded_on": e["loaded_on"],
                               "size_bytes": e["size_bytes"], "head_only": bool((e["spec"] or {}).get("head"))}}

    # ------------------------------------------------------------------ the repository API

    async def index_list(self, ready_only: bool = False) -> list[dict]:
        """The repository index (Open Inference Protocol repository extension / Triton):
        ``[{"name", "version", "state", "reason"}]`` plus ``pool`` and ``loaded_on``."""
        self.start()
        await self.refresh(rescan=True, whole=True)
        out = []
        for address, e in sorted(self.entries.items()):
            if ready_only and e["state"] != "READY":
                continue
            out.append({"name": e.get("model") or address, "version": e.get("version") or "1", "state": e["state"],
                        "reason": e["reason"], "pool": e["pool"], "loaded_on": e["loaded_on"]})
        return out

    async def load(self, name: str) -> dict:
        """Make model ``name`` serve again (undo an unload, retry a failed load; every version of a
        folder of versions) and load it on a pool replica now (each ready version); returns when it
        is loaded: the pool's facts of the default version.

        Raises:
            ModelNotFound: no such folder. ModelNotReady: it cannot be served (the reason).
            WeightsError: its load failed (the reason).
        """
        try:
            entry = await self.index.load.remote(name)
        except Exception as exc:  # noqa: BLE001 - KeyError from the index: no such model
            from maas.errors import unwrap

            if isinstance(unwrap(exc), KeyError):
                raise ModelNotFound(f"no model {name!r} in the repositories; POST /v2/repository/index lists them") from None
            raise
        if entry["state"] != "READY":
            raise ModelNotReady(unavailable_message(name, entry.get("kind", ""), entry["reason"]))
        await self.refresh()
        model = entry.get("model") or entry["name"]
        addresses = [a for a, e in self.entries.items() if (e.get("model") or a) == model and e["state"] == "READY"
                     and a != entry["name"]] + [entry["name"]]  # the default last: its facts are the answer
        timeout = self.pools[entry["pool"]].load_timeout_s + 5
        for address in addresses:
            pool = self.handles[self.entries.get(address, entry)["pool"]].options(multiplexed_model_id=address)
            facts = await self.calls.awaited(pool.load.remote(address), address, timeout)
        return facts

    async def unload(self, name: str) -> dict:
        """Stop serving ``name``: its route goes now; pool replicas drain and evict it.

        Raises:
            ModelNotFound: no such model in the repositories.
        """
        try:
            entry = await self.index.unload.remote(name)
        except Exception as exc:  # noqa: BLE001
            from maas.errors import unwrap

            if isinstance(unwrap(exc), KeyError):
                raise ModelNotFound(f"no model {name!r} in the repositories; POST /v2/repository/index lists them") from None
            raise
        model = entry.get("model") or entry["name"]
        for address in [a for a, e in self.entries.items() if (e.get("model") or a) == model]:
            self._drop(address)
        await self.refresh()
        return entry

    async def replicas(self) -> dict:
        """Pool replica → ``{"pool", "models": {name: bytes}, "bytes", "rss_bytes", "baseline_bytes",
        "budget_bytes", "models_budget_bytes"}`` (the index's live reports)."""
        return await asyncio.wait_for(self.index.held.remote(), INDEX_TIMEOUT_S)
