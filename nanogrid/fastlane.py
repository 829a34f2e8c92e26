"""The client's fast lane: plain API requests over kept-alive sockets, with a small HTTP/1.1 reader of its own.

A warm ``.remote()`` call is a few small JSON requests, and httpx spends most of the client's time on them: the
profile of a warm call (benchmarks/bench_profile.py) put the client at ~660 µs of CPU per call, of which
httpx+httpcore ~240 µs and h11 ~120 µs, NanoGrid's own code ~50 µs; one JSON POST on a kept-alive connection costs
~785 µs of CPU through ``httpx.Client.post`` and ~230 µs through ``http.client.HTTPConnection``. ``http.client``
itself then spent ~50 µs of a call writing the request one header at a time and parsing the answer's head with the
``email`` package, so the lane writes each request in one piece and reads the answer with its own parser
(``_Connection``). It answers with an ``httpx.Response``, so every caller (``.json()``, ``.status_code``,
``.headers``, the 429 back-off) works as before.

What goes through it (``Client.request`` decides; anything else goes through httpx as always):

- a client made without an injected ``transport``, for an ``http://`` grid that no proxy from the environment
  applies to (https keeps httpx's certificate handling; a proxy keeps httpx's proxying);
- a path relative to the API, with only ``json=`` or ``content=`` (bytes), ``params=`` (plain values),
  ``headers=`` and ``timeout=``: bodies are encoded exactly as httpx encodes ``json=`` and query strings as it
  renders ``params=``; ``content=`` bytes go as they are (a new function's package, ``/v1/packages``).

Streams (``/map``, blob and volume downloads) and other uploads (``files=``, a file or an iterator as ``content=``)
never go through it.
Failures raise the httpx exception httpx's path would (``ConnectError``, ``ReadTimeout``, ...), so the client turns
them into the same ``NotConnected`` and ``GridUnresponsive`` errors.
"""

from __future__ import annotations

import json
import re
import select
import socket
import threading
import time
import urllib.parse
import urllib.request
from typing import Any

import httpx

# A request with any other keyword argument (files=, data=, content=, ...) goes through httpx.
ARGUMENTS = frozenset(("json", "content", "params", "headers", "timeout"))
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


class _NoAnswer(Exception):
    """The grid closed the connection without a word of an answer."""


# what http.client refuses to send: a control character or space in the target, a line break in a header
_UNSAFE_TARGET = re.compile(r"[\x00-\x20\x7f]").search
_UNSAFE_VALUE = re.compile(r"[\r\n\x00]").search
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+").fullmatch
MAX_HEAD_BYTES = 64 << 10  # an answer's status line and headers; a longer head is not the grid's
RECV_BYTES = 64 << 10


