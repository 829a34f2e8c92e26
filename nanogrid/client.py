"""The HTTP client for a grid's controller, and finding the grid to connect to."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from nanogrid.errors import APIError, NotConnected, VersionMismatch
from nanogrid.packaging import FunctionPackage

RATE_LIMIT_RETRIES = 6
SYNC_READ_TIMEOUT_S = 90.0  # the controller answers a sync /run within 60 s (202 if still running)

_default: Client | None = None
_default_lock = threading.Lock()


def data_dir() -> Path:
    return Path(os.environ.get("NANOGRID_DATA_DIR") or Path.home() / ".nanogrid").expanduser()


def discover_url() -> str:
    """``NANOGRID_URL``, else the URL that ``nanogrid up`` wrote into its data directory."""
    url = os.environ.get("NANOGRID_URL")
    if url:
        return url
    grid_file = data_dir() / "grid.json"
    try:
        return json.loads(grid_file.read_text())["url"]
    except (OSError, ValueError, KeyError):
        raise NotConnected(
            f"no grid found: start one with `nanogrid up`, or set NANOGRID_URL (looked in {grid_file})"
        ) from None


def discover_key(url: str) -> str | None:
    """``NANOGRID_API_KEY``, else the local key of the grid ``nanogrid up`` started here at this URL."""
    key = os.environ.get("NANOGRID_API_KEY")
    if key:
        return key
    directory = data_dir()
    try:
        local_url = json.loads((directory / "grid.json").read_text())["url"]
        if local_url.rstrip("/") == url.rstrip("/"):
            return (directory / "local-key").read_text().strip()
    except (OSError, ValueError, KeyError):
        pass
    return None


def connect(url: str | None = None, api_key: str | None = None) -> Client:
    """Connect to a grid and make it the default for ``@remote`` functions and the magics.

    The key is ``api_key``, else ``NANOGRID_API_KEY``, else the local grid's own key.
    """
    global _default
    url = url or discover_url()
    client = Client(url, api_key=api_key or discover_key(url))
    with _default_lock:
        old, _default = _default, client
    if old is not None:
        old.close()
    return client


def get_client() -> Client:
    """The default client, connecting on first use."""
    with _default_lock:
        client = _default
    return client or connect()


class Client:
    """One controller's HTTP API. Thread-safe; keeps connections alive.

    ``transport`` replaces the network (any ``httpx.BaseTransport``, e.g. ``httpx.MockTransport`` in tests).
    """

    def __init__(self, url: str, api_key: str | None = None, *, transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        api_key = api_key or discover_key(self.url)
        headers = {"x-api-key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, transport=transport,
                                  timeout=httpx.Timeout(30.0, read=SYNC_READ_TIMEOUT_S),
                                  limits=httpx.Limits(max_connections=32, max_keepalive_connections=16))
        self._known_functions: dict[str, str] = {}  # package content id -> the grid's function id
        self._runtimes: dict[str, str] | None = None

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:
        return f"<nanogrid.Client {self.url}>"

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One API call; a 429 is retried after its Retry-After (with jitter), up to RATE_LIMIT_RETRIES times."""
        for attempt in range(RATE_LIMIT_RETRIES + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise NotConnected(f"cannot reach the grid at {self.url} ({exc}); is `nanogrid up` running?") from None
            if response.status_code != 429 or attempt == RATE_LIMIT_RETRIES:
                break
            time.sleep(_backoff(response, attempt))
        if response.status_code >= 400:
            raise _api_error(response)
        return response

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/health").json()

    def runtimes(self) -> dict[str, str]:
        if self._runtimes is None:
            self._runtimes = self.health()["runtimes"]
        return self._runtimes

    def deploy(self, package: FunctionPackage) -> str:
        """Upload a package unless the grid already has it; returns its function id."""
        known = self._known_functions.get(package.function_id)
        if known is not None:
            return known
        runtime, python = package.manifest["runtime"], package.manifest["python"]
        runtimes = self.runtimes()
        if runtime not in runtimes:
            raise VersionMismatch(
                f"this client runs Python {python}, but the grid at {self.url} only runs "
                f"{', '.join(sorted(runtimes))}: functions are sent with cloudpickle, which needs the same "
                f"Python minor version on both sides. Use a Python {' or '.join(sorted(runtimes.values()))} "
                "environment for this notebook or script."
            )
        function = self.request("POST", "/upload", files={"file": ("package.zip", package.data, "application/zip")})
        function_id = function.json()["function_id"]  # the grid answers 200 if it has this package already
        self._known_functions[package.function_id] = function_id
        return function_id

    def forget_function(self, function_id: str) -> None:
        """Drop a function from the upload cache (it was deleted on the grid), so the next call uploads it."""
        for content_id in [c for c, f in self._known_functions.items() if f == function_id]:
            del self._known_functions[content_id]

    def upload(self, path: str | Path, **form: Any) -> dict[str, Any]:
        """Upload a ``.py`` file or a zip, with form fields (function_name, runtime, handler, timeout, memory)."""
        path = Path(path)
        data = {k: str(v) for k, v in form.items() if v is not None}
        with path.open("rb") as f:
            return self.request("POST", "/upload", files={"file": (path.name, f)}, data=data).json()

    def run(self, body: dict[str, Any], *, asynchronous: bool = False) -> dict[str, Any]:
        headers = {"X-Async": "true"} if asynchronous else None
        return self.request("POST", "/run", json=body, headers=headers).json()

    def status(self, job_id: str, wait: float = 0) -> dict[str, Any]:
        return self.request("GET", f"/status/{job_id}", params={"wait": wait} if wait else None).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/jobs/{job_id}/cancel").json()

    def cancel_many(self, job_ids: list[str]) -> int:
        """Cancel every unfinished job among these; returns how many were cancelled."""
        return self.request("POST", "/jobs/cancel", json={"job_ids": job_ids}).json()["cancelled"]

    def map_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST /map; yields its NDJSON lines (first the job ids, then one job per call as it finishes)."""
        try:
            with self._http.stream("POST", "/map", json=body, timeout=httpx.Timeout(30.0, read=None)) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _api_error(response)
                for line in response.iter_lines():
                    if line:
                        yield json.loads(line)
        except httpx.TransportError as exc:
            raise NotConnected(f"lost the connection to the grid at {self.url} ({exc})") from None

    def download(self, url: str) -> bytes:
        return self.request("GET", url).content

    def jobs(self, limit: int = 50) -> list[dict[str, Any]]:
        return self.request("GET", "/jobs", params={"limit": limit}).json()

    def functions(self) -> list[dict[str, Any]]:
        return self.request("GET", "/functions").json()

    def delete_function(self, function_id: str) -> dict[str, Any]:
        self.forget_function(function_id)
        return self.request("DELETE", f"/functions/{function_id}").json()

    def models(self) -> dict[str, Any]:
        """The AI node's endpoint, default model and the models it has."""
        return self.request("GET", "/models").json()

    def system_status(self) -> dict[str, Any]:
        return self.request("GET", "/system/status").json()


def _backoff(response: httpx.Response, attempt: int) -> float:
    try:
        wait = float(response.headers.get("Retry-After", "1"))
    except ValueError:
        wait = 1.0
    return min(30.0, wait * (1 + attempt * 0.5)) * random.uniform(0.8, 1.2)


def _api_error(response: httpx.Response) -> APIError:
    """The controller's error body is ``{"detail": message, "error": code}``; a proxy's may be anything."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}
    detail = body.get("detail")
    if isinstance(detail, list):  # FastAPI's validation errors, from a controller older than this client
        detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
    code = body.get("error")
    return APIError(response.status_code, str(detail or response.text[:500] or response.reason_phrase),
                    code if isinstance(code, str) else "")
