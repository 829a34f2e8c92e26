"""The controller's one ASGI middleware: request durations, and oversized bodies refused before they are read (413)."""

from __future__ import annotations

import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nanogrid_backend.controller.errors import error_body
from nanogrid_backend.controller.function_metrics import RequestDurations


class BodyTooLarge(Exception):
    pass


class RequestGate:
    """The controller's one ASGI middleware: times each request (``durations``, for /metrics) and refuses an
    oversized body before it is read. One layer, not two: every call pays for each layer it passes."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        durations: RequestDurations,
        streamed: tuple[str, int] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.durations = durations
        self.streamed = (
            streamed  # (path prefix, cap): routes that stream their body to disk (blob uploads)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # found by /metrics via request.state
        scope.setdefault("state", {})["request_durations"] = self.durations
        started, status = time.perf_counter(), 0  # 0: no answer started yet

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, self._limited(scope, receive), send_status)
        except BodyTooLarge:
            if not status:
                await self._refuse(send)
        finally:
            self.durations.observe(scope, status or 500, time.perf_counter() - started)

    def _limited(self, scope: Scope, receive: Receive) -> Receive:
        """``receive``, counting the body when its size is not known up front; a body declared over the cap
        raises at once."""
        if self.streamed and scope["path"].startswith(self.streamed[0]):
            return receive  # a streamed route caps its own body as it reads it
        declared, chunked = None, False
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared = value
            elif name == b"transfer-encoding":
                chunked = True
        if declared is not None and declared.isdigit():
            if int(declared) > self.max_bytes:
                raise BodyTooLarge
            if not chunked:
                # The server reads exactly the declared length (HTTP/1.1 framing), so such a body needs no counting:
                # a request with a Content-Length under the cap costs nothing more here.
                return receive
        seen = 0

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # a chunked body with no Content-Length
                raise BodyTooLarge
            return message

        return counted_receive

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            error_body(
                413,
                f"request body over the {self.max_bytes}-byte limit; pass large data by "
                "reference (a path or URL the function can read)",
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
