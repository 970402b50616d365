"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with its HTTP status,
so the `openai` SDK raises its own exception classes (AuthenticationError, NotFoundError, ...)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"


class ApiError(Exception):
    """A refusal the client sees: the status, and a message saying what is wrong and what to do."""

    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, type=self.type, param=self.param, code=self.code,
                              headers=self.headers)


def not_found(kind: str, object_id: str) -> ApiError:
    """The one answer for an id that does not exist, is malformed, or is another tenant's."""
    shown = object_id if len(object_id) <= 80 else object_id[:80] + "..."
    return ApiError(404, f"No {kind} found with id {shown!r}.", param="id", code="not_found")


def error_response(status: int, message: str, *, type: str = INVALID_REQUEST, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def install_handlers(app: FastAPI) -> None:
    """Every refusal in OpenAI's shape, and no traceback to clients: an unexpected error is logged
    with its traceback and answered 500 with a plain message."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
        param = ".".join(location) or None
        message = f"{param or 'request'}: {first.get('msg', 'invalid')}"
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, error: HTTPException) -> JSONResponse:
        message = "Unknown URL; see /v1/files and /v1/batches." if error.status_code == 404 else str(error.detail)
        return error_response(error.status_code, message, code="unknown_url" if error.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "The server had an error while processing your request; it is logged. "
                                   "Retry, and tell the operator if it persists.", type="server_error")
