"""Domain exceptions that carry their HTTP status, and the one error body shape.

Every error the service returns has the body::

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

which is the OpenAI API's error object, so OpenAI clients parse it. 4xx messages say how to
fix the request; 5xx bodies are replaced by a generic line (the detail goes to the log with
the request id, never to the caller).

The exceptions are raised on any replica (ingress, preprocessor, model) and caught by type
at the ingress. Ray wraps an exception raised in another replica in ``RayTaskError``, so
:func:`unwrap` digs the original out. They pickle with their fields intact
(``__reduce__``), which is what lets them cross deployment boundaries.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any


class MaasError(Exception):
    """Base class: an error with an HTTP status and an OpenAI-style ``type``.

    Args:
        message: What went wrong and, for 4xx, how to fix the request.
        param: The request field at fault (``"input"``, ``"top_k"``), or None.
        code: A short machine-readable code (``"model_not_found"``), or None.
        retry_after_s: For 429/503/504: when to retry, seconds (``Retry-After``); None = the default.
    """

    status_code: int = HTTPStatus.INTERNAL_SERVER_ERROR
    error_type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: int | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return (_rebuild, (type(self), self.message, self.param, self.code, self.retry_after_s))

    def to_body(self) -> dict[str, Any]:
        """The error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return error_body(self.message, self.error_type, self.param, self.code)


def _rebuild(cls: type[MaasError], message: str, param: str | None, code: str | None,
             retry_after_s: int | None = None) -> MaasError:
    err = cls(message, param=param, code=code)
    err.retry_after_s = retry_after_s
    return err


class InvalidRequest(MaasError):
    """The request is malformed or asks for something out of bounds (HTTP 400)."""

    status_code = HTTPStatus.BAD_REQUEST
    error_type = "invalid_request_error"


class ModelNotFound(MaasError):
    """No model of that name is served (HTTP 404, OpenAI code ``model_not_found``)."""

    status_code = HTTPStatus.NOT_FOUND
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = "model", code: str | None = "model_not_found"):
        super().__init__(message, param=param, code=code)


class NotFoundRoute(MaasError):
    """No such route (HTTP 404)."""

    status_code = HTTPStatus.NOT_FOUND
    error_type = "invalid_request_error"


class MethodNotAllowed(MaasError):
    """The route exists but not for this HTTP method (HTTP 405)."""

    status_code = HTTPStatus.METHOD_NOT_ALLOWED
    error_type = "invalid_request_error"


class TaskNotSupported(MaasError):
    """The model exists but does not offer the asked task (HTTP 400)."""

    status_code = HTTPStatus.BAD_REQUEST
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = "model", code: str | None = "task_not_supported"):
        super().__init__(message, param=param, code=code)


class UnsupportedMediaType(InvalidRequest):
    """The body is in a content type the route does not accept (HTTP 415)."""

    status_code = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class PayloadTooLarge(MaasError):
    """The request carries more data than the configured limits allow (HTTP 413)."""

    status_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    error_type = "invalid_request_error"


class ModelNotReady(MaasError):
    """The model is configured but not loaded or not reachable now (HTTP 503)."""

    status_code = HTTPStatus.SERVICE_UNAVAILABLE
    error_type = "service_unavailable"


class ModelTimeout(MaasError):
    """The model did not answer within the ingress's ``model_call_timeout_s`` (HTTP 504)."""

    status_code = HTTPStatus.GATEWAY_TIMEOUT
    error_type = "timeout"


class ServiceOverloaded(MaasError):
    """Queues are full; the client should retry after ``Retry-After`` seconds (HTTP 503)."""

    status_code = HTTPStatus.SERVICE_UNAVAILABLE
    error_type = "service_unavailable"


class WeightsError(MaasError):
    """Weights could not be found or loaded safely. Raised at replica start-up.

    The message names the model and the path or id, and says how to fix the spec.
    """

    status_code = HTTPStatus.SERVICE_UNAVAILABLE
    error_type = "model_load_error"


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    """Build the one error body shape used by every route."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def unwrap(exc: BaseException) -> BaseException:
    """Return the original exception behind Ray's ``RayTaskError`` wrappers.

    Ray re-raises a remote exception as a ``RayTaskError`` whose ``cause`` is the original;
    nested calls (ingress → model → preprocessor) may wrap more than once.
    """
    seen = 0
    while seen < 8 and getattr(exc, "cause", None) is not None and exc.cause is not exc:
        exc = exc.cause
        seen += 1
    return exc
