"""The HTTP client for a grid's controller, and finding the grid to connect to."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from nanogrid import fastlane
from nanogrid.transfer import Ref, sha256_of
from nanogrid_contract.errors import (
    APIError,
    ConfigError,
    GridUnresponsive,
    NanoGridError,
    NotConnected,
    VersionMismatch,
)
from nanogrid_contract.packages import FunctionPackage
from nanogrid_contract.views import JobView

RATE_LIMIT_RETRIES = 6
API_PREFIX = (
    "/v1"  # NanoGrid's own API; the seed platform's contract answers at the root and under /api
)
DEFAULT_TIMEOUT_S = (
    30.0  # how long the grid may stay silent before a request gives up (NANOGRID_TIMEOUT)
)
SYNC_HOLD_S = (
    60.0  # the controller answers a sync /run within this (202 if the call is still running)
)
CANCEL_HOLD_S = 5.0  # ... and a cancel within this
MAP_SILENCE_S = 10.0  # a /map stream sends an empty line every 2 s without news: its read timeout is at least this
LEGACY_PAYLOAD_BYTES = 16 << 20  # what a grid that does not name its limits takes
BLOB_PIECE_BYTES = 1 << 20  # a blob upload is sent in pieces of this size
BLOB_MIN_RATE = (
    20e6  # bytes/s a blob transfer may be as slow as before it counts as the grid not answering
)
DIRECT_CONNECT_S = (
    10.0  # the store behind a presigned upload URL must accept a connection within this
)
GIVE_UP_CANCEL_S = 3.0  # a client that gave up spends at most this on cancelling what it started

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


def connect(
    url: str | None = None, api_key: str | None = None, *, timeout: float | None = None
) -> Client:
    """Connect to a grid and make it the default for ``@remote`` functions and the magics.

    The key is ``api_key``, else ``NANOGRID_API_KEY``, else the local grid's own key. ``timeout``: seconds
    the grid may stay silent before a call raises ``GridUnresponsive`` (else ``NANOGRID_TIMEOUT``, else 30).
    """
    global _default
    url = url or discover_url()
    client = Client(url, api_key=api_key or discover_key(url), timeout=timeout)
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
    ``timeout``: seconds the grid may stay silent, on top of any wait a request asks for (a sync call's, a
    long poll's), before the request raises ``GridUnresponsive``; default ``NANOGRID_TIMEOUT``, else 30.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = _timeout_setting(timeout)
        api_key = api_key or discover_key(self.url)
        headers = {"x-api-key": api_key} if api_key else {}
        self._http = httpx.Client(
            base_url=self.url + API_PREFIX,
            headers=headers,
            transport=transport,
            timeout=httpx.Timeout(self.timeout),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
        )
        self._known_functions: dict[str, str] = {}  # package content id -> the grid's function id
        self._package_route = True  # POST /v1/packages, until a grid from before it says 404
        self._runtimes: dict[str, str] | None = None
        self._limits: dict[str, Any] | None = None
        self._known_blobs: set[str] = set()  # blobs this client uploaded or found on the grid
        # Blobs go straight to the grid's store when it offers a presigned URL (S3); NANOGRID_DIRECT_UPLOADS=0, or
        # False here, sends them through the controller (clients that cannot reach the store).
        self.direct_uploads = _direct_uploads_setting()
        self._direct_http: httpx.Client | None = (
            None  # to presigned URLs: its own connections, never the API key
        )
        self._timeouts: dict[float, httpx.Timeout] = {}  # by the hold on top (_timeout)
        # by API path (request): its URL, and its request target if the fast lane may take it (relative to the API)
        self._urls: dict[str, tuple[httpx.URL, str | None]] = {}
        # Plain requests to a plain-http grid go over http.client, at a third of httpx's CPU (nanogrid/fastlane.py)
        self._lane = (
            fastlane.FastLane(self._http.base_url, self._http.headers)
            if fastlane.usable(self._http.base_url, transport)
            else None
        )

    def close(self) -> None:
        self._http.close()
        if self._lane is not None:
            self._lane.close()
        if self._direct_http is not None:
            self._direct_http.close()

    def __repr__(self) -> str:
        return f"<nanogrid.Client {self.url}>"

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One API call; a 429 is retried after its Retry-After (with jitter), up to RATE_LIMIT_RETRIES times."""
        # Parsed once per path: httpx parses a relative path and the joined URL at each request.
        known = self._urls.get(path)
        if known is None:
            if len(self._urls) >= 256:  # paths with a job id in them come and go
                self._urls.clear()
            url, base, lane_path = httpx.URL(path), self._http.base_url, None
            if url.is_relative_url:  # joined as httpx joins a path to its base_url
                url = base.copy_with(raw_path=base.raw_path + url.raw_path.lstrip(b"/"))
                lane_path = url.raw_path.decode("ascii")
            known = self._urls[path] = (url, lane_path)
        url, lane_path = known
        lane, target = self._lane, None
        if (
            lane is not None
            and lane_path is not None
            and kwargs.keys() <= fastlane.ARGUMENTS
            and isinstance(kwargs.get("content", b""), bytes)
            and not ("content" in kwargs and "json" in kwargs)
        ):
            target = lane.target(lane_path, kwargs.get("params"))
        for attempt in range(RATE_LIMIT_RETRIES + 1):
            try:
                if target is not None and lane is not None:
                    response = lane.send(
                        method,
                        target,
                        kwargs.get("json"),
                        kwargs.get("headers"),
                        kwargs.get("timeout", self._http.timeout),
                        kwargs.get("content"),
                    )
                else:
                    response = self._http.request(method, url, **kwargs)
            except httpx.TimeoutException as exc:
                raise self._unresponsive(exc) from None
            except httpx.TransportError as exc:
                raise NotConnected(
                    f"cannot reach the grid at {self.url} ({exc}); is `nanogrid up` running?"
                ) from None
            if response.status_code != 429 or attempt == RATE_LIMIT_RETRIES:
                break
            time.sleep(_backoff(response, attempt))
        if response.status_code >= 400:
            if response.status_code == 404 and path == "/run":
                self._known_blobs.clear()  # one may be gone (retention, damaged): the next call uploads it again
            raise _api_error(response)
        return response

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/health").json()

    def runtimes(self) -> dict[str, str]:
        if self._runtimes is None:
            self._runtimes = self.health()["runtimes"]
        return self._runtimes

    def limits(self) -> dict[str, Any]:
        """The grid's own limits (``/v1/health``): max_payload_bytes and max_result_bytes per value, and
        blob_threshold_bytes (None from a grid older than the data plane: 16 MiB inline, no blobs)."""
        if self._limits is None:
            health = self.health()
            self._limits = {
                "max_payload_bytes": health.get("max_payload_bytes") or LEGACY_PAYLOAD_BYTES,
                "max_result_bytes": health.get("max_result_bytes"),
                "blob_threshold_bytes": health.get("blob_threshold_bytes"),
            }
        return self._limits

    def upload_blob(self, data: bytes) -> Ref:
        """Store ``data`` on the grid under its SHA-256 unless it is there already; its Ref.

        With direct uploads on, the grid is asked first (``POST /v1/blobs/{sha}/upload``): it says whether it has
        the blob and, where its store is S3, offers a short-lived presigned URL bound to this size and hash. The
        bytes then go straight to the store and a HEAD through the grid confirms them; any failure of that path
        sends them through the controller once (``PUT /v1/blobs/{sha}``), as a grid without S3 always has them.
        """
        ref = Ref(sha256_of(data), len(data))
        if ref.sha256 in self._known_blobs:
            return ref
        offer = self._upload_offer(ref) if self.direct_uploads else None
        # not asked, or a grid that does not offer: does it have the blob already?
        if offer is None:
            exists = self._http.head(f"/blobs/{ref.sha256}")
            if exists.status_code >= 400 and exists.status_code != 404:
                raise _api_error(exists)
            stored = exists.status_code != 404
        else:
            stored = bool(offer.get("stored")) or (
                bool(offer.get("url")) and self._upload_direct(ref, data, offer)
            )
        if not stored:
            # In pieces: httpcore sends one large bytes object with a copy per socket write (quadratic).
            self.request(
                "PUT",
                f"/blobs/{ref.sha256}",
                content=_Pieces(data),
                timeout=self._timeout(len(data) / BLOB_MIN_RATE),
                headers={
                    "content-type": "application/octet-stream",
                    "content-length": str(len(data)),
                },
            )
        self._known_blobs.add(ref.sha256)
        return ref

    def _upload_offer(self, ref: Ref) -> dict[str, Any] | None:
        """Where the grid wants this blob: ``{"stored": true}``, ``{"url": ..., "headers": ...}`` or ``{"url": null}``
        (through the controller); None when it cannot say (a grid older than the route: this client stops asking)."""
        try:
            return self.request(
                "POST", f"/blobs/{ref.sha256}/upload", params={"size": ref.size}
            ).json()
        except APIError as exc:
            if exc.status in (404, 405):
                self.direct_uploads = False
            elif exc.status < 500:
                raise  # the key, the size over the grid's limit: sending the bytes another way would fail the same
            return None

    def _upload_direct(self, ref: Ref, data: bytes, offer: dict[str, Any]) -> bool:
        """PUT the bytes to a presigned URL in pieces, then ask the grid whether it holds them whole. False on any
        failure (the caller sends them through the controller); a store this client cannot connect to turns direct
        uploads off for it, with a warning, so that later blobs do not wait for it again."""
        if self._direct_http is None:
            self._direct_http = httpx.Client(
                limits=httpx.Limits(max_connections=8, max_keepalive_connections=4)
            )
        headers = {**offer.get("headers", {}), "content-length": str(ref.size)}
        timeout = httpx.Timeout(
            self.timeout,
            connect=min(self.timeout, DIRECT_CONNECT_S),
            read=self.timeout + ref.size / BLOB_MIN_RATE,
        )
        try:
            response = self._direct_http.put(
                offer["url"], content=_Pieces(data), headers=headers, timeout=timeout
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            if self.direct_uploads:
                self.direct_uploads = False
                warnings.warn(
                    f"cannot reach the grid's store for direct blob uploads ({exc}); this client sends "
                    "them through the grid's controller from now on (NANOGRID_DIRECT_UPLOADS=0 says so "
                    "from the start)",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return False
        except httpx.HTTPError:  # cut off mid-way: the store keeps no partial object
            return False
        # e.g. 403 (the URL expired), 400 BadDigest (S3 hashed other bytes)
        if response.status_code >= 300:
            return False
        try:
            confirm = self._http.head(f"/blobs/{ref.sha256}")
        except httpx.HTTPError:
            return False
        return confirm.status_code == 200 and confirm.headers.get("content-length") == str(ref.size)

    def download_blob(self, sha256: str, size: int) -> bytearray:
        """A blob's bytes, streamed into one buffer of its size and checked against its hash.

        The pieces are copied once, as they come (no re-chunking), and hashed on another thread in pieces of
        ``HASH_PIECE_BYTES`` while the rest arrives (hashlib releases the GIL), so the check costs little time.
        """
        buffer, filled = bytearray(size), 0
        view = memoryview(buffer)
        hasher = _Hasher(view)
        try:
            with self._http.stream(
                "GET", f"/blobs/{sha256}", timeout=self._timeout(size / BLOB_MIN_RATE)
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _api_error(response)
                for chunk in response.iter_raw():
                    if filled + len(chunk) > size:
                        raise NanoGridError(
                            f"blob {sha256[:12]} is larger than the {size} bytes the grid announced"
                        )
                    view[filled : filled + len(chunk)] = chunk
                    filled += len(chunk)
                    hasher.upto(filled)
        except httpx.TimeoutException as exc:
            raise self._unresponsive(exc) from None
        except httpx.TransportError as exc:
            raise NotConnected(f"lost the connection to the grid at {self.url} ({exc})") from None
        finally:
            digest = hasher.finish(filled)
        if filled != size or digest != sha256:
            raise NanoGridError(
                f"blob {sha256[:12]} arrived damaged (its content does not match its hash); try again"
            )
        return buffer

    def result_ref(self, job_id: str) -> Ref:
        """A finished job's result as a blob on the grid (``POST /v1/jobs/{id}/ref``): its Ref, no data moved here."""
        answer = self.request("POST", f"/jobs/{job_id}/ref").json()
        self._known_blobs.add(answer["sha256"])
        return Ref(answer["sha256"], answer["size"])

    def deploy(self, package: FunctionPackage) -> str:
        """Upload a package unless the grid already has it; returns its function id."""
        known = self._known_functions.get(package.function_id)
        if known is not None:
            return known
        runtime, python = package.manifest["runtime"], package.manifest["python"]
        runtimes = self.runtimes()
        if runtime not in runtimes:
            # Only its Python runtimes matter here: a grid's nodejs, go or cpp runtime cannot take a pickle.
            pythons = sorted(
                ((v, n) for n, v in runtimes.items() if n.startswith("python")), key=_version_key
            )
            raise VersionMismatch(
                f"this client runs Python {python}, but the grid at {self.url} only runs "
                f"{', '.join(n for _, n in pythons) or 'no Python runtime'}: functions are sent with cloudpickle, "
                "which needs the same Python minor version on both sides."
                + (
                    f" Use a Python {' or '.join(v for v, _ in pythons)} environment for this notebook or script."
                    if pythons
                    else ""
                )
            )
        function = None
        if self._package_route:
            try:  # the zip as the body: no multipart form to build or parse (~2 ms of a first call)
                function = self.request(
                    "POST",
                    "/packages",
                    content=package.data,
                    headers={"Content-Type": "application/zip"},
                )
            except APIError as exc:
                if exc.status not in (404, 405):
                    raise
                self._package_route = False  # a grid from before /v1/packages: its form upload
        if function is None:
            function = self.request(
                "POST", "/upload", files={"file": ("package.zip", package.data, "application/zip")}
            )
        # the grid answers 200 if it has this package already
        function_id = function.json()["function_id"]
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

    def run(
        self, body: dict[str, Any], *, asynchronous: bool = False, hold: float | None = None
    ) -> JobView:
        """POST /run. ``hold``: seconds the grid waits for the result before answering 202 (then follow the job)."""
        headers = (
            {"X-Async": "true"}
            if asynchronous
            else {"X-Hold": f"{hold:g}"}
            if hold is not None
            else None
        )
        wait = 0 if asynchronous else SYNC_HOLD_S if hold is None else hold
        return self.request(
            "POST", "/run", json=body, headers=headers, timeout=self._timeout(wait)
        ).json()

    def logs(
        self, job_id: str, after: str = "", wait: float = 0, watched: bool = False
    ) -> dict[str, Any]:
        """What a job printed since the cursor ``after`` (long-poll up to ``wait`` s): {chunks, cursor, ended}.
        ``watched``: this client waits for the job (a sync ``.remote()``); if it goes away while the job is still
        queued, the grid cancels the job."""
        params: dict[str, Any] = {
            "after": after,
            "wait": wait,
            **({"watched": "true"} if watched else {}),
        }
        return self.request(
            "GET", f"/jobs/{job_id}/logs", params=params, timeout=self._timeout(wait)
        ).json()

    def status(self, job_id: str, wait: float = 0) -> JobView:
        return self.request(
            "GET",
            f"/status/{job_id}",
            params={"wait": wait} if wait else None,
            timeout=self._timeout(wait),
        ).json()

    def cancel(self, job_id: str, *, timeout: float | None = None) -> JobView:
        """``timeout``: give up sooner than the client's own (a client cancelling on its way out)."""
        return self.request(
            "POST",
            f"/jobs/{job_id}/cancel",
            timeout=self._timeout(CANCEL_HOLD_S) if timeout is None else timeout,
        ).json()

    def cancel_many(self, job_ids: list[str], *, timeout: float | None = None) -> int:
        """Cancel every unfinished job among these; returns how many were cancelled."""
        return self.request(
            "POST",
            "/jobs/cancel",
            json={"job_ids": job_ids},
            timeout=self.timeout if timeout is None else timeout,
        ).json()["cancelled"]

    def _timeout(self, hold: float) -> httpx.Timeout:
        """The client's timeout, with ``hold`` seconds more to read the answer (the wait the request asked for).
        Made once per distinct hold (a warm call asks for the same one each time)."""
        timeouts = self._timeouts
        timeout = timeouts.get(hold)
        if timeout is None:
            if len(timeouts) >= 64:  # holds computed from sizes vary: keep a few
                timeouts.clear()
            timeout = timeouts[hold] = httpx.Timeout(self.timeout, read=self.timeout + hold)
        return timeout

    def _unresponsive(self, exc: httpx.TimeoutException) -> GridUnresponsive:
        what = {
            httpx.ConnectTimeout: "to accept a connection",
            httpx.WriteTimeout: "to take the request",
            httpx.PoolTimeout: "to free a connection",
        }.get(type(exc), "to answer")
        return GridUnresponsive(
            f"the grid at {self.url} took longer than the client's {self.timeout:g} s timeout "
            f"{what} (stopped, hung or overloaded?); raise it with nanogrid.connect(timeout=...) "
            "or NANOGRID_TIMEOUT if the grid is merely slow"
        )

    def map_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST /map; yields its NDJSON lines (first the job ids, then one job per call as it finishes)."""
        try:
            # The grid sends an empty line every 2 s without news, so silence means it stopped answering.
            silence = httpx.Timeout(self.timeout, read=max(self.timeout, MAP_SILENCE_S))
            with self._http.stream("POST", "/map", json=body, timeout=silence) as response:
                if response.status_code >= 400:
                    response.read()
                    if response.status_code == 404:
                        self._known_blobs.clear()  # as for /run
                    raise _api_error(response)
                for line in response.iter_lines():
                    if line:
                        yield json.loads(line)
        except httpx.TimeoutException as exc:
            raise self._unresponsive(exc) from None
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

    def set_secret(self, name: str, values: dict[str, str]) -> dict[str, Any]:
        """Store (or replace) a secret: encrypted by the grid, given only to functions that name it."""
        return self.request("PUT", f"/secrets/{name}", json={"values": values}).json()

    def secrets(self) -> list[dict[str, Any]]:
        """Your secrets' names and variable names (values are never sent back)."""
        return self.request("GET", "/secrets").json()

    def delete_secret(self, name: str) -> dict[str, Any]:
        return self.request("DELETE", f"/secrets/{name}").json()


HASH_PIECE_BYTES = 8 << 20


class _Hasher:
    """SHA-256 of a buffer as it fills, on a thread of its own: ``upto(n)`` says the first n bytes are in."""

    def __init__(self, view: memoryview) -> None:
        self.view, self.digest, self.done = view, hashlib.sha256(), 0
        self.pieces: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="nanogrid-blob-hash", daemon=True)
        self.thread.start()

    def upto(self, filled: int) -> None:
        if filled - self.done >= HASH_PIECE_BYTES:
            self.pieces.put(filled)
            self.done = filled

    def finish(self, filled: int) -> str:
        self.pieces.put(filled)
        self.pieces.put(None)
        self.thread.join()
        return self.digest.hexdigest()

    def _run(self) -> None:
        hashed = 0
        while (end := self.pieces.get()) is not None:
            if end > hashed:
                self.digest.update(self.view[hashed:end])
                hashed = end


class _Pieces:
    """A bytes value as pieces of BLOB_PIECE_BYTES, iterable again (a request retried after a 429 sends it again)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __iter__(self) -> Iterator[bytes]:
        view = memoryview(self.data)
        for start in range(0, len(view), BLOB_PIECE_BYTES):
            yield bytes(view[start : start + BLOB_PIECE_BYTES])


def _direct_uploads_setting() -> bool:
    """``NANOGRID_DIRECT_UPLOADS`` (default on): 0, false, no or off send blobs through the controller."""
    text = os.environ.get("NANOGRID_DIRECT_UPLOADS", "").strip().lower()
    if text in ("", "1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"NANOGRID_DIRECT_UPLOADS is on or off (1 or 0), not {text!r}")


def _timeout_setting(timeout: float | None) -> float:
    """``timeout`` if given, else ``NANOGRID_TIMEOUT``, else DEFAULT_TIMEOUT_S; a positive number of seconds."""
    source = "timeout"
    if timeout is None:
        text = os.environ.get("NANOGRID_TIMEOUT", "").strip()
        if not text:
            return DEFAULT_TIMEOUT_S
        source = "NANOGRID_TIMEOUT"
        try:
            timeout = float(text)
        except ValueError:
            raise ConfigError(
                f"NANOGRID_TIMEOUT is a number of seconds, e.g. 30, not {text!r}"
            ) from None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout < float("inf")
    ):
        raise ConfigError(f"{source} is a number of seconds above 0, e.g. 30, not {timeout!r}")
    return float(timeout)


def _version_key(runtime: tuple[str, str]) -> tuple[int, ...]:
    """(version, name) in version order: 3.9 before 3.11."""
    return tuple(int(part) if part.isdigit() else 0 for part in runtime[0].split("."))


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
    # FastAPI's validation errors, from a controller older than this client
    if isinstance(detail, list):
        detail = "; ".join(
            f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail
        )
    code = body.get("error")
    return APIError(
        response.status_code,
        str(detail or response.text[:500] or response.reason_phrase),
        code if isinstance(code, str) else "",
    )
