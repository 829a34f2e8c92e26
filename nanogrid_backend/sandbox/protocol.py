"""The host's side of the bootstrap's framed protocol (see nanogrid_runtimes/python/bootstrap.py).

Everything a sandbox sends is hostile input: the function runs in the bootstrap's own
interpreter, so it can write any bytes to the reply channel. The reader therefore caps every
frame as it arrives (header and body sizes are checked before a byte of the body is buffered),
and headers are parsed as JSON objects only. Any breach raises ``ProtocolViolation``; the
caller discards the sandbox.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

HEADER = struct.Struct(">II")  # JSON header length, body length
# any frame's header, unless the reader is given a call reply's (reply_header_cap)
MAX_HEADER_BYTES = 256 << 10
CHUNK_BYTES = 1 << 20  # output file data travels in frames of at most this many bytes


def reply_header_cap(capture_limit: int) -> int:
    """The largest header a call's reply may need: stdout and stderr kept up to the capture limit each, and the
    error's message and traceback, in JSON at up to 6 bytes a character (``\\u00XX``, ``\\ufffd``)."""
    return max(MAX_HEADER_BYTES, 4 * 6 * (capture_limit + 256) + (64 << 10))


class ChannelClosed(Exception):
    pass


class ChannelTimeout(Exception):
    pass


class ProtocolViolation(Exception):
    """The sandbox sent something the protocol does not allow (forged, oversized or malformed)."""


