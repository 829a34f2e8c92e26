"""The client's fast lane (nanogrid/fastlane.py): plain API requests over http.client instead of httpx.

What must never happen: an answer through the lane that differs from httpx's (a value, an error's type or message);
a request sent twice because a kept-alive connection was gone (a POST /run run twice); a grid that stops answering
and a client that waits forever; two threads that get each other's answers; the lane taking a request httpx must
send (an injected transport, https, a proxy).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

import nanogrid
from nanogrid import fastlane
from nanogrid.errors import APIError, GridUnresponsive, NotConnected

# -- a tiny grid stand-in that can misbehave -----------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _TinyServer

    def do_POST(self) -> None:
        self._answer()

    def do_GET(self) -> None:
        self._answer()

    def do_PUT(self) -> None:
        self._answer()

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        server = self.server
        with server.lock:
            server.requests += 1
            number = server.requests
            server.seen.append((self.command, self.path, dict(self.headers), body))
        behaviour = server.behaviour(number)
        if behaviour == "drop":  # read the whole request, then go away without a word
            self.close_connection = True
            return
        if behaviour == "silent":
            server.release.wait(30)
            self.close_connection = True
            return
        is_json = self.headers.get("content-type") == "application/json"
        answer = json.dumps(
            {"n": number, "path": self.path, "body": json.loads(body) if is_json else None}
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
        self.wfile.flush()
        if behaviour in ("close", "reset"):  # closes the kept-alive connection without saying so
            if behaviour == "reset":  # ... with a reset, so that the next write on it fails
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                server.resets.add(self.connection)
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _TinyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, behaviour: Any) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.behaviour = (
            behaviour  # request number (from 1) -> "answer", "close", "reset", "drop" or "silent"
        )
        self.lock = threading.Lock()
        self.requests = 0
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []
        self.release = threading.Event()
        self.resets: set[socket.socket] = set()

    def shutdown_request(self, request: Any) -> None:
        if request in self.resets:  # a reset alone, no FIN first
            self.resets.discard(request)
            request.close()
        else:
            super().shutdown_request(request)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[_TinyServer] = []

    def start(behaviour: Any = lambda n: "answer") -> _TinyServer:
        server = _TinyServer(behaviour)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.release.set()
        server.shutdown()
        server.server_close()


def _lane(client: nanogrid.Client) -> fastlane.FastLane:
    assert client._lane is not None, "this client should send through the fast lane"
    return client._lane


_readable = fastlane._readable


def _until_the_server_closed_it(client: nanogrid.Client) -> None:
    """Wait until the server's close of the client's idle connection has arrived."""
    deadline = time.monotonic() + 10
    connection = _lane(client)._idle[-1][0]
    while not _readable(connection.sock) and time.monotonic() < deadline:
        time.sleep(0.01)


# -- what goes through the lane ------------------------------------------------------------------------------------


def test_plain_requests_go_through_the_lane_as_httpx_would_send_them(serve):
    server = serve()
    client = nanogrid.Client(server.url, api_key="k-123")
    try:
        answer = client.request(
            "POST",
            "/run",
            json={"x": "é", "n": [1, 2.5]},
            headers={"X-Hold": "2"},
            params={"after": "", "wait": 2.5, "watched": "true", "flag": True, "path": "/a b&c"},
        ).json()
        assert _lane(client).sent == 1
        method, path, headers, body = server.seen[0]
        # the body and the query as httpx encodes json= and renders params=
        assert body == json.dumps(
            {"x": "é", "n": [1, 2.5]}, ensure_ascii=False, separators=(",", ":")
        ).encode("utf-8")
        expected = httpx.Request(
            "POST",
            server.url + "/v1/run",
            params={"after": "", "wait": 2.5, "watched": "true", "flag": True, "path": "/a b&c"},
        )
        assert (method, path) == ("POST", expected.url.raw_path.decode())
        assert answer["path"] == path
        lower = {k.lower(): v for k, v in headers.items()}
        assert lower["x-api-key"] == "k-123"
        assert lower["x-hold"] == "2"
        assert lower["content-type"] == "application/json"
        assert lower["content-length"] == str(len(body))
        assert lower["host"] == server.url.removeprefix("http://")
        assert lower["accept-encoding"] == "identity"
        assert lower["user-agent"]
    finally:
        client.close()


def test_the_lane_is_not_used_with_a_transport_https_or_a_proxy(serve, monkeypatch):
    server = serve()
    assert nanogrid.Client(server.url, api_key="k", transport=httpx.HTTPTransport())._lane is None
    assert nanogrid.Client("https://grid.example", api_key="k")._lane is None
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    assert nanogrid.Client(server.url, api_key="k")._lane is None
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # httpx does not proxy it either
    assert nanogrid.Client(server.url, api_key="k")._lane is not None
    monkeypatch.delenv("HTTP_PROXY")
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    assert nanogrid.Client(server.url, api_key="k")._lane is None


def test_bytes_as_content_go_through_the_lane_as_they_are(serve):
    server = serve()
    client = nanogrid.Client(server.url, api_key="k")
    try:
        data = bytes(range(256)) * 1000  # past the one-write size: head and body in two writes
        client.request(
            "POST", "/packages", content=data, headers={"Content-Type": "application/zip"}
        )
        client.request("POST", "/packages", content=b"small", headers={"Content-Type": "x/y"})
        assert _lane(client).sent == 2
        (_, path, headers, body), (_, _, small_headers, small) = server.seen
        assert path == "/v1/packages" and body == data and small == b"small"
        assert (
            headers["Content-Type"] == "application/zip" and headers["Content-Length"] == "256000"
        )
        assert small_headers["Content-Type"] == "x/y"
    finally:
        client.close()


def test_uploads_and_other_arguments_keep_httpx(serve):
    server = serve()
    client = nanogrid.Client(server.url, api_key="k")
    try:
        client.request("POST", "/upload", files={"file": ("f.zip", b"raw")})  # a form
        client.request("GET", "/jobs", params={"status": ["a", "b"]})  # a repeated key
        assert _lane(client).sent == 0
        assert server.requests == 2
    finally:
        client.close()


# -- against a real grid: the same answers as httpx ----------------------------------------------------------------


@nanogrid.remote(memory=256, timeout=30)
def _triple(x):
    return {"x": x, "triple": 3 * x}


def _outcome(call: Any) -> Any:
    try:
        return ("ok", call())
    except Exception as exc:  # the comparison is the point: any exception, its type and message
        return ("raised", type(exc), str(exc), getattr(exc, "status", None))


@pytest.mark.integration
def test_a_grid_answers_the_same_through_the_lane_and_through_httpx(grid, monkeypatch):
    client = nanogrid.connect(grid.url, api_key=grid.api_key)
    wrong = nanogrid.Client(grid.url, api_key="not-the-key")
    calls = {
        "health": client.health,
        "remote": lambda: _triple.remote(7),
        "unknown job": lambda: client.status("j-does-not-exist"),
        "unknown function": lambda: client.delete_function("f-does-not-exist"),
        "wrong key": wrong.jobs,
    }
    through_lane = {name: _outcome(call) for name, call in calls.items()}
    assert _lane(client).sent >= len(calls) - 1 and _lane(wrong).sent == 1
    monkeypatch.setattr(client, "_lane", None)
    monkeypatch.setattr(wrong, "_lane", None)
    through_httpx = {name: _outcome(call) for name, call in calls.items()}

    assert through_lane["remote"] == ("ok", {"x": 7, "triple": 21})
    for name in ("unknown job", "unknown function", "wrong key"):
        assert through_lane[name][:2] == ("raised", APIError), through_lane[name]
    assert through_lane["wrong key"][3] == 401
    assert through_lane["unknown job"][3] == 404
    health_lane, health_httpx = through_lane.pop("health"), through_httpx.pop("health")
    assert health_lane[0] == "ok" and health_lane[1].keys() == health_httpx[1].keys()
    assert through_lane == through_httpx
    wrong.close()


# -- connections that go away --------------------------------------------------------------------------------------


def test_a_connection_the_grid_closed_while_idle_is_not_used_and_nothing_runs_twice(serve):
    server = serve(lambda n: "close")  # every answer ends its connection, unannounced
    client = nanogrid.Client(server.url, api_key="k")
    try:
        answers = []
        for i in range(3):
            answers.append(client.request("POST", "/run", json={"i": i}).json())
            _until_the_server_closed_it(client)
        assert [a["body"]["i"] for a in answers] == [0, 1, 2]
        assert server.requests == 3  # each POST ran exactly once
    finally:
        client.close()


def test_a_write_that_fails_on_a_reused_connection_is_sent_once_on_a_new_one(serve, monkeypatch):
    server = serve(lambda n: "reset")
    client = nanogrid.Client(server.url, api_key="k")
    # The grid's reset arrives after the idle check: the write on the old connection fails.
    monkeypatch.setattr(fastlane, "_readable", lambda sock: False)
    try:
        assert client.request("POST", "/run", json={"i": 0}).json()["n"] == 1
        _until_the_server_closed_it(client)
        assert client.request("POST", "/run", json={"i": 1}).json() == {
            "n": 2,
            "path": "/v1/run",
            "body": {"i": 1},
        }
        assert server.requests == 2
    finally:
        client.close()


@pytest.mark.parametrize("first", ["answer", "drop"])
def test_a_request_the_grid_took_and_dropped_raises_and_is_never_resent(serve, first):
    # "answer": the dropped request went out on a reused connection; "drop": on a new one.
    server = serve(lambda n: first if n == 1 else "drop")
    client = nanogrid.Client(server.url, api_key="k")
    try:
        if first == "answer":
            client.request("POST", "/run", json={"i": 0})
        with pytest.raises(NotConnected, match="cannot reach the grid"):
            client.request("POST", "/run", json={"i": 1})
        assert server.requests == (2 if first == "answer" else 1)
        assert [json.loads(seen[3])["i"] for seen in server.seen] == (
            [0, 1] if first == "answer" else [1]
        )
    finally:
        client.close()


def test_a_grid_that_never_answers_raises_grid_unresponsive(serve):
    server = serve(lambda n: "silent")
    client = nanogrid.Client(server.url, api_key="k", timeout=0.5)
    try:
        with pytest.raises(GridUnresponsive, match="to answer"):
            client.request("POST", "/run", json={"i": 0})
        assert server.requests == 1
    finally:
        client.close()


def test_a_grid_that_is_not_there_raises_not_connected():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = nanogrid.Client(f"http://127.0.0.1:{port}", api_key="k")
    try:
        with pytest.raises(NotConnected, match="is `nanogrid up` running"):
            client.health()
    finally:
        client.close()


# -- threads -------------------------------------------------------------------------------------------------------


def test_threads_sharing_a_client_each_get_their_own_answers(serve):
    server = serve()
    client = nanogrid.Client(server.url, api_key="k")
    crossed: list[Any] = []

    def calls(thread: int) -> None:
        for i in range(50):
            sent = {"thread": thread, "i": i}
            answer = client.request("POST", f"/echo/{thread}", json=sent).json()
            if answer["body"] != sent or answer["path"] != f"/v1/echo/{thread}":
                crossed.append((sent, answer))

    threads = [threading.Thread(target=calls, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lane = _lane(client)
    assert not crossed
    assert lane.sent == server.requests == 400
    assert 1 <= lane._open <= 8  # kept alive, one per thread at most
    client.close()
    assert lane._open == 0  # nothing left open
    with pytest.raises(RuntimeError, match="closed"):
        client.request("GET", "/health")


# -- the lane's own HTTP reader, against answers written byte by byte ----------------------------------------------


class _RawGrid:
    """A server that reads each request's head and body and answers with the next of ``answers``: raw bytes, or
    (raw bytes, "then close"), or None (closes the connection at once). Counts the connections it accepted."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = list(answers)
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while self.answers:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(data) < length:
                    data += conn.recv(65536)
                data = data[length:]
                answer = self.answers.pop(0)
                if answer is None:
                    return
                if isinstance(answer, tuple):
                    conn.sendall(answer[0])
                    return
                conn.sendall(answer)

    def close(self) -> None:
        self.listener.close()


