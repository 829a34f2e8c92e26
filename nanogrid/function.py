"""``@remote``: a Python function that runs on the grid with ``.remote()``, ``.spawn()`` and ``.map()``.

Typed with the function's own parameters (``ParamSpec``): ``square.remote("7")`` on ``def square(x: int)``
is a type error in mypy, and ``square.remote(7)`` has ``square``'s return type. Mistakes a type
checker cannot see are caught at the call site, before anything is uploaded: arguments that do not
fit the signature, and functions the grid cannot run (``async def``, generators) at decoration.
"""

from __future__ import annotations

import base64
import copy
import functools
import inspect
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, ParamSpec, TypeVar, overload

import cloudpickle
from tqdm.auto import tqdm

from nanogrid.client import Client, get_client
from nanogrid.environment import Environment, modules_of_values, requirements_for
from nanogrid.errors import (
    APIError,
    InvalidArgument,
    InvalidArguments,
    JobFailed,
    NanoGridError,
    UnsupportedFunction,
)
from nanogrid.job import Job, outcome
from nanogrid.packaging import FunctionPackage, package_function

MAX_ARGS_BYTES = 16 << 20  # the grid's default payload cap
MAP_STREAMS = 4  # /map requests in flight at once; each carries a chunk of calls

P = ParamSpec("P")
R = TypeVar("R")


