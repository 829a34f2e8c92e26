"""Webhook notifications: per-owner hooks told about failures, completions and thresholds, never holding up a call.

A worker hands every finished job to ``Notifier.job_finished``, which only appends it to a bounded queue; one
sender thread matches it against the owner's hooks and posts a Slack-compatible JSON body (``text`` and
``blocks``, plus a ``nanogrid`` object for programs), signed with the hook's secret:

    X-NanoGrid-Timestamp: <unix seconds>
    X-NanoGrid-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + body)>

A delivery that fails (a connection error, a timeout, a 5xx or a 429) is tried again with backoff, up to
``ATTEMPTS`` times, without delaying other deliveries; ``SENDERS`` posts go out at once, so one receiver
that hangs holds up at most one of them for ``TIMEOUT_S``.

Hooks reach public addresses only: never loopback, private, link-local (the cloud's instance metadata lives
there), unique-local, multicast, unspecified or reserved ones, nor an IPv6 form that carries one of those (IPv4-
mapped or -compatible, NAT64, 6to4, Teredo), however the address is spelled (``127.1``, ``0x7f000001``). The
URL is checked when the hook is registered and again at each delivery, where the name is resolved once and the
POST connects to the address that was checked (the name still goes in ``Host`` and TLS's SNI), so a name that
resolves differently the second time (DNS rebinding) reaches nothing new; redirects are never followed. An
operator may open named internal networks with the grid's ``webhook_allow_networks`` setting.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import ipaddress
import json
import logging
import queue
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from nanogrid_backend.models import COMPLETED, FAILED, JobRecord
from nanogrid_backend.registry.base import Registry
from nanogrid_backend.registry.windows import WINDOWS

log = logging.getLogger(__name__)

EVENTS = ("failure", "completion", "threshold")
THRESHOLD_METRICS = (
    "duration_ms",
    "error_rate",
    "p95_ms",
)  # one call's duration, or a window's figure
MAX_HOOKS_PER_OWNER = 20
MAX_PENDING = (
    10_000  # jobs waiting to be matched; beyond this the oldest news is dropped, never the call
)
ATTEMPTS = 4
BACKOFF_S = 0.5  # before the second attempt; doubled after each failed one
TIMEOUT_S = 5.0
SENDERS = 4
HOOKS_CACHE_S = 5.0  # a new or deleted hook takes effect within this long
THRESHOLD_CHECK_S = (
    30.0  # a window threshold is evaluated at most this often per hook and function ...
)
THRESHOLD_COOLDOWN_S = 600.0  # ... and, once it fired, not again for this long


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Networks = Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
# the well-known NAT64 prefix: the last 32 bits are an IPv4 address
NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d


class WebhookError(ValueError):
    """A hook that cannot be registered; the message says what to change."""


def networks(cidrs: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The operator's ``webhook_allow_networks``, parsed (the grid's settings checked them already)."""
    return [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]


def carried(ip: IPAddress) -> list[IPAddress]:
    """The address and every IPv4 address an IPv6 form of it carries, and so reaches through a translator or
    tunnel: IPv4-mapped, IPv4-compatible, NAT64, 6to4 and Teredo (its server and its client)."""
    if isinstance(ip, ipaddress.IPv4Address):
        return [ip]
    inner: list[IPAddress] = [ip]
    if ip.ipv4_mapped:
        inner.append(ip.ipv4_mapped)
    if ip in NAT64 or ip in IPV4_COMPATIBLE:
        inner.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour:
        inner.append(ip.sixtofour)
    if ip.teredo:
        inner.extend(ip.teredo)
    return inner


def not_public(ip: IPAddress) -> str:
    """What kind of non-public address ``ip`` is ('' for a public unicast address)."""
    kinds = (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("unspecified", ip.is_unspecified),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    )
    for kind, yes in kinds:
        if yes:
            return kind
    return "" if ip.is_global else "not public"


def refused_ip(ip: IPAddress, allow: Networks = ()) -> str:
    """Why a hook may not reach ``ip`` ('' if it may): a non-public address, in any form, outside ``allow``."""
    forms = carried(ip)
    if any(
        form in network for form in forms for network in allow if form.version == network.version
    ):
        return ""
    for form in forms[1:] + forms[:1]:  # what an IPv6 form carries says most about where it goes
        kind = not_public(form)
        if kind:
            return f"{ip} is {kind}" if form == ip else f"{ip} carries {form}, which is {kind}"
    return ""


