"""A test server speaking the Ollama HTTP API (the parts NanoGrid uses): a fixture, not product code.

Its answers are deterministic: they name the model and echo the prompt, and token counts are
word counts, so tests can check which model a call reached and what was counted. Like Ollama it
stops an answer at ``options.num_predict`` tokens. Options for tests of the grid's budget:
``answer_words`` makes every answer that long (a model that would talk for ever), ``chunk_delay_s``
slows a stream down (so calls overlap), ``flood_bytes`` streams that much filler before the final
object (an answer too large to pass), and ``tokens_done`` adds up every token the node reported.
"""

from __future__ import annotations

import asyncio
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
    return JSONResponse(
        {
            "models": [
                {
                    "name": m,
                    "model": m,
                    "modified_at": "2026-11-23T00:00:00Z",
                    "size": 1,
                    "digest": "0" * 64,
                    "details": {},
                }
                for m in MODELS
            ]
        }
    )


async def delete(request: Request):
    return JSONResponse(
        {}
    )  # a real Ollama deletes the model: no auth, so only the grid stands in front of it


class FakeOllama:
    def __init__(
        self, *, answer_words: int = 0, chunk_delay_s: float = 0.0, flood_bytes: int = 0
    ) -> None:
        self.answer_words = answer_words  # 0: the short summary answer
        self.chunk_delay_s = chunk_delay_s
        self.flood_bytes = flood_bytes
        self.tokens_done = 0  # prompt and answer tokens of every answer, as the node reported them
        self.requests: list[
            dict
        ] = []  # the JSON body of every generate and chat request that reached it

        async def generate(request: Request):
            body = await request.json()
            self.requests.append(body)
            if body["model"] not in MODELS and f"{body['model']}:latest" not in MODELS:
                return JSONResponse(
                    {"error": f"model '{body['model']}' not found"}, status_code=404
                )
            return self._reply(body, "response", body.get("prompt", ""))

        async def chat(request: Request):
            body = await request.json()
            self.requests.append(body)
            return self._reply(body, "message", body["messages"][-1]["content"])

        routes = Starlette(
            routes=[
                Route("/api/tags", tags),
                Route("/api/generate", generate, methods=["POST"]),
                Route("/api/chat", chat, methods=["POST"]),
                Route("/api/delete", delete, methods=["DELETE", "POST"]),
            ]
        )
        self.seen: list[
            tuple[str, str]
        ] = []  # (method, path) of every request that reached the node

        async def app(scope, receive, send):
            if scope["type"] == "http":
                self.seen.append((scope["method"], scope["path"]))
            await routes(scope, receive, send)

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self._sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def _words(self, body: dict, content: str) -> list[str]:
        """The answer's words, stopped at num_predict as Ollama stops."""
        words = (
            ("word " * self.answer_words).split()
            if self.answer_words
            else _answer(body["model"], content).split()
        )
        limit = (body.get("options") or {}).get("num_predict")
        return words[:limit] if isinstance(limit, int) and limit > 0 else words

    def _reply(self, body: dict, key: str, content: str) -> StreamingResponse | JSONResponse:
        base = {"model": body["model"], "created_at": "2026-11-23T00:00:00Z"}
        words = self._words(body, content)
        text = " ".join(words)
        whole = (
            {"response": text}
            if key == "response"
            else {"message": {"role": "assistant", "content": text}}
        )
        final = {
            **base,
            "done": True,
            "done_reason": "stop",
            "prompt_eval_count": len(content.split()),
            "eval_count": len(words),
        }
        self.tokens_done += final["prompt_eval_count"] + final["eval_count"]
        if not body.get("stream", True) and not self.flood_bytes:
            return JSONResponse({**final, **whole})
        delay, flood = self.chunk_delay_s, self.flood_bytes

        async def chunks():
            for word in words:
                piece = word + " "
                part = (
                    {"response": piece}
                    if key == "response"
                    else {"message": {"role": "assistant", "content": piece}}
                )
                yield json.dumps({**base, **part, "done": False}) + "\n"
                await asyncio.sleep(delay)
            filler = json.dumps({**base, "response": "x" * 65000, "done": False}) + "\n"
            for _ in range(-(-flood // len(filler))):
                yield filler
            yield (
                json.dumps(
                    {
                        **final,
                        **(
                            {"response": ""}
                            if key == "response"
                            else {"message": {"role": "assistant", "content": ""}}
                        ),
                    }
                )
                + "\n"
            )

        return StreamingResponse(chunks(), media_type="application/x-ndjson")

    def __enter__(self) -> FakeOllama:
        self._thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(10)
