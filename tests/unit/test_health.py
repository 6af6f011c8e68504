"""check_health probes the model: a stalled forward marks the replica unhealthy (no Ray needed:
the deployment class is driven directly)."""

import asyncio
import threading

import pytest

from maas.models.image_classifier import ImageClassifier


@pytest.fixture(scope="module")
def replica(local_args):
    spec = dict(next(m for m in local_args["models"] if m["name"] == "efficientnet-lite0"))
    spec["health"] = {"stall_timeout_s": 0.5, "probe_timeout_s": 1.0}
    return ImageClassifier.func_or_class(spec)


def test_idle_replica_passes_its_probe(replica):
    asyncio.run(replica.check_health())


def test_stalled_probe_fails_health(replica, monkeypatch):
    release = threading.Event()
    real_run = replica.runner.run

    def stalled(requests):
        release.wait(timeout=30)
        return real_run(requests)

    monkeypatch.setattr(replica.runner, "run", stalled)
    # Unstall shortly after the probe's deadline, so asyncio.run's executor shutdown can finish.
    timer = threading.Timer(1.5, release.set)
    timer.start()
    try:
        with pytest.raises(RuntimeError, match="probe forward took over 1.0 s"):
            asyncio.run(replica.check_health())
    finally:
        release.set()
        timer.cancel()


def test_long_running_batch_fails_health(replica, monkeypatch):
    import time

    monkeypatch.setattr(replica, "_batch_started", time.monotonic() - 5)
    with pytest.raises(RuntimeError, match="a batch has been running for 5 s"):
        asyncio.run(replica.check_health())


def test_user_config_overrides_only_the_fields_it_names(replica):
    replica.reconfigure({"max_batch_size": 16})
    assert replica.batching.max_batch_size == 16
    assert replica.batching.batch_wait_timeout_s == replica.spec.batching.batch_wait_timeout_s
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="max_batch_sise"):
        replica.reconfigure({"max_batch_sise": 4})


def test_busy_replica_is_not_probed(replica, monkeypatch):
    """A batch that just succeeded proves the forward pass; no probe takes compute from traffic."""
    import time

    calls = []
    monkeypatch.setattr(replica.runner, "run", lambda requests: calls.append(requests))
    monkeypatch.setattr(replica, "_last_batch_done", time.monotonic())
    asyncio.run(replica.check_health())
    assert calls == []
    monkeypatch.setattr(replica, "_last_batch_done", time.monotonic() - 60)
    asyncio.run(replica.check_health())
    assert len(calls) == 1


def test_a_replica_warms_up_before_it_reports_ready_and_says_how_long_a_forward_took(replica):
    info = replica.info()
    assert info["warmup_ms"] > 0 and info["start_s"] >= info["load_s"] > 0
    replica.reconfigure({"max_batch_size": 3})  # a serve config's user_config override
    assert replica.info()["batching"]["max_batch_size"] == 3  # what it runs with, for the ingress to follow
