"""Model repositories: folders of models found at run time, and the app's one index of them.

A repository (:class:`~maas.config.RepositorySpec`) is a directory whose folders are models::

    /models/                      ← repositories: [{path: /models}]
      sentiment-support/          ← the model's name (a model name: [a-z0-9][a-z0-9._-]*)
        maas-model.yaml           ← FolderSpec: family, base, tasks (and head/labels for head-only models)
        config.json               ← a full checkpoint in Hugging Face layout …
        model.safetensors
      topic-router/
        maas-model.yaml           ← … or a head-only model: `head: head.safetensors`, `labels: [...]`
        head.safetensors
      pets/                       ← an image classifier (its pool builds the architecture) in versions:
        maas-model.yaml           ←   family: image-classifier, weights: model.safetensors, labels: [...]
        1/model.safetensors       ←   pets@1
        2/model.safetensors       ←   pets@2; `pets` alone answers with the highest (or default_version)

Adding a model is copying its folder in (copy to a dot-folder, then ``mv``: folders whose name
starts with ``.`` are skipped, so a half-copied model is never read; a model read half-copied
fails its load and is retried when its files change). Removing the folder drains the model
(requests in flight finish) and unloads it everywhere.

:class:`RepositoryState` is the ray-free logic: scanning, each model's state (``READY`` or
``UNAVAILABLE`` with a reason, the states of Triton's repository index), the explicit
load/unload of the repository API, load failures and which replica holds which model.
:class:`RepositoryIndex` is the one Serve deployment that owns it per app (one replica): the
ingress replicas and the pool replicas read it, so every one of them sees the same models and the
same unloads. Decided so because an unload must reach every pool replica and a repository API call
lands on one ingress replica; a per-process scan would make them disagree.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from maas.config import FolderSpec, PoolSpec, RepositorySpec

logger = logging.getLogger("ray.serve.maas.repository")

#: The spec file every repository model's folder holds.
SPEC_FILE = "maas-model.yaml"
#: Folder names that are models (the model name rule of :class:`~maas.config.ModelSpec`).
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
#: Weight files counted in a model's size estimate (its bytes before it is loaded).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: A replica's report is dropped when it is older than this, seconds (the replica died or left).
REPORT_TTL_S = 30.0
#: A rescan asked for by a request for an unknown model runs at most this often, seconds.
RESCAN_MIN_INTERVAL_S = 0.5

READY, UNAVAILABLE = "READY", "UNAVAILABLE"
#: Kinds of unavailability (``Entry.kind``): fixed words a client may be shown.
KINDS = ("invalid", "no pool", "over budget", "name taken", "unloaded", "load failed")


def unavailable_message(name: str, kind: str, reason: str) -> str:
    """A 503's message for a repository model that cannot serve: the kind of reason, and where the
    reason is (it names the server's files, which a 5xx body does not show: the repository index,
    behind the API keys, gives it to operators). An unload is told as it is."""
    if kind == "unloaded":
        return f"repository model {name!r} is unavailable: {reason}"
    return (f"repository model {name!r} cannot be served now ({kind or 'unavailable'}); POST /v2/repository/index "
            "gives the reason")


@dataclass
class Entry:
    """One repository model as the index knows it.

    Attributes:
        name: The model's address: the folder's name, ``<folder>@<version>`` for a version of a
            folder of versions. model: The model's name (the folder's). version: The version
            (a version subfolder's name), None for a folder without versions. default: Whether
            ``model`` alone answers with this entry. repository: The repository directory.
        path: The model's folder (the version's subfolder). spec: Its ``maas-model.yaml`` as a dict (None when unreadable).
        pool: The pool that serves it (None when none fits). size_bytes: Its weight files' bytes
            (the load-time estimate checked against the pool's budget). fingerprint: Changes when
            any of its files change (names, sizes, mtimes).
        state: ``READY`` or ``UNAVAILABLE``. reason: Why it is unavailable ('' when ready; may name
            the server's files: for operators, through the repository API). kind: The reason's kind
            (:data:`KINDS`), which a 5xx body may show.
        loaded_on: Replica ids that hold it now (from the pools' reports).
    """

    name: str
    repository: str
    path: str
    spec: dict | None
    pool: str | None
    size_bytes: int
    fingerprint: str
    state: str = READY
    reason: str = ""
    kind: str = ""  # why it is unavailable, as a fixed word (KINDS): what a client may be told
    loaded_on: list[str] = field(default_factory=list)
    model: str = ""
    version: str | None = None
    default: bool = True

    def public(self) -> dict:
        return asdict(self)


def fingerprint(folder: Path) -> tuple[str, int]:
    """``(fingerprint, weight bytes)`` of a model folder: the fingerprint covers every file's name,
    size and mtime (ns) one level deep and in subfolders; weight bytes sum the files whose suffix is
    in :data:`WEIGHT_SUFFIXES`."""
    parts: list[str] = []
    weights = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            try:
                st = os.stat(os.path.join(root, f))
            except OSError:
                continue
            parts.append(f"{os.path.relpath(os.path.join(root, f), folder)}:{st.st_size}:{st.st_mtime_ns}")
            if f.endswith(WEIGHT_SUFFIXES):
                weights += st.st_size
    import hashlib

    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16], weights


def _problem(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(((".".join(map(str, e["loc"])) + ": ") if e["loc"] else "")
                         + e["msg"].removeprefix("Value error, ") for e in exc.errors(include_url=False))
    return str(exc).splitlines()[0]


def version_folders(folder: Path) -> list[Path]:
    """A folder's version subfolders (names of digits, Triton's layout), in numeric order."""
    try:
        return sorted((d for d in folder.iterdir() if d.is_dir() and d.name.isdigit() and len(d.name) <= 9),
                      key=lambda d: int(d.name))
    except OSError:
        return []


def read_folder(repository: str, folder: Path, pools: list[PoolSpec], model: str | None = None,
                version: str | None = None, parent_spec: Path | None = None) -> Entry:
    """One model folder as an :class:`Entry` (``UNAVAILABLE`` with the reason when its spec is
    missing or invalid, no pool serves its kind, or it is larger than its pool's budget).

    ``model``/``version``: a version subfolder of the folder of versions ``model``; its spec is its
    own ``maas-model.yaml``, else ``parent_spec`` (the folder's), whose changes count in its
    fingerprint."""
    fp, size = fingerprint(folder)
    name = folder.name if version is None else f"{model}@{version}"
    spec_path = folder / SPEC_FILE
    if version is not None and not spec_path.is_file() and parent_spec is not None:
        spec_path = parent_spec
        try:
            st = spec_path.stat()
            fp = fp + f"{st.st_size:x}{st.st_mtime_ns:x}"[-8:]
        except OSError:
            pass
    entry = Entry(name=name, repository=repository, path=str(folder), spec=None, pool=None,
                  size_bytes=size, fingerprint=fp, model=model or folder.name, version=version)
    try:
        raw = yaml.safe_load(spec_path.read_text()) or {}
        spec = FolderSpec.model_validate(raw)
    except FileNotFoundError:
        entry.state, entry.kind, entry.reason = UNAVAILABLE, "invalid", f"no {SPEC_FILE} in {folder}; add one (family, base, tasks)"
        return entry
    except (yaml.YAMLError, ValidationError, OSError) as exc:
        entry.state, entry.kind, entry.reason = UNAVAILABLE, "invalid", f"{SPEC_FILE} is invalid: {_problem(exc)}"
        return entry
    entry.spec = spec.model_dump(mode="json")
    pool = next((p for p in pools if (p.family, p.base) == (spec.family, spec.base)), None)
    if pool is None:
        kinds = [f"{p.family}/{p.base}" for p in pools]
        entry.state, entry.kind, entry.reason = UNAVAILABLE, "no pool", (
            f"no pool serves {spec.family} models of base {spec.base!r} (pools: {kinds}); add a pool with "
            f"family: {spec.family}, base: {spec.base} to the app config")
        return entry
    entry.pool = pool.name
    if spec.head is not None:
        if pool.base_weights is None:
            entry.state, entry.kind, entry.reason = UNAVAILABLE, "no pool", (
                f"head-only model, but pool {pool.name!r} has no base_weights to run its head on; set the pool's "
                "base_weights or ship a full checkpoint")
            return entry
        head = folder / spec.head
        if not head.is_file():
            entry.state, entry.kind, entry.reason = UNAVAILABLE, "invalid", f"head file {spec.head!r} is not in {folder}"
            return entry
        entry.size_bytes = head.stat().st_size
    elif spec.weights is not None:
        weights = folder / spec.weights
        if not weights.is_file():
            entry.state, entry.kind, entry.reason = UNAVAILABLE, "invalid", f"weights file {spec.weights!r} is not in {folder}"
            return entry
        entry.size_bytes = weights.stat().st_size
    elif size == 0 or not (folder / "config.json").is_file():
        entry.state, entry.kind, entry.reason = UNAVAILABLE, "invalid", (
            f"no weights or config.json in {folder} (config.json and model.safetensors, Hugging Face layout)")
        return entry
    if entry.size_bytes > pool.memory_budget_bytes:
        entry.state, entry.kind, entry.reason = UNAVAILABLE, "over budget", (
            f"its weights take {entry.size_bytes} bytes, more than pool {pool.name!r}'s memory budget of "
            f"{pool.memory_budget_bytes} bytes; raise memory_budget_bytes or serve it as its own model")
    return entry


def read_model(repository: str, folder: Path, pools: list[PoolSpec]) -> tuple[list[Entry], str | None]:
    """A model folder's entries — one, or one per version subfolder (see
    :class:`~maas.config.FolderSpec`) — and the folder spec's ``default_version`` (None when unset)."""
    versions = version_folders(folder)
    if not versions:
        return [read_folder(repository, folder, pools)], None
    parent = folder / SPEC_FILE
    default = None
    try:
        raw = yaml.safe_load(parent.read_text()) or {}
        default = str(raw.get("default_version")) if isinstance(raw, dict) and raw.get("default_version") is not None else None
    except (OSError, yaml.YAMLError):
        pass
    return [read_folder(repository, v, pools, model=folder.name, version=v.name, parent_spec=parent)
            for v in versions], default


def mark_defaults(entries: dict[str, Entry], spec_of) -> None:
    """Set ``Entry.default``: a folder without versions is its own default; of a folder of versions,
    the ready version its spec names (``default_version``), else its highest ready version."""
    by_model: dict[str, list[Entry]] = {}
    for e in entries.values():
        by_model.setdefault(e.model or e.name, []).append(e)
    for model, group in by_model.items():
        if len(group) == 1 and group[0].version is None:
            group[0].default = True
            continue
        ready = [e for e in group if e.state == READY]
        wanted = spec_of(model)
        chosen = next((e for e in ready if e.version == wanted), None) if wanted else None
        if chosen is None and ready:
            chosen = max(ready, key=lambda e: int(e.version or 0))
        for e in group:
            e.default = e is chosen


class RepositoryState:
    """The index of every repository's models, ray-free (see the module docstring).

    Args:
        repositories: The app's repositories. pools: The app's pools.
        taken: Names of the app's own models (a repository model may not take one).
        clock: Monotonic seconds (tests pass a fake one).
    """

    def __init__(self, repositories: list[RepositorySpec], pools: list[PoolSpec], taken: set[str] | None = None,
                 clock=time.monotonic):
        self.repositories, self.pools, self.taken, self.clock = repositories, pools, set(taken or ()), clock
        self.entries: dict[str, Entry] = {}
        self.version = 0
        self.unloaded: set[str] = set()  # names unloaded through the repository API (until a load)
        self.failed: dict[str, tuple[str, str]] = {}  # name → (fingerprint, reason) of a failed load
        self.reports: dict[str, tuple[str, dict[str, int], float]] = {}  # replica → (pool, {name: bytes}, time)
        self.facts: dict[str, dict] = {}  # replica → its memory facts (rss_bytes, baseline_bytes, budgets)
        self.scanned_at = -1e9
        self.skipped: set[str] = set()  # folder names that are not model names (warned once each)
        self.default_versions: dict[str, str] = {}  # folder of versions → its spec's default_version
        import uuid

        self.epoch = uuid.uuid4().hex[:12]  # versions count from 0 again in a new index replica

    def scan(self) -> bool:
        """Read every repository now. Returns whether anything a reader sees changed."""
        found: dict[str, Entry] = {}
        defaults: dict[str, str] = {}
        for repo in self.repositories:
            root = Path(repo.path)
            try:
                folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError as exc:
                logger.warning("repository %s cannot be read: %s", root, exc)
                continue
            for folder in folders:
                if not NAME_RE.match(folder.name):
                    if folder.name not in self.skipped:  # not a model name (upper case, spaces …): said once
                        self.skipped.add(folder.name)
                        logger.warning("repository %s: folder %r skipped: a model's folder name is its model name "
                                       "([a-z0-9][a-z0-9._-]*, at most 63 characters)", root, folder.name)
                    continue
                taken = folder.name in self.taken or any(e.model == folder.name for e in found.values())
                entries, default = read_model(repo.path, folder, self.pools)
                if default is not None and not taken:
                    defaults[folder.name] = default
                for entry in entries:
                    if taken:
                        first = next((e.path for e in found.values() if e.model == folder.name), None)
                        if first is not None:
                            continue  # the first repository's folder of the name keeps it
                        entry.state, entry.kind, entry.reason = UNAVAILABLE, "name taken", (
                            f"the name {folder.name!r} is taken by a model of the app config; rename the folder")
                        entry.pool = None
                    found[entry.name] = entry
        self.scanned_at = self.clock()
        for name in list(self.failed):
            if name not in found or found[name].fingerprint != self.failed[name][0]:
                del self.failed[name]  # changed or gone: a new model, loads again
        self.unloaded &= {e.model for e in found.values()}
        self.default_versions = defaults
        return self._set(found)

    def _apply_marks(self, entries: dict[str, Entry]) -> None:
        for name, e in entries.items():
            if e.state != READY:
                continue
            if e.model in self.unloaded:
                e.state, e.kind, e.reason = UNAVAILABLE, "unloaded", "unloaded through the repository API; POST …/load to serve it again"
            elif name in self.failed:
                e.state, e.kind, e.reason = UNAVAILABLE, "load failed", f"its load failed: {self.failed[name][1]}"

    def _set(self, found: dict[str, Entry]) -> bool:
        before = {n: (e.fingerprint, e.state, e.reason, e.pool, e.default) for n, e in self.entries.items()}
        for e in found.values():
            if e.state == READY:
                e.reason, e.kind = "", ""
        self._apply_marks(found)
        mark_defaults(found, self.default_versions.get)
        self._place(found)
        changed = {n: (e.fingerprint, e.state, e.reason, e.pool, e.default) for n, e in found.items()} != before
        self.entries = found
        if changed:
            self.version += 1
        return changed

    def _place(self, entries: dict[str, Entry]) -> None:
        now = self.clock()
        self.reports = {r: rep for r, rep in self.reports.items() if now - rep[2] < REPORT_TTL_S}
        self.facts = {r: f for r, f in self.facts.items() if r in self.reports}
        for e in entries.values():
            e.loaded_on = sorted(r for r, (_, held, _) in self.reports.items() if e.name in held)

    def snapshot(self) -> dict:
        """``{"version", "epoch", "models": {name: Entry.public()}}``."""
        self._place(self.entries)
        return {"version": self.version, "epoch": self.epoch,
                "models": {n: e.public() for n, e in self.entries.items()}}

    def model_entries(self, name: str) -> list[Entry]:
        """The entries of model ``name`` (every version of a folder of versions), or of the address
        ``name@v``; empty when there are none."""
        if name in self.entries:
            return [self.entries[name]]
        return [e for e in self.entries.values() if e.model == name]

    def _entry_of(self, name: str) -> Entry:
        found = self.model_entries(name)
        if not found:
            raise KeyError(name)
        return next((e for e in found if e.default), found[0])

    def load(self, name: str) -> Entry:
        """The repository API's load: rescan, forget an unload or a failure of model ``name`` (every
        version of it). Returns its entry (of a folder of versions: the default version's).

        Raises:
            KeyError: no folder of that name in any repository.
        """
        model = name.partition("@")[0]
        self.unloaded.discard(model)
        for addr in [n for n, e in self.entries.items() if e.model == model]:
            self.failed.pop(addr, None)
        self.scan()
        self.version += 1  # a reader must refresh even when the entry looks the same
        return self._entry_of(name)

    def unload(self, name: str) -> Entry:
        """The repository API's unload: model ``name`` (every version of it, as Triton unloads a
        model) stops taking requests at once; pool replicas drain and evict it at their next look at
        the index.

        Raises:
            KeyError: no such model.
        """
        entry = self._entry_of(name)
        self.unloaded.add(entry.model)
        self._set(dict(self.entries))
        return entry

    def report(self, replica: str, pool: str, loaded: dict[str, int], failed: dict[str, tuple[str, str]],
               facts: dict | None = None) -> None:
        """A pool replica's report: the models it holds (name → bytes), the loads that failed
        (name → (fingerprint, reason); a failure marks the model, not the replica) and its memory
        ``facts`` (``rss_bytes``, ``baseline_bytes``, ``budget_bytes``, ``models_budget_bytes``)."""
        self.reports[replica] = (pool, dict(loaded), self.clock())
        self.facts[replica] = dict(facts or {})
        marked = False
        for name, (fp, reason) in failed.items():
            e = self.entries.get(name)
            if e is not None and e.fingerprint == fp and self.failed.get(name) != (fp, reason):
                self.failed[name] = (fp, reason)
                marked = True
        if marked:
            self._set(dict(self.entries))

    def held(self) -> dict[str, dict]:
        """Replica → ``{"pool", "models": {name: bytes}, "bytes", **facts}`` from the live reports."""
        now = self.clock()
        return {r: {"pool": p, "models": held, "bytes": sum(held.values()), **self.facts.get(r, {})}
                for r, (p, held, at) in self.reports.items() if now - at < REPORT_TTL_S}


def _make_index_deployment():
    from ray import serve

    @serve.deployment(name="RepositoryIndex", num_replicas=1, ray_actor_options={"num_cpus": 0.05},
                      max_ongoing_requests=1000)
    class RepositoryIndex:
        """The app's one index of repository models (see the module docstring): scans every
        repository every ``poll_interval_s`` and on demand; answers the ingress and the pools.

        Args:
            repositories: ``RepositorySpec`` dicts. pools: ``PoolSpec`` dicts. taken: the app's model names.
        """

        def __init__(self, repositories: list[dict], pools: list[dict], taken: list[str]):
            self.state = RepositoryState([RepositorySpec.model_validate(r) for r in repositories],
                                         [PoolSpec.model_validate(p) for p in pools], set(taken))
            self.state.scan()
            self.poll_s = min(r.poll_interval_s for r in self.state.repositories)
            self._poller: asyncio.Task | None = None
            self._rescan: asyncio.Future | None = None
            self._scan_lock: asyncio.Lock | None = None

        def _lock(self) -> asyncio.Lock:
            if self._scan_lock is None:
                self._scan_lock = asyncio.Lock()
            return self._scan_lock

        async def _scan(self, fn=None, *args):
            """``fn(*args)`` (default: a scan) on a thread under the state's lock: the event loop stays free
            while the disk is read, and no read or change of the state (snapshots, reports, unloads, which
            run on the loop under the same lock) sees a scan half done."""
            async with self._lock():
                return await asyncio.to_thread(fn or self.state.scan, *args)
            logger.info("repository index: %d models in %d repositories", len(self.state.entries),
                        len(self.state.repositories))

        def _ensure_poller(self) -> None:
            if self._poller is None or self._poller.done():
                self._poller = asyncio.get_running_loop().create_task(self._poll())

        async def _poll(self) -> None:
            while True:
                await asyncio.sleep(self.poll_s)
                try:
                    await self._scan()
                except Exception:  # noqa: BLE001 - one failed scan must not stop the poll
                    logger.exception("repository scan failed")

        async def snapshot(self, known_version: int = -1, rescan: bool = False, epoch: str | None = None) -> dict:
            """``{"version", "epoch"}`` when ``known_version`` of this ``epoch`` is current, else the whole
            snapshot (:meth:`RepositoryState.snapshot`).
            ``rescan``: scan first (at most every :data:`RESCAN_MIN_INTERVAL_S`; a request named
            a model this reader does not know)."""
            self._ensure_poller()
            if rescan:
                await self.rescan()
            async with self._lock():
                if known_version == self.state.version and epoch == self.state.epoch:
                    return {"version": self.state.version, "epoch": self.state.epoch}
                return self.state.snapshot()

        async def rescan(self) -> None:
            """A scan that starts after this call arrived: concurrent askers share one, and scans run
            at most every :data:`RESCAN_MIN_INTERVAL_S` (a flood of requests for unknown names
            cannot turn into a flood of directory walks)."""
            fut = self._rescan
            if fut is None or fut.done():
                async def run():
                    wait = RESCAN_MIN_INTERVAL_S - (time.monotonic() - self.state.scanned_at)
                    if wait > 0:
                        await asyncio.sleep(wait)
                    self._rescan = None  # askers arriving from now on need the next scan
                    await self._scan()

                fut = self._rescan = asyncio.ensure_future(run())
            await asyncio.shield(fut)

        async def load(self, name: str) -> dict:
            self._ensure_poller()
            return (await self._scan(self.state.load, name)).public()

        async def unload(self, name: str) -> dict:
            async with self._lock():
                return self.state.unload(name).public()

        async def report(self, replica: str, pool: str, loaded: dict, failed: dict, facts: dict | None = None) -> int:
            self._ensure_poller()
            async with self._lock():
                self.state.report(replica, pool, loaded, {k: tuple(v) for k, v in failed.items()}, facts)
                return self.state.version

        async def held(self) -> dict:
            async with self._lock():
                return self.state.held()

    return RepositoryIndex


def index_deployment():
    """The :class:`RepositoryIndex` Serve deployment (made on first use, so importing this module
    needs no Ray)."""
    global _INDEX
    if _INDEX is None:
        _INDEX = _make_index_deployment()
    return _INDEX


_INDEX = None
INDEX_DEPLOYMENT = "RepositoryIndex"

__all__ = ["RepositoryState", "Entry", "read_folder", "fingerprint", "index_deployment", "INDEX_DEPLOYMENT",
           "SPEC_FILE", "READY", "UNAVAILABLE", "KINDS", "unavailable_message"]
