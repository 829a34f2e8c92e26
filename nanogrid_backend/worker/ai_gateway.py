"""The AI node, reached by sandboxes through the host: they have no network of their own.

A function with ``ai=True`` sends its Ollama API request over the sandbox's channel; the worker
forwards it to the AI node only if it is an inference route (generate, chat, embeddings, tags),
never an admin one (pull, delete, create, copy, push: a real Ollama has no auth, so one owner
could otherwise delete everyone's models). The host counts the tokens from the node's answer,
so a function cannot misreport its usage.

The per-owner budget bounds the node's work, not just what is counted afterwards: before a request
is sent, its tokens are reserved from the owner's hour (the prompt at most one token per byte of the
request, plus the answer's ``num_predict``, which the worker sets on the forwarded request to what was
reserved). The node's own counts settle the reservation; an answer that is cut off, too large or
malformed is charged all it reserved, since the node did that work whatever became of the answer.
Concurrent calls of one owner draw from one pool (in this process for the embedded grid, in Redis for
a grid of many workers), so the node's work for an owner stays within the budget whatever they run at
once.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx

from nanogrid_backend.config import GridConfig

ROUTES = {
    ("POST", "/api/generate"),
    ("POST", "/api/chat"),
    ("POST", "/api/embeddings"),
    ("POST", "/api/embed"),
    ("GET", "/api/tags"),
}
GENERATING = {"/api/generate", "/api/chat"}  # routes whose answer length num_predict bounds
CHANNEL = "nanogrid:channel"  # AI_ENDPOINT as a sandbox sees it (nanogrid.ai.CHANNEL)
MAX_REQUEST_BYTES = 4 << 20
MAX_RESPONSE_BYTES = 32 << 20
MAX_TOKENS_PER_REQUEST = (
    4096  # an answer's tokens when the grid does not say (ai_max_tokens_per_request)
)
IMAGE_TOKENS = 4096  # reserved per image of a multimodal request (a small image may cost more tokens than bytes)
WINDOW_S = 3600.0
BUDGET_POLL_S = 0.05  # how often a request waiting for the owner's reserved tokens looks again


def _error(status: int, message: str) -> tuple[dict[str, Any], bytes]:
    return {"op": "ai_reply", "status": status}, json.dumps({"error": message}).encode()


@dataclass
class Reservation:
    """Tokens held for one request until the node's answer settles them."""

    owner: str
    tokens: int
    held_by_others: int = (
        0  # what the owner's requests still at the node held when this one was made
    )
    ticket: str = field(default_factory=lambda: uuid.uuid4().hex)


class TokenBudget:
    """Each owner's AI tokens over the last hour, spent and reserved, in this process (the embedded grid).

    ``reserve`` and ``settle`` hold one lock, so the calls of one owner running at once never reserve more
    than is left between them.
    """

    def __init__(self, tokens_per_hour: int = 0) -> None:
        self.tokens_per_hour = tokens_per_hour  # 0: no limit
        self._spent: dict[str, deque[tuple[float, int]]] = {}
        self._held: dict[str, int] = {}  # owner -> tokens reserved by requests still at the node
        self._lock = threading.Lock()

    def reserve(self, owner: str, tokens: int, hold_s: float) -> Reservation:
        """Reserve up to ``tokens`` (fewer when less is left, 0 when none is); ``settle`` must follow."""
        if not self.tokens_per_hour:
            return Reservation(owner, tokens)
        with self._lock:
            held = self._held.get(owner, 0)
            granted = max(0, min(tokens, self.tokens_per_hour - self._spent_now(owner) - held))
            self._held[owner] = held + granted
        return Reservation(owner, granted, held)

    def settle(self, reservation: Reservation, used: int) -> None:
        """Release a reservation and charge what the node actually did (which may be more, or less)."""
        if not self.tokens_per_hour:
            return
        owner = reservation.owner
        with self._lock:
            held = self._held.get(owner, 0) - reservation.tokens
            if held > 0:
                self._held[owner] = held
            else:
                self._held.pop(owner, None)
            if used > 0:
                self._spent.setdefault(owner, deque()).append((time.monotonic(), used))

    def _spent_now(self, owner: str) -> int:
        window = self._spent.get(owner)
        if not window:
            return 0
        while window and window[0][0] < time.monotonic() - WINDOW_S:
            window.popleft()
        return sum(tokens for _, tokens in window)


