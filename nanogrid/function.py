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
import io
import json
import queue
import sys
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, ParamSpec, TypeVar, cast, overload

import cloudpickle
from tqdm.auto import tqdm

from nanogrid.client import GIVE_UP_CANCEL_S, Client, get_client
from nanogrid.environment import (
    Environment,
    missing_package,
    modules_of_argument,
    modules_of_put,
    pin_installed,
    requirements_for,
)
from nanogrid.job import Job, outcome
from nanogrid.packaging import FunctionPackage, build_zip, package_function
from nanogrid.schedule import Cron, Period, Schedule, as_schedule, lookup, register
from nanogrid.transfer import ArgsEncoder, PickledCall
from nanogrid.volume import Volume, manifest_volumes
from nanogrid_contract.errors import (
    APIError,
    GridUnresponsive,
    InvalidArgument,
    InvalidArguments,
    InvalidEnvironment,
    JobFailed,
    MissingModule,
    NanoGridError,
    RemoteTraceback,
    UnsupportedFunction,
)
from nanogrid_contract.views import JobView

LIVE_AFTER_S = (
    0.5  # .remote(): a call still running after this is followed live (its output as it is printed)
)
MAP_STREAMS = 4  # /map requests in flight at once; each carries a chunk of calls
MAP_WINDOW = 10_000  # calls of a map sent ahead of the first result not yet yielded
MISSING_MODULE_TRIES = (
    3  # .remote(): tries again with one more missing package at most this often (pandas, pyarrow)
)

P = ParamSpec("P")
R = TypeVar("R")


