"""CORS (maas.security.Cors) on a small FastAPI app with the ingress's middleware order: Cors
outermost, then the API-key Guard. Browsers send preflights without credentials, so preflights
from allowed origins succeed with keys required; other origins get no CORS headers."""

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.testclient import TestClient

from maas import security
from maas.config import IngressSpec
from maas.security import Cors, Guard

APP_ORIGIN = "https://app.example.com"
KEY = "sk-test-key"


def build_app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(Guard)
    app.add_middleware(Cors)  # outermost, as in the ingress

    @app.post("/v1/embeddings")
    def embeddings():
        return JSONResponse({"ok": True}, headers={"X-Maas-Routed-Model": "minilm", "X-Maas-Extra-Info": "x"})

    @app.get("/busy")
    def busy():
        return JSONResponse({"error": "busy"}, status_code=503, headers={"Retry-After": "1", "Vary": "Accept"})

    @app.post("/v2/models/m/infer")
    def infer():
        return {"ok": True}

    return app


@pytest.fixture
def client(monkeypatch):
    monkeypatch.setattr(security, "SETTINGS", security.GuardSettings(api_keys=(KEY.encode(),)))
    return TestClient(build_app())


def allow(monkeypatch, origins):
    monkeypatch.setattr(security.SETTINGS, "cors_allowed_origins", security.cors_origins(origins))


def preflight(client, origin, path="/v1/embeddings", headers="authorization, content-type"):
    return client.options(path, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                         "Access-Control-Request-Headers": headers})


def cors_headers(response) -> dict:
    return {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")}


def test_the_setting_defaults_to_no_origins_and_takes_a_list():
    assert IngressSpec().cors_allowed_origins == []
    assert IngressSpec(cors_allowed_origins=["*"]).cors_allowed_origins == ["*"]
    assert security.GuardSettings().cors_allowed_origins == frozenset()


def test_cors_off_by_default_preflight_is_403_naming_the_setting(client):
    r = preflight(client, APP_ORIGIN)
    assert r.status_code == 403
    assert cors_headers(r) == {}
    message = r.json()["error"]["message"]
    assert "https://app.example.com" in message and "CORS is off" in message
    assert "args.ingress.cors_allowed_origins" in message
    actual = client.post("/v1/embeddings", headers={"Origin": APP_ORIGIN, "Authorization": f"Bearer {KEY}"})
    assert actual.status_code == 200 and cors_headers(actual) == {}
    assert "vary" not in actual.headers  # off: responses are as they were


def test_preflight_from_an_allowed_origin_is_answered_before_the_key_guard(client, monkeypatch):
    allow(monkeypatch, [APP_ORIGIN])
    r = preflight(client, APP_ORIGIN)  # no credentials, keys required: still answered
    assert r.status_code == 204 and r.content == b""
    assert r.headers["access-control-allow-origin"] == APP_ORIGIN
    assert set(r.headers["access-control-allow-methods"].split(", ")) >= {"GET", "POST"}
    assert r.headers["access-control-allow-headers"] == "authorization, content-type"
    assert r.headers["access-control-max-age"] == str(security.CORS_MAX_AGE_S)
    assert "Origin" in r.headers["vary"]


def test_responses_to_an_allowed_origin_carry_cors_headers_errors_included(client, monkeypatch):
    allow(monkeypatch, [APP_ORIGIN])
    ok = client.post("/v1/embeddings", headers={"Origin": APP_ORIGIN, "Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == APP_ORIGIN
    exposed = ok.headers["access-control-expose-headers"].split(", ")
    assert {"X-Maas-Routed-Model", "X-Maas-Model-Version", "Retry-After", "x-maas-extra-info"} <= set(exposed)
    assert ok.headers["vary"] == "Origin"
    # The page can read why it was refused (401 from the guard, inside Cors).
    refused = client.post("/v1/embeddings", headers={"Origin": APP_ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == APP_ORIGIN
    busy = client.get("/busy", headers={"Origin": APP_ORIGIN, "X-API-Key": KEY})
    assert busy.status_code == 503 and "Retry-After" in busy.headers["access-control-expose-headers"]
    assert busy.headers.get_list("vary") == ["Accept, Origin"]


def test_another_origin_gets_no_cors_headers(client, monkeypatch):
    allow(monkeypatch, [APP_ORIGIN])
    r = preflight(client, "https://evil.example.net")
    assert r.status_code == 403 and cors_headers(r) == {}
    assert "not in the ingress's cors_allowed_origins" in r.json()["error"]["message"]
    actual = client.post("/v1/embeddings", headers={"Origin": "https://evil.example.net",
                                                    "Authorization": f"Bearer {KEY}"})
    assert actual.status_code == 200 and cors_headers(actual) == {}
    assert actual.headers["vary"] == "Origin"  # caches must not hand this answer to an allowed origin
    # Same host, other scheme or port: another origin.
    assert preflight(client, "http://app.example.com").status_code == 403
    assert preflight(client, "https://app.example.com:8443").status_code == 403


def test_a_request_without_origin_and_a_plain_options_pass_through(client, monkeypatch):
    allow(monkeypatch, [APP_ORIGIN])
    r = client.post("/v1/embeddings", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and cors_headers(r) == {}
    # OPTIONS without Access-Control-Request-Method is no preflight: the guard and routes answer it.
    assert client.options("/v1/embeddings", headers={"Origin": APP_ORIGIN}).status_code == 401


def test_star_allows_any_origin_and_configured_origins_are_normalised(client, monkeypatch):
    allow(monkeypatch, ["*"])
    r = preflight(client, "https://anything.example.org")
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "https://anything.example.org"
    allow(monkeypatch, ["https://App.Example.com/"])  # as typed in a config: case and trailing slash
    assert preflight(client, APP_ORIGIN).status_code == 204


def test_v2_paths_refuse_in_their_own_error_format(client, monkeypatch):
    allow(monkeypatch, [APP_ORIGIN])
    r = preflight(client, "https://evil.example.net", path="/v2/models/m/infer")
    assert r.status_code == 403 and isinstance(r.json()["error"], str)
