"""Access control and request-size limits, as ASGI middlewares in front of the ingress routes.

* **CORS** (:class:`Cors`, outermost). Browser pages on the origins in the ingress's
  ``cors_allowed_origins`` may call the API: their preflights are answered here, before the key
  check (browsers send preflights without credentials), and their responses carry
  ``Access-Control-Allow-Origin``. Any other origin gets no CORS headers (a preflight from it
  gets 403 naming the setting). Off by default (no origins).

* **API keys.** When any key is configured — ``MAAS_API_KEYS`` (comma-separated, in the ingress
  replica's environment) and/or the ingress ``api_keys_file`` — every route except liveness and
  readiness (:data:`OPEN_PATHS`) needs ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.
  The official ``openai`` client sends its ``api_key`` as a bearer token. Keys are compared with
  ``hmac.compare_digest`` against every configured key (no early exit), and never logged.
  Missing or wrong keys get 401 with ``WWW-Authenticate: Bearer``.
* **Tenants.** With the ingress's ``tenants_file`` the key names a tenant (:mod:`maas.tenants`):
  looked up by its hash, set as the request's tenant (``maas.tenants.CURRENT``) for the router's
  model permissions, rate and compute quota, and the batchers' fair queues. The file is looked at
  for changes at most once a second, here, so a revoked key is refused within 2 s.
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

#: POST routes a tenant over its rate or quota may still call (the repository API is not priced).
FREE_POSTS = frozenset({"/v2/repository/index"})

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
    """What the middlewares enforce; set by the Ingress replica at start-up.

    ``cors_allowed_origins`` holds origins as :func:`cors_origins` normalises them (``"*"``: any).
    """

    api_keys: tuple[bytes, ...] = ()
    tenancy: "object | None" = None  # maas.tenants.Tenancy when a tenants file is configured
    max_body_bytes: int = 64 * 1024 * 1024
    extra_open: frozenset = field(default_factory=frozenset)
    cors_allowed_origins: frozenset[str] = frozenset()


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
        tenancy = settings.tenancy
        if tenancy is not None and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
            from maas.tenants import CURRENT

            tenancy.maybe_reload()
            key = presented_key(headers)
            tenant = tenancy.resolve(key)
            if tenant is None:
                msg = ("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'" if key is None
                       else "invalid API key")
                return await _reply(send, path, 401, msg, "authentication_error", {"www-authenticate": "Bearer"})
            if scope.get("method") == "POST" and path not in FREE_POSTS:  # over its limits: 429 before the body
                refused = tenancy.refusal(tenant)
                if refused is not None:
                    return await _reply(send, path, 429, refused.message, "rate_limit_error",
                                        {"retry-after": str(refused.retry_after_s), **refused.headers},
                                        code=refused.code)
            CURRENT.set(tenant)
        elif settings.api_keys and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
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


#: Methods a cross-origin page may use: the routes take GET and POST (HEAD wherever GET is).
CORS_ALLOW_METHODS = "GET, HEAD, POST, OPTIONS"
#: Response headers a cross-origin page may read besides the CORS-safelisted ones: the routing
#: headers (every other ``X-Maas-*`` header of a response is exposed too) and ``Retry-After``.
CORS_EXPOSE_HEADERS = ("X-Maas-Routed-Model", "X-Maas-Route-Reason", "X-Maas-Model-Version", "Retry-After")
#: How long a browser may cache a preflight's answer, seconds (Chromium caps it at 7200).
CORS_MAX_AGE_S = 600


def cors_origins(origins) -> frozenset[str]:
    """The configured origins as browsers send them in ``Origin``: lower case, no trailing slash
    (``"https://App.example.com/"`` matches ``https://app.example.com``); ``"*"`` stays."""
    return frozenset(o.strip().rstrip("/").lower() for o in origins if o.strip())


class Cors:
    """Pure ASGI middleware answering CORS for the origins in ``SETTINGS.cors_allowed_origins``.

    Read at every request, as :class:`Guard` reads its settings, so the Ingress replica sets them
    after the app is built. Goes outermost: a preflight (``OPTIONS`` with ``Origin`` and
    ``Access-Control-Request-Method``) is answered before the key check, since browsers send it
    without credentials.

    * Preflight from an allowed origin: 204 with ``Access-Control-Allow-Origin`` (the origin),
      ``-Allow-Methods`` (:data:`CORS_ALLOW_METHODS`), ``-Allow-Headers`` (the requested ones:
      the API key is the access control, not the header names), ``-Max-Age``
      (:data:`CORS_MAX_AGE_S`) and ``Vary``.
    * Preflight from any other origin (every origin while the setting is empty): 403 with a JSON
      error naming the setting, and no CORS headers.
    * Other requests run as they are; a response to an allowed origin gets
      ``Access-Control-Allow-Origin`` and ``Access-Control-Expose-Headers``
      (:data:`CORS_EXPOSE_HEADERS` and the response's other ``X-Maas-*`` headers). While CORS is
      on every response varies by ``Origin`` (``Vary: Origin``) so caches keep them apart.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        allowed = SETTINGS.cors_allowed_origins
        origin = request_method = request_headers = None
        for name, value in scope.get("headers") or ():
            if name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"access-control-request-method":
                request_method = value
            elif name == b"access-control-request-headers":
                request_headers = value
        ok = origin is not None and ("*" in allowed or origin.lower() in allowed)
        if scope.get("method") == "OPTIONS" and origin is not None and request_method is not None:
            if not ok:
                path, root = scope.get("path", ""), scope.get("root_path", "")
                if root and path.startswith(root):  # as in Guard: /v2 paths answer in their own error format
                    path = path[len(root):] or "/"
                setting = ("CORS is off" if not allowed else "it is not in the ingress's cors_allowed_origins")
                return await _reply(send, path, 403, f"origin {origin!r} may not call this API from a browser: "
                                    f"{setting}; add it to args.ingress.cors_allowed_origins in the serve config "
                                    "([\"*\"] allows any origin)", "permission_error")
            headers = [(b"access-control-allow-origin", origin.encode("latin-1")),
                       (b"access-control-allow-methods", CORS_ALLOW_METHODS.encode()),
                       (b"access-control-max-age", str(CORS_MAX_AGE_S).encode()),
                       (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers")]
            if request_headers:
                headers.append((b"access-control-allow-headers", request_headers))
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            return await send({"type": "http.response.body", "body": b""})
        if not allowed:
            return await self.app(scope, receive, send)

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                names = {n.lower() for n, _ in headers}
                if ok:
                    expose = list(CORS_EXPOSE_HEADERS) + sorted(
                        n.decode("latin-1") for n in names
                        if n.startswith(b"x-maas-") and n.decode("latin-1") not in _EXPOSED_LOWER)
                    headers.append((b"access-control-allow-origin", origin.encode("latin-1")))
                    headers.append((b"access-control-expose-headers", ", ".join(expose).encode("latin-1")))
                if b"vary" in names:  # one Vary header, Origin added to its list
                    headers = [(n, v + b", Origin" if n.lower() == b"vary" and b"origin" not in v.lower() else v)
                               for n, v in headers]
                else:
                    headers.append((b"vary", b"Origin"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_cors)


_EXPOSED_LOWER = frozenset(h.lower() for h in CORS_EXPOSE_HEADERS)


async def _reply(send, path: str, status: int, message: str, kind: str, extra: dict | None = None,
                 code: str | None = None) -> None:
    body = {"error": message} if path.startswith("/v2") else error_body(message, kind, code=code)
    raw = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": raw})
