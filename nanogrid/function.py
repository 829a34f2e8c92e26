"""``@remote``: a Python function that runs on the grid with ``.remote()``, ``.spawn()`` and ``.map()``."""

from __future__ import annotations

import base64
import copy
import functools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import cloudpickle
from tqdm.auto import tqdm

from nanogrid.client import Client, get_client
from nanogrid.errors import APIError, JobFailed, NanoGridError
from nanogrid.job import Job, outcome
from nanogrid.packaging import FunctionPackage, package_function

MAX_ARGS_BYTES = 16 << 20  # the grid's default payload cap
MAP_STREAMS = 4  # /map requests in flight at once; each carries a chunk of calls


class RemoteFunction:
    """A function bound to the grid. Calling it directly still runs it locally."""

    def __init__(self, fn: Callable[..., Any], *, memory: int | None = None, timeout: float | None = None,
                 name: str | None = None, runtime: str | None = None, client: Client | None = None,
                 model: str | None = None, ai: bool = False) -> None:
        self.fn = fn
        self.memory = memory
        self.timeout = timeout
        self.name = name or getattr(fn, "__name__", "function")
        self.runtime = runtime
        self.model = model  # the AI node's model for its calls (else the grid's LLM_MODEL)
        self.ai = ai or model is not None  # its sandbox may reach the AI node
        self._client = client
        self._pickled: bytes | None = None
        self._package: FunctionPackage | None = None
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # Pickled when a function refers to itself (recursion): send the function, not the connection.
        return {**self.__dict__, "_client": None, "_pickled": None, "_package": None}

    def with_options(self, *, model: str | None = None) -> RemoteFunction:
        """The same function with per-call options: ``summarise.with_options(model="llama3.2").remote(text)``."""
        clone = copy.copy(self)
        clone.model = model if model is not None else self.model
        return clone

    def local(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    @property
    def client(self) -> Client:
        return self._client or get_client()

    def package(self) -> FunctionPackage:
        """The current package. Pickled afresh each time, so globals changed since the last call go along."""
        pickled = cloudpickle.dumps(self.fn)
        if pickled != self._pickled or self._package is None:
            self._package = package_function(self.fn, name=self.name, memory_mib=self.memory,
                                             timeout_s=self.timeout, runtime=self.runtime, ai=self.ai)
            self._pickled = pickled
        return self._package

    def deploy(self) -> str:
        """Upload the function if the grid does not have this version yet; returns its function id."""
        return self.client.deploy(self.package())

    def _call(self, body_for: Callable[[str], dict[str, Any]], send: Callable[[dict[str, Any]], Any]) -> Any:
        function_id = self.deploy()
        try:
            return send(body_for(function_id))
        except APIError as exc:
            if exc.status != 404 or "no function" not in exc.detail:
                raise
            self.client.forget_function(function_id)  # deleted on the grid: upload again
            return send(body_for(self.deploy()))

    def spawn(self, *args: Any, **kwargs: Any) -> Job:
        """Start a call and return its Job at once."""
        payload = _encode_args(args, kwargs)
        view = self._call(lambda fid: {"function_id": fid, "args_pickle": payload, "model": self.model},
                          lambda body: self.client.run(body, asynchronous=True))
        return Job(self.client, view, self.name)

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Run on the grid and return the value; a remote exception is re-raised here."""
        payload = _encode_args(args, kwargs)
        view = self._call(lambda fid: {"function_id": fid, "args_pickle": payload, "model": self.model},
                          self.client.run)
        if view["status"] not in ("completed", "failed", "cancelled"):
            return Job(self.client, view, self.name).result()
        return outcome(view)

    def map(self, *iterables: Iterable[Any], return_exceptions: bool = False, progress: bool | None = None,
            chunk_size: int | None = None) -> Iterator[Any]:
        """Call the function once per item (``zip`` of the iterables), results in input order.

        Calls go to the grid in batches; the progress bar counts calls, not batches. With
        ``return_exceptions=True`` a failed call yields its exception instead of raising it.
        """
        items = [_encode_args(args, {}) for args in zip(*iterables, strict=False)]
        return _ordered_map(self, items, return_exceptions, progress, chunk_size)


def _ordered_map(fn: RemoteFunction, items: list[str], return_exceptions: bool, progress: bool | None,
                 chunk_size: int | None) -> Iterator[Any]:
    total = len(items)
    if not total:
        return
    function_id = fn.deploy()
    size = chunk_size or max(1, min(1000, -(-total // (MAP_STREAMS * 2))))
    chunks = [(start, items[start:start + size]) for start in range(0, total, size)]
    done: queue.SimpleQueue[tuple[int, dict[str, Any]] | BaseException] = queue.SimpleQueue()
    job_ids: list[str] = []
    ids_lock = threading.Lock()
    stop = threading.Event()

    def send(work: queue.SimpleQueue[tuple[int, list[str]]]) -> None:
        while not stop.is_set():
            try:
                start, chunk = work.get_nowait()
            except queue.Empty:
                return
            try:
                lines = fn.client.map_stream({"function_id": function_id, "args_pickle": chunk, "model": fn.model})
                ids = next(lines)["job_ids"]
                with ids_lock:  # the consumer cancels job_ids once it stops: none may slip in after that
                    job_ids.extend(ids)
                    stopped = stop.is_set()
                if stopped:
                    fn.client.cancel_many(ids)
                    return
                for line in lines:
                    done.put((start + line["index"], line))
            except BaseException as exc:  # handed to the consumer, which raises it
                done.put(exc)
                return

    work: queue.SimpleQueue[tuple[int, list[str]]] = queue.SimpleQueue()
    for chunk in chunks:
        work.put(chunk)
    senders = [threading.Thread(target=send, args=(work,), daemon=True) for _ in range(min(MAP_STREAMS, len(chunks)))]
    for thread in senders:
        thread.start()
    bar = tqdm(total=total, desc=fn.name, unit="call", disable=(not progress) if progress is not None else None)
    waiting: dict[int, dict[str, Any]] = {}
    next_index = failed = 0
    try:
        while next_index < total:
            item = done.get()
            if isinstance(item, BaseException):
                raise item
            index, view = item
            waiting[index] = view
            failed += view["status"] != "completed"
            bar.set_postfix(failed=failed, in_flight=len(job_ids) - bar.n - 1, refresh=False)
            bar.update(1)
            while next_index in waiting:
                view = waiting.pop(next_index)
                next_index += 1
                try:
                    yield outcome(view)
                except (Exception, JobFailed) as exc:
                    if not return_exceptions:
                        raise
                    yield exc
    finally:
        with ids_lock:
            stop.set()
            submitted = list(job_ids)
        bar.close()
        if next_index < total:  # interrupted or failed: don't leave the rest running
            try:
                fn.client.cancel_many(submitted)
            except NanoGridError:
                pass


def _encode_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    try:
        data = cloudpickle.dumps((args, kwargs))
    except Exception as exc:
        raise TypeError(f"cannot send the arguments to the grid: {exc}") from exc
    if len(data) > MAX_ARGS_BYTES:
        sizes = ", ".join(f"argument {i}: {len(cloudpickle.dumps(a)) >> 20} MiB" for i, a in enumerate(args))
        raise ValueError(f"the arguments pickle to {len(data) >> 20} MiB, over the grid's "
                         f"{MAX_ARGS_BYTES >> 20} MiB limit ({sizes}); pass large data by reference "
                         "(a path or URL the function can read) instead")
    return base64.b64encode(data).decode()


def remote(fn: Callable[..., Any] | None = None, *, memory: int | None = None, timeout: float | None = None,
           name: str | None = None, runtime: str | None = None, model: str | None = None, ai: bool = False) -> Any:
    """Decorator: ``@remote`` or ``@remote(memory=MiB, timeout=seconds, ai=True, model="AI node model")``.

    ``ai=True`` (implied by ``model``) lets the function's sandbox reach the grid's AI node.
    """
    def wrap(f: Callable[..., Any]) -> RemoteFunction:
        return RemoteFunction(f, memory=memory, timeout=timeout, name=name, runtime=runtime, model=model, ai=ai)

    return wrap(fn) if fn is not None else wrap
