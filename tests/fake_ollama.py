"""A test server speaking the Ollama HTTP API (the parts NanoGrid uses): a fixture, not product code.

Its answers are deterministic: they name the model and echo the prompt, and token counts are
word counts, so tests can check which model a call reached and what was counted.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

MODELS = ["tiny:latest", "summarizer:latest"]


def _answer(model: str, text: str) -> str:
    return f"[{model}] summary: {' '.join(text.split()[:8])}"


async def tags(request: Request) -> JSONResponse:
    return JSONResponse({"models": [{"name": m, "model": m, "modified_at": "2026-11-23T00:00:00Z", "size": 1,
                                     "digest": "0" * 64, "details": {}} for m in MODELS]})


def _reply(body: dict, key: str, content: str, extra: dict) -> StreamingResponse | JSONResponse:
    base = {"model": body["model"], "created_at": "2026-11-23T00:00:00Z"}
    final = {**base, **extra, "done": True, "done_reason": "stop",
             "prompt_eval_count": len(content.split()), "eval_count": len(_answer(body["model"], content).split())}
    if not body.get("stream", True):
        return JSONResponse(final)
    words = _answer(body["model"], content).split(" ")

    async def chunks():
        for word in words:
            piece = word + " "
            part = {"response": piece} if key == "response" else {"message": {"role": "assistant", "content": piece}}
            yield json.dumps({**base, **part, "done": False}) + "\n"
        last = {**final, **({"response": ""} if key == "response" else
                            {"message": {"role": "assistant", "content": ""}})}
        yield json.dumps(last) + "\n"

    return StreamingResponse(chunks(), media_type="application/x-ndjson")


async def generate(request: Request):
    body = await request.json()
    if body["model"] not in MODELS and f"{body['model']}:latest" not in MODELS:
        return JSONResponse({"error": f"model '{body['model']}' not found"}, status_code=404)
    return _reply(body, "response", body.get("prompt", ""), {"response": _answer(body["model"], body.get("prompt", ""))})


async def chat(request: Request):
    body = await request.json()
    content = body["messages"][-1]["content"]
    return _reply(body, "message", content,
                  {"message": {"role": "assistant", "content": _answer(body["model"], content)}})


async def delete(request: Request):
    return JSONResponse({})  # a real Ollama deletes the model: no auth, so only the grid stands in front of it


class FakeOllama:
    def __init__(self) -> None:
        routes = Starlette(routes=[Route("/api/tags", tags), Route("/api/generate", generate, methods=["POST"]),
                                   Route("/api/chat", chat, methods=["POST"]),
                                   Route("/api/delete", delete, methods=["DELETE", "POST"])])
        self.seen: list[tuple[str, str]] = []  # (method, path) of every request that reached the node

        async def app(scope, receive, send):
            if scope["type"] == "http":
                self.seen.append((scope["method"], scope["path"]))
            await routes(scope, receive, send)

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self._sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> FakeOllama:
        self._thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(10)
