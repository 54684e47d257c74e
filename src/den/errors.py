"""The one error hierarchy of den.

Every error carries a JSON-RPC code, a message meant for the user (what was
wrong and what to do) and optional details for the log. Errors become
responses at exactly one boundary: :mod:`den.rpc.jsonrpc`.

=======  ===================  ==============================================
code     name                 meaning
=======  ===================  ==============================================
-32700   Parse error          the body is not valid JSON
-32600   Invalid Request      not a JSON-RPC 2.0 request object (or too large)
-32601   Method not found     no such method
-32602   Invalid params       parameters of the wrong name, type or value
-32603   Internal error       a bug in den; the log has the traceback
-32001   not found            no such object, or not yours to see
-32002   conflict             the object exists already, or is in use
-32003   forbidden            your identity lacks the right for this call
-32004   quota exceeded       the call would pass one of your quotas
-32005   backend failure      the host refused (a command, a mount, a device)
-32006   unauthenticated      missing, unknown, expired or revoked credentials
=======  ===================  ==============================================
"""

from __future__ import annotations

from typing import Any

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603


class DenError(Exception):
    """Base of every error den reports to a caller."""

    code: int = INTERNAL_ERROR
    kind: str = "internal"

    def __init__(self, message: str, *, data: Any = None, log_detail: str | None = None):
        super().__init__(message)
        self.message = message
        self.data = data
        self.log_detail = log_detail

    def to_error(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err


class ParseError(DenError):
    code = PARSE_ERROR
    kind = "parse_error"


class InvalidRequest(DenError):
    code = INVALID_REQUEST
    kind = "invalid_request"


class MethodNotFound(DenError):
    code = METHOD_NOT_FOUND
    kind = "method_not_found"


class InvalidParams(DenError):
    """Parameters of the wrong name, type or value.

    The message is always the standard "Invalid params"; what was wrong is in
    ``data["errors"]`` as a list of ``{"field", "message"}``.
    """

    code = INVALID_PARAMS
    kind = "invalid_params"

    def __init__(self, detail: str | list[dict[str, str]], *, field: str = "") -> None:
        errors = detail if isinstance(detail, list) else [{"field": field, "message": detail}]
        super().__init__("Invalid params", data={"errors": errors})
        self.errors = errors

    def __str__(self) -> str:
        parts = [
            f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in self.errors
        ]
        return "Invalid params: " + "; ".join(parts)


class InternalError(DenError):
    code = INTERNAL_ERROR
    kind = "internal"


class NotFound(DenError):
    code = -32001
    kind = "not_found"


class Conflict(DenError):
    code = -32002
    kind = "conflict"


class Forbidden(DenError):
    code = -32003
    kind = "forbidden"


class QuotaExceeded(DenError):
    code = -32004
    kind = "quota_exceeded"


class BackendFailure(DenError):
    code = -32005
    kind = "backend_failure"


class Unauthenticated(DenError):
    code = -32006
    kind = "unauthenticated"


ERROR_CLASSES: tuple[type[DenError], ...] = (
    ParseError,
    InvalidRequest,
    MethodNotFound,
    InvalidParams,
    InternalError,
    NotFound,
    Conflict,
    Forbidden,
    QuotaExceeded,
    BackendFailure,
    Unauthenticated,
)
