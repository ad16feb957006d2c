"""uvicorn inside the daemon's task group, without its signal handlers (the daemon owns them)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import anyio
import uvicorn
from anyio.abc import TaskStatus
from litestar import Litestar

from k2d.config import ApiConfig

__all__ = ["ApiServer", "serve"]

_POLL = 0.01


class _Server(uvicorn.Server):
    """A uvicorn server that leaves SIGTERM/SIGINT alone: stop() is the only way out."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # uvicorn >= 0.29
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn
        return


class ApiServer:
    """Serves one app on one socket; run() in a task group, stop() to drain and close."""

    def __init__(
        self, app: Litestar, cfg: ApiConfig, heartbeat: tuple[float, float] | None = None
    ) -> None:
        """`heartbeat`: (interval, timeout) of the WebSocket pings that find dead peers."""
        self.cfg = cfg
        interval, timeout = heartbeat or (20.0, 20.0)
        config = uvicorn.Config(
            app,
            host=cfg.host,
            port=cfg.port,
            log_config=None,
            lifespan="on",
            # httptools (a dependency), not h11: the parser is C, not Python.
            http="httptools",
            access_log=False,
            timeout_graceful_shutdown=cfg.shutdown_timeout,
            # The client address is the peer's; X-Forwarded-For counts only from the
            # trusted proxies in api.trusted_proxies (k2d/api/_access.py decides).
            proxy_headers=False,
            # /v1/stream encodes each batch once for every subscriber; per-message deflate
            # would compress it again per client, undoing that.
            ws_per_message_deflate=False,
            # A peer that does not answer a ping within the timeout is closed (1011).
            ws_ping_interval=interval,
            ws_ping_timeout=timeout,
        )
        self._server = _Server(config)
        self._done = anyio.Event()
        self._running = False

    @property
    def started(self) -> bool:
        return bool(self._server.started)

    @property
    def port(self) -> int:
        """The port actually bound (differs from cfg.port when that is 0)."""
        if not self._server.started:
            raise RuntimeError("the API server is not listening yet")
        sockets = self._server.servers[0].sockets
        return int(sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until stop(); task_status is signalled once the socket is bound."""
        if self._running:
            raise RuntimeError("ApiServer.run() called twice")
        self._running = True
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._serve)
                while not self._server.started:
                    if self._done.is_set():
                        return
                    await anyio.sleep(_POLL)
                task_status.started()
        finally:
            self._done.set()

    async def _serve(self) -> None:
        try:
            await self._server.serve(sockets=[self._listen()])
        except OSError as exc:
            raise RuntimeError(
                f"HTTP server failed to start on {self.cfg.host}:{self.cfg.port}: {exc}"
            ) from exc
        except SystemExit as exc:
            # uvicorn exits the process when it cannot bind or the lifespan fails: not ours to do.
            raise RuntimeError(
                f"HTTP server failed to start on {self.cfg.host}:{self.cfg.port} (see log)"
            ) from exc
        finally:
            # On cancellation uvicorn skips its shutdown; at least release the socket.
            for server in getattr(self._server, "servers", ()):
                server.close()
            self._done.set()

    def _listen(self) -> socket.socket:
        """The listening socket, made here so that its send buffer (which the connections
        accepted on it inherit) is api.socket_send_buffer."""
        family, kind, proto, _, address = socket.getaddrinfo(
            self.cfg.host, self.cfg.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.cfg.socket_send_buffer:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.cfg.socket_send_buffer)
            sock.bind(address)
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
        sock.set_inheritable(True)
        return sock

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded by cfg.shutdown_timeout)."""
        self._server.should_exit = True
        if self._running:
            await self._done.wait()


def serve(app: Litestar, cfg: ApiConfig, heartbeat: tuple[float, float] | None = None) -> ApiServer:
    """An ApiServer for `app`; start it with `await tg.start(server.run)`."""
    return ApiServer(app, cfg, heartbeat)
