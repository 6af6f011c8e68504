"""The ``RoutingKeys`` deployment: one :class:`~maas.dataplane.traffic.KeyTable` for the whole app.

Present only in apps where some model name has several versions. Every ingress replica asks it
once per (model name, routing key) and then remembers the answer, so a key gets one version
whichever ingress replica serves it and the split holds by key count (see
:mod:`maas.dataplane.traffic`). One replica on purpose (it is the state); its calls are dict
look-ups. Should it restart, the table starts empty: keys are assigned again, balanced, and the
ingress replicas keep the answers they already have until the policy changes.
"""

from __future__ import annotations

from ray import serve

from maas.dataplane.traffic import KeyTable

#: The deployment's name in serve configs.
ROUTING_KEYS_DEPLOYMENT = "RoutingKeys"


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.01}, max_ongoing_requests=1000)
class RoutingKeys:
    """Args: max_keys: routing keys remembered per model name and weights (oldest forgotten first)."""

    def __init__(self, max_keys: int = 200_000):
        self.table = KeyTable(max_keys)

    def assign(self, name: str, key: str, weights: list[tuple[str, float]]) -> str:
        """The version of ``key`` for model ``name`` under ``weights`` ((version, weight), config order)."""
        return self.table.assign(name, key, [tuple(w) for w in weights])
