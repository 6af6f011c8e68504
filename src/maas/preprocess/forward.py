"""The preprocessor calls the model: preprocessed arrays go from it to the model replica directly.

DESIGN.md chains a batch's calls, ``model.remote(pre.remote(jobs), ...)``, so that token ids and
pixels go from the preprocessor replica to the model replica "without coming back through the
ingress". Under Serve's gRPC transport between replicas (the high-throughput mode's default, which
this project keeps: see :data:`maas.manifest.THROUGHPUT_ENV`) Serve does not pass a chained
``DeploymentResponse`` on by reference: it awaits it in the caller and sends the value again
(``ray.serve._private.utils.resolve_deployment_response``). The ingress then received every
batch's arrays (150 KB of pixels per 224² image) and sent them out again, and paid two Serve
calls per batch.

So the ingress makes one call per batch, :meth:`Forwarding.forward` on the preprocessor
(``pre.forward.remote(jobs, model, target, params, deadlines, backlog_items)``), and the
preprocessor replica preprocesses and calls the model with the same arguments the ingress used to
send. What the model answers (one result or error per job) comes back through the preprocessor
unchanged. Decision and reason: the message count per batch is the same (ingress → preprocessor
→ model → preprocessor → ingress against ingress → preprocessor → ingress → model → ingress), the
arrays cross one process boundary instead of two, and the call the ingress no longer makes is CPU
taken off the one process every request passes through. ``args.ingress.preprocessor_calls_model:
false`` restores the two calls (kept to measure one against the other).

Cancellation: when the ingress cancels its call (every caller of the batch left), Serve cancels the
``forward`` task on the preprocessor, which cancels the model call it is awaiting. Deadlines travel
in ``deadlines`` as before, so the model replica drops a job past its own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    """Which model deployment a preprocessor's ``forward`` calls.

    Attributes:
        deployment: The model's deployment name (in the preprocessor's own app).
        method: The deployment method (``__call__``; ``heads`` for a pool's head-only models).
        model_id: Serve's multiplexed model id (a repository model on its pool), or None.
    """

    deployment: str
    method: str = "__call__"
    model_id: str | None = None


class Forwarding:
    """Mixin of the preprocessor deployments: :meth:`forward` preprocesses a batch, then calls the model.

    The deployment class provides ``async __call__(jobs, model) -> Preprocessed``.
    """

    _handles: dict | None = None

    def _handle(self, target: Target):
        """The model's deployment handle (one per deployment and method, made on first use; Serve's router
        inside it follows the model's replicas)."""
        if self._handles is None:
            self._handles = {}
        key = (target.deployment, target.method)
        handle = self._handles.get(key)
        if handle is None:
            from ray import serve

            app = serve.get_replica_context().app_name
            handle = serve.get_deployment_handle(target.deployment, app)
            if target.method != "__call__":
                handle = getattr(handle, target.method)
            self._handles[key] = handle
        if target.model_id is not None:
            return handle.options(multiplexed_model_id=target.model_id)
        return handle

    async def forward(self, jobs: list, model: str, target: Target, params: list[dict],
                      deadlines: list[float | None], backlog_items: float | None = None) -> list[Any]:
        """Preprocess a front batch of ``jobs`` (for ``model``, a metrics tag) and run it on ``target``.

        Args:
            jobs: One payload per job (a ``TextJob``, or a request's images).
            params, deadlines: Per job, what the model deployment receives (see
                :meth:`maas.models.base.ModelDeployment.__call__`); deadlines are wall-clock seconds.
            backlog_items: Items queued in the ingress per model replica (the model's autoscaling signal).

        Returns:
            The model's answer: one result dict or :class:`~maas.errors.MaasError` per job (a job that
            failed preprocessing gets its 4xx error through the model, as with a chained call).

        Raises:
            Whatever the model call raises (its replica died, Serve's back-pressure), for the ingress to map.
        """
        pre = await self(jobs, model)
        response = self._handle(target).remote(pre, params, deadlines, backlog_items=backlog_items)
        try:
            return await response
        except asyncio.CancelledError:  # the ingress cancelled (every caller left): stop the model's work too
            response.cancel()
            raise
