"""The grid's HTTP/1.1 server protocol: uvicorn's, with an answer's head sent together with its body.

uvicorn writes an answer's status line and headers to the socket as soon as the app starts the answer, and the
body when the app sends it: two writes. Each wakes the client; on a small machine the client then takes the CPU,
reads the head, finds no body and sleeps until the second write wakes it again. A warm ``POST /v1/run`` answer
is sent head and body back to back (``fast_run.py``), so that ping-pong was on every call's path.

``HeadWithBody`` holds an answer's head until the next write (the body's first piece), and writes both as one;
a head whose body is not written in the same turn of the event loop (a stream that waits for its first piece)
goes out alone at the end of that turn, as before. Nothing else is held, so streams and flow control are as
uvicorn has them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeadWithBody:
    """A transport that holds an answer's head (``HTTP/1.1 ... \\r\\n\\r\\n``) until the next write or the end of
    the loop's turn; everything else is the wrapped transport's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._head: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        head, self._head = self._head, None
        if head is not None:
            self._transport.write(head + bytes(data))
        elif isinstance(data, bytes) and data.startswith(b"HTTP/") and data.endswith(b"\r\n\r\n"):
            self._head = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        head, self._head = self._head, None
        if head is not None and not self._transport.is_closing():
            self._transport.write(head)

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()  # a held head still goes out before the close, as a written one would
        self._transport.close()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._head or b"")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, its answers' heads sent with their bodies (``HeadWithBody``)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(HeadWithBody(transport, self.loop))  # type: ignore[arg-type]
