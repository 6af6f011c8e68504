"""Multi-node scenario, run as its own process by test_cluster.py (it starts its own Ray cluster).

A head node (CPUs only) and a second node advertising one logical GPU, both on this machine.
`serve run` deploys a small maas graph whose models request GPUs and whose gpt2 deployment
autoscales fast. The script then records, as JSON in argv[1]:
placement (which node each replica runs on), answers over HTTP, answers from a submitted Ray
job, the autoscaling timeline under load, rejections under a flood, and scraped metrics.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.conftest import encode, free_port, wait_for  # noqa: E402

RESULT: dict = {}
T0 = time.monotonic()


def config(port: int) -> dict:
    cfg = yaml.safe_load((ROOT / "serve_configs" / "local.yaml").read_text())
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]
    keep = {"minilm", "efficientnet-lite0", "gpt2-tiny-demo"}
    app["args"]["models"] = [m for m in app["args"]["models"] if m["name"] in keep]
    for m in app["args"]["models"]:
        m["resources"] = {"num_cpus": 0.25, "num_gpus": 0.25}
        if m["name"] == "efficientnet-lite0":
            m["dtype"] = "float16"  # half precision on CUDA; here the replica logs that it keeps float32
        if m["name"] == "minilm":  # a tight queue for the handle flood: 1 running + 2 waiting
            m.update(max_ongoing_requests=1, max_queued_requests=2,
                     batching={"max_batch_size": 1, "batch_wait_timeout_s": 0})
    app["deployments"] = [
        {"name": "Ingress", "max_ongoing_requests": 2, "max_queued_requests": 2},  # tight, for the HTTP flood
        {"name": "gpt2-tiny-demo", "autoscaling_config": {
            "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "metrics_interval_s": 0.5,
            "look_back_period_s": 2, "upscale_delay_s": 1, "downscale_delay_s": 3}},
        # A front-batched model scales on the items it holds (maas.autoscaling), not on calls.
        {"name": "efficientnet-lite0", "autoscaling_config": {
            "min_replicas": 1, "max_replicas": 2, "look_back_period_s": 2, "upscale_delay_s": 1,
            "downscale_delay_s": 3,
            "policy": {"policy_function": "maas.autoscaling:QueuedItemsPolicy",
                       "policy_kwargs": {"target_items_per_replica": 2}}}},
    ]
    return cfg


def replicas_running(deployment: str) -> int:
    from ray import serve

    dep = serve.status().applications["maas"].deployments[deployment]
    return dep.replica_states.get("RUNNING", 0)


def phase(name: str) -> None:
    """Record when a phase of the scenario ended (s since start), for a slow run's log."""
    RESULT.setdefault("phase_s", {})[name] = round(time.monotonic() - T0, 1)


