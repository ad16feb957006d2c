"""HTTP API: Litestar app (ops routes, JSON errors, OpenAPI, tracing) and its uvicorn server."""

from k2d.api._app import create_app
from k2d.api._errors import ApiError, ErrorBody
from k2d.api._server import ApiServer, serve
from k2d.api._state import ApiState, Readiness

__all__ = ["ApiError", "ApiServer", "ApiState", "ErrorBody", "Readiness", "create_app", "serve"]
