"""HTTP API: Litestar app (ops routes, JSON errors, OpenAPI, tracing), the WebSocket stream
(/v1/stream, its protocol's Structs) and its uvicorn server."""

from k2d.api._app import create_app
from k2d.api._errors import ApiError, ErrorBody
from k2d.api._server import ApiServer, serve
from k2d.api._state import ApiState, Published, Readiness, StreamSource
from k2d.api._stream_protocol import (
    ClientMessage,
    ServerMessage,
    decode_server,
    encode_message,
    parse_channel,
)

__all__ = [
    "ApiError",
    "ApiServer",
    "ApiState",
    "ClientMessage",
    "ErrorBody",
    "Published",
    "Readiness",
    "ServerMessage",
    "StreamSource",
    "create_app",
    "decode_server",
    "encode_message",
    "parse_channel",
    "serve",
]