def scale_up_and_back(deployment: str, call, callers: int) -> tuple[list, float]:
    """Load ``deployment`` with ``callers`` threads each repeating ``call(handle)`` (a handle call
    through the app) until it runs ≥ 2 replicas, stop, and wait until it is back to 1.

    Returns:
        The ``(s, running replicas)`` timeline and the time it scaled up, s.

    Raises:
        TimeoutError: no scale-up within 150 s, or no scale-down within 180 s after the load.
    """
    from ray import serve

    handle = serve.get_app_handle("maas")
    timeline: list[tuple[float, int]] = []
    started = time.monotonic()
    stop = threading.Event()

    def load():
        while not stop.is_set():
            call(handle).result()

    threads = [threading.Thread(target=load) for _ in range(callers)]
    for t in threads:
        t.start()

    def sample():
        n = replicas_running(deployment)
        timeline.append((round(time.monotonic() - started, 1), n))
        return n

    try:
        wait_for(lambda: sample() >= 2, 150, f"{deployment} scale up", 0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    scaled_up_at_s = timeline[-1][0]
    wait_for(lambda: sample() == 1, 180, f"{deployment} scale down", 0.5)
    return timeline, scaled_up_at_s


def main(out_path: str) -> None:
    os.environ.pop("RAY_ADDRESS", None)  # this scenario starts its own cluster
    # Replicas push their autoscaling metrics every second (Serve's default: 10 s), so the
    # scenario sees scaling on queued items within its time.
    os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "1"
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors, list_nodes

    metrics_ports = [free_port(), free_port()]
    # Own ports for every agent: another Ray cluster on this machine (the test session's) holds
    # the defaults, and a job agent that cannot bind leaves "No available agent to submit job".
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "num_gpus": 0, "include_dashboard": True, "dashboard_port": free_port(),
        "metrics_export_port": metrics_ports[0], "dashboard_agent_listen_port": free_port()})
    gpu_node = cluster.add_node(num_cpus=3, num_gpus=1, metrics_export_port=metrics_ports[1],
                                dashboard_agent_listen_port=free_port())
    # The environment is written before connecting, never after (tests/conftest.py ray_cluster).
    os.environ["RAY_ADDRESS"] = cluster.address
    ctx = ray.init(address=cluster.address, namespace="serve", log_to_driver=False)
    port = free_port()
    cfg_path = Path(tempfile.mkdtemp()) / "scenario.yaml"
    cfg_path.write_text(yaml.safe_dump(config(port)))
    proc = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run", "--address", cluster.address,
                             str(cfg_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: requests.get(f"{url}/readyz", timeout=10).json()["ready"], 300, "scenario app ready", 1)
        phase("cluster and app ready")

        # Placement: GPU-requesting model replicas on the GPU node.
        nodes = {n.node_id: n for n in list_nodes()}
        def read_placement() -> dict:
            # The state API may answer with a partial list when a node is slow to reply (busy
            # 2-core machine, two clusters), so poll until every deployment of the graph is seen.
            placement = {}
            for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000, timeout=30,
                                 raise_on_missing_output=False):
                if a.class_name.startswith("ServeReplica:maas:"):
                    placement[a.class_name.split(":", 2)[2]] = "gpu-node" if a.node_id == gpu_node.node_id else "head"
            return placement if {"Ingress", "minilm", "efficientnet-lite0", "gpt2-tiny-demo"} <= set(placement) else None

        RESULT["placement"] = wait_for(read_placement, 120, "every replica listed by the state API", 2)
        RESULT["nodes"] = len(nodes)
        phase("placement read")

        # Answers over HTTP (torch falls back to CPU on the logical GPU).
        from skimage import data

        chelsea = encode(data.chelsea(), "JPEG", quality=95)
        r = requests.post(f"{url}/v1/classifications/image", data={"model": "efficientnet-lite0", "top_k": "3"},
                          files=[("file", ("c.jpg", chelsea, "image/jpeg"))], timeout=120)
        RESULT["http_image"] = r.json()["data"][0]["top_k"]
        info = serve.get_deployment_handle("efficientnet-lite0", app_name="maas").info.remote().result()
        RESULT["model_device"] = info["device"]

        # The log lines the README promises for a logical GPU without CUDA and for an ignored dtype.
        import glob

        logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")

        def log_lines():
            found = {"cpu_fallback": False, "dtype": False}
            for path in glob.glob(os.path.join(logs, "**", "*"), recursive=True):
                if os.path.isfile(path):
                    text = open(path, "rb").read()
                    found["cpu_fallback"] |= b"but CUDA is not available here; running on CPU" in text
                    found["dtype"] |= b"model efficientnet-lite0: dtype float16 ignored on cpu; using float32" in text
            return found if all(found.values()) else None

        RESULT["log_lines"] = wait_for(log_lines, 60, "CPU-fallback and dtype log lines", 1)
        http_embed = requests.post(f"{url}/v1/embeddings", json={"model": "minilm", "input": ["hello cluster"]},
                                   timeout=60).json()["data"][0]["embedding"]

        # A submitted Ray job calls the app through serve.get_app_handle, from a driver and an actor.
        from ray.job_submission import JobStatus, JobSubmissionClient

        job_script = Path(tempfile.mkdtemp()) / "job.py"
        job_script.write_text(
            "import json, ray\nfrom ray import serve\nray.init(namespace='serve')\n"
            "h = serve.get_app_handle('maas')\n"
            "@ray.remote(num_cpus=0)\nclass A:\n    def __init__(self, h): self.h = h\n"
            "    async def go(self): return await self.h.embed.remote({'model': 'minilm', 'input': ['hello cluster']})\n"
            "direct = h.embed.remote({'model': 'minilm', 'input': ['hello cluster']}).result()\n"
            "via_actor = ray.get(A.remote(h).go.remote())\n"
            "print('JOBRESULT ' + json.dumps([direct['data'][0]['embedding'], via_actor['data'][0]['embedding']]))\n")
        client = JobSubmissionClient(f"http://{ctx.dashboard_url}")
        # The job agent may still be starting on a fresh cluster ("No available agent"): retry.
        job_id = wait_for(lambda: client.submit_job(entrypoint=f"{sys.executable} {job_script}"), 120,
                          "job submitted", 2)
        phase("job submitted")

        # Autoscaling, while the job runs, one model after the other: both at once made a busy
        # machine's run flaky (under a CPU hog the image model's second replica took so long to start
        # that the policy had scaled it back before it ran).
        # gpt2-tiny-demo scales on ongoing requests (6 callers).
        RESULT["autoscale_timeline"], RESULT["scaled_up_at_s"] = scale_up_and_back(
            "gpt2-tiny-demo", lambda h: h.complete.remote({"model": "gpt2-tiny-demo", "prompt": "scale",
                                                           "max_tokens": 64, "temperature": 0}), 6)
        phase("autoscaling on ongoing requests")
        # A front-batched model: requests become few calls with many images each, so the replicas
        # report items (running, queued, the ingress's backlog) and the policy scales on them.
        RESULT["items_autoscale_timeline"], _ = scale_up_and_back(
            "efficientnet-lite0", lambda h: h.classify_images.remote(
                {"model": "efficientnet-lite0", "images": [chelsea] * 4, "top_k": 1}), 8)
        phase("autoscaling on queued items")

        wait_for(lambda: client.get_job_status(job_id) in (JobStatus.SUCCEEDED, JobStatus.FAILED), 180, "job", 1)
        phase("job finished")
        logs = client.get_job_logs(job_id)
        line = next((ln for ln in logs.splitlines() if ln.startswith("JOBRESULT ")), None)
        RESULT["job_status"] = str(client.get_job_status(job_id))
        job = json.loads(line[len("JOBRESULT "):]) if line else None
        RESULT["job_equals_http"] = bool(job) and all(
            max(abs(a - b) for a, b in zip(vec, http_embed)) < 1e-6 for vec in job)
        if not line:
            RESULT["job_logs_tail"] = logs[-2000:]


        # Backpressure over HTTP: the ingress takes 2 ongoing + 2 queued; a flood gets fast 503s from the
        # proxy with Retry-After, and admitted requests succeed.
        def embed(i):
            t0 = time.monotonic()
            r = requests.post(f"{url}/v1/embeddings", timeout=120,
                              json={"model": "minilm", "input": [f"flood {i} " * 200] * 16})
            return r.status_code, time.monotonic() - t0, r.headers.get("retry-after")

        with ThreadPoolExecutor(24) as pool:
            flood = list(pool.map(embed, range(24)))
        RESULT["flood"] = {
            "ok": sum(1 for s, _, _ in flood if s == 200),
            "rejected": sum(1 for s, _, _ in flood if s == 503),
            "other": sorted({s for s, _, _ in flood if s not in (200, 503)}),
            "max_reject_s": max((d for s, d, _ in flood if s == 503), default=None),
            "max_ok_s": max((d for s, d, _ in flood if s == 200), default=None),
            "retry_after": sorted({ra for s, _, ra in flood if s == 503}),
        }
        phase("HTTP flood")

        # Backpressure over handles: minilm takes 1 ongoing + 2 queued per caller; the excess gets
        # BackPressureError at once.
        import numpy as np
        from ray.serve.exceptions import BackPressureError

        from maas.preprocess.text import TokenizedBatch

        batch = TokenizedBatch(np.ones((16, 256), dtype=np.int64), np.ones((16, 256), dtype=np.int64),
                               [256] * 16, 0)
        model = serve.get_deployment_handle("minilm", app_name="maas")
        t0 = time.monotonic()
        responses = [model.remote(batch, {"task": "embeddings"}) for _ in range(12)]
        def outcome(resp):
            try:
                resp.result(timeout_s=120)
                return "ok", -(time.monotonic() - t0)  # negative: an answer's time, told apart below
            except BackPressureError:
                return "backpressure", time.monotonic() - t0

        with ThreadPoolExecutor(12) as pool:
            outcomes = list(pool.map(outcome, responses))
        RESULT["handle_flood"] = {"ok": sum(1 for o, _ in outcomes if o == "ok"),
                                  "backpressure": sum(1 for o, _ in outcomes if o == "backpressure"),
                                  "first_reject_s": min((d for o, d in outcomes if o == "backpressure"), default=None),
                                  "last_ok_s": max((-d for o, d in outcomes if o == "ok"), default=None)}

        # Metrics on the nodes' Prometheus endpoints.
        def scrape():
            text = "".join(requests.get(f"http://127.0.0.1:{p}/metrics", timeout=10).text for p in metrics_ports)
            wanted = ["ray_maas_batch_size_bucket", "ray_maas_stage_latency_ms_bucket", "ray_maas_requests"]
            found = {w: [ln for ln in text.splitlines() if ln.startswith(w)] for w in wanted}
            return found if all(found.values()) and any('stage="queue"' in ln for ln in found[wanted[1]]) else None

        found = wait_for(scrape, 90, "metrics exported", 2)
        phase("metrics scraped")
        RESULT["metrics"] = {k: v[:3] for k, v in found.items()}
        RESULT["metric_stages"] = sorted({ln.split('stage="')[1].split('"')[0]
                                          for ln in found["ray_maas_stage_latency_ms_bucket"]})
        RESULT["metric_models"] = sorted({ln.split('model="')[1].split('"')[0]
                                          for ln in found["ray_maas_batch_size_bucket"]})
    finally:
        Path(out_path).write_text(json.dumps(RESULT, indent=1))
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
