"""One error hierarchy for the whole service, mapped to HTTP in one place (the ingress)."""

from __future__ import annotations


class MnemeError(Exception):
    """Base error: carries the HTTP status and OpenAI's error fields (type, param, code)."""

    status_code = 500
    error_type = "internal_error"
    code: str | None = None
    retry_after_s: float | None = None
    headers: dict[str, str] = {}
    details: dict = {}  # more fields of the error object (the ids of a write that may stand)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
                **self.details,
            }
        }


class InvalidRequest(MnemeError):
    """Bad input: the request is rejected before anything is changed."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_value"


class ContextLengthExceeded(InvalidRequest):
    """A prompt longer than the model's context, even without any output tokens."""

    code = "context_length_exceeded"


class PayloadTooLarge(InvalidRequest):
    status_code = 413
    code = "request_too_large"


class Unauthorized(MnemeError):
    """No API key, or one that is not configured."""

    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"
    headers = {"WWW-Authenticate": 'Bearer realm="mneme"'}


class Forbidden(MnemeError):
    """A valid API key that does not allow this namespace or priority."""

    status_code = 403
    error_type = "permission_error"
    code = "forbidden"


class NotFound(MnemeError):
    status_code = 404
    error_type = "not_found_error"
    code = "not_found"


class Overloaded(MnemeError):
    """A queue or a downstream is full; the client should retry after `retry_after_s`."""

    status_code = 503
    error_type = "overloaded_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after_s = retry_after_s


class Unavailable(Overloaded):
    """A downstream replica is unreachable (dead, restarting or not yet started)."""

    error_type = "service_unavailable_error"
    code = "unavailable"


class DeadlineExceeded(MnemeError):
    status_code = 504
    error_type = "timeout_error"
    code = "deadline_exceeded"
