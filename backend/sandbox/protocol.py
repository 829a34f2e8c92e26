"""The agent's side of the bootstrap's framed protocol (see runtimes/python/bootstrap.py)."""

from __future__ import annotations

import json
import os
import select
import struct
import time
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
    """Reads frames from a pipe with a deadline, without ever blocking past it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
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
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                    raise ChannelTimeout
            chunk = os.read(self.fd, max(size - len(self._buffer), 1 << 16))
            if not chunk:
                raise ChannelClosed
            self._buffer += chunk
