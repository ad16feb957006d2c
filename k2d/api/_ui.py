"""The live page: `/` and `/ui/*` serve the files of k2d/ui, and the JavaScript libraries
they use from the installed packages that ship them (plotly's wheel carries plotly.min.js),
so the page needs no network beyond the daemon. The page is open; its data calls go to
/v1 with the key the user entered (k2d/ui/api.js).

Browsers cannot set headers on a WebSocket, so the page offers its key as a subprotocol
(`k2d.key.<hex of the key>`, next to `k2d`); `browser_keys` turns that into the X-API-Key
header the stream checks at the handshake (k2d/api/_stream.py) and accepts `k2d`. A key in
a subprotocol, unlike one in a cookie, is not sent by a page of another origin.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast

import anyio
import anyio.to_thread
from litestar import Request, Response, get
from litestar.di import NamedDependency
from litestar.enums import ScopeType
from litestar.params import FromPath
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from k2d import __version__
from k2d.api._errors import ApiError
from k2d.api._state import ApiState

__all__ = ["STREAM_SUBPROTOCOL", "UI_HANDLERS", "browser_keys"]

STREAM_SUBPROTOCOL = "k2d"
KEY_SUBPROTOCOL_PREFIX = "k2d.key."
# Libraries the page loads, from the packages that ship them: name -> (package, path).
VENDOR = {"plotly.min.js": ("plotly", "package_data/plotly.min.js")}
_MEDIA_TYPES = {
    # Litestar appends "; charset=utf-8" to text/* media types.
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*(\.[a-z0-9]+)+$")
# Plotly injects its own <style> elements, hence 'unsafe-inline' for styles only; every
# fetch and the WebSocket go to this origin.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'"
)
_GZIP_MIN_BYTES = 1024


@dataclass(frozen=True)
class _Asset:
    body: bytes
    gzipped: bytes | None
    etag: str
    media_type: str


_assets: dict[tuple[str, str], _Asset] = {}


def _load(package: str, path: str) -> _Asset | None:
    """A file of an installed package, read (and gzipped) once and kept."""
    try:
        body = resources.files(package).joinpath(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError, ModuleNotFoundError):
        return None
    suffix = path[path.rfind(".") :]
    zipped = gzip.compress(body, 6, mtime=0) if len(body) >= _GZIP_MIN_BYTES else None
    asset = _Asset(
        body=body,
        gzipped=zipped,
        etag='"' + hashlib.sha256(body).hexdigest()[:20] + '"',
        media_type=_MEDIA_TYPES.get(suffix, "application/octet-stream"),
    )
    _assets[(package, path)] = asset
    return asset


def _serve(request: Request[Any, Any, Any], asset: _Asset | None, what: str) -> Response[bytes]:
    if asset is None:
        raise ApiError(404, "not_found", f"no such file: {what[:100]}")
    # Revalidated on every load (the package may have been upgraded), answered 304 when unchanged.
    headers = {
        "ETag": asset.etag,
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Vary": "Accept-Encoding",
    }
    if asset.media_type.startswith("text/html"):
        headers["Content-Security-Policy"] = _CSP
        headers["Referrer-Policy"] = "no-referrer"
    if request.headers.get("if-none-match") == asset.etag:
        return Response(b"", status_code=304, headers=headers)
    body = asset.body
    if asset.gzipped is not None and "gzip" in request.headers.get("accept-encoding", ""):
        body = asset.gzipped
        headers["Content-Encoding"] = "gzip"
    return Response(body, media_type=asset.media_type, headers=headers)


async def _asset(package: str, path: str) -> _Asset | None:
    cached = _assets.get((package, path))
    if cached is not None:
        return cached
    # Reading a file the first time (and gzipping plotly's 5 MB) blocks: in a worker thread.
    return await anyio.to_thread.run_sync(_load, package, path)


async def _page_file(name: str) -> _Asset | None:
    if not _NAME.match(name) or name[name.rfind(".") :] not in _MEDIA_TYPES:
        return None
    return await _asset("k2d", f"ui/{name}")


@get(["/", "/ui"], include_in_schema=False)
async def index(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The live page."""
    return _serve(request, await _page_file("index.html"), "index.html")


@get("/ui/{name:str}", include_in_schema=False)
async def page_file(request: Request[Any, Any, Any], name: FromPath[str]) -> Response[bytes]:
    """The page's own files (k2d/ui)."""
    return _serve(request, await _page_file(name), name)


@get("/ui/vendor/{name:str}", include_in_schema=False)
async def vendor_file(request: Request[Any, Any, Any], name: FromPath[str]) -> Response[bytes]:
    """A library from the installed package that ships it."""
    source = VENDOR.get(name)
    return _serve(request, await _asset(*source) if source else None, name)


@get("/ui/settings.json", include_in_schema=False, sync_to_thread=False)
def settings(api: NamedDependency[ApiState]) -> dict[str, Any]:
    """What the page must know before its first /v1 call: whether it needs a key (so it asks
    for one instead of failing), and whether the stream is on."""
    cfg = api.config
    return {
        "version": __version__,
        "api_keys": bool(cfg.api_keys or cfg.admin_api_keys),
        "stream": api.stream.enabled,
        "stream_subprotocol": STREAM_SUBPROTOCOL,
        "key_subprotocol_prefix": KEY_SUBPROTOCOL_PREFIX,
    }


UI_HANDLERS = (index, page_file, vendor_file, settings)


def browser_keys(app: ASGIApp) -> ASGIApp:
    """App middleware: a WebSocket handshake offering `k2d` and `k2d.key.<hex>` (and no
    X-API-Key header) gets that key as its X-API-Key header, and `k2d` as the accepted
    subprotocol (a browser drops a connection that accepts none of those it offered)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.WEBSOCKET:
            await app(scope, receive, send)
            return
        offered = cast(list[str], scope.get("subprotocols") or [])
        if STREAM_SUBPROTOCOL not in offered:
            await app(scope, receive, send)
            return
        headers = list(scope["headers"])
        if not any(k.lower() == b"x-api-key" for k, _ in headers):
            key = _key_from(offered)
            if key is not None:
                headers.append((b"x-api-key", key))
                scope = cast(Scope, {**scope, "headers": headers})

        async def accept_subprotocol(message: Message) -> None:
            if message["type"] == "websocket.accept":
                message = cast(Message, {**message, "subprotocol": STREAM_SUBPROTOCOL})
            await send(message)

        await app(scope, receive, accept_subprotocol)

    return middleware


def _key_from(offered: list[str]) -> bytes | None:
    """The header bytes of the key (the page hex-encodes the key's characters as latin-1
    bytes, as fetch() sends them in X-API-Key)."""
    for protocol in offered:
        if protocol.startswith(KEY_SUBPROTOCOL_PREFIX):
            try:
                return bytes.fromhex(protocol[len(KEY_SUBPROTOCOL_PREFIX) :]) or None
            except ValueError:
                return None
    return None
