"""The AI node, reached by sandboxes through the host: they have no network of their own.

A function with ``ai=True`` sends its Ollama API request over the sandbox's channel; the worker
forwards it to the AI node only if it is an inference route (generate, chat, embeddings, tags),
never an admin one (pull, delete, create, copy, push: a real Ollama has no auth, so one owner
could otherwise delete everyone's models). The host counts the tokens from the node's answer,
so a function cannot misreport its usage, and enforces a per-owner token budget per hour.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from typing import Any

import httpx

ROUTES = {("POST", "/api/generate"), ("POST", "/api/chat"), ("POST", "/api/embeddings"), ("POST", "/api/embed"),
          ("GET", "/api/tags")}
CHANNEL = "nanogrid:channel"  # AI_ENDPOINT as a sandbox sees it (nanogrid.ai.CHANNEL)
MAX_REQUEST_BYTES = 4 << 20
MAX_RESPONSE_BYTES = 32 << 20
WINDOW_S = 3600.0


def _error(status: int, message: str) -> tuple[dict[str, Any], bytes]:
    return {"op": "ai_reply", "status": status}, json.dumps({"error": message}).encode()


class AIGateway:
    """One per worker: the connection to the AI node and the owners' token budgets."""

    def __init__(self, endpoint: str, model: str = "", tokens_per_hour: int = 0) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.model = model  # the grid's default model (LLM_MODEL in the sandbox)
        self.tokens_per_hour = tokens_per_hour
        self._http = httpx.Client(base_url=self.endpoint, timeout=httpx.Timeout(300.0, connect=5.0))
        self._spent: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def session(self, owner: str) -> AIGatewaySession:
        return AIGatewaySession(self, owner)

    def spent(self, owner: str) -> int:
        """Tokens the owner used in the last hour (on this worker)."""
        with self._lock:
            window = self._spent.get(owner)
            if not window:
                return 0
            while window and window[0][0] < time.monotonic() - WINDOW_S:
                window.popleft()
            return sum(tokens for _, tokens in window)

    def charge(self, owner: str, tokens: int) -> None:
        with self._lock:
            self._spent.setdefault(owner, deque()).append((time.monotonic(), tokens))

    def close(self) -> None:
        self._http.close()


class AIGatewaySession:
    """One call's requests: forwarded, checked and counted (``usage`` goes on the job)."""

    def __init__(self, gateway: AIGateway, owner: str) -> None:
        self.gateway = gateway
        self.owner = owner
        self.usage = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def forward(self, header: dict[str, Any], body: bytes, deadline: float) -> tuple[dict[str, Any], bytes]:
        method, path = str(header.get("method")), str(header.get("path"))
        if (method, path) not in ROUTES:
            return _error(403, f"only the AI node's inference routes are open to functions, not {str(method)[:10]} "
                               f"{str(path)[:80]}")
        if len(body) > MAX_REQUEST_BYTES:
            return _error(413, f"an AI request of {len(body)} bytes (at most {MAX_REQUEST_BYTES})")
        if method == "POST":
            try:
                request = json.loads(body)
            except ValueError:
                request = None
            if not isinstance(request, dict):
                return _error(400, "an AI request body must be a JSON object")
        budget = self.gateway.tokens_per_hour
        if budget and self.gateway.spent(self.owner) >= budget:
            return _error(429, f"this owner's AI budget of {budget} tokens per hour is spent; try again later")
        left = deadline - time.monotonic()
        if left <= 0:
            return _error(504, "the call's time is up")
        try:
            with self.gateway._http.stream(method, path, content=body if method == "POST" else None,
                                           headers={"content-type": "application/json"}, timeout=left) as response:
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > MAX_RESPONSE_BYTES:
                        return _error(502, f"the AI node's answer is over {MAX_RESPONSE_BYTES >> 20} MiB")
                status = response.status_code
        except httpx.HTTPError as exc:
            return _error(502, f"the AI node did not answer ({type(exc).__name__})")
        if status == 200 and path != "/api/tags":
            self._count(bytes(data))
        return {"op": "ai_reply", "status": status}, bytes(data)

    def _count(self, data: bytes) -> None:
        """Tokens from the node's own figures: the final object of a stream, or the whole answer."""
        prompt = completion = 0
        for line in data.splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict) and item.get("done", True):
                prompt += _count_of(item.get("prompt_eval_count"))
                completion += _count_of(item.get("eval_count"))
        self.usage["calls"] += 1
        self.usage["prompt_tokens"] += prompt
        self.usage["completion_tokens"] += completion
        self.gateway.charge(self.owner, prompt + completion)


def _count_of(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 40 else 0
