"""The grid's private AI node (an Ollama server), from inside a function.

    import nanogrid.ai
    reply = nanogrid.ai.generate("Summarise: ...")            # model: LLM_MODEL, or model="..."
    text = reply.response
    answer = nanogrid.ai.chat([{"role": "user", "content": "Hi"}]).message.content

Thin wrappers over the official ``ollama`` client, pointed at ``AI_ENDPOINT``. In a sandbox that
is an address on the sandbox's own loopback, served by the bootstrap, which hands each request to
the worker over the sandbox's channel (sandboxes have no network): the worker forwards the
inference routes to the AI node and counts the tokens itself for the job.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from nanogrid_contract.errors import AIUnavailable

_usage = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0}


def endpoint() -> str:
    url = os.environ.get("AI_ENDPOINT")
    if not url:
        raise AIUnavailable(
            "no AI node in this sandbox: declare the function with @nanogrid.remote(ai=True) "
            "(or %%nanogrid --ai), on a grid started with --ai-endpoint URL (AI_ENDPOINT)"
        )
    return url


def default_model() -> str:
    model = os.environ.get("LLM_MODEL")
    if not model:
        # a function without AI access is told that first (the sandbox's forwarder refuses it)
        _call("list")
        raise AIUnavailable(
            "no model chosen: pass model=..., or set the grid's default (LLM_MODEL)"
        )
    return model


CHANNEL = "nanogrid:channel"  # AI_ENDPOINT inside a sandbox: requests go to the host over the sandbox's channel


def _client() -> Any:
    import ollama  # imported on use: a function that never calls the AI node does not need the client

    url = endpoint()
    if url == CHANNEL:
        return ollama.Client(host="http://ai-node.invalid", transport=_channel_transport())
    return ollama.Client(host=url)


def _channel_transport() -> Any:
    """An httpx transport that hands each request to the worker, which forwards inference routes only."""
    import sys

    import httpx

    channel = sys.modules.get("__nanogrid_channel__")
    if channel is None:
        raise AIUnavailable(
            "AI_ENDPOINT says to use the sandbox's channel, but this is not a NanoGrid sandbox"
        )
    over_channel = channel.request

    class ChannelTransport(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            header, body = over_channel(
                {"op": "ai", "method": request.method, "path": request.url.path}, request.read()
            )
            status = header.get("status") if isinstance(header.get("status"), int) else 502
            return httpx.Response(
                status, headers={"content-type": "application/json"}, content=body
            )

    return ChannelTransport()


def _call(method: str, **kwargs: Any) -> Any:
    import ollama

    try:
        return getattr(_client(), method)(**kwargs)
    except ollama.ResponseError as exc:
        # the sandbox's forwarder: this function has no AI access, and why
        if exc.status_code == 403:
            raise AIUnavailable(exc.error) from None
        raise
    except (ConnectionError, OSError) as exc:
        raise AIUnavailable(
            f"cannot reach the AI node at {endpoint()} ({exc}); a function that uses it must say "
            "so: @nanogrid.remote(ai=True) (or %%nanogrid --ai), which gives its sandbox that one "
            "network route"
        ) from None


def generate(
    prompt: str,
    model: str | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    stream: bool = False,
    **kwargs: Any,
) -> Any:
    """``ollama.Client.generate`` against the AI node; with ``stream=True``, an iterator of chunks."""
    endpoint()
    response = _call(
        "generate",
        model=model or default_model(),
        prompt=prompt,
        options=options,
        stream=stream,
        **kwargs,
    )
    return _counted_stream(response) if stream else _count(response)


def chat(
    messages: Sequence[Mapping[str, Any]],
    model: str | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    stream: bool = False,
    **kwargs: Any,
) -> Any:
    """``ollama.Client.chat`` against the AI node; with ``stream=True``, an iterator of chunks."""
    endpoint()
    response = _call(
        "chat",
        model=model or default_model(),
        messages=messages,
        options=options,
        stream=stream,
        **kwargs,
    )
    return _counted_stream(response) if stream else _count(response)


def models() -> list[str]:
    """The models the AI node has."""
    return [m.model for m in _call("list").models]


def usage() -> dict[str, int]:
    """Tokens used by this call so far (the grid resets it before each call)."""
    return dict(_usage)


def reset_usage() -> None:
    for key in _usage:
        _usage[key] = 0


def _count(response: Any) -> Any:
    _usage["calls"] += 1
    _usage["prompt_tokens"] += getattr(response, "prompt_eval_count", None) or 0
    _usage["completion_tokens"] += getattr(response, "eval_count", None) or 0
    return response


def _counted_stream(chunks: Iterator[Any]) -> Iterator[Any]:
    for chunk in chunks:
        if getattr(chunk, "done", False):  # the last chunk carries the counts
            _count(chunk)
        yield chunk