class RemoteFunction(Generic[P, R]):
    """A function bound to the grid. Calling it directly still runs it locally."""

    def __init__(self, fn: Callable[P, R], *, memory: int | None = None, timeout: float | None = None,
                 name: str | None = None, runtime: str | None = None, client: Client | None = None,
                 model: str | None = None, ai: bool = False, packages: list[str] | None = None,
                 environment: Environment | None = None, result: str = "pickle") -> None:
        _check_runnable(fn)
        if result not in ("pickle", "json"):
            raise InvalidArguments(f"result must be 'pickle' or 'json' (data only, never unpickled), not {result!r}")
        self.result_format = result
        _check_limits(memory, timeout)
        self.fn = fn
        self.memory = memory
        self.timeout = timeout
        self.name = name or str(getattr(fn, "__name__", "function"))
        self.runtime = runtime
        self.model = model  # the AI node's model for its calls (else the grid's LLM_MODEL)
        self.ai = ai or model is not None  # its sandbox may reach the AI node
        self._client = client
        # What it runs with: an explicit Environment as it is, else the client's packages it uses (package sync)
        # plus ``packages``, which win over synced ones of the same name.
        self.environment = environment
        self.packages = list(packages or [])
        self._argument_modules: set[str] = set()  # modules of the argument types seen so far (package sync)
        self._synced: tuple[bytes, frozenset[str], Environment, dict[str, bytes]] | None = None
        self._pickled: bytes | None = None
        self._package: FunctionPackage | None = None
        self._signature: inspect.Signature | None = None
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # Pickled when a function refers to itself (recursion): send the function, not the connection.
        return {**self.__dict__, "_client": None, "_pickled": None, "_package": None, "_signature": None,
                "_synced": None}

    def with_options(self, *, model: str | None = None) -> RemoteFunction[P, R]:
        """The same function with per-call options: ``summarise.with_options(model="llama3.2").remote(text)``."""
        clone = copy.copy(self)
        clone.model = model if model is not None else self.model
        return clone

    def local(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    @property
    def client(self) -> Client:
        return self._client or get_client()

    def package(self) -> FunctionPackage:
        """The current package. Pickled afresh each time, so globals changed since the last call go along."""
        pickled = cloudpickle.dumps(self.fn)
        environment, local_files = self._environment(pickled)
        if pickled != self._pickled or self._package is None or self._package.manifest.get("environment_id") != (
                None if environment.empty else environment.id):
            self._package = package_function(self.fn, name=self.name, memory_mib=self.memory,
                                             timeout_s=self.timeout, runtime=self.runtime, ai=self.ai,
                                             environment=environment, local_files=local_files, pickled=pickled,
                                             result=self.result_format)
            self._pickled = pickled
        return self._package

    def _environment(self, pickled: bytes) -> tuple[Environment, dict[str, bytes]]:
        """The environment and local module files for this pickle (package sync, cached per pickle)."""
        if self.environment is not None:
            return self.environment.with_packages(self.packages), {}
        key = frozenset(self._argument_modules)
        if self._synced is None or self._synced[:2] != (pickled, key):
            found = requirements_for(self.fn, pickled, key)
            self._synced = (pickled, key, Environment(tuple(self.packages)).with_packages(found.packages),
                            found.local_files)
        return self._synced[2], self._synced[3]

    def _note_arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Package sync counts the argument types: a DataFrame argument needs pandas on the grid."""
        if self.environment is None:
            self._argument_modules |= modules_of_values([*args, *kwargs.values()])

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

    def _encode(self, args: tuple[Any, ...], kwargs: dict[str, Any], item: int | None = None) -> str:
        """Check the arguments against the signature, then pickle them: a wrong call never leaves this machine."""
        where = "" if item is None else f" (item {item} of .map())"
        if self._signature is None:
            self._signature = _signature_of(self.fn)
        if self._signature is not None:
            try:
                self._signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise InvalidArguments(f"cannot call {getattr(self.fn, '__qualname__', self.name)}{self._signature}: "
                                       f"{exc}{where}; nothing was sent to the grid") from None
        return _encode_args(args, kwargs, where)

    def spawn(self, *args: P.args, **kwargs: P.kwargs) -> Job[R]:
        """Start a call and return its Job at once."""
        payload = self._encode(args, kwargs)
        view = self._call(lambda fid: {"function_id": fid, "args_pickle": payload, "model": self.model},
                          lambda body: self.client.run(body, asynchronous=True))
        return Job(self.client, view, self.name, unpickle=self.result_format == "pickle")

    def remote(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run on the grid and return the value; a remote exception is re-raised here."""
        payload = self._encode(args, kwargs)
        view = self._call(lambda fid: {"function_id": fid, "args_pickle": payload, "model": self.model},
                          self.client.run)
        unpickle = self.result_format == "pickle"
        if view["status"] not in ("completed", "failed", "cancelled"):
            return Job[R](self.client, view, self.name, unpickle=unpickle).result()
        return outcome(view, unpickle)

    def map(self, *iterables: Iterable[Any], return_exceptions: bool = False, progress: bool | None = None,
            chunk_size: int | None = None) -> Iterator[R]:
        """Call the function once per item (``zip`` of the iterables), results in input order.

        Calls go to the grid in batches; the progress bar counts calls, not batches. With
        ``return_exceptions=True`` a failed call yields its exception instead of raising it.
        Every item is checked against the signature before the first one is sent.
        """
        items = [self._encode(args, {}, index) for index, args in enumerate(zip(*iterables, strict=False))]
        return _ordered_map(self, items, return_exceptions, progress, chunk_size)


def _check_runnable(fn: Callable[..., Any]) -> None:
    """Refuse, at decoration, what would only fail remotely after an upload and a cold start."""
    name = getattr(fn, "__qualname__", None) or repr(fn)
    if not callable(fn):
        raise UnsupportedFunction(f"@nanogrid.remote needs a function, not {type(fn).__name__} {fn!r}")
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise UnsupportedFunction(
            f"{name} is an async function; the grid runs plain functions. Wrap it in one that runs it: "
            f"`@nanogrid.remote` on `def {getattr(fn, '__name__', 'f')}_sync(*args, **kwargs): "
            f"return asyncio.run({getattr(fn, '__name__', 'f')}(*args, **kwargs))`")
    if inspect.isgeneratorfunction(fn):
        raise UnsupportedFunction(
            f"{name} is a generator function (it uses yield); a remote call returns one value. "
            "Return a list instead (`return list(...)`), or use .map() for one call per item")


def _check_limits(memory: int | None, timeout: float | None) -> None:
    if memory is not None and (isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0):
        raise InvalidArgument(f"memory is a whole number of MiB, e.g. memory=256, not {memory!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0):
        raise InvalidArgument(f"timeout is a number of seconds above 0, e.g. timeout=30, not {timeout!r}")


def _signature_of(fn: Callable[..., Any]) -> inspect.Signature | None:
    """The parameters only (annotations would read as strings under ``from __future__ import annotations``)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C callables have none: the grid will tell
        return None
    return signature.replace(parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
                             return_annotation=signature.empty)


def _ordered_map(fn: RemoteFunction[..., Any], items: list[str], return_exceptions: bool, progress: bool | None,
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
                    yield outcome(view, fn.result_format == "pickle")
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


def _encode_args(args: tuple[Any, ...], kwargs: dict[str, Any], where: str = "") -> str:
    try:
        data = cloudpickle.dumps((args, kwargs))
    except Exception as exc:
        raise InvalidArguments(f"cannot send the arguments to the grid{where}: {exc}") from exc
    if len(data) > MAX_ARGS_BYTES:
        sizes = ", ".join(f"argument {i}: {len(cloudpickle.dumps(a)) >> 20} MiB" for i, a in enumerate(args))
        raise InvalidArgument(f"the arguments{where} pickle to {len(data) >> 20} MiB, over the grid's "
                              f"{MAX_ARGS_BYTES >> 20} MiB limit ({sizes}); pass large data by reference "
                              "(a path or URL the function can read) instead")
    return base64.b64encode(data).decode()


@overload
def remote(fn: Callable[P, R], /) -> RemoteFunction[P, R]: ...


@overload
def remote(fn: None = None, /, *, memory: int | None = None, timeout: float | None = None, name: str | None = None,
           runtime: str | None = None, model: str | None = None, ai: bool = False, packages: list[str] | None = None,
           environment: Environment | None = None, result: str = "pickle"
           ) -> Callable[[Callable[P, R]], RemoteFunction[P, R]]: ...


def remote(fn: Callable[P, R] | None = None, /, *, memory: int | None = None, timeout: float | None = None,
           name: str | None = None, runtime: str | None = None, model: str | None = None, ai: bool = False,
           packages: list[str] | None = None, environment: Environment | None = None, result: str = "pickle"
           ) -> RemoteFunction[P, R] | Callable[[Callable[P, R]], RemoteFunction[P, R]]:
    """Decorator: ``@remote`` or ``@remote(memory=MiB, timeout=seconds, ai=True, model="AI node model")``.

    ``ai=True`` (implied by ``model``) lets the function's sandbox reach the grid's AI node.
    ``async def`` and generator functions are refused here, with what to write instead.
    With no ``environment``, the function gets the client's versions of the packages it uses, plus
    ``packages=["scikit-learn==1.5.2"]``; ``environment=nanogrid.Environment(...)`` says exactly what it gets.
    ``result="json"``: data-only results, sent as JSON; nothing the sandbox sends is ever unpickled here.
    """
    _check_limits(memory, timeout)

    def wrap(f: Callable[P, R]) -> RemoteFunction[P, R]:
        return RemoteFunction(f, memory=memory, timeout=timeout, name=name, runtime=runtime, model=model, ai=ai,
                              packages=packages, environment=environment, result=result)

    return wrap(fn) if fn is not None else wrap
