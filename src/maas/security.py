"""Access control and request-size limits, as one ASGI middleware in front of the ingress routes.

* **API keys.** When any key is configured — ``MAAS_API_KEYS`` (comma-separated, in the ingress
  replica's environment) and/or the ingress ``api_keys_file`` — every route except liveness and
  readiness (:data:`OPEN_PATHS`) needs ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.
  The official ``openai`` client sends its ``api_key`` as a bearer token. Keys are compared with
  ``hmac.compare_digest`` against every configured key (no early exit), and never logged.
  Missing or wrong keys get 401 with ``WWW-Authenticate: Bearer``.
* **Content type.** JSON routes (:data:`JSON_ROUTES`) answer another declared content type
  with 415.
* **Body size.** A ``Content-Length`` above ``max_body_bytes`` gets 413 before the body is
  read; a chunked body is counted as it streams in and cut off with 413 at the limit.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from maas.errors import PayloadTooLarge, error_body

logger = logging.getLogger("ray.serve.maas.security")

#: Routes whose body is JSON; another declared content type gets 415.
JSON_ROUTES = frozenset({"/v1/explanations/text", "/v1/embeddings", "/v1/completions", "/v1/chat/completions", "/v1/text2text",
                         "/v1/classifications/text"})

#: Paths reachable without a key: liveness and readiness probes (Kubernetes, load balancers) and the
#: API's own description (the schema is not a secret; Swagger UI fetches it without headers).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready",
                        "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/", "/playground"})
#: Path prefixes open without a key: static files of the docs and the playground page (no data).
OPEN_PREFIXES = ("/static-offline-docs/", "/playground/assets/")


def load_api_keys(keys_file: str | None, env: dict | None = None) -> tuple[bytes, ...]:
    """Keys from ``MAAS_API_KEYS`` and ``keys_file``; empty when none is configured.

    Raises:
        ValueError: ``keys_file`` is named but unreadable (naming the path, never a key).
    """
    env = os.environ if env is None else env
    keys = [k.strip() for k in env.get("MAAS_API_KEYS", "").split(",") if k.strip()]
    if keys_file:
        try:
            lines = Path(keys_file).read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"api_keys_file {keys_file!r} cannot be read ({type(exc).__name__})") from None
        keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    return tuple(k.encode() for k in keys)


@dataclass
class GuardSettings:
    """What the middleware enforces; set by the Ingress replica at start-up."""

    api_keys: tuple[bytes, ...] = ()
    max_body_bytes: int = 64 * 1024 * 1024
    extra_open: frozenset = field(default_factory=frozenset)


SETTINGS = GuardSettings()


def presented_key(headers: dict[bytes, bytes]) -> bytes | None:
    auth = headers.get(b"authorization", b"")
    if auth[:7].lower() == b"bearer ":
        return auth[7:].strip()
    return headers.get(b"x-api-key")


def key_ok(candidate: bytes | None, keys: tuple[bytes, ...]) -> bool:
    """Constant-time check against every key (the loop never stops early)."""
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(candidate or b"", k)
    return ok and candidate is not None


class _BodyTooLarge(Exception):
    pass


class Guard:
    """Pure ASGI middleware (keeps streaming responses and disconnects intact)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):  # an app under a route prefix sees its own paths
            path = path[len(root):] or "/"
        headers = dict(scope.get("headers") or [])
        settings = SETTINGS
        if settings.api_keys and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
            key = presented_key(headers)
            if not key_ok(key, settings.api_keys):
                msg = ("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'" if key is None
                       else "invalid API key")
                return await _reply(send, path, 401, msg, "authentication_error", {"www-authenticate": "Bearer"})
        if scope.get("method") == "POST" and path in JSON_ROUTES:
            ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if ctype and ctype != b"application/json" and not ctype.endswith(b"+json"):
                return await _reply(send, path, 415, f"content type {ctype.decode(errors='replace')!r} is not "
                                    "accepted here; send a JSON body with Content-Type: application/json",
                                    "invalid_request_error")
        limit = settings.max_body_bytes
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            length = 0
        if length > limit:
            return await _reply(send, path, 413, f"request body is {length} bytes; the limit is {limit} bytes",
                                "invalid_request_error")
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            return message

        await self.app(scope, counted_receive, send)


async def _reply(send, path: str, status: int, message: str, kind: str, extra: dict | None = None) -> None:
    body = {"error": message} if path.startswith("/v2") else error_body(message, kind)
    raw = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": raw})
