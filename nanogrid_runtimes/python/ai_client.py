"""The seed platform's AI SDK (``import ai_client``), for functions written against it.

    import ai_client
    summary = ai_client.generate("Summarise: ...")                 # model: LLM_MODEL (the run's modelId)
    answer = ai_client.chat([{"role": "user", "content": "Hi"}], model="phi3:mini")

The same calls as the seed's module: ``generate`` and ``chat`` return the answer's text, the
``AIClient`` behind them (``ai_client.client``) has ``endpoint`` and ``default_model``. Requests go
to ``AI_ENDPOINT``, which in a NanoGrid sandbox is the bootstrap's forwarder on the sandbox's own
loopback: the worker sends them on to the AI node and counts the tokens itself (``llm_token_count``
on the job), so nothing is written to the output directory for that. A refused or failed request
raises ``AIError`` with the grid's own explanation (no AI access, budget spent, unknown model).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import requests

DEFAULT_ENDPOINT = "http://10.0.20.100:11434"  # the seed's AI node, where AI_ENDPOINT is not set
DEFAULT_MODEL = "llama3:8b"
RETRIED_STATUSES = (502, 503, 504)  # the node was not reached or did not answer: worth another try
ATTEMPTS = 3
TIMEOUT_S = 300


class AIError(RuntimeError):
    """The AI node refused or failed a request; the message is the grid's (or the node's) reason."""


class AIClient:
    """Ollama's generate and chat routes at ``AI_ENDPOINT``, with the model of this call by default."""

    def __init__(self, endpoint: str | None = None, default_model: str | None = None) -> None:
        self._endpoint, self._default_model = endpoint, default_model
        self._session: requests.Session | None = None

    @property
    def endpoint(self) -> str:
        return (self._endpoint or os.environ.get("AI_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")

    @property
    def default_model(self) -> str:
        """Read at each request: the grid sets LLM_MODEL per call (the run's modelId)."""
        return self._default_model or os.environ.get("LLM_MODEL") or DEFAULT_MODEL

    def generate(self, prompt: str, model: str | None = None, **kwargs: Any) -> str:
        """The answer's text for ``prompt`` (extra keys such as ``options`` or ``system`` go into the request)."""
        data = self._post(
            "/api/generate", {**kwargs, "model": model or self.default_model, "prompt": prompt}
        )
        return data.get("response", "")

    def chat(self, messages: list[dict[str, Any]], model: str | None = None, **kwargs: Any) -> str:
        """The assistant's reply to ``messages`` ([{"role": ..., "content": ...}, ...])."""
        data = self._post(
            "/api/chat", {**kwargs, "model": model or self.default_model, "messages": messages}
        )
        return (data.get("message") or {}).get("content", "")

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        import requests

        if self._session is None:
            self._session = requests.Session()
        payload["stream"] = False  # one answer, whole: these calls return its text
        url = self.endpoint + path
        for attempt in range(1, ATTEMPTS + 1):
            try:
                response = self._session.post(url, json=payload, timeout=TIMEOUT_S)
            except requests.ConnectionError as exc:
                if attempt == ATTEMPTS:
                    raise AIError(f"cannot reach the AI node at {self.endpoint} ({exc})") from None
                continue
            if response.status_code in RETRIED_STATUSES and attempt < ATTEMPTS:
                continue
            break
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.status_code >= 400 or not isinstance(data, dict) or "error" in data:
            said = data.get("error") if isinstance(data, dict) else None
            raise AIError(
                f"the AI node answered {response.status_code} to {path}: "
                f"{said or response.text[:500] or 'no reason given'}"
            )
        return data


client = AIClient()  # the seed's module-level client


def generate(prompt: str, model: str | None = None, **kwargs: Any) -> str:
    return client.generate(prompt, model, **kwargs)


def chat(messages: list[dict[str, Any]], model: str | None = None, **kwargs: Any) -> str:
    return client.chat(messages, model, **kwargs)