class RemoteFunction(Generic[P, R]):
    """A function bound to the grid. Calling it directly still runs it locally."""

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        memory: int | None = None,
        timeout: float | None = None,
        name: str | None = None,
        runtime: str | None = None,
        client: Client | None = None,
        model: str | None = None,
        ai: bool = False,
        packages: list[str] | None = None,
        environment: Environment | None = None,
        result: str = "pickle",
        retries: int = 0,
        retry_on: Iterable[type[BaseException] | str] = (),
        backoff: float = 1.0,
        env: dict[str, str] | None = None,
        secrets: list[str] | None = None,
        disk: int | None = None,
        schedule: str | Cron | Period | None = None,
        volumes: dict[str, Volume] | None = None,
    ) -> None:
        _check_runnable(fn)
        # mount path -> the owner's Volume its sandbox binds there
        self.volumes = dict(volumes or {})
        self._volume_entries = manifest_volumes(self.volumes)
        _check_environment_options(packages, secrets, environment)
        if result not in ("pickle", "json"):
            raise InvalidArguments(
                f"result must be 'pickle' or 'json' (data only, never unpickled), not {result!r}"
            )
        self.result_format = result
        self.env = dict(env or {})  # environment variables of its sandbox
        # names of the owner's secrets its sandbox gets as variables
        self.secrets = list(secrets or [])
        _check_limits(memory, timeout, disk)
        self.fn = fn
        self.memory = memory
        self.disk = (
            disk  # MiB of scratch disk for /tmp, work and output files (None: the grid's default)
        )
        self.timeout = timeout
        self.name = name or str(getattr(fn, "__name__", "function"))
        self.runtime = runtime
        self.model = model  # the AI node's model for its calls (else the grid's LLM_MODEL)
        self.ai = ai or model is not None  # its sandbox may reach the AI node
        self._client = client
        # What it runs with: an explicit Environment as it is, else the client's packages it uses (package sync)
        # plus ``packages``, which win over synced ones of the same name.
        self.environment = environment
        # a bare name this client has runs at the version it has
        self.packages = pin_installed(packages or [])
        # pins added after the sandbox could not import a module this client has
        self._added: list[str] = []
        # in the manifest: the worker tries again
        self.retry_policy = _retry_policy(retries, retry_on, backoff)
        # modules the arguments' pickles referenced so far (package sync)
        self._argument_modules: set[str] = set()
        self._synced: tuple[bytes, Any, Environment, dict[str, bytes]] | None = None
        self._pickled: bytes | None = None
        self._package: FunctionPackage | None = None
        self._signature: inspect.Signature | None = None
        # shapes of calls (positional count, keyword names) that bound: binding checks only these
        self._bound_shapes: set[tuple[int, tuple[str, ...]]] = set()
        self.schedule = None if schedule is None else _check_schedule(fn, schedule)
        self._scheduled: str | None = None  # the version its schedule was last registered for
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # Pickled when a function refers to itself (recursion): send the function, not the connection.
        return {
            **self.__dict__,
            "_client": None,
            "_pickled": None,
            "_package": None,
            "_signature": None,
            "_bound_shapes": set(),
            "_synced": None,
        }

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
        if (
            pickled != self._pickled
            or self._package is None
            or self._package.manifest.get("environment_id")
            != (None if environment.empty else environment.id)
        ):
            self._package = package_function(
                self.fn,
                name=self.name,
                memory_mib=self.memory,
                disk_mib=self.disk,
                timeout_s=self.timeout,
                runtime=self.runtime,
                ai=self.ai,
                environment=environment,
                local_files=local_files,
                pickled=pickled,
                result=self.result_format,
                env=self.env,
                secrets=self.secrets,
                volumes=self._volume_entries,
            )
            # made on first use, as `Volume(name, size_mib=...)` says
            for volume in self.volumes.values():
                if not volume._made:
                    volume._client = volume._client or self.client
                    volume.ensure()
            if self.retry_policy:
                self._package = _with_manifest(self._package, retries=self.retry_policy)
            self._pickled = pickled
        return self._package

    def _environment(self, pickled: bytes) -> tuple[Environment, dict[str, bytes]]:
        """The environment and local module files for this pickle (package sync, cached per pickle)."""
        if self.environment is not None:
            return self.environment.with_packages(self.packages), {}
        key = (frozenset(self._argument_modules), tuple(self._added))
        if self._synced is None or self._synced[:2] != (pickled, key):
            found = requirements_for(self.fn, pickled, key[0])
            explicit = Environment(tuple(self.packages)).with_packages(self._added)
            self._synced = (pickled, key, explicit.with_packages(found.packages), found.local_files)
        return self._synced[2], self._synced[3]

    def _note_arguments(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], encoder: ArgsEncoder | None = None
    ) -> None:
        """Package sync counts what the arguments' pickles reference (``encoder``'s, the bytes the call sends): a
        DataFrame needs pandas on the grid, and pyarrow too where pandas 3 keeps its strings in pyarrow."""
        if self.environment is not None:
            return
        for value in [*args, *kwargs.values()]:
            pickled, refs = encoder.pickle_of(value) if encoder is not None else (None, ())
            if encoder is None or pickled is not None:
                self._argument_modules |= modules_of_argument(value, pickled)
            for ref in refs:  # scanned by nanogrid.put when it was uploaded from here
                self._argument_modules |= modules_of_put(ref.sha256)

    def _missing_module(self, exc: BaseException) -> tuple[MissingModule, list[str]] | None:
        """For a call that failed because the sandbox could not import a module this client has: the error that
        names the package to add, and the pins that provide it; None for any other failure."""
        cause = exc.__cause__
        text = f"{exc}\n{cause.text if isinstance(cause, RemoteTraceback) else ''}"
        found = missing_package(text) if isinstance(exc, ImportError | JobFailed) else None
        if found is None:
            return None
        module, pins = found
        where = (
            "its Environment(packages=[...])"
            if self.environment is not None
            else "@nanogrid.remote"
        )
        message = (
            f"the grid's sandbox could not import {module!r}, which this client has ({pins[0]}): add "
            f"packages=['{pins[0]}'] to {where}"
        )
        return MissingModule(message, name=module, requirement=pins[0]), pins

    def _ran(self, exc: BaseException) -> bool:
        """Whether the failed call got as far as running the function (then it is never tried again here): not
        when its package or arguments could not be unpickled."""
        if isinstance(exc, JobFailed):
            return exc.kind != "load"
        cause = exc.__cause__
        code = getattr(self.fn, "__code__", None)
        text = cause.text if isinstance(cause, RemoteTraceback) else ""
        return code is None or f'File "{code.co_filename}"' in text

    def deploy(self) -> str:
        """Upload the function if the grid does not have this version yet; returns its function id. With
        ``schedule=``, the schedule (named after the function) is registered and pointed at this version."""
        function_id = self.client.deploy(self.package())
        if self.schedule is not None and self._scheduled != function_id:
            register(self.client, self.name, function_id, self.schedule, self._encode((), {})[0])
            self._scheduled = function_id
        return function_id

    def schedule_info(self) -> Schedule | None:
        """This function's schedule as the grid has it (firings, next due time), to ``pause()``, ``resume()`` or
        ``remove()``; None if it has none."""
        return lookup(self.client, self.name)

    def history(
        self, limit: int = 50, status: str | None = None, before: str | None = None
    ) -> list[dict[str, Any]]:
        """This version's calls on the grid, newest first: status, times, duration, peak memory, cold/warm, worker,
        exit reason, and stdout/stderr cut to 2,048 characters (``Job.from_id(job_id).stdout`` has all of it).
        ``before``: the last job id of the previous page."""
        params = {
            "limit": limit,
            **({"status": status} if status else {}),
            **({"before": before} if before else {}),
        }
        path = _v1(self.client, f"/functions/{self.deploy()}/history")
        return self.client.request("GET", path, params=params).json()["items"]

    def windows(self) -> dict[str, dict[str, Any]]:
        """Count, error rate, p50/p95/p99 duration, peak memory and cold-start share over 1h, 24h, 7d and 30d."""
        return self.client.request(
            "GET", _v1(self.client, f"/functions/{self.deploy()}/windows")
        ).json()["windows"]

    def autotune(self, apply: bool = False) -> dict[str, Any]:
        """The AutoTuner's memory advice, its reasons and the saving per million calls. ``apply=True`` makes the grid's
        version with that memory and uses it for this function's next calls (``advice["applied"]``)."""
        path = _v1(self.client, f"/functions/{self.deploy()}/autotune")
        advice = self.client.request("GET", path).json()
        if apply and advice["recommended_mib"] not in (None, advice["current_mib"]):
            advice["applied"] = self.client.request(
                "POST", path + "/apply", json={"memory_mib": advice["recommended_mib"]}
            ).json()
            self.memory, self._package = advice["recommended_mib"], None
        return advice

    def _call(
        self, body_for: Callable[[str], dict[str, Any]], send: Callable[[dict[str, Any]], Any]
    ) -> Any:
        function_id = self.deploy()
        try:
            return send(body_for(function_id))
        except APIError as exc:
            if exc.status != 404 or "no function" not in exc.detail:
                raise
            self.client.forget_function(function_id)  # deleted on the grid: upload again
            return send(body_for(self.deploy()))

    def _encode(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, list[str]]:
        """Check the arguments, then send the large ones: (the base64 args pickle, the blobs it references)."""
        encoder = ArgsEncoder(self.client)
        data, blobs = encoder.send([self._pickle(encoder, args, kwargs)])[0]
        return base64.b64encode(data).decode(), blobs

    def _pickle(
        self,
        encoder: ArgsEncoder,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        item: int | None = None,
    ) -> PickledCall:
        """Check the arguments against the signature, then pickle each one: a wrong call never leaves this machine."""
        where = "" if item is None else f" (item {item} of .map())"
        if self._signature is None:
            self._signature = _signature_of(self.fn)
        # Whether arguments bind depends on how many are positional and which keywords are named, never on their
        # values: a shape that bound once is not bound again (~8 us a call).
        shape = (len(args), tuple(kwargs))
        if self._signature is not None and shape not in self._bound_shapes:
            try:
                self._signature.bind(*args, **kwargs)
                if len(self._bound_shapes) >= 64:  # keywords made up at run time: kept bounded
                    self._bound_shapes.clear()
                self._bound_shapes.add(shape)
            except TypeError as exc:
                raise InvalidArguments(
                    f"cannot call {getattr(self.fn, '__qualname__', self.name)}{self._signature}: "
                    f"{exc}{where}; nothing was sent to the grid"
                ) from None
        call = encoder.pickle(args, kwargs, where)
        self._note_arguments(args, kwargs, encoder)
        return call

    def spawn(self, *args: P.args, **kwargs: P.kwargs) -> Job[R]:
        """Start a call and return its Job at once."""
        payload, blobs = self._encode(args, kwargs)
        view = self._call(
            lambda fid: {
                "function_id": fid,
                "args_pickle": payload,
                "blobs": blobs,
                "model": self.model,
            },
            lambda body: self.client.run(body, asynchronous=True),
        )
        return Job(self.client, view, self.name, unpickle=self.result_format == "pickle")

    def remote(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run on the grid and return the value; a remote exception is re-raised here.

        A call that failed before the function ran because the sandbox could not import a module this
        client has (``MissingModule`` names it) is tried once more with that package added, at this
        client's version, when the environment is synced; an explicit ``environment`` is never changed.
        """
        payload, blobs = self._encode(args, kwargs)
        for _ in range(MISSING_MODULE_TRIES):
            try:
                return self._run(payload, blobs)
            except (ImportError, JobFailed) as exc:
                missing = self._missing_module(exc)
                if missing is None:
                    raise
                if (
                    self.environment is not None
                    or self._ran(exc)
                    or all(p in self._added for p in missing[1])
                ):
                    raise missing[0] from exc
                self._added += [pin for pin in missing[1] if pin not in self._added]
                warnings.warn(f"{missing[0]}; trying {self.name} again with it added", stacklevel=2)
        return self._run(payload, blobs)

    def _run(self, payload: str, blobs: list[str]) -> R:
        view = self._call(
            lambda fid: {
                "function_id": fid,
                "args_pickle": payload,
                "blobs": blobs,
                "model": self.model,
            },
            lambda body: self.client.run(body, hold=LIVE_AFTER_S),
        )
        job = Job[R](self.client, view, self.name, unpickle=self.result_format == "pickle")
        job.watched = (
            True  # nobody else waits for it: if this process goes, a call still queued is not run
        )
        try:
            # What it prints appears here as it would locally: live when the call is still running.
            return job.echo().result()
        except GridUnresponsive:
            _cancel_quietly(self.client, [job.job_id])  # nobody is left to take its result
            raise

    def map(
        self,
        *iterables: Iterable[Any],
        return_exceptions: bool = False,
        progress: bool | None = None,
        chunk_size: int | None = None,
    ) -> Iterator[R]:
        """Call the function once per item (``zip`` of the iterables), results in input order.

        Calls go to the grid in batches; the progress bar counts calls, not batches. With
        ``return_exceptions=True`` a failed call yields its exception instead of raising it.
        Every item is checked against the signature before the first one is sent.
        """
        # a value shared by many items is pickled and uploaded once
        encoder = ArgsEncoder(self.client)
        calls = [
            self._pickle(encoder, args, {}, index)
            for index, args in enumerate(zip(*iterables, strict=False))
        ]
        items = (
            [(base64.b64encode(data).decode(), blobs) for data, blobs in encoder.send(calls)]
            if calls
            else []
        )
        return _ordered_map(self, items, return_exceptions, progress, chunk_size)


def _check_runnable(fn: Callable[..., Any]) -> None:
    """Refuse, at decoration, what would only fail remotely after an upload and a cold start."""
    name = getattr(fn, "__qualname__", None) or repr(fn)
    if not callable(fn):
        raise UnsupportedFunction(
            f"@nanogrid.remote needs a function, not {type(fn).__name__} {fn!r}"
        )
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise UnsupportedFunction(
            f"{name} is an async function; the grid runs plain functions. Wrap it in one that runs it: "
            f"`@nanogrid.remote` on `def {getattr(fn, '__name__', 'f')}_sync(*args, **kwargs): "
            f"return asyncio.run({getattr(fn, '__name__', 'f')}(*args, **kwargs))`"
        )
    if inspect.isgeneratorfunction(fn):
        raise UnsupportedFunction(
            f"{name} is a generator function (it uses yield); a remote call returns one value. "
            "Return a list instead (`return list(...)`), or use .map() for one call per item"
        )


def _check_environment_options(
    packages: list[str] | None, secrets: list[str] | None, environment: Environment | None
) -> None:
    """Refuse, where they are written, options that could never give a working environment."""
    for option, names, example in (
        ("packages", packages, "humanize==4.9.0"),
        ("secrets", secrets, "openai"),
    ):
        if isinstance(names, str):
            raise InvalidArguments(
                f"{option} takes a list of names: write {option}=[{names!r}], not {option}={names!r} "
                "(a string would be read letter by letter)"
            )
        if names is not None and (
            not isinstance(names, list | tuple | set | frozenset)
            or not all(isinstance(name, str) for name in names)
        ):
            raise InvalidArguments(
                f"{option} takes a list of names, e.g. {option}=['{example}'], not {names!r}"
            )
    Environment(packages=tuple(packages or ()))  # InvalidEnvironment for what no installer takes
    if environment is not None and not isinstance(environment, Environment):
        raise InvalidArguments(
            f"environment takes a nanogrid.Environment(...), not {type(environment).__name__}; "
            "for a list of packages write packages=[...]"
        )
    client_python = "%d.%d" % sys.version_info[:2]
    if environment is not None and environment.python not in (None, client_python):
        raise InvalidEnvironment(
            f"environment python={environment.python!r}: a function is pickled by this client's "
            f"Python {client_python} and only loads on that version; leave python out, or run "
            f"the client on Python {environment.python}"
        )


def _check_limits(memory: int | None, timeout: float | None, disk: int | None = None) -> None:
    if memory is not None and (
        isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0
    ):
        raise InvalidArgument(f"memory is a whole number of MiB, e.g. memory=256, not {memory!r}")
    if disk is not None and (isinstance(disk, bool) or not isinstance(disk, int) or disk <= 0):
        raise InvalidArgument(f"disk is a whole number of MiB, e.g. disk=4096, not {disk!r}")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
    ):
        raise InvalidArgument(
            f"timeout is a number of seconds above 0, e.g. timeout=30, not {timeout!r}"
        )


def _check_schedule(fn: Callable[..., Any], schedule: str | Cron | Period) -> Cron | Period:
    """A schedule's runs call the function with no arguments: refuse one that needs some, at decoration."""
    spec = as_schedule(schedule)
    signature = _signature_of(fn)
    if signature is not None:
        try:
            signature.bind()
        except TypeError:
            raise InvalidArgument(
                f"a scheduled function is called with no arguments, but "
                f"{getattr(fn, '__qualname__', 'it')}{signature} needs some: give them defaults"
            ) from None
    return spec


def _v1(client: Client, path: str) -> str:
    """An absolute URL of NanoGrid's own API (the operations routes live under /v1 whatever the client's base)."""
    return f"{client.url}/v1{path}"


def _retry_policy(
    retries: int, retry_on: Iterable[type[BaseException] | str], backoff: float
) -> dict[str, Any]:
    """The manifest's retry policy ({} for none): exception classes by name, with their subclasses."""
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
        raise InvalidArgument(f"retries is a whole number of extra tries, 0 to 10, not {retries!r}")
    if isinstance(backoff, bool) or not isinstance(backoff, int | float) or not 0 <= backoff <= 60:
        raise InvalidArgument(
            f"backoff is the seconds before the second try (0 to 60), not {backoff!r}"
        )
    names: set[str] = set()
    for item in [retry_on] if isinstance(retry_on, str | type) else retry_on:
        if isinstance(item, str):
            names.add(item)
        elif isinstance(item, type) and issubclass(item, BaseException):
            todo = [item]
            while todo:
                cls = todo.pop()
                names.add(f"{cls.__module__}.{cls.__qualname__}")
                todo.extend(cls.__subclasses__())
        else:
            raise InvalidArgument(f"retry_on takes exception classes or their names, not {item!r}")
    if not retries:
        return {}
    return {"retries": retries, "retry_on": sorted(names), "backoff_s": float(backoff)}


def _with_manifest(package: FunctionPackage, **entries: Any) -> FunctionPackage:
    """The package with more manifest entries (they are part of its content hash, like every other setting)."""
    with zipfile.ZipFile(io.BytesIO(package.data)) as zf:
        files = {name: zf.read(name) for name in zf.namelist()}
    manifest = {**package.manifest, **entries}
    files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return FunctionPackage(build_zip(files), manifest)


def _signature_of(fn: Callable[..., Any]) -> inspect.Signature | None:
    """The parameters only (annotations would read as strings under ``from __future__ import annotations``)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C callables have none: the grid will tell
        return None
    return signature.replace(
        parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
        return_annotation=signature.empty,
    )


def _ordered_map(
    fn: RemoteFunction[..., Any],
    items: list[tuple[str, list[str]]],
    return_exceptions: bool,
    progress: bool | None,
    chunk_size: int | None,
) -> Iterator[Any]:
    total = len(items)
    if not total:
        return
    function_id = fn.deploy()
    size = chunk_size or max(1, min(1000, -(-total // (MAP_STREAMS * 2))))
    # A chunk is sent only while it starts within `window` of the first result not yet yielded: what waits
    # here for its turn (and what the grid streams) stays bounded however many calls the map has, and
    # however slowly they are consumed.
    window = max(MAP_WINDOW, MAP_STREAMS * size)
    work: queue.SimpleQueue[tuple[int, list[tuple[str, list[str]]]]] = queue.SimpleQueue()
    for start in range(0, total, size):
        work.put((start, items[start : start + size]))
    del items  # each chunk's arguments are freed once it is sent
    done: queue.SimpleQueue[tuple[int, JobView] | BaseException] = queue.SimpleQueue()
    in_flight: dict[int, list[str]] = {}  # chunk start -> its job ids, until all its results came
    submitted = 0
    # guards in_flight, submitted and yielded; notified as results are yielded
    turn = threading.Condition()
    yielded = 0
    stop = threading.Event()

    def send() -> None:
        nonlocal submitted
        while not stop.is_set():
            try:
                start, chunk = work.get_nowait()
            except queue.Empty:
                return
            with turn:
                while not stop.is_set() and start - yielded >= window:
                    turn.wait()
            if stop.is_set():
                return
            try:
                body: dict[str, Any] = {
                    "function_id": function_id,
                    "args_pickle": [p for p, _ in chunk],
                    "model": fn.model,
                }
                if any(blobs for _, blobs in chunk):
                    body["blobs"] = [blobs for _, blobs in chunk]
                del chunk
                lines = fn.client.map_stream(body)
                del body
                ids = next(lines)["job_ids"]
                # the consumer cancels what is in flight once it stops: none may slip in after that
                with turn:
                    in_flight[start] = ids
                    submitted += len(ids)
                    stopped = stop.is_set()
                if stopped:
                    fn.client.cancel_many(ids)
                    return
                for line in lines:
                    # only what the outcome is made of: a job's logs, times and links are not kept per call
                    done.put((start + line["index"], cast(JobView, _outcome_view(line))))
                with turn:
                    del in_flight[start]  # all its results arrived
            except BaseException as exc:  # handed to the consumer, which raises it
                done.put(exc)
                return

    senders = [
        threading.Thread(target=send, daemon=True)
        for _ in range(min(MAP_STREAMS, -(-total // size)))
    ]
    for thread in senders:
        thread.start()
    bar = tqdm(
        total=total,
        desc=fn.name,
        unit="call",
        disable=(not progress) if progress is not None else None,
    )
    waiting: dict[int, JobView] = {}
    failed = 0
    try:
        while yielded < total:
            item = done.get()
            if isinstance(item, BaseException):
                raise item
            index, view = item
            waiting[index] = view
            failed += view["status"] != "completed"
            if not bar.disable:  # its formatting costs as much as a call's own decoding
                bar.set_postfix(failed=failed, in_flight=submitted - bar.n - 1, refresh=False)
            bar.update(1)
            while yielded in waiting:
                view = waiting.pop(yielded)
                with turn:
                    yielded += 1
                    if yielded % size == 0:
                        turn.notify_all()
                try:
                    yield outcome(view, fn.result_format == "pickle", fn.client)
                except (Exception, JobFailed) as exc:
                    # the error that says which package to add, if that was it
                    missing = fn._missing_module(exc)
                    if missing is None and not return_exceptions:
                        raise
                    if missing is not None and not return_exceptions:
                        raise missing[0] from exc
                    if missing is not None:
                        missing[0].__cause__ = exc
                    yield exc if missing is None else missing[0]
    finally:
        with turn:
            stop.set()
            turn.notify_all()
            unfinished = [job_id for ids in in_flight.values() for job_id in ids]
        bar.close()
        if yielded < total:  # interrupted or failed: don't leave the rest running
            _cancel_quietly(fn.client, unfinished)


OUTCOME_FIELDS = ("job_id", "status", "result", "result_pickle", "result_blob", "error")


def _outcome_view(line: dict[str, Any]) -> dict[str, Any]:
    return {key: line[key] for key in OUTCOME_FIELDS if key in line}


def _cancel_quietly(client: Client, job_ids: list[str]) -> None:
    """Best effort on the way out, briefly: a grid that stopped answering may still act on it once it resumes."""
    try:
        client.cancel_many(job_ids, timeout=GIVE_UP_CANCEL_S)
    except NanoGridError:
        pass


@overload
def remote(fn: Callable[P, R], /) -> RemoteFunction[P, R]: ...


@overload
def remote(
    fn: None = None,
    /,
    *,
    memory: int | None = None,
    timeout: float | None = None,
    name: str | None = None,
    runtime: str | None = None,
    model: str | None = None,
    ai: bool = False,
    packages: list[str] | None = None,
    environment: Environment | None = None,
    result: str = "pickle",
    retries: int = 0,
    retry_on: Iterable[type[BaseException] | str] = (),
    backoff: float = 1.0,
    env: dict[str, str] | None = None,
    secrets: list[str] | None = None,
    disk: int | None = None,
    schedule: str | Cron | Period | None = None,
    volumes: dict[str, Volume] | None = None,
) -> Callable[[Callable[P, R]], RemoteFunction[P, R]]: ...


def remote(
    fn: Callable[P, R] | None = None,
    /,
    *,
    memory: int | None = None,
    timeout: float | None = None,
    name: str | None = None,
    runtime: str | None = None,
    model: str | None = None,
    ai: bool = False,
    packages: list[str] | None = None,
    environment: Environment | None = None,
    result: str = "pickle",
    retries: int = 0,
    retry_on: Iterable[type[BaseException] | str] = (),
    backoff: float = 1.0,
    env: dict[str, str] | None = None,
    secrets: list[str] | None = None,
    disk: int | None = None,
    schedule: str | Cron | Period | None = None,
    volumes: dict[str, Volume] | None = None,
) -> RemoteFunction[P, R] | Callable[[Callable[P, R]], RemoteFunction[P, R]]:
    """Decorator: ``@remote`` or ``@remote(memory=MiB, timeout=seconds, ai=True, model="AI node model")``.

    ``ai=True`` (implied by ``model``) lets the function's sandbox reach the grid's AI node.
    ``async def`` and generator functions are refused here, with what to write instead.
    With no ``environment``, the function gets the client's versions of the packages it uses, plus
    ``packages=["scikit-learn==1.5.2"]``; ``environment=nanogrid.Environment(...)`` says exactly what it gets.
    ``result="json"``: data-only results, sent as JSON; nothing the sandbox sends is ever unpickled here.
    ``retries=N``: a call whose sandbox crashed or whose worker was lost, or that raised one of ``retry_on``
    (exception classes, subclasses included, or names), is tried up to N more times, ``backoff`` seconds
    after the first failure and twice as long after each next one; every try shows in ``history()``.
    ``env={"NAME": "value"}`` sets environment variables in its sandbox; ``secrets=["NAME"]`` adds the variables
    of the owner's secret NAME (`nanogrid secrets set NAME KEY=VALUE`), decrypted only inside the worker.
    ``disk=MiB``: the sandbox's own disk for /tmp, its working and output files (default: the grid's, 1 GiB);
    it does not count against ``memory``, and filling it raises ``nanogrid.OutOfDisk``.
    ``schedule="0 * * * *"`` (cron, UTC), ``nanogrid.Cron(expr, timezone=...)`` or ``nanogrid.Period(minutes=5)``:
    it also runs on its own, with no arguments, once ``deploy()`` registered it (nanogrid/schedule.py).
    ``volumes={"/data": nanogrid.Volume("datasets")}`` binds your volumes into its sandbox (nanogrid/volume.py).
    """
    _check_limits(memory, timeout, disk)
    manifest_volumes(volumes)
    _retry_policy(retries, retry_on, backoff)  # mistakes named here, not at the first call
    _check_environment_options(packages, secrets, environment)
    if schedule is not None:
        as_schedule(schedule)

    def wrap(f: Callable[P, R]) -> RemoteFunction[P, R]:
        return RemoteFunction(
            f,
            memory=memory,
            timeout=timeout,
            name=name,
            runtime=runtime,
            model=model,
            ai=ai,
            packages=packages,
            environment=environment,
            result=result,
            retries=retries,
            retry_on=retry_on,
            backoff=backoff,
            env=env,
            secrets=secrets,
            disk=disk,
            schedule=schedule,
            volumes=volumes,
        )

    return wrap(fn) if fn is not None else wrap