class FrameTooLarge(ProtocolViolation):
    """A frame bigger than the reader allows at this point (refused before its body is read)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a frame body of {size} bytes where at most {limit} are allowed")
        self.size, self.limit = size, limit


def encode_frame(header: dict[str, Any], body: bytes = b"") -> bytes:
    data = json.dumps(header).encode()
    return HEADER.pack(len(data), len(body)) + data + body


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class FrameReader:
    """Reads frames from a pipe or socket with a deadline, without ever blocking past it.

    ``read_some(n)`` returns up to n bytes of the bootstrap's reply stream (b"" at its end); by
    default it is ``os.read`` on ``fd``. The Docker sandbox passes one that strips the attach
    stream's multiplexing headers. ``read_into(view)`` fills part of ``view`` instead (the number of
    bytes, 0 at the end): a streamed result's pieces are read with it straight into one reused buffer.
    """

    def __init__(
        self,
        fd: int,
        read_some: Callable[[int], bytes] | None = None,
        pending: Callable[[], bool] | None = None,
        max_header: int = MAX_HEADER_BYTES,
        read_into: Callable[[memoryview], int] | None = None,
    ) -> None:
        self.fd = fd
        self._read_some = read_some or (lambda n: os.read(fd, n))
        self._read_into = read_into or (lambda view: os.readv(fd, [view]))
        self._pending = pending or (lambda: False)
        self._readable = Readable(fd)  # the poll registered once: a frame may wait several times
        self._buffer = bytearray()
        self.max_header = max_header

    def read_into(
        self, deadline: float | None, buffer: bytearray
    ) -> tuple[dict[str, Any], memoryview]:
        """One frame whose body (at most ``len(buffer)`` bytes) is read into ``buffer``: the body is a view of it,
        valid until the buffer is used again. For large pieces: the bytes are copied once, not four times."""
        header_len, body_len = self._sizes(deadline, len(buffer))
        self._fill(HEADER.size + header_len, deadline)
        header = self._header(header_len)
        del self._buffer[: HEADER.size + header_len]
        view = memoryview(buffer)[:body_len]
        filled = min(len(self._buffer), body_len)  # what came with the header
        view[:filled] = self._buffer[:filled]
        del self._buffer[:filled]
        while filled < body_len:
            self._wait(deadline)
            got = self._read_into(view[filled:])
            if not got:
                raise ChannelClosed
            filled += got
        return header, view

    def _sizes(self, deadline: float | None, max_body: int) -> tuple[int, int]:
        self._fill(HEADER.size, deadline)
        header_len, body_len = HEADER.unpack_from(self._buffer)
        if header_len > self.max_header:
            raise ProtocolViolation(
                f"a frame header of {header_len} bytes (at most {self.max_header})"
            )
        if body_len > max_body:
            raise FrameTooLarge(body_len, max_body)
        return header_len, body_len

    def _header(self, header_len: int) -> dict[str, Any]:
        try:
            header = json.loads(bytes(self._buffer[HEADER.size : HEADER.size + header_len]))
        except (UnicodeDecodeError, ValueError):
            raise ProtocolViolation("a frame header that is not JSON") from None
        if not isinstance(header, dict):
            raise ProtocolViolation("a frame header that is not a JSON object")
        return header

    def _wait(self, deadline: float | None) -> None:
        if deadline is not None and not self._pending():
            left = deadline - time.monotonic()
            if left <= 0 or not self._readable(left):
                raise ChannelTimeout

    def read(self, deadline: float | None, max_body: int) -> tuple[dict[str, Any], bytes]:
        """One frame whose body is at most ``max_body`` bytes; ProtocolViolation otherwise."""
        header_len, body_len = self._sizes(deadline, max_body)
        total = HEADER.size + header_len + body_len
        self._fill(total, deadline)
        header = self._header(header_len)
        body = bytes(self._buffer[HEADER.size + header_len : total])
        del self._buffer[:total]
        return header, body

    def _fill(self, size: int, deadline: float | None) -> None:
        while len(self._buffer) < size:
            self._wait(deadline)
            chunk = self._read_some(min(max(size - len(self._buffer), 1 << 16), 4 << 20))
            if not chunk:
                raise ChannelClosed
            self._buffer += chunk


class Readable:
    """Whether one descriptor has something to read (or has ended) within a timeout, with ``poll`` registered once.
    ``poll`` takes descriptors of any number (``select`` refuses those from 1024 on, which a busy grid process
    reaches)."""

    def __init__(self, fd: int) -> None:
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN | select.POLLPRI)

    def __call__(self, timeout_s: float) -> bool:
        return bool(self._poll.poll(max(0.0, timeout_s) * 1000))


def readable(fd: int, timeout_s: float) -> bool:
    """One look at ``fd`` (see ``Readable``), for a descriptor that may be closed and its number reused between
    looks."""
    return Readable(fd)(timeout_s)


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

    def read_into(self, view: memoryview) -> int:
        """Stdout bytes straight into ``view`` (at least one unless the stream ended), received in place when
        nothing is buffered: a large result crosses this process with one copy (dockerd sends it in frames of
        about 32 KiB, each after its own 8-byte header)."""
        while not self._raw:
            if self._left == 0:
                head = self.sock.recv(8, socket.MSG_WAITALL)
                if len(head) < 8:
                    if not head:
                        return 0
                    self._raw += head  # a header cut short: the general path below completes it
                    break
                self._stream, self._left = head[0], int.from_bytes(head[4:8], "big")
                continue
            if self._stream != self.STDOUT:
                break
            got = self.sock.recv_into(view[: self._left] if len(view) > self._left else view)
            self._left -= got
            return got
        data = self.read_some(len(view))
        view[: len(data)] = data
        return len(data)

    def read_pending(self) -> bool:
        """Take in what has arrived (for a socket ``select`` found readable); False once the stream has ended.
        The bytes wait for ``read_some``, which also keeps what was said on stderr."""
        data = self.sock.recv(1 << 16)
        self._raw += data
        return bool(data)

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
                take = min(self._left, len(self._raw), n - len(out))
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


def check_need(header: dict[str, Any], body: bytes, count: int) -> list[int]:
    """The bootstrap's ``need`` frame: which of the call's ``count`` blobs it lacks, as strictly increasing
    indices, and nothing else (no other field, no body)."""
    need = header.get("blobs")
    if (
        header.get("op") != "need"
        or set(header) != {"op", "blobs"}
        or body
        or not isinstance(need, list)
    ):
        raise ProtocolViolation(
            f"a {str(header.get('op'))[:40]!r} frame where the call's 'need' frame was due"
        )
    last = -1
    for n in need:
        if not isinstance(n, int) or isinstance(n, bool) or not last < n < count:
            raise ProtocolViolation(
                f"a 'need' frame asking for blobs the call does not have ({str(n)[:40]} of "
                f"{count}), or twice"
            )
        last = n
    return need


# What a call's reply header may hold, and of what type; anything else is a violation.
_REPLY_FIELDS: dict[str, type | tuple[type, ...]] = {
    "ok": bool,
    "result_format": str,
    "error": dict,
    "stdout": str,
    "stderr": str,
    "duration_ms": (int, float),
    "peak_rss_bytes": (int, type(None)),
    "output_files": int,
    "op": str,
    "result_size": int,  # a result streamed after the reply in ``result_data`` frames (the reply's body is empty)
    "result_file": bool,  # ... or left in a file on the sandbox's own disk for the host to read (the Docker sandbox)
}
_ERROR_FIELDS = ("kind", "type", "module", "message", "traceback")
_ERROR_KINDS = {"exception", "memory", "disk", "cancelled"}  # cancelled: a skipped call of a batch


def check_reply(header: dict[str, Any], capture_limit: int) -> dict[str, Any]:
    """The call reply's header, validated field by field; the sandbox's word is taken for nothing else."""
    for key, value in header.items():
        expected = _REPLY_FIELDS.get(key)
        if expected is None:
            raise ProtocolViolation(f"an unexpected field {key[:40]!r} in the call's reply")
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ProtocolViolation(f"the reply's {key!r} has the wrong type")
    if header.get("op") not in (None, "result"):
        raise ProtocolViolation(
            f"a {str(header.get('op'))[:40]!r} frame where the call's reply was due"
        )
    if "ok" not in header:
        raise ProtocolViolation("a call reply without 'ok'")
    if header["ok"] and header.get("result_format") not in ("pickle", "json"):
        raise ProtocolViolation("a result in an unknown format")
    text_cap = capture_limit + 256  # the bootstrap's truncation notice comes on top
    for stream in ("stdout", "stderr"):
        if len(header.get(stream, "")) > text_cap:
            raise ProtocolViolation(f"{stream} over the {capture_limit}-byte capture limit")
    if not header["ok"]:
        error = header.get("error")
        if not isinstance(error, dict) or error.get("kind") not in _ERROR_KINDS:
            raise ProtocolViolation("a failed call without a valid error")
        for key, value in error.items():
            if key not in _ERROR_FIELDS or not isinstance(value, str) or len(value) > text_cap:
                raise ProtocolViolation("a malformed error in the call's reply")
    if header.get("output_files", 0) < 0:
        raise ProtocolViolation("a negative count of output files")
    if header.get("result_size", 1) <= 0:
        raise ProtocolViolation("a streamed result of no bytes")
    return header