class RedisTokenBudget:
    """The same budget kept in Redis, so that every worker of a grid draws on one pool per owner (AWS mode).

    Per owner, two sorted sets of ``ticket:tokens`` members: what was spent (scored by when) and what is held
    (scored by when the hold lapses, so a worker that died holding tokens gives them back). One Lua script
    reserves, one settles: each runs atomically in Redis.
    """

    RESERVE = """
    local now, window, budget, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
    local sums = {0, 0}  -- spent, held
    for i, key in ipairs(KEYS) do
        for _, member in ipairs(redis.call('ZRANGE', key, 0, -1)) do
            sums[i] = sums[i] + tonumber(string.match(member, ':(%d+)$'))
        end
    end
    local granted = math.max(0, math.min(want, budget - sums[1] - sums[2]))
    if granted > 0 then
        redis.call('ZADD', KEYS[2], tonumber(ARGV[6]), ARGV[5] .. ':' .. granted)
        redis.call('EXPIRE', KEYS[2], math.ceil(window) + 60)
    end
    return {granted, sums[2]}
    """
    SETTLE = """
    redis.call('ZREM', KEYS[2], ARGV[1] .. ':' .. ARGV[2])
    if tonumber(ARGV[3]) > 0 then
        redis.call('ZADD', KEYS[1], tonumber(ARGV[4]), ARGV[1] .. ':' .. ARGV[3])
        redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[5])) + 60)
    end
    return 1
    """

    def __init__(self, client: Any, tokens_per_hour: int = 0) -> None:
        self.tokens_per_hour = tokens_per_hour
        self._reserve = client.register_script(self.RESERVE)
        self._settle = client.register_script(self.SETTLE)

    @staticmethod
    def _keys(owner: str) -> list[str]:
        return [f"nanogrid:ai-spent:{owner}", f"nanogrid:ai-held:{owner}"]

    def reserve(self, owner: str, tokens: int, hold_s: float) -> Reservation:
        if not self.tokens_per_hour:
            return Reservation(owner, tokens)
        reservation = Reservation(owner, 0)
        now = time.time()
        granted, held = self._reserve(
            keys=self._keys(owner),
            args=[now, WINDOW_S, self.tokens_per_hour, tokens, reservation.ticket, now + hold_s],
        )
        reservation.tokens, reservation.held_by_others = int(granted), int(held)
        return reservation

    def settle(self, reservation: Reservation, used: int) -> None:
        if not self.tokens_per_hour:
            return
        self._settle(
            keys=self._keys(reservation.owner),
            args=[reservation.ticket, reservation.tokens, max(0, used), time.time(), WINDOW_S],
        )


