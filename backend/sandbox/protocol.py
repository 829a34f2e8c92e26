"""The agent's side of the bootstrap's framed protocol (see runtimes/python/bootstrap.py)."""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

HEADER = struct.Struct(">II")


class ChannelClosed(Exception):
    pass


class ChannelTimeout(Exception):
    pass


def encode_frame(header: dict[str, Any], body: bytes = b"") -> bytes:
    data = json.dumps(header).encode()
    return HEADER.pack(len(data), len(body)) + data + body


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class FrameReader:
    """Reads frames from a pipe or socket with a deadline, without ever blocking past it.

    ``read_some(n)`` returns up to n bytes of the bootstrap's reply stream (b"" at its end); by
    default it is ``os.read`` on ``fd``. The Docker sandbox passes one that strips the attach
    stream's multiplexing headers.
    """

    def __init__(self, fd: int, read_some: Callable[[int], bytes] | None = None,
                 pending: Callable[[], bool] | None = None) -> None:
        self.fd = fd
        self._read_some = read_some or (lambda n: os.read(fd, n))
        self._pending = pending or (lambda: False)
        self._buffer = bytearray()

    def read(self, deadline: float | None) -> tuple[dict[str, Any], bytes]:
        self._fill(HEADER.size, deadline)
        header_len, body_len = HEADER.unpack_from(self._buffer)
        total = HEADER.size + header_len + body_len
        self._fill(total, deadline)
        header = json.loads(bytes(self._buffer[HEADER.size:HEADER.size + header_len]))
        body = bytes(self._buffer[HEADER.size + header_len:total])
        del self._buffer[:total]
        return header, body

    def _fill(self, size: int, deadline: float | None) -> None:
        while len(self._buffer) < size:
            if deadline is not None and not self._pending():
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                    raise ChannelTimeout
            chunk = self._read_some(max(size - len(self._buffer), 1 << 16))
            if not chunk:
                raise ChannelClosed
            self._buffer += chunk


class DockerAttachStream:
    """The stdout half of a non-TTY ``docker attach`` socket: 8-byte headers (stream, 0, 0, 0, size)."""

    STDOUT = 1

    def __init__(self, sock: socket.socket, stderr_limit: int = 64 << 10) -> None:
        self.sock = sock
        self.stderr = bytearray()  # the bootstrap's own stderr: only what it says before it starts
        self._stderr_limit = stderr_limit
        self._raw = bytearray()
        self._left = 0  # bytes still to come in the current multiplexed frame
        self._stream = 0

    def pending(self) -> bool:
        return bool(self._raw)

    def read_some(self, n: int) -> bytes:
        """Stdout bytes (at least one unless the stream ended); skips stderr frames."""
        while True:
            out = bytearray()
            while self._raw and len(out) < n:
                if self._left == 0:
                    if len(self._raw) < 8:
                        break
                    self._stream, self._left = self._raw[0], int.from_bytes(self._raw[4:8], "big")
                    del self._raw[:8]
                    continue
                take = min(self._left, len(self._raw))
                piece = self._raw[:take]
                del self._raw[:take]
                self._left -= take
                if self._stream == self.STDOUT:
                    out += piece
                elif len(self.stderr) < self._stderr_limit:
                    self.stderr += piece
            if out:
                return bytes(out)
            data = self.sock.recv(max(n, 1 << 16))
            if not data:
                return b""
            self._raw += data