def literal_ip(host: str) -> IPAddress | None:
    """The address a host names by itself, in any spelling a resolver accepts (``127.1``, ``2130706433``,
    ``0x7f000001``, ``0177.0.0.1``, ``127.0.0.1.``), or None for a name."""
    host = host.removesuffix(".")  # a resolver ignores the root's dot
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if re.fullmatch(r"[0-9a-fA-FxX.]+", host):
        try:
            # the classic parser: octal, hex, short forms
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address the host names, from one lookup (``OSError`` if it names none)."""
    literal = literal_ip(host)
    if literal is not None:
        return [literal]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(
        dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos)
    )


def refused_host(host: str, port: int, allow: Networks = ()) -> tuple[str, list[IPAddress]]:
    """Why a hook may not reach ``host`` ('' if it may), and its addresses: all must be allowed."""
    try:
        addresses = resolve(host, port)
    except (OSError, UnicodeError) as exc:
        return f"{host} does not resolve ({exc})", []
    for ip in addresses:
        why = refused_ip(ip, allow)
        if why:
            return (
                why if ip == literal_ip(host) else f"{host} resolves to {ip} ({why})"
            ), addresses
    return "", addresses


def check_hook(
    url: str, events: list[str], threshold: dict[str, Any] | None, allow: Networks = ()
) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookError(f"a webhook URL is http:// or https:// with a host, not {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise WebhookError(f"a webhook URL's port is a number 1-65535, in {url!r}") from None
    why, addresses = refused_host(parts.hostname, port, allow)
    if addresses and why:  # a name that does not resolve yet is checked again at each delivery
        raise WebhookError(
            f"a webhook may not point at {parts.hostname}: {why}; webhooks go to public addresses "
            "only (an operator may allow internal networks with the grid's webhook_allow_networks "
            "setting)"
        )
    if parts.username or parts.password:
        raise WebhookError(
            "put no credentials in a webhook URL: requests are signed with the hook's secret"
        )
    if not events or any(e not in EVENTS for e in events):
        raise WebhookError(f"events are some of {', '.join(EVENTS)}, not {events!r}")
    if "threshold" in events:
        if (
            not isinstance(threshold, dict)
            or threshold.get("metric") not in THRESHOLD_METRICS
            or not isinstance(threshold.get("above"), int | float)
        ):
            raise WebhookError(
                'a threshold hook needs threshold={"metric": one of '
                f'{", ".join(THRESHOLD_METRICS)}, "above": a number[, "window": 1h|24h|7d|30d, '
                '"min_calls": n]}'
            )
        if threshold.get("window", "1h") not in WINDOWS:
            raise WebhookError(
                f"threshold window is one of {', '.join(WINDOWS)}, not {threshold.get('window')!r}"
            )


def sign(secret: str, timestamp: str, body: bytes) -> str:
    return (
        "sha256="
        + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    )


def new_hook(
    owner: str,
    url: str,
    events: list[str],
    function_id: str | None = None,
    threshold: dict[str, Any] | None = None,
    secret: str | None = None,
    allow_networks: Iterable[str] = (),
) -> dict[str, Any]:
    check_hook(url, events, threshold, networks(allow_networks))
    return {
        "hook_id": "hook-" + uuid.uuid4().hex[:16],
        "owner": owner,
        "url": url,
        "secret": secret or secrets.token_urlsafe(32),
        "events": list(events),
        "function_id": function_id,
        "threshold": threshold if "threshold" in events else None,
        "created_at": time.time(),
    }


def message(event: str, job: JobRecord, function_name: str, detail: str = "") -> dict[str, Any]:
    """A Slack-compatible body: ``text`` (and a ``blocks`` section) for people, ``nanogrid`` for programs."""
    icon = {"failure": ":x:", "completion": ":white_check_mark:", "threshold": ":warning:"}[event]
    what = {"failure": "failed", "completion": "completed", "threshold": "crossed a threshold"}[
        event
    ]
    line = f"{icon} NanoGrid: `{function_name}` {what} (job {job.job_id})"
    if job.execution_time_ms is not None:
        line += f", {job.execution_time_ms:.1f} ms"
    error = job.error or {}
    if event == "failure" and error:
        line += f": {error.get('type') or error.get('kind')}: {str(error.get('message', ''))[:300]}"
    if detail:
        line += f"\n{detail}"
    return {
        "text": line,
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": line}}],
        "nanogrid": {
            "event": event,
            "detail": detail,
            "job_id": job.job_id,
            "function_id": job.function_id,
            "function_name": function_name,
            "status": job.status,
            "attempt": job.attempt,
            "duration_ms": job.execution_time_ms,
            "peak_memory_bytes": job.peak_memory_bytes,
            "error": job.error,
            "finished_at": job.finished_at,
        },
    }


@dataclass(order=True)
class _Delivery:
    due: float
    attempt: int = field(compare=False)
    hook: dict[str, Any] = field(compare=False)
    event: str = field(compare=False)
    body: bytes = field(compare=False)


class Notifier:
    """The worker's sender thread. ``job_finished`` never blocks and never raises."""

    def __init__(
        self,
        registry: Registry,
        *,
        transport: httpx.BaseTransport | None = None,
        backoff_s: float = BACKOFF_S,
        max_pending: int = MAX_PENDING,
        allow_networks: Iterable[str] = (),
    ) -> None:
        self.registry = registry
        self.allow = networks(allow_networks)  # the operator's internal networks hooks may reach
        self.backoff_s = backoff_s
        self.stats = {"sent": 0, "failed": 0, "dropped": 0}
        self._jobs: queue.Queue[JobRecord] = queue.Queue(max_pending)
        self._retries: list[_Delivery] = []
        self._retries_lock = threading.Lock()
        self._senders = ThreadPoolExecutor(SENDERS, thread_name_prefix="webhook-post")
        self._hooks: dict[str, tuple[float, list[dict[str, Any]]]] = {}
        self._names: dict[str, str] = {}
        # (hook, function) -> when its window was last evaluated
        self._checked: dict[tuple[str, str], float] = {}
        self._fired: dict[tuple[str, str], float] = {}
        # No proxy from the environment: the POST must go to the very address that was checked.
        self._http = httpx.Client(
            timeout=TIMEOUT_S, follow_redirects=False, transport=transport, trust_env=False
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhook-sender", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=TIMEOUT_S + 1)
        self._senders.shutdown(wait=True, cancel_futures=True)
        self._http.close()

    def job_finished(self, job: JobRecord) -> None:
        cached = self._hooks.get(job.owner)  # the sender thread's copy of the owner's hooks
        if cached is not None and not cached[1] and time.monotonic() - cached[0] <= HOOKS_CACHE_S:
            # The owner had no hooks when last asked, less than HOOKS_CACHE_S ago: the sender would match this job
            # against nothing, and waking its thread for that took the interpreter from the call's own threads.
            return
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            self.stats["dropped"] += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = (
                0.5 if not self._retries else max(0.0, min(0.5, self._retries[0].due - time.time()))
            )
            try:
                job = self._jobs.get(timeout=wait)
            except queue.Empty:
                job = None
            try:
                if job is not None:
                    self._match(job)
                with self._retries_lock:
                    due = []
                    while self._retries and self._retries[0].due <= time.time():
                        due.append(heapq.heappop(self._retries))
                for delivery in due:
                    self._senders.submit(self._deliver, delivery)
            except Exception:  # a bug here must not end notifications for the grid's lifetime
                log.exception("webhooks: unexpected error")

    def _match(self, job: JobRecord) -> None:
        for hook in self._hooks_of(job.owner):
            if hook["function_id"] and hook["function_id"] != job.function_id:
                continue
            events = hook["events"]
            if job.status == FAILED and "failure" in events:
                self._queue(hook, "failure", job)
            if job.status == COMPLETED and "completion" in events:
                self._queue(hook, "completion", job)
            if "threshold" in events and (detail := self._crossed(hook, job)):
                self._queue(hook, "threshold", job, detail)

    def _crossed(self, hook: dict[str, Any], job: JobRecord) -> str:
        """What crossed the hook's threshold for this job's function, or ''."""
        threshold, key, now = (
            hook["threshold"] or {},
            (hook["hook_id"], job.function_id),
            time.time(),
        )
        if now - self._fired.get(key, 0.0) < THRESHOLD_COOLDOWN_S:
            return ""
        metric, above = threshold.get("metric"), float(threshold.get("above", 0))
        detail = ""
        if metric == "duration_ms":
            if job.execution_time_ms is not None and job.execution_time_ms > above:
                detail = f"duration {job.execution_time_ms:.1f} ms is above {above:g} ms"
        elif now - self._checked.get(key, 0.0) >= THRESHOLD_CHECK_S:
            self._checked[key] = now
            name = threshold.get("window", "1h")
            window = self.registry.function_windows(job.function_id, names=(name,))[name]
            value = window["error_rate"] if metric == "error_rate" else window["duration_ms"]["p95"]
            if (
                window["count"] >= int(threshold.get("min_calls", 10))
                and value is not None
                and value > above
            ):
                detail = f"{metric} over the last {name} is {value:.4g}, above {above:g} ({window['count']} calls)"
        if detail:
            self._fired[key] = now
        return detail

    def _hooks_of(self, owner: str) -> list[dict[str, Any]]:
        cached = self._hooks.get(owner)
        if cached is None or time.monotonic() - cached[0] > HOOKS_CACHE_S:
            cached = (time.monotonic(), self.registry.list_webhooks(owner))
            self._hooks[owner] = cached
        return cached[1]

    def _queue(self, hook: dict[str, Any], event: str, job: JobRecord, detail: str = "") -> None:
        if job.function_id not in self._names:
            function = self.registry.get_function(job.function_id)
            self._names[job.function_id] = function.function_name if function else job.function_id
        body = json.dumps(message(event, job, self._names[job.function_id], detail)).encode()
        self._senders.submit(self._deliver, _Delivery(time.time(), 1, hook, event, body))

    def _deliver(self, delivery: _Delivery) -> None:
        """One POST, on a sender thread; a failure that may pass is put back on the retry heap."""
        try:
            self._post(delivery)
        except Exception:
            log.exception("webhooks: unexpected error while sending")

    def _post(self, delivery: _Delivery) -> None:
        hook = delivery.hook
        target = pinned(hook["url"], self.allow)
        if isinstance(target, str):
            log.warning("webhook %s: not sent: %s", hook["hook_id"], target)
            self.stats["failed"] += 1
            return
        url, host, extensions = target
        timestamp = str(int(time.time()))
        headers = {
            "Host": host,
            "Content-Type": "application/json",
            "User-Agent": "NanoGrid-Webhook",
            "X-NanoGrid-Event": delivery.event,
            "X-NanoGrid-Delivery": uuid.uuid4().hex,
            "X-NanoGrid-Attempt": str(delivery.attempt),
            "X-NanoGrid-Timestamp": timestamp,
            "X-NanoGrid-Signature": sign(hook["secret"], timestamp, delivery.body),
        }
        try:
            status = self._http.post(
                url, content=delivery.body, headers=headers, extensions=extensions
            ).status_code
            why = f"HTTP {status}"
        except httpx.HTTPError as exc:
            status, why = 0, f"{type(exc).__name__}: {exc}"
        if 200 <= status < 400:
            self.stats["sent"] += 1
            return
        # the receiver refuses it: trying again would not change that
        if 400 <= status < 500 and status != 429:
            log.warning("webhook %s: refused (%s)", hook["hook_id"], why)
            self.stats["failed"] += 1
            return
        if delivery.attempt >= ATTEMPTS:
            log.warning(
                "webhook %s: gave up after %d attempts (%s)", hook["hook_id"], delivery.attempt, why
            )
            self.stats["failed"] += 1
            return
        delivery.attempt, delivery.due = (
            delivery.attempt + 1,
            time.time() + self.backoff_s * 2 ** (delivery.attempt - 1),
        )
        with self._retries_lock:
            heapq.heappush(self._retries, delivery)


def pinned(url: str, allow: Networks = ()) -> tuple[str, str, dict[str, Any]] | str:
    """The hook's URL with its host replaced by the one checked address, the ``Host`` header and the TLS
    extensions that keep the name (SNI and certificate check); or why it may not be sent."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return f"the URL's port is not a number 1-65535: {url!r}"
    why, addresses = refused_host(host, port, allow)
    if why or not addresses:
        return why or f"{host} resolves to nothing"
    ip = addresses[0]
    netloc = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    extensions = (
        {"sni_hostname": host} if parts.scheme == "https" and literal_ip(host) is None else {}
    )
    return (
        urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")),
        parts.netloc.rpartition("@")[2],
        extensions,
    )