class _Connection:
    """One kept-alive connection to the grid, speaking just the HTTP/1.1 the lane needs.

    A request goes out as one write (its head and, up to ``ONE_WRITE_BYTES``, its body). Its answer is read by a
    small parser: the status line, the header lines, then a body framed by ``content-length``, by chunks, or by
    the connection's end. ``http.client`` parses an answer's head with the ``email`` package, which cost a warm
    call ~35 µs of the client's CPU, and writes the head one ``putheader`` at a time (~14 µs); this takes ~5 µs for
    both. ``sock`` is None once closed.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket | None = sock
        self.keep = True  # False once an answer said (or showed) that the connection ends with it
        self._timeout: float | None | bool = False  # the socket's, as last set (False: never set)

    def settimeout(self, seconds: float | None) -> None:
        """The socket's timeout, set only when it changes (each setting is a system call)."""
        if seconds != self._timeout and self.sock is not None:
            self.sock.settimeout(seconds)
            self._timeout = seconds

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()

    def write(self, head: bytes, body: bytes | None) -> None:
        sock = self.sock
        assert sock is not None
        if body is not None and len(body) <= ONE_WRITE_BYTES:
            head, body = head + body, None
        sock.sendall(head)
        if body is not None:
            sock.sendall(body)

    def read(self, method: str) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]], bytes, bool]:
        """The grid's answer: (status, reason, HTTP version, header lines, body, whether the connection may carry
        another request). A protocol error raises ``ValueError``; a connection the grid closed before a word of
        its answer, ``_NoAnswer``; the socket's own errors and timeouts go up as they are."""
        buffered = b""
        while True:  # an interim answer (100 Continue) is skipped, as http.client does
            head, buffered = self._head(buffered)
            lines = head.split(b"\r\n")
            version, _, rest = lines[0].partition(b" ")
            status_text, _, reason = rest.partition(b" ")
            if (
                version not in (b"HTTP/1.1", b"HTTP/1.0")
                or len(status_text) != 3
                or not status_text.isdigit()
            ):
                raise ValueError(f"a malformed status line: {lines[0][:100]!r}")
            status = int(status_text)
            if not 100 <= status < 200 or status == 101:
                break
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t") and headers:  # a folded line continues the one before it
                name, value = headers[-1]
                headers[-1] = (name, value + b" " + line.strip(b" \t"))
                continue
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise ValueError(f"a malformed header line: {line[:100]!r}")
            headers.append((name, value.strip(b" \t")))
        length: int | None = None
        chunked = False
        keep = version == b"HTTP/1.1"
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                if not value.isdigit() or (length is not None and int(value) != length):
                    raise ValueError(f"a malformed content-length: {value[:40]!r}")
                length = int(value)
            elif lower == b"transfer-encoding":
                chunked = value.lower().split(b",")[-1].strip() == b"chunked"
            elif lower == b"connection":
                tokens = {token.strip() for token in value.lower().split(b",")}
                keep = b"close" not in tokens and (keep or b"keep-alive" in tokens)
        if method == "HEAD" or status in (204, 304):
            body = b""
        elif chunked:
            body, buffered = self._chunked(buffered)
        elif length is not None:
            body, buffered = self._exactly(buffered, length)
        else:  # the body ends with the connection
            body, buffered, keep = self._to_the_end(buffered), b"", False
        # bytes past the answer were never asked for: the connection is out of step, not to be used again
        return status, reason, version, headers, body, keep and not buffered

    def _recv(self) -> bytes:
        sock = self.sock
        assert sock is not None
        return sock.recv(RECV_BYTES)

    def _head(self, buffered: bytes) -> tuple[bytes, bytes]:
        """An answer's head (up to its blank line, not included) and what was read past it."""
        data = buffered
        while True:
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                return data[:end], data[end + 4 :]
            if len(data) > MAX_HEAD_BYTES:
                raise ValueError(f"an answer's head over {MAX_HEAD_BYTES} bytes")
            chunk = self._recv()
            if not chunk:
                if not data:
                    raise _NoAnswer("Server disconnected without sending a response.")
                raise ValueError("the connection ended in the middle of an answer's head")
            data += chunk

    def _exactly(self, buffered: bytes, length: int) -> tuple[bytes, bytes]:
        """``length`` bytes (those buffered first) and what was read past them."""
        if len(buffered) >= length:
            return buffered[:length], buffered[length:]
        body = bytearray(length)
        body[: len(buffered)] = buffered
        view = memoryview(body)
        filled = len(buffered)
        sock = self.sock
        assert sock is not None
        while filled < length:
            n = sock.recv_into(view[filled:])
            if not n:
                raise ValueError(
                    f"the connection ended {length - filled} bytes before the answer's end"
                )
            filled += n
        return bytes(body), b""

    def _line(self, buffered: bytes) -> tuple[bytes, bytes]:
        while True:
            end = buffered.find(b"\r\n")
            if end >= 0:
                return buffered[:end], buffered[end + 2 :]
            if len(buffered) > MAX_HEAD_BYTES:
                raise ValueError("a chunk's size line is too long")
            chunk = self._recv()
            if not chunk:
                raise ValueError("the connection ended in the middle of a chunked answer")
            buffered += chunk

    def _chunked(self, buffered: bytes) -> tuple[bytes, bytes]:
        parts: list[bytes] = []
        while True:
            line, buffered = self._line(buffered)
            size_text = line.split(b";", 1)[0].strip()
            if not size_text or size_text.strip(b"0123456789abcdefABCDEF"):
                raise ValueError(f"a malformed chunk size: {size_text[:40]!r}")
            size = int(size_text, 16)
            if size == 0:
                while True:  # trailer lines, up to the blank one
                    line, buffered = self._line(buffered)
                    if not line:
                        return b"".join(parts), buffered
            data, buffered = self._exactly(buffered, size + 2)
            if data[-2:] != b"\r\n":
                raise ValueError("a chunk that does not end where its size says")
            parts.append(data[:-2])

    def _to_the_end(self, buffered: bytes) -> bytes:
        parts = [buffered]
        while chunk := self._recv():
            parts.append(chunk)
        return b"".join(parts)


