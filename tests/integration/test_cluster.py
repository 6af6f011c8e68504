"""The graph on a local two-node cluster (one node with a logical GPU), as a GPU cluster would
run it: placement, answers, a submitted Ray job, autoscaling, backpressure and metrics. The
scenario runs in its own process with its own cluster (see cluster_scenario.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import haproxy_ports_env
from tests.unit.test_models import CAT_CLASSES

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("scenario") / "result.json"
    script = Path(__file__).with_name("cluster_scenario.py")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # not the session's cluster
    env.update(haproxy_ports_env())  # its own HAProxy listeners beside the session cluster's
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=900,
                          env=env)
    result = json.loads(out.read_text()) if out.exists() else {}
    print("\nscenario:", json.dumps(result, indent=1)[:4000])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return result


def test_gpu_replicas_on_the_gpu_node(scenario):
    placement = scenario["placement"]
    assert scenario["nodes"] == 2
    for model in ("minilm", "efficientnet-lite0", "gpt2-tiny-demo"):
        assert placement[model] == "gpu-node"
    assert scenario["model_device"] == "cpu"  # logical GPU, no CUDA: clean CPU fallback
    assert scenario["log_lines"] == {"cpu_fallback": True, "dtype": True}  # each said once in the logs


def test_answers_over_http_and_from_a_job(scenario):
    assert CAT_CLASSES & {c["index"] for c in scenario["http_image"]}
    assert "SUCCEEDED" in scenario["job_status"]
    assert scenario["job_equals_http"] is True


def test_autoscaling_up_and_back(scenario):
    counts = [n for _, n in scenario["autoscale_timeline"]]
    assert max(counts) >= 2 and counts[-1] == 1


def test_front_batched_model_scales_on_queued_items(scenario):
    counts = [n for _, n in scenario["items_autoscale_timeline"]]
    assert counts[0] == 1 and max(counts) >= 2 and counts[-1] == 1


def test_flood_is_rejected_fast(scenario):
    flood = scenario["flood"]
    assert flood["ok"] >= 3 and flood["rejected"] >= 1 and flood["other"] == []
    assert flood["retry_after"] == ["1"]
    # Rejected at once, not after waiting in a queue: faster than the slowest admitted request, which
    # waited its turn (an absolute bound failed with a CPU hog on one core: 2.98 s against 1 s).
    assert flood["max_reject_s"] < flood["max_ok_s"], flood
    handles = scenario["handle_flood"]
    assert handles["ok"] >= 1 and handles["backpressure"] >= 1
    assert handles["first_reject_s"] < handles["last_ok_s"], handles


def test_metrics_scraped_with_labels(scenario):
    assert {"queue", "forward", "postprocess", "preprocess"} <= set(scenario["metric_stages"])
    assert {"minilm", "gpt2-tiny-demo"} <= set(scenario["metric_models"])
    assert any('status="200"' in ln for ln in scenario["metrics"]["ray_maas_requests"])