class AIGateway:
    """One per worker: the connection to the AI node and the owners' token budgets."""

    def __init__(
        self,
        endpoint: str,
        model: str = "",
        tokens_per_hour: int = 0,
        max_tokens_per_request: int = MAX_TOKENS_PER_REQUEST,
        budget: TokenBudget | RedisTokenBudget | None = None,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.model = model  # the grid's default model (LLM_MODEL in the sandbox)
        # shared by the grid's workers when it is in Redis
        self.budget = budget or TokenBudget(tokens_per_hour)
        self.max_tokens_per_request = max_tokens_per_request
        self._http = httpx.Client(base_url=self.endpoint, timeout=httpx.Timeout(300.0, connect=5.0))

    def session(self, owner: str) -> AIGatewaySession:
        return AIGatewaySession(self, owner)

    def close(self) -> None:
        self._http.close()


def ai_gateway(config: GridConfig, redis: Any = None) -> AIGateway | None:
    """A worker's gateway to the grid's AI node (None without one); with ``redis``, the budget is the grid's,
    shared by all its workers, not this worker's."""
    if not config.ai_endpoint:
        return None
    budget = RedisTokenBudget(redis, config.ai_tokens_per_hour) if redis is not None else None
    return AIGateway(
        config.ai_endpoint,
        config.ai_model,
        config.ai_tokens_per_hour,
        config.ai_max_tokens_per_request,
        budget,
    )


class AIGatewaySession:
    """One call's requests: forwarded, checked and counted (``usage`` goes on the job)."""

    def __init__(self, gateway: AIGateway, owner: str) -> None:
        self.gateway = gateway
        self.owner = owner
        self.usage = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def forward(
        self, header: dict[str, Any], body: bytes, deadline: float
    ) -> tuple[dict[str, Any], bytes]:
        method, path = str(header.get("method")), str(header.get("path"))
        if (method, path) not in ROUTES:
            return _error(
                403,
                f"only the AI node's inference routes are open to functions, not {str(method)[:10]} "
                f"{str(path)[:80]}",
            )
        if len(body) > MAX_REQUEST_BYTES:
            return _error(413, f"an AI request of {len(body)} bytes (at most {MAX_REQUEST_BYTES})")
        if method == "GET":  # the model list: no tokens
            status, data, _ = self._exchange(method, path, b"", deadline)
            return {"op": "ai_reply", "status": status}, data
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        if not isinstance(request, dict) or not isinstance(request.get("options") or {}, dict):
            return _error(400, "an AI request body must be a JSON object (and its options one too)")
        prompt = len(body) + IMAGE_TOKENS * _images(request)
        answer = self._answer_tokens(request) if path in GENERATING else 0
        budget = self.gateway.budget
        while True:
            reservation = budget.reserve(
                self.owner, prompt + answer, hold_s=max(0.0, deadline - time.monotonic()) + 60
            )
            reserved = reservation.tokens
            if reserved >= prompt + (1 if answer else 0):
                break
            budget.settle(reservation, 0)
            # Tokens held by this owner's other requests come back when they settle: wait for them, within the call.
            if not reservation.held_by_others or time.monotonic() + BUDGET_POLL_S >= deadline:
                return _error(
                    429,
                    f"this owner's AI budget of {budget.tokens_per_hour} tokens per hour has not "
                    f"{prompt + 1} tokens left for this request; try again later, or send less",
                )
            time.sleep(BUDGET_POLL_S)
        if answer:  # the node stops at what was reserved for the answer
            request["options"] = {
                **(request.get("options") or {}),
                "num_predict": reserved - prompt,
            }
            body = json.dumps(request).encode()
        charged = (
            reserved  # if anything below goes wrong, the node may have done all it was allowed
        )
        try:
            status, data, problem = self._exchange(method, path, body, deadline)
            counts = _counts(data) if not problem else None
            if counts is not None:
                charged = sum(counts)
            elif 400 <= status < 500:  # the node refused the request before working on it
                charged = 0
            self.usage["calls"] += 1
            self.usage["prompt_tokens"] += counts[0] if counts else 0
            self.usage["completion_tokens"] += charged - (counts[0] if counts else 0)
        finally:
            budget.settle(reservation, charged)
        if problem:
            return _error(status, problem)
        return {"op": "ai_reply", "status": status}, data

    def _answer_tokens(self, request: dict[str, Any]) -> int:
        """The answer's tokens to reserve: the request's num_predict, within the grid's cap per request."""
        cap = self.gateway.max_tokens_per_request
        asked = (request.get("options") or {}).get("num_predict")
        return (
            min(asked, cap)
            if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0
            else cap
        )

    def _exchange(
        self, method: str, path: str, body: bytes, deadline: float
    ) -> tuple[int, bytes, str]:
        """The node's status and answer, or a status and why the answer was refused (then the data is partial)."""
        left = deadline - time.monotonic()
        if left <= 0:
            return 504, b"", "the call's time is up"
        data = bytearray()
        try:
            with self.gateway._http.stream(
                method,
                path,
                content=body if method == "POST" else None,
                headers={"content-type": "application/json"},
                timeout=left,
            ) as response:
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > MAX_RESPONSE_BYTES:
                        return (
                            502,
                            bytes(data),
                            f"the AI node's answer is over {MAX_RESPONSE_BYTES >> 20} MiB",
                        )
                    if time.monotonic() > deadline:
                        return 504, bytes(data), "the call's time is up"
                return response.status_code, bytes(data), ""
        except httpx.HTTPError as exc:
            return 502, bytes(data), f"the AI node did not answer ({type(exc).__name__})"


def _images(request: dict[str, Any]) -> int:
    """Images in a multimodal request (generate's ``images``, or each chat message's)."""
    messages = request.get("messages")
    messages = messages if isinstance(messages, list) else []
    lists = [request.get("images"), *(m.get("images") for m in messages if isinstance(m, dict))]
    return sum(len(images) for images in lists if isinstance(images, list))


def _counts(data: bytes) -> tuple[int, int] | None:
    """(prompt, answer) tokens from the node's own figures: the final object of a stream, or the whole answer;
    None when no object counts anything (cut off, malformed, or a route whose answer says nothing)."""
    prompt = completion = 0
    counted = False
    for line in data.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if (
            isinstance(item, dict)
            and item.get("done", True)
            and "error" not in item
            and ("prompt_eval_count" in item or "eval_count" in item)
        ):
            counted = True
            prompt += _count_of(item.get("prompt_eval_count"))
            completion += _count_of(item.get("eval_count"))
    return (prompt, completion) if counted else None


def _count_of(value: object) -> int:
    return (
        value
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 40
        else 0
    )
