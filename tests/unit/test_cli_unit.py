"""The ``maas`` command line without a server or Ray: parsing, shared options, ``python -m maas``."""

import json
import subprocess
import sys
from typing import ClassVar

import pytest
from click.testing import CliRunner

from maas import cli
from tests.conftest import BIN, ROOT, free_port

PY = sys.executable
MAAS = str(BIN / "maas")


def invoke(*args, env=None):
    """Run the click program in this process (standard error apart from standard output)."""
    return CliRunner().invoke(cli.main, list(args), env=env)


def run(*argv, timeout=120):
    """Run a command line as a user does (a subprocess in the repository root)."""
    return subprocess.run(list(argv), check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def commands_listed(help_text: str) -> list[str]:
    """The command names of a click group's --help."""
    lines = help_text.split("Commands:\n", 1)[1].splitlines()
    names = []
    for line in lines:
        if not line.startswith("  ") or line.startswith("   "):
            if names:
                break
            continue
        names.append(line.split()[0])
    return names


@pytest.mark.parametrize("args", [
    ["models", "--json"],
    ["predict", "some-model", "a text", "--json"],
    ["embed", "some-model", "a text", "--json"],
    ["status", "--json"],
    ["chat", "some-model", "hello", "--json"],
])
def test_shared_options_after_the_command_parse(args):
    url = f"http://127.0.0.1:{free_port()}"
    result = invoke(*args, "--url", url, "--api-key", "k")
    # exit 2 is both "cannot reach" and a usage error: the message tells which
    assert result.exit_code == 2, result.output
    assert "cannot reach maas-serve at " + url in result.stderr
    assert "Usage" not in result.output


class FakeClient(cli.Client):
    """Records where it was asked and answers /v1/models."""

    calls: ClassVar[list] = []

    def json(self, method, path, **kwargs):
        FakeClient.calls.append((self.url, self.headers.get("Authorization"), method, path))
        return {"object": "list", "data": [{"id": "m", "family": "f", "tasks": ["embeddings"], "ready": True,
                                            "demo_weights": False, "weights": "w"}]}


@pytest.fixture()
def fake_client(monkeypatch):
    FakeClient.calls = []
    monkeypatch.setattr(cli, "Client", FakeClient)
    return FakeClient.calls


def test_a_subcommand_value_wins_over_the_groups(fake_client):
    result = invoke("--url", "http://group:1", "--api-key", "g", "models", "--url", "http://sub:2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["data"][0]["id"] == "m"
    assert fake_client == [("http://sub:2", "Bearer g", "GET", "/v1/models")]
    fake_client.clear()
    result = invoke("models", "--api-key", "s", env={"MAAS_URL": "http://env:3", "MAAS_API_KEY": "e"})
    assert result.exit_code == 0 and result.stdout.splitlines()[0].split()[:2] == ["model", "family"]
    assert fake_client == [("http://env:3", "Bearer s", "GET", "/v1/models")]


def test_group_level_options_still_work(fake_client):
    result = invoke("--json", "--url", "http://group:1", "models", env={"MAAS_API_KEY": None})
    assert result.exit_code == 0 and json.loads(result.stdout)["object"] == "list"
    assert fake_client == [("http://group:1", None, "GET", "/v1/models")]


def test_usage_errors_exit_2():
    for args in (["predict"], ["models", "--no-such-option"], ["no-such-command"]):
        result = invoke(*args)
        assert result.exit_code == 2 and "Usage" in result.stderr, (args, result.output)


def test_python_m_maas_is_the_console_script():
    module, script = run(PY, "-m", "maas", "--help"), run(MAAS, "--help")
    assert module.returncode == script.returncode == 0, module.stderr + script.stderr
    assert commands_listed(module.stdout) == commands_listed(script.stdout)
    assert set(commands_listed(module.stdout)) == {"models", "predict", "embed", "chat", "status", "plan",
                                                   "manifest", "serve", "usage", "tenants"}
    assert "Usage: python -m maas" in module.stdout and "Exit codes" in module.stdout
    assert run(PY, "-m", "maas").returncode == 2  # no command: usage, as before


def test_help_imports_nothing_heavy():
    probe = ("import sys\nfrom maas import cli\nfor a in (['--help'], ['plan', '--help'], ['models', '--help']):\n"
             "    try:\n        cli.main(a)\n    except SystemExit:\n        pass\n"
             "print(sorted(m for m in ('torch', 'ray', 'httpx', 'numpy') if m in sys.modules), file=sys.stderr)")
    out = run(PY, "-c", probe)
    assert out.stderr.strip().splitlines()[-1] == "[]", out.stderr


def test_python_m_maas_plan():
    config = "serve_configs/local.yaml"
    fits = run(PY, "-m", "maas", "plan", config, "--gpus", "0", "--cpus", "64")
    assert fits.returncode == 0 and fits.stdout.rstrip().endswith("FITS"), fits.stdout + fits.stderr
    tight = run(PY, "-m", "maas", "plan", config, "--cpus", "0.5", "--json")
    assert tight.returncode == 1, tight.stderr
    assert json.loads(tight.stdout)["fits"] is False


def test_python_m_maas_manifest():
    committed = (ROOT / "cluster" / "rayservice.yaml").read_text()
    out = run(PY, "-m", "maas", "manifest", "serve_configs/gpu-cluster.yaml")
    assert out.returncode == 0 and out.stdout == committed, out.stderr
    as_json = run(PY, "-m", "maas", "manifest", "serve_configs/gpu-cluster.yaml", "--workers", "3", "--json")
    assert as_json.returncode == 0, as_json.stderr
    body = json.loads(as_json.stdout)
    assert body["kind"] == "RayService" and body["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] == 3
    assert "--gpus-per-worker" in run(PY, "-m", "maas", "manifest", "--help").stdout


def test_manifest_errors_exit_2(tmp_path):
    missing = invoke("manifest", str(tmp_path / "nope.yaml"))
    assert missing.exit_code == 2 and "cannot read" in missing.stderr and "Traceback" not in missing.output
    bad_option = invoke("manifest", "serve_configs/gpu-cluster.yaml", "--no-such-option")
    assert bad_option.exit_code == 2


def test_serve_passes_its_arguments_through(monkeypatch):
    import maas.launch

    calls = []
    monkeypatch.setattr(maas.launch, "run", lambda args, grace_s: calls.append((args, grace_s)) or 7)
    result = invoke("serve", "--address", "local", "c.yaml", "--grace-s", "3", "--json", "-a", "auto", "--name=x")
    assert result.exit_code == 7, result.output
    assert calls == [(["--address", "local", "c.yaml", "--json", "-a", "auto", "--name=x"], 3.0)]
    usage = run(PY, "-m", "maas", "serve", "--help")
    assert usage.returncode == 0 and "--grace-s" in usage.stdout and "serve run" in usage.stdout


def test_tenants_hash_key_reads_the_key_from_stdin():
    import subprocess

    out = subprocess.run([PY, "-m", "maas", "tenants", "hash-key"], input="abc\n", capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == (
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
