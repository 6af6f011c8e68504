"""API keys and body limits on a second, small app (route prefix ``/secured``) deployed next to
the session's app, with its keys in a keys file."""

import pytest
import requests

from maas.security import key_ok, load_api_keys
from tests.conftest import one_model_args, side_app

pytestmark = pytest.mark.integration

KEY = "sk-test-0123456789abcdef"
LIMIT = 300_000


@pytest.fixture(scope="module")
def secured(served_app, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# maas keys\n{KEY}\nsecond-key\n")
    args = one_model_args("efficientnet-lite0", "effnet-secured")
    args["ingress"].update(api_keys_file=str(keys), max_body_bytes=LIMIT)
    with side_app(served_app, args, "secured") as url:
        yield url


def test_keys_from_env_and_file(tmp_path):
    f = tmp_path / "k"
    f.write_text("# comment\nabc\n\n  def  \n")
    keys = load_api_keys(str(f), env={"MAAS_API_KEYS": "x1, x2"})
    assert keys == (b"x1", b"x2", b"abc", b"def")
    assert key_ok(b"abc", keys) and not key_ok(b"ab", keys) and not key_ok(None, keys)
    assert load_api_keys(None, env={}) == ()
    with pytest.raises(ValueError, match="cannot be read"):
        load_api_keys(str(tmp_path / "missing"), env={})


def test_probes_are_open_everything_else_needs_a_key(secured, chelsea_jpeg):
    assert requests.get(f"{secured}/healthz", timeout=10).status_code == 200
    assert requests.get(f"{secured}/v2/health/live", timeout=10).status_code == 200
    assert requests.get(f"{secured}/openapi.json", timeout=10).status_code == 200  # the schema is not secret
    r = requests.get(f"{secured}/v1/models", timeout=10)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "authentication_error" and "missing API key" in r.json()["error"]["message"]
    r = requests.get(f"{secured}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["message"] == "invalid API key"
    r = requests.get(f"{secured}/v2/models/effnet-secured", timeout=10)
    assert r.status_code == 401 and "error" in r.json()
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": "second-key"}):
        r = requests.post(f"{secured}/v1/classifications/image", headers=headers, timeout=60,
                          data={"model": "effnet-secured", "top_k": "1"},
                          files=[("file", ("c.jpg", chelsea_jpeg, "image/jpeg"))])
        assert r.status_code == 200, r.text


def test_openai_client_api_key(secured):
    import openai

    good = openai.OpenAI(base_url=f"{secured}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in good.models.list()] == ["effnet-secured"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{secured}/v1", api_key="nope", max_retries=0).models.list()


def test_body_limit_413_before_reading(secured):
    headers = {"Authorization": f"Bearer {KEY}"}
    big = b"x" * (LIMIT + 1)
    r = requests.post(f"{secured}/v1/classifications/image", headers=headers, timeout=30,
                      data={"model": "effnet-secured"}, files=[("file", ("big.jpg", big, "image/jpeg"))])
    assert r.status_code == 413 and "limit is 300000 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted while it streams in
        for _ in range(10):
            yield b"x" * 50_000

    r = requests.post(f"{secured}/v1/embeddings", headers={**headers, "Content-Type": "application/json"},
                      data=chunks(), timeout=30)
    assert r.status_code == 413
