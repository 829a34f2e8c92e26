"""The client's fast lane: plain API requests over the standard library's ``http.client``.

A warm ``.remote()`` call is a few small JSON requests, and httpx spends most of the client's time on them: the
profile of a warm call (benchmarks/bench_profile.py) put the client at ~660 µs of CPU per call, of which
httpx+httpcore ~240 µs and h11 ~120 µs, NanoGrid's own code ~50 µs; one JSON POST on a kept-alive connection costs
~785 µs of CPU through ``httpx.Client.post`` and ~230 µs through ``http.client.HTTPConnection``. The lane sends those
requests over a small pool of kept-alive ``HTTPConnection``s and answers with an ``httpx.Response``, so every caller
(``.json()``, ``.status_code``, ``.headers``, the 429 back-off) works as before.

What goes through it (``Client.request`` decides; anything else goes through httpx as always):

- a client made without an injected ``transport``, for an ``http://`` grid that no proxy from the environment
  applies to (https keeps httpx's certificate handling; a proxy keeps httpx's proxying);
- a path relative to the API, with only ``json=``, ``params=`` (plain values), ``headers=`` and ``timeout=``:
  bodies are encoded exactly as httpx encodes ``json=`` and query strings as it renders ``params=``.

Streams (``/map``, blob and volume downloads) and uploads (``files=``, ``content=``) never go through it.
Failures raise the httpx exception httpx's path would (``ConnectError``, ``ReadTimeout``, ...), so the client turns
them into the same ``NotConnected`` and ``GridUnresponsive`` errors.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
import urllib.parse
import urllib.request
from typing import Any

import httpx

# A request with any other keyword argument (files=, data=, content=, ...) goes through httpx.
ARGUMENTS = frozenset(("json", "params", "headers", "timeout"))
MAX_CONNECTIONS = 32  # as the client's httpx pool: a request beyond these waits for one to be free
MAX_IDLE = 16  # kept-alive connections kept; more are closed when their request ends
# An idle connection older than this is closed rather than reused: the grid (uvicorn) closes idle ones after 5 s,
# and one it is closing just as a request goes out cannot be told from one it dropped after reading the request.
IDLE_S = 4.0
ONE_WRITE_BYTES = 64 << 10  # a body up to this size is copied behind the request's head, one write

_PLAIN = (str, int, float, bool, type(None))
# Query values as httpx renders them: true/false for bools, an empty value for None.
_RENDERED: dict[Any, str] = {True: "true", False: "false", None: ""}


def usable(url: httpx.URL, transport: httpx.BaseTransport | None) -> bool:
    """Whether requests to this grid may take the lane: no injected transport, plain http, no proxy for it."""
    if transport is not None or url.scheme != "http" or not url.host:
        return False
    # what httpx's trust_env reads: *_PROXY, NO_PROXY
    proxies = urllib.request.getproxies_environment()
    if not (proxies.get("http") or proxies.get("all")):
        return True
    return bool(urllib.request.proxy_bypass_environment(url.host, proxies))  # type: ignore[attr-defined]


class _Connection(http.client.HTTPConnection):
    """An ``HTTPConnection`` that sends a small request's head and body in one write: one packet, where
    ``endheaders(body)`` makes two (and the grid reads twice)."""

    body: bytes | None = None  # set just before endheaders()

    def send(self, data: Any) -> None:
        body, self.body = self.body, None
        if body is not None and len(body) <= ONE_WRITE_BYTES:
            data, body = data + body, None
        super().send(data)
        if body is not None:
            super().send(body)


class FastLane:
    """Kept-alive ``http.client`` connections to one grid. Thread-safe: a connection serves one request at a time.

    ``default_headers``: what the client's httpx sends with every request (its key, user agent); the lane asks for
    uncompressed answers (``accept-encoding: identity``), so it never has to decode one.
    """

    def __init__(self, base_url: httpx.URL, default_headers: httpx.Headers) -> None:
        self.host = base_url.host
        self.port = base_url.port or 80
        self.origin = f"http://{base_url.netloc.decode('ascii')}"
        headers = [("Host", base_url.netloc.decode("ascii"))]
        for name, value in default_headers.raw:
            lower = name.decode("latin-1").lower()
            if lower not in ("host", "accept-encoding", "content-length", "transfer-encoding"):
                headers.append((name.decode("latin-1"), value.decode("latin-1")))
        headers.append(("Accept-Encoding", "identity"))
        self.headers = headers
        self._header_names = {name.lower() for name, _ in headers}
        self._idle: list[tuple[_Connection, float]] = []  # most recently used last
        self._open = 0  # connections made and not closed, idle or serving a request
        self._free = threading.Condition()
        self._closed = False
        # the responses' requests, by method and target (_request)
        self._requests: dict[tuple[str, str], httpx.Request] = {}
        self.sent = 0  # requests answered through the lane

    def target(self, path: str, params: Any) -> str | None:
        """The request target for a URL's raw path (``/v1/run``) and params; None when the params are not plain
        values (a list to repeat a key, say) or the path has a query already: those go through httpx."""
        if not params:
            return path
        if not isinstance(params, dict) or "?" in path:
            return None
        items = []
        for key, value in params.items():
            if not isinstance(value, _PLAIN) or not isinstance(key, str):
                return None
            rendered = _RENDERED[value] if value is None or type(value) is bool else value
            items.append((key, rendered))
        return f"{path}?{urllib.parse.urlencode(items)}"

    def send(
        self,
        method: str,
        target: str,
        body: Any = None,
        headers: Any = None,
        timeout: httpx.Timeout | float | None = None,
    ) -> httpx.Response:
        """One request; ``body`` is sent as JSON unless None (as httpx's ``json=``)."""
        if not isinstance(timeout, httpx.Timeout):
            timeout = httpx.Timeout(timeout)
        lines = self.headers
        if headers:
            given = [(str(name), str(value)) for name, value in headers.items()]
            names = {name.lower() for name, _ in given}
            lines = [line for line in lines if line[0].lower() not in names] + given
        else:
            names = self._header_names
        content = None
        if body is not None:
            content = json.dumps(
                body, ensure_ascii=False, separators=(",", ":"), allow_nan=False
            ).encode()
            if "content-type" not in names:
                lines = [*lines, ("Content-Type", "application/json")]
        if (
            content is not None or method in ("POST", "PUT", "PATCH")
        ) and "content-length" not in names:
            lines = [*lines, ("Content-Length", str(len(content or b"")))]

        connection, reused = self._acquire(timeout)
        try:
            written = self._write(connection, method, target, lines, content, timeout)
            if not written and reused:
                # The grid closed the idle connection after the check in _acquire. Resending is safe: the write
                # failed, so the grid never had the whole request (its content-length says where it ends), and a
                # server does not act on half a request. A request written whole is never sent again, whatever
                # happens next (no answer, a dropped connection): a POST /run sent twice could run the call twice.
                # httpcore likewise drops idle connections the server closed before using them and never resends
                # a request it wrote; a write that fails on a reused connection is the one case resent here.
                connection.close()
                connection = self._connect(timeout)
                written = self._write(connection, method, target, lines, content, timeout)
            # A failed write still reads: the grid may have answered (413, 401) before it stopped reading, as
            # httpcore does; with nothing to read, the read raises.
            answer = self._read(connection, method, target, timeout)
            keep = written and connection.sock is not None  # None: the grid said it closes this one
        except BaseException:
            self._release(connection, False, answered=False)
            raise
        self._release(connection, keep, answered=True)
        return answer

    def close(self) -> None:
        """Close the idle connections; those serving a request close when it ends. Later requests raise."""
        with self._free:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._free.notify_all()
        for connection, _ in idle:
            connection.close()

    def _acquire(self, timeout: httpx.Timeout) -> tuple[_Connection, bool]:
        """An idle connection still open (True), else a new one (False), waiting up to the pool timeout for a slot."""
        stale = []
        deadline = None
        try:
            with self._free:
                while True:
                    if self._closed:
                        raise RuntimeError("Cannot send a request, as the client has been closed.")
                    now = time.monotonic()
                    while self._idle:
                        connection, since = self._idle.pop()
                        # Like httpcore: an idle connection that has something to read has been closed by the
                        # grid (it only ever sends EOF to an idle one): drop it rather than send on it.
                        if now - since < IDLE_S and not _readable(connection.sock):
                            return connection, True
                        stale.append(connection)
                        self._open -= 1
                    if self._open < MAX_CONNECTIONS:
                        self._open += 1
                        break
                    if timeout.pool is not None:
                        deadline = deadline or now + timeout.pool
                        if now >= deadline:
                            raise httpx.PoolTimeout("no connection to the grid became free in time")
                    self._free.wait(None if deadline is None else deadline - now)
        finally:
            for connection in stale:
                connection.close()
        try:
            return self._connect(timeout), False
        except BaseException:
            self._release(None, False)
            raise

    def _release(self, connection: _Connection | None, keep: bool, answered: bool = False) -> None:
        with self._free:
            self.sent += answered
            if keep and connection is not None and not self._closed and len(self._idle) < MAX_IDLE:
                self._idle.append((connection, time.monotonic()))
                connection = None
            else:
                self._open -= 1
            self._free.notify()
        if connection is not None:
            connection.close()

    def _connect(self, timeout: httpx.Timeout) -> _Connection:
        connection = _Connection(self.host, self.port, timeout=timeout.connect)
        connection.auto_open = 0  # never reconnect behind the pool's back
        try:
            connection.connect()
        except TimeoutError as exc:
            connection.close()
            raise httpx.ConnectTimeout(str(exc) or "timed out") from None
        except OSError as exc:
            connection.close()
            raise httpx.ConnectError(str(exc)) from None
        return connection

    def _write(
        self,
        connection: _Connection,
        method: str,
        target: str,
        lines: list[tuple[str, str]],
        content: bytes | None,
        timeout: httpx.Timeout,
    ) -> bool:
        """Send the request; False if the connection failed under it (the grid had closed it)."""
        sock = connection.sock
        assert sock is not None
        try:
            sock.settimeout(timeout.write)
            connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for name, value in lines:
                connection.putheader(name, value)
            connection.body = content
            connection.endheaders()
        except TimeoutError as exc:
            raise httpx.WriteTimeout(str(exc) or "timed out") from None
        except OSError:  # reset, broken pipe: the grid closed the connection
            return False
        return True

    def _read(
        self,
        connection: _Connection,
        method: str,
        target: str,
        timeout: httpx.Timeout,
    ) -> httpx.Response:
        sock = connection.sock
        assert sock is not None
        try:
            sock.settimeout(timeout.read)
            answer = connection.getresponse()
            content = answer.read()
        except TimeoutError as exc:
            raise httpx.ReadTimeout(str(exc) or "timed out") from None
        except http.client.RemoteDisconnected:
            raise httpx.RemoteProtocolError(
                "Server disconnected without sending a response."
            ) from None
        except OSError as exc:
            raise httpx.ReadError(str(exc)) from None
        except http.client.HTTPException as exc:  # a malformed answer, or one cut short
            raise httpx.RemoteProtocolError(f"{type(exc).__name__}: {exc}") from None
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.getheaders()]
        return httpx.Response(
            answer.status,
            headers=headers,
            content=content,
            request=self._request(method, target),
            extensions={
                "http_version": b"HTTP/1.0" if answer.version == 10 else b"HTTP/1.1",
                "reason_phrase": answer.reason.encode("latin-1"),
            },
        )

    def _request(self, method: str, target: str) -> httpx.Request:
        """The response's request (method and URL), made once per target: building one costs ~10 µs."""
        request = self._requests.get((method, target))
        if request is None:
            if len(self._requests) >= 256:  # targets with a job id in them come and go
                self._requests.clear()
            request = self._requests[method, target] = httpx.Request(method, self.origin + target)
        return request


def _readable(sock: socket.socket | None) -> bool:
    """Whether an idle socket has something to read, i.e. the grid closed it (httpcore's is_socket_readable)."""
    if sock is None or sock.fileno() < 0:
        return True
    poll = select.poll()
    poll.register(sock, select.POLLIN)
    return bool(poll.poll(0))
