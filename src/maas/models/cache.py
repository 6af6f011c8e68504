"""A byte budget with least-recently-used eviction, for the models a pool replica holds.

Ray Serve's ``@serve.multiplexed`` bounds a replica by a model *count*; models of one pool differ in
size (a 90 MB checkpoint, a 3 KB head), so :class:`ModelCache` bounds the *bytes* instead. Ray-free
and torch-free: :mod:`maas.models.pool` owns one per replica and unit tests drive it directly.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable


class ModelCache:
    """Models by name with their bytes, under ``budget_bytes``; least recently used first out.

    A model that is in use (``in_use(name)`` true: requests queued or running on it) is never
    evicted, so a request is never lost to an eviction; when only busy models could make room,
    :meth:`victims` returns None and the caller waits for one to finish.

    Args:
        budget_bytes: The most bytes held at once (parameters and buffers of every model).
        in_use: ``in_use(name)`` → whether requests for ``name`` are queued or running.
    """

    def __init__(self, budget_bytes: int, in_use: Callable[[str], bool] = lambda name: False):
        self.budget_bytes, self.in_use = int(budget_bytes), in_use
        self._models: OrderedDict[str, tuple[Any, int]] = OrderedDict()

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def __len__(self) -> int:
        return len(self._models)

    @property
    def bytes(self) -> int:
        """Bytes held now."""
        return sum(n for _, n in self._models.values())

    def held(self) -> dict[str, int]:
        """Name → bytes, least recently used first."""
        return {k: n for k, (_, n) in self._models.items()}

    def get(self, name: str) -> Any:
        """The model, marked most recently used. Raises KeyError: not held."""
        self._models.move_to_end(name)
        return self._models[name][0]

    def victims(self, nbytes: int) -> list[str] | None:
        """Least recently used idle models whose eviction makes room for ``nbytes`` more: ``[]``
        when it fits already, None when evicting every idle model would not be enough now.

        Raises:
            ValueError: ``nbytes`` is over the whole budget (it can never fit).
        """
        if nbytes > self.budget_bytes:
            raise ValueError(f"{nbytes} bytes is over the budget of {self.budget_bytes} bytes")
        free = self.budget_bytes - self.bytes
        out: list[str] = []
        for name, (_, n) in self._models.items():
            if free >= nbytes:
                break
            if self.in_use(name):
                continue
            out.append(name)
            free += n
        return out if free >= nbytes else None

    def add(self, name: str, model: Any, nbytes: int) -> None:
        """Hold ``model`` (most recently used). The caller made room first (:meth:`victims`).

        Raises:
            ValueError: it would take the cache over its budget.
        """
        if self.bytes + nbytes - self._models.get(name, (None, 0))[1] > self.budget_bytes:
            raise ValueError(f"holding {name!r} ({nbytes} bytes) would exceed the budget of {self.budget_bytes} "
                             f"bytes ({self.bytes} held)")
        self._models[name] = (model, int(nbytes))
        self._models.move_to_end(name)

    def pop(self, name: str) -> Any:
        """Stop holding ``name``; its model (None when not held)."""
        entry = self._models.pop(name, None)
        return None if entry is None else entry[0]
