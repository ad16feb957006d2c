"""Access to the /v1 routes: optional API keys, admin keys, rate limits per client, and CORS.

The client is its API key (when keys are configured and it sent a valid one) or its address;
X-Forwarded-For is believed only from a configured trusted proxy. A request refused for its
key takes a token from its address's bucket, so guessing keys runs into 429 like anything
else. Keys are compared as sha256 digests with hmac.compare_digest, against every configured
digest, so timing says nothing about them. Refusals are answered here, in the JSON error
shape, with the CORS headers a browser needs to read them. Admin routes add a guard
(`admin_guard`): a valid key that is not an admin key is 403.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from litestar.connection import ASGIConnection
from litestar.enums import ScopeType
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import Example
from litestar.types import ASGIApp, Guard, Message, Receive, Scope, Send

from k2d.api._errors import ApiError, ErrorBody, error_body
from k2d.config import ApiConfig

__all__ = [
    "ADMIN_RESPONSES",
    "CLIENT_KEY",
    "SECURITY_SCHEME",
    "AccessControl",
    "access_responses",
    "admin_guard",
    "client_key",
]

CLIENT_KEY = "k2d.client_key"
IS_ADMIN = "k2d.is_admin"
API_KEY_HEADER = "x-api-key"
# The name of the API key scheme in the OpenAPI document.
SECURITY_SCHEME = "ApiKey"
# Clients whose rate-limit state is kept; the least recently seen go first.
_MAX_CLIENTS = 10_000
_ALLOW_HEADERS = "Accept, Content-Type, X-API-Key, X-Request-ID, traceparent"
_EXPOSE_HEADERS = (
    "X-Request-ID, X-K2D-Snapshot-Id, X-K2D-Truncated, X-K2D-Next-Cursor, Retry-After, "
    "Content-Disposition"
)


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per client: `rate` per second, up to `burst` at once."""

    def __init__(self, rate: float, burst: int, clock: Any = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, key: str) -> float:
        """0 when allowed, else the seconds until a request would be."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
            while len(self._buckets) > _MAX_CLIENTS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate


def client_key(scope: Scope) -> str:
    """The client a request was admitted as (set by AccessControl; the address otherwise)."""
    key = scope.get("state", {}).get(CLIENT_KEY)
    if isinstance(key, str):
        return key
    client = scope.get("client")
    return f"addr:{client[0] if client else 'unknown'}"


class AccessControl:
    """Builds the ASGI middleware of the query router (one instance per app: it holds the
    rate-limit state)."""

    def __init__(self, cfg: ApiConfig) -> None:
        # ApiConfig checked that these are sha256 hex digests; an admin key is a key.
        self.digests = tuple(dict.fromkeys((*cfg.api_keys, *cfg.admin_api_keys)))
        self.admin_digests = tuple(cfg.admin_api_keys)
        self.trusted = frozenset(cfg.trusted_proxies)
        self.origins = frozenset(cfg.cors_origins)
        self.limiter = RateLimiter(cfg.rate_limit, cfg.rate_burst)

    def __call__(self, app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            await self._handle(app, scope, receive, send)

        return middleware

    async def _handle(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin")
        allowed_origin = self._allowed(origin)
        cors: list[tuple[bytes, bytes]] = []
        if allowed_origin is not None:
            cors = [
                (b"access-control-allow-origin", allowed_origin.encode("latin-1")),
                (b"access-control-expose-headers", _EXPOSE_HEADERS.encode()),
                (b"vary", b"Origin"),
            ]
        if (
            scope.get("method") == "OPTIONS"
            and origin is not None
            and "access-control-request-method" in headers
        ):
            if allowed_origin is None:
                await _reply(send, 403, "cors_forbidden", "origin not allowed", [])
                return
            await _preflight(send, cors)
            return
        key, admin, refusal = self._admit(scope, headers)
        if refusal is not None:
            status, code, detail, extra = refusal
            await _reply(send, status, code, detail, cors + extra)
            return
        state = scope.setdefault("state", {})
        state[CLIENT_KEY] = key
        state[IS_ADMIN] = admin

        async def send_with_cors(message: Message) -> None:
            if cors and message["type"] == "http.response.start":
                raw = list(message.get("headers", ())) + cors
                message = cast(Message, {**message, "headers": raw})
            await send(message)

        await app(scope, receive, send_with_cors)

    def _allowed(self, origin: str | None) -> str | None:
        if origin is None or not self.origins:
            return None
        if "*" in self.origins:
            return "*"
        return origin if origin in self.origins else None

    def _admit(
        self, scope: Scope, headers: dict[str, str]
    ) -> tuple[str, bool, tuple[int, str, str, list[tuple[bytes, bytes]]] | None]:
        """(client key, admin?, refusal or None)."""
        key = f"addr:{self._address(scope, headers)}"
        admin = False
        if self.digests:
            given = headers.get(API_KEY_HEADER)
            digest = hashlib.sha256(given.encode()).hexdigest() if given else ""
            if not _any_equal(digest, self.digests):
                # Counted against the address: a client guessing keys is rate limited.
                wait = self.limiter.take(key)
                if wait > 0:
                    return key, False, _too_many(wait)
                challenge = [(b"www-authenticate", b'ApiKey header="X-API-Key"')]
                detail = "a valid API key is required in the X-API-Key header"
                return key, False, (401, "unauthorized", detail, challenge)
            key = f"key:{digest[:16]}"
            admin = _any_equal(digest, self.admin_digests)
        wait = self.limiter.take(key)
        if wait > 0:
            return key, admin, _too_many(wait)
        return key, admin, None

    def _address(self, scope: Scope, headers: dict[str, str]) -> str:
        client = scope.get("client")
        peer = client[0] if client else "unknown"
        forwarded = headers.get("x-forwarded-for")
        if peer not in self.trusted or not forwarded:
            return str(peer)
        # The nearest address not of a trusted proxy is the client.
        hops = [h.strip() for h in forwarded.split(",") if h.strip()]
        for hop in reversed(hops):
            if hop not in self.trusted:
                return hop
        return str(peer)


def _any_equal(digest: str, digests: Iterable[str]) -> bool:
    """Compared with every digest, so the time taken says nothing about which matched."""
    ok = False
    for expected in digests:
        ok |= hmac.compare_digest(digest, expected)
    return ok


def _too_many(wait: float) -> tuple[int, str, str, list[tuple[bytes, bytes]]]:
    retry = [(b"retry-after", str(max(1, math.ceil(wait))).encode())]
    return 429, "rate_limited", "too many requests; slow down", retry


def admin_guard(cfg: ApiConfig) -> Guard:
    """The Litestar guard of the admin routes (behind AccessControl, which admitted the key)."""

    def require_admin(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        if not cfg.admin_api_keys:
            raise ApiError(403, "admin_disabled", "admin routes need api.admin_api_keys to be set")
        if not connection.scope.get("state", {}).get(IS_ADMIN):
            raise ApiError(403, "admin_required", "this route needs an admin API key")

    return require_admin


def _examples(items: Iterable[tuple[str, str]]) -> list[Example]:
    return [
        Example(id=code, summary=code, value={"code": code, "detail": detail})
        for code, detail in items
    ]


def access_responses() -> dict[int, ResponseSpec]:
    """The refusals AccessControl answers on every /v1 route, for the OpenAPI document."""
    return {
        401: ResponseSpec(
            data_container=ErrorBody,
            description="No valid API key in X-API-Key (when keys are configured)",
            examples=_examples(
                [("unauthorized", "a valid API key is required in the X-API-Key header")]
            ),
            generate_examples=False,
        ),
        429: ResponseSpec(
            data_container=ErrorBody,
            description="Too many requests from this client (see Retry-After); requests "
            "refused for their key count against the address",
            examples=_examples([("rate_limited", "too many requests; slow down")]),
            generate_examples=False,
        ),
    }


# The admin routes' 403 (both codes), for the OpenAPI document.
ADMIN_RESPONSES = {
    403: ResponseSpec(
        data_container=ErrorBody,
        description="Admin routes are off (no api.admin_api_keys), or the key is not an admin key",
        examples=_examples(
            [
                ("admin_disabled", "admin routes need api.admin_api_keys to be set"),
                ("admin_required", "this route needs an admin API key"),
            ]
        ),
        generate_examples=False,
    )
}


async def _preflight(send: Send, cors: Iterable[tuple[bytes, bytes]]) -> None:
    headers = [
        *cors,
        (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
        (b"access-control-allow-headers", _ALLOW_HEADERS.encode()),
        (b"access-control-max-age", b"600"),
        (b"content-length", b"0"),
    ]
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _reply(
    send: Send, status: int, code: str, detail: str, extra: Iterable[tuple[bytes, bytes]]
) -> None:
    body = error_body(code, detail)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