class FastLane:
    """Kept-alive connections to one grid. Thread-safe: a connection serves one request at a time.

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
        raw: bytes | None = None,
    ) -> httpx.Response:
        """One request; ``body`` is sent as JSON unless None (as httpx's ``json=``), ``raw`` as it is."""
        if not isinstance(timeout, httpx.Timeout):
            timeout = httpx.Timeout(timeout)
        lines = self.headers
        if headers:
            given = [(str(name), str(value)) for name, value in headers.items()]
            for name, value in given:
                if not _TOKEN(name) or _UNSAFE_VALUE(value):
                    raise ValueError(f"a header that cannot be sent: {name!r}: {value[:100]!r}")
            names = {name.lower() for name, _ in given}
            lines = [line for line in lines if line[0].lower() not in names] + given
        else:
            names = self._header_names
        content = raw
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
        if _UNSAFE_TARGET(target):
            raise ValueError(f"a request target that cannot be sent: {target[:100]!r}")
        head = "".join(
            [
                f"{method} {target} HTTP/1.1\r\n",
                *[f"{name}: {value}\r\n" for name, value in lines],
                "\r\n",
            ]
        ).encode("latin-1")

        connection, reused = self._acquire(timeout)
        try:
            written = self._write(connection, head, content, timeout)
            if not written and reused:
                # The grid closed the idle connection after the check in _acquire. Resending is safe: the write
                # failed, so the grid never had the whole request (its content-length says where it ends), and a
                # server does not act on half a request. A request written whole is never sent again, whatever
                # happens next (no answer, a dropped connection): a POST /run sent twice could run the call twice.
                # httpcore likewise drops idle connections the server closed before using them and never resends
                # a request it wrote; a write that fails on a reused connection is the one case resent here.
                connection.close()
                connection = self._connect(timeout)
                written = self._write(connection, head, content, timeout)
            # A failed write still reads: the grid may have answered (413, 401) before it stopped reading, as
            # httpcore does; with nothing to read, the read raises.
            answer = self._read(connection, method, target, timeout)
            keep = written and connection.keep
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
        try:
            sock = socket.create_connection((self.host, self.port), timeout.connect)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc) or "timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(str(exc)) from None
        try:  # small requests and answers go out at once, as http.client and httpcore set it
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        return _Connection(sock)

    def _write(
        self,
        connection: _Connection,
        head: bytes,
        content: bytes | None,
        timeout: httpx.Timeout,
    ) -> bool:
        """Send the request; False if the connection failed under it (the grid had closed it)."""
        try:
            connection.settimeout(timeout.write)
            connection.write(head, content)
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
        try:
            connection.settimeout(timeout.read)
            status, reason, version, headers, content, connection.keep = connection.read(method)
        except TimeoutError as exc:
            raise httpx.ReadTimeout(str(exc) or "timed out") from None
        except _NoAnswer as exc:
            raise httpx.RemoteProtocolError(str(exc)) from None
        except OSError as exc:
            raise httpx.ReadError(str(exc)) from None
        except ValueError as exc:  # a malformed answer, or one cut short
            raise httpx.RemoteProtocolError(f"the grid's answer could not be read: {exc}") from None
        extensions = {"http_version": version, "reason_phrase": reason}
        request = self._request(method, target)
        if any(name.lower() == b"content-length" for name, _ in headers):
            return httpx.Response(
                status, headers=headers, content=content, request=request, extensions=extensions
            )
        # httpx's content= would add a content-length the grid did not send (a chunked answer, say)
        response = httpx.Response(
            status,
            headers=headers,
            stream=httpx.ByteStream(content),
            request=request,
            extensions=extensions,
        )
        response.read()
        return response

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
