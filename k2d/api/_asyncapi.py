"""The AsyncAPI 3 document of /v1/stream, served at /schema/asyncapi.json beside the OpenAPI
document. Built from the protocol's msgspec Structs (k2d/api/_stream_protocol.py), so the
document and the server cannot drift apart; the close codes come from the same table the
server closes with."""

from __future__ import annotations

from typing import Any

import msgspec

from k2d import __version__
from k2d.api._stream_protocol import (
    CLOSE_CODES,
    SPEEDS,
    Ack,
    ClientMessage,
    End,
    Error,
    Gap,
    Pause,
    Ping,
    Pong,
    Quotes,
    Replay,
    Resume,
    Seek,
    ServerMessage,
    Subscribe,
    Trades,
    Unsubscribe,
)
from k2d.config import StreamConfig

__all__ = ["asyncapi_document"]

_REF = "#/components/schemas/{name}"
_SERVER = (Ack, Error, Trades, Quotes, Gap, Pong, End)
_CLIENT = (Subscribe, Unsubscribe, Ping, Replay, Pause, Resume, Seek)
_SUMMARIES = {
    "Subscribe": "Live rows of channels; with `since`, stored rows first, joined to live",
    "Unsubscribe": "Stop channels",
    "Ping": "Answered with pong",
    "Replay": "Stored rows of channels in [start, end), paced at `speed`",
    "Pause": "Pause the running replay",
    "Resume": "Resume the paused replay",
    "Seek": "Move the running replay to `to`",
    "Ack": "An op was done",
    "Error": "An op was refused (the connection stays open), or why it closes next",
    "Trades": "Trade rows of one channel, REST field names, in sequence order",
    "Quotes": "Quote rows of one channel, REST field names, in sequence order",
    "Gap": "The ledger opened, narrowed or closed a gap or an outage of a channel",
    "Pong": "The answer to ping",
    "End": "A replay reached the end of its window",
}


def asyncapi_document(cfg: StreamConfig, *, keys: bool) -> dict[str, Any]:
    """The document for a server with these limits (and API keys on or off)."""
    _, schemas = msgspec.json.schema_components([ServerMessage, ClientMessage], ref_template=_REF)
    messages: dict[str, Any] = {}
    for struct in (*_CLIENT, *_SERVER):
        name = struct.__name__
        messages[name] = {
            "name": name,
            "title": name,
            "summary": _SUMMARIES[name],
            "contentType": "application/json",
            "payload": {"$ref": _REF.format(name=name)},
        }
    close_codes = {
        str(code): {"error": error or None, "meaning": meaning}
        for code, (error, meaning) in sorted(CLOSE_CODES.items())
    }
    bindings: dict[str, Any] = {"ws": {"bindingVersion": "0.1.0"}}
    if keys:
        bindings["ws"]["headers"] = {
            "type": "object",
            "properties": {"X-API-Key": {"type": "string", "description": "An API key"}},
            "required": ["X-API-Key"],
        }
    doc: dict[str, Any] = {
        "asyncapi": "3.0.0",
        "info": {
            "title": "k2d stream",
            "version": __version__,
            "description": (
                "Live trades and quotes, their gaps, and replays of stored windows over one "
                "WebSocket protocol. Client messages are JSON objects with an `op`; server "
                "messages are objects with a `type` (JSON text frames, or MessagePack binary "
                "frames after a subscribe or replay with `encoding: msgpack`). Channels are "
                "`trades:EXCHANGE:SYMBOL` and `quotes:EXCHANGE:SYMBOL`; rows carry the field "
                "names and renderings of the REST JSON rows and their `source_sequence`. "
                f"Limits: {cfg.max_subscriptions} channels per connection, "
                f"{cfg.max_connections_per_key} connections per client and "
                f"{cfg.max_connections} in total, client messages of {cfg.max_message_bytes} "
                f"bytes, a send queue of {cfg.queue_messages} messages or {cfg.queue_bytes} "
                f"bytes (a client past it is closed, 4408); replay speeds {', '.join(SPEEDS)}. "
                "See docs/stream-protocol.md."
            ),
            "x-close-codes": close_codes,
        },
        "servers": {
            "k2d": {
                "host": "127.0.0.1:8765",
                "protocol": "ws",
                "description": "The daemon's API address (api.host, api.port)",
            }
        },
        "channels": {
            "stream": {
                "address": "/v1/stream",
                "title": "The stream",
                "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in messages},
                "bindings": bindings,
            }
        },
        "operations": {
            "clientMessages": {
                "action": "receive",
                "title": "What a client sends",
                "channel": {"$ref": "#/channels/stream"},
                "messages": [{"$ref": f"#/channels/stream/messages/{s.__name__}"} for s in _CLIENT],
            },
            "serverMessages": {
                "action": "send",
                "title": "What the server sends",
                "channel": {"$ref": "#/channels/stream"},
                "messages": [{"$ref": f"#/channels/stream/messages/{s.__name__}"} for s in _SERVER],
            },
        },
        "components": {"schemas": schemas, "messages": messages},
    }
    return doc
