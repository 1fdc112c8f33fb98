"""One error shape for the whole API.

Every error leaves as ``{"error": {"message", "type", "code"}}`` (plus
``"param"`` on ``/v1``, as OpenAI's clients expect). Validation errors are 422
in the same shape; nothing a client sends produces a 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(Exception):
    """An error with an HTTP status, sent to the client as the one error shape.

    Args:
        status: HTTP status code.
        message: What went wrong, naming the offending value.
        code: A short machine-readable code, e.g. ``"collection_not_found"``.
        headers: Extra response headers (``Retry-After`` for 429).
        param: The request field at fault, when there is one.
    """

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        *,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.param = param

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "api_error")


def not_found(kind: str, name: str) -> ApiError:
    """404 for a resource that does not exist for this tenant (or at all)."""
    return ApiError(404, f"{kind} {name!r} not found", f"{kind}_not_found")


def error_body(
    message: str, type_: str, code: str, *, param: str | None = None, openai: bool = False
) -> dict[str, Any]:
    """The JSON body of an error (OpenAI's shape adds ``param``)."""
    error: dict[str, Any] = {"message": message, "type": type_, "code": code}
    if openai:
        error["param"] = param
    return {"error": error}


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def error_response(request: Request, exc: ApiError) -> JSONResponse:
    """The response for an ApiError on this request's path."""
    body = error_body(exc.message, exc.type, exc.code, param=exc.param, openai=_is_openai(request))
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts = []
    first_param = None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        where = ".".join(loc) or "body"
        first_param = first_param or where
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", first_param


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception the app can raise into the one error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(request, ApiError(422, message, "invalid_request", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(request, ApiError(exc.status_code, str(exc.detail), code))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        body = error_body(
            "internal server error", "api_error", "internal_error", openai=_is_openai(request)
        )
        return JSONResponse(body, status_code=500)
