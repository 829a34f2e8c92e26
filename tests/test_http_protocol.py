"""The grid's HTTP protocol (nanogrid_backend/controller/http_protocol.py): an answer's head goes out with its body.

What must never happen: a head held back past its turn of the event loop (a stream whose first piece comes later
must still show its status and headers at once), a held head lost at a close, bytes reordered, or any write other
than an answer's head delayed at all.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from nanogrid_backend.controller.http_protocol import HeadWithBody, HttpProtocol


class _Recorder:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name in ("peername", "sockname") else default


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


def test_a_head_and_the_body_written_after_it_leave_as_one_write():
    async def scenario() -> _Recorder:
        recorder = _Recorder()
        transport = HeadWithBody(recorder, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(HEAD)
        assert recorder.writes == []  # held, for the body
        transport.write(b"{}")
        assert recorder.writes == [HEAD + b"{}"]
        transport.write(b"not a head")  # anything else goes straight through
        assert recorder.writes[-1] == b"not a head"
        await asyncio.sleep(0.01)  # the end-of-turn flush finds nothing held
        assert len(recorder.writes) == 2
        return recorder

    asyncio.run(scenario())


def test_a_head_whose_body_comes_later_goes_out_at_the_end_of_its_turn_and_a_close_never_loses_one():
    async def scenario() -> None:
        recorder = _Recorder()
        transport = HeadWithBody(recorder, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(HEAD)
        await asyncio.sleep(0)  # one turn
        await asyncio.sleep(0)
        assert recorder.writes == [HEAD]
        transport.write(b"{}")
        assert recorder.writes == [HEAD, b"{}"]
        transport.write(HEAD)
        transport.close()  # at once: the head still goes out first
        assert recorder.writes == [HEAD, b"{}", HEAD] and recorder.closed

    asyncio.run(scenario())


# -- a real server over the protocol ---------------------------------------------------------------------------


async def _slow_stream(request: Request) -> StreamingResponse:
    async def pieces() -> AsyncIterator[bytes]:
        await asyncio.sleep(1.0)
        yield b"late"

    return StreamingResponse(pieces(), headers={"x-stream": "yes"})


async def _json(request: Request) -> JSONResponse:
    return JSONResponse({"n": int(request.query_params.get("n", "0"))})


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    app = Starlette(routes=[Route("/stream", _slow_stream), Route("/json", _json)])
    config = uvicorn.Config(app, http=HttpProtocol, log_level="warning", lifespan="off")
    served = uvicorn.Server(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=served.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not served.started and time.monotonic() < deadline:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    served.should_exit = True
    thread.join(10)


def test_a_stream_shows_its_head_before_its_first_piece(server):
    with httpx.Client() as client:
        started = time.monotonic()
        with client.stream("GET", f"{server}/stream") as response:
            head_after = time.monotonic() - started
            assert response.status_code == 200 and response.headers["x-stream"] == "yes"
            assert response.read() == b"late"
    assert head_after < 0.8, f"the head waited for the body ({head_after:.2f} s)"


def test_answers_on_a_kept_alive_connection_arrive_whole_and_in_order(server):
    with httpx.Client() as client:
        for n in range(200):
            assert client.get(f"{server}/json", params={"n": n}).json() == {"n": n}
