"""Autoscaling on queued items, through Serve's own autoscaler.

With front batching a model replica holds few calls (one or two front batches) but many items,
and the backlog waits in the ingress's queue, so Serve's default signal (ongoing requests per
replica) stays near 1 whatever the load. Each model replica reports, through Serve's custom
autoscaling metrics hook (``record_autoscaling_stats``):

* ``running_items``: items in the forward now;
* ``queued_items``: items waiting in the replica's own queue;
* ``backlog_items``: the ingress's queue for this model at the last call, divided by the running
  replicas (each front batch carries it; it reads 0 once no call came for ``BACKLOG_TTL_S``).

:class:`QueuedItemsPolicy` turns their sum into a replica count. Serve still applies
``min_replicas``, ``max_replicas``, the up/down-scaling delays and factors of the deployment's
``autoscaling_config``. Use it from a serve config::

    deployments:
      - name: minilm
        autoscaling_config:
          min_replicas: 1
          max_replicas: 4
          policy:
            policy_function: maas.autoscaling:QueuedItemsPolicy
            policy_kwargs: {target_items_per_replica: 64}
"""

from __future__ import annotations

import math
from typing import Any

#: A backlog report older than this many seconds counts as 0 (no calls: no backlog).
BACKLOG_TTL_S = 2.0

METRICS = ("running_items", "queued_items", "backlog_items")


class QueuedItemsPolicy:
    """Replicas = ceil(items in the model / ``target_items_per_replica``).

    Args:
        target_items_per_replica: Items (texts, images) one replica should hold, running and
            waiting together; about two of its batches (``2 × max_batch_size``) keeps each
            replica's forward busy without letting requests wait long.
    """

    def __init__(self, target_items_per_replica: float = 64.0):
        if target_items_per_replica <= 0:
            raise ValueError(f"target_items_per_replica must be above 0, got {target_items_per_replica!r}")
        self.target = float(target_items_per_replica)

    def items(self, ctx: Any) -> float:
        """Items in the model now: the per-replica averages Serve aggregated, summed."""
        metrics = ctx.aggregated_metrics or {}
        return sum(sum(metrics.get(name, {}).values()) for name in METRICS)

    def __call__(self, ctx: Any) -> tuple[float, dict]:
        """Serve's policy call: the desired replica count (bounds and delays are Serve's)."""
        if not ctx.current_num_replicas:
            return ctx.target_num_replicas, {}
        return max(1, math.ceil(self.items(ctx) / self.target)), {}