def _answer(body: bytes, *headers: str, status: str = "200 OK", version: str = "HTTP/1.1") -> bytes:
    lines = [f"{version} {status}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


WELL_FORMED = {
    "content-length": _answer(b'{"a":1}', "content-type: application/json", "content-length: 7"),
    "chunked": _answer(
        b'3\r\n{"a\r\n4;ext=1\r\n":1}\r\n0\r\ntrailer: x\r\n\r\n',
        "Transfer-Encoding: chunked",
        "Content-Type: application/json",
    ),
    "interim 100 first": b"HTTP/1.1 100 Continue\r\n\r\n"
    + _answer(b'{"a":1}', "content-length: 7"),
    "folded header": _answer(b'{"a":1}', "x-long: one", "  two", "content-length: 7"),
    "no reason phrase": b'HTTP/1.1 200\r\ncontent-length: 7\r\n\r\n{"a":1}',
    "a 404 with a body": _answer(b'{"detail":"no"}', "content-length: 15", status="404 Not Found"),
    "a 204": _answer(b"", status="204 No Content"),
}


@pytest.mark.parametrize("case", WELL_FORMED)
def test_the_lane_reads_every_framing_of_an_answer_as_httpx_does(case):
    answers = []
    for lane in (True, False):
        grid = _RawGrid([WELL_FORMED[case]])
        client = nanogrid.Client(grid.url, api_key="k")
        if not lane:
            client._lane = None
        try:
            response = client._http.request("GET", "/x") if not lane else None
            if lane:
                response = _lane(client).send("GET", "/v1/x", timeout=5)
            assert response is not None
            answers.append(
                (
                    response.status_code,
                    response.reason_phrase,
                    response.http_version,
                    response.content,
                    [(k, v) for k, v in response.headers.items() if k != "x-long"],
                )
            )
        finally:
            client.close()
            grid.close()
    assert answers[0] == answers[1]


@pytest.mark.parametrize(
    "case, answer",
    [
        ("cut short", (_answer(b'{"a":', "content-length: 7"), "then close")),
        ("no answer", None),
        ("not HTTP", b"SSH-2.0-OpenSSH_9.2\r\n\r\n"),
        ("a bad status", b"HTTP/1.1 2000 OK\r\ncontent-length: 0\r\n\r\n"),
        ("a bad header line", b"HTTP/1.1 200 OK\r\nno colon here\r\ncontent-length: 0\r\n\r\n"),
        ("a bad length", _answer(b"", "content-length: -1")),
        ("two lengths", _answer(b"ab", "content-length: 2", "content-length: 3")),
        ("a bad chunk", _answer(b"zz\r\nab\r\n0\r\n\r\n", "transfer-encoding: chunked")),
        ("a chunk too short", _answer(b"5\r\nab\r\n0\r\n\r\n", "transfer-encoding: chunked")),
        ("an endless head", b"HTTP/1.1 200 OK\r\nx: " + b"a" * (70 << 10)),
        ("a head cut short", (b"HTTP/1.1 200 OK\r\ncontent-len", "then close")),
        (
            "a chunked answer cut short",
            (_answer(b"5\r\nab", "transfer-encoding: chunked"), "then close"),
        ),
    ],
)
def test_a_broken_answer_raises_not_connected_and_its_connection_is_never_reused(case, answer):
    grid = _RawGrid([answer, _answer(b'{"n":2}', "content-length: 7")])
    client = nanogrid.Client(grid.url, api_key="k", timeout=5)
    try:
        with pytest.raises(NotConnected, match="cannot reach the grid"):
            client.request("POST", "/run", json={"i": 0})
        # never half an answer taken for a whole one; the next request goes out on a new connection
        assert client.request("POST", "/run", json={"i": 1}).json() == {"n": 2}
        assert grid.connections == 2
    finally:
        client.close()
        grid.close()


@pytest.mark.parametrize(
    "case, first",
    [
        ("connection: close", _answer(b"{}", "content-length: 2", "Connection: close")),
        ("HTTP/1.0", _answer(b"{}", "content-length: 2", version="HTTP/1.0")),
        ("ends with the connection", (_answer(b"{}", "connection: close"), "then close")),
        ("bytes past its end", _answer(b"{}", "content-length: 2") + b"HTTP/1.1 200 OK\r\n\r\n"),
    ],
)
def test_an_answer_that_ends_its_connection_is_not_followed_by_another_request_on_it(case, first):
    grid = _RawGrid([first, _answer(b'{"n":2}', "content-length: 7")])
    client = nanogrid.Client(grid.url, api_key="k", timeout=5)
    try:
        assert client.request("POST", "/run", json={"i": 0}).json() == {}
        assert client.request("POST", "/run", json={"i": 1}).json() == {"n": 2}
        assert grid.connections == 2
        assert _lane(client).sent == 2
    finally:
        client.close()
        grid.close()


def test_a_header_with_a_line_break_is_refused_before_anything_is_sent(serve):
    server = serve()
    client = nanogrid.Client(server.url, api_key="k")
    try:
        with pytest.raises(ValueError, match="cannot be sent"):
            client.request("POST", "/run", json={}, headers={"X-Hold": "1\r\nX-Api-Key: other"})
        with pytest.raises(ValueError, match="cannot be sent"):
            client.request("POST", "/run", json={}, headers={"X Bad": "1"})
        assert server.requests == 0
    finally:
        client.close()
