"""The `maas` console script against the session's app, as a user runs it (a subprocess)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import BIN, ROOT, free_port

pytestmark = pytest.mark.e2e

MAAS = str(BIN / "maas")


def run(served_app, *args, url=None, stdin=None, timeout=300):
    env = dict(served_app["env"], MAAS_URL=url or served_app["url"])
    return subprocess.run([MAAS, *args], env=env, capture_output=True, text=True, input=stdin, timeout=timeout,
                          cwd=ROOT)


def test_help_imports_neither_torch_nor_ray(served_app):
    out = run(served_app, "--help")
    assert out.returncode == 0 and "Exit codes" in out.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys; from maas import cli; "
                            "print(sorted(m for m in ('torch', 'ray', 'httpx', 'numpy') if m in sys.modules))"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr


def test_models_as_a_table_and_as_json(served_app):
    human = run(served_app, "models")
    assert human.returncode == 0, human.stderr
    header, rule, *rows = human.stdout.splitlines()
    assert header.split()[:4] == ["model", "family", "tasks", "ready"]
    assert any(r.startswith("efficientnet-lite0 ") and " yes " in r for r in rows)
    assert any(r.startswith("resnet50 ") and "DEMO" in r for r in rows)
    machine = json.loads(run(served_app, "--json", "models").stdout)
    assert {m["id"] for m in machine["data"]} >= {"minilm", "efficientnet-lite0", "smollm2-135m"}
    after = json.loads(run(served_app, "models", "--json").stdout)  # --json after the command too
    assert {m["id"] for m in after["data"]} == {m["id"] for m in machine["data"]}


def test_predict_an_image_file_and_texts(served_app, chelsea_jpeg, tmp_path):
    photo = tmp_path / "chelsea.jpg"
    photo.write_bytes(chelsea_jpeg)
    out = run(served_app, "predict", "efficientnet-lite0", str(photo), "--top-k", "3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(str(photo)) and "efficientnet-lite0 v1" in lines[0]
    assert len(lines) == 4 and any(cat in out.stdout for cat in ("tabby", "tiger cat", "Egyptian cat"))
    body = json.loads(run(served_app, "--json", "predict", "efficientnet-lite0", str(photo)).stdout)
    assert len(body["data"][0]["top_k"]) == 5
    text = run(served_app, "predict", "sentiment-tiny-demo", "great film", "awful film")
    assert text.returncode == 0 and text.stdout.count("DEMO WEIGHTS") == 2
    missing = run(served_app, "predict", "efficientnet-lite0", str(tmp_path / "nope.jpg"))
    assert missing.returncode == 2 and "cannot read image file" in missing.stderr


def test_embed_prints_cosines(served_app):
    out = run(served_app, "embed", "minilm", "a fox", "a fox", "stock markets fell")
    assert out.returncode == 0, out.stderr
    assert "3 embedding(s) of 384 dimensions from minilm" in out.stdout
    row0 = next(line for line in out.stdout.splitlines() if line.startswith("[0]"))
    same, other = float(row0.split()[-2]), float(row0.split()[-1])
    assert same == pytest.approx(1.0, abs=1e-3) and other < 0.5


def test_chat_streams_an_answer_from_an_argument_or_stdin(served_app):
    out = run(served_app, "chat", "smollm2-135m", "What is the capital of France?", "--max-tokens", "24",
              "--temperature", "0")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    piped = run(served_app, "--json", "chat", "smollm2-135m", "--max-tokens", "24", "--temperature", "0",
                stdin="What is the capital of France?")
    chunks = [json.loads(line) for line in piped.stdout.splitlines()]
    assert len(chunks) >= 3 and chunks[0]["object"] == "chat.completion.chunk"
    assert "Paris" in "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


def test_status_shows_deployments_and_readiness(served_app):
    import ray

    dashboard = "http://" + ray._private.worker.global_worker.node.address_info["webui_url"]
    out = run(served_app, "status", "--dashboard", dashboard)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.rstrip().endswith("READY")
    lines = out.stdout.splitlines()
    assert any(line.split()[:3] == ["maas", "Ingress", "HEALTHY"] for line in lines), out.stdout
    assert any(line.startswith("efficientnet-lite0 ") and "ready" in line for line in lines)
    body = json.loads(run(served_app, "--json", "status", "--dashboard", dashboard).stdout)
    assert body["ready"] is True and body["serve"]["maas"]["deployments"]["minilm"]["running"] == 2


def test_exit_codes(served_app, tmp_path):
    down = run(served_app, "models", url=f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 2
    assert down.stderr.strip().count("\n") == 0 and "cannot reach maas-serve" in down.stderr
    assert "Traceback" not in down.stderr
    refused = run(served_app, "embed", "no-such-model", "x")
    assert refused.returncode == 1 and "HTTP 404" in refused.stderr and "does not exist" in refused.stderr
    plan = run(served_app, "plan", str(ROOT / "serve_configs" / "local.yaml"), "--gpus", "0",
               "--gpu-memory-gib", "1", "--cpus", "0.5")
    assert plan.returncode == 1 and "DOES NOT FIT" in plan.stdout
    fits = run(served_app, "--json", "plan", str(ROOT / "serve_configs" / "rollout.yaml"), "--gpus", "0",
               "--gpu-memory-gib", "1", "--cpus", "4")
    assert fits.returncode == 0 and json.loads(fits.stdout)["fits"] is True
    bad = tmp_path / "bad.yaml"
    cfg = (ROOT / "serve_configs" / "rollout.yaml").read_text().replace('weights: {"1": 90, "2": 10}',
                                                                         'weights: {"1": 90, "5": 10}')
    bad.write_text(cfg)
    refused_policy = run(served_app, "plan", str(bad), "--gpus", "0", "--gpu-memory-gib", "1", "--cpus", "4")
    assert refused_policy.returncode == 1 and "names version '5'" in refused_policy.stdout
    assert "INVALID:" in refused_policy.stdout and "\nFITS" in refused_policy.stdout
    assert run(served_app, "plan", str(ROOT / "serve_configs" / "rollout.yaml")).returncode == 0  # CPU defaults
    usage = run(served_app, "predict")
    assert usage.returncode == 2 and "Usage" in usage.stderr
