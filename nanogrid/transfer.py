"""Arguments and results of any size: content-addressed blobs, ``put`` and references, and the args codec.

Each top-level argument of a call is pickled once, on its own (cloudpickle, protocol 5). One at most
``threshold`` bytes travels inline, inside the call's small args pickle; a larger one is uploaded as a
blob named by its SHA-256 (``PUT /v1/blobs/{sha256}``, after a ``HEAD`` that skips what the grid has
already) and the args pickle carries only a reference to it (a pickle persistent id). The sandbox
resolves the references from the blobs the worker sends with the call. ``put(obj)`` uploads a value
explicitly; the ``Ref`` it returns may be passed as an argument to any number of calls.

A Ref may sit anywhere inside an argument (a list of Refs, a dict of them, an attribute): the
argument's own pickle names it by hash, and the call's blob list (``RunRequest.blobs``) includes it
so the worker sends it. A job's result becomes a Ref with ``job.ref()`` without coming back here.

The persistent ids in the args pickle: ``("i", bytes)`` an argument's own pickle, inline;
``("b", n)`` the call's ``n``-th blob (``RunRequest.blobs``). Either has a third item, ``{sha256: n}``,
when the argument holds Refs; inside the argument's pickle each Ref is ``("r", sha256)``.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cloudpickle

from nanogrid.environment import remember_put
from nanogrid_contract.errors import InvalidArgument, InvalidArguments

if TYPE_CHECKING:
    from nanogrid.client import Client

PROTOCOL = 5
MAX_BLOBS_PER_CALL = 256  # the controller refuses more


@dataclass(frozen=True)
class Ref:
    """A value kept on the grid (``nanogrid.put(obj)``, ``job.ref()``); wherever it sits in a call's arguments (the
    argument itself, an item of a list, a value of a dict), the function receives the value. The same Ref given
    twice in one call is one object there."""

    sha256: str
    size: int  # bytes of the value's pickle

    def __repr__(self) -> str:
        return f"<nanogrid.Ref {self.sha256[:12]} {_size(self.size)}>"

    def __reduce__(self) -> Any:
        # Only an argument's pickler (_RefPickler) may write a Ref; anything else would send a dangling name.
        raise RefOutsideArguments(
            "a nanogrid.Ref is resolved only inside a call's arguments (f.remote(ref), "
            "f.remote([ref1, ref2])), not in a value given to nanogrid.put, a function's "
            "globals or a result"
        )


class RefOutsideArguments(TypeError):
    """A Ref was pickled by something other than a call's arguments."""


def put(obj: Any, client: Client | None = None) -> Ref:
    """Upload ``obj`` once (pickled with cloudpickle) and return its ``Ref``; pass the Ref to calls instead of obj."""
    from nanogrid.client import get_client

    client = client or get_client()
    try:
        data = cloudpickle.dumps(obj, protocol=PROTOCOL)
    except Exception as exc:
        raise InvalidArguments(f"cannot send this value to the grid: {exc}") from exc
    limit = client.limits()["max_payload_bytes"]
    if len(data) > limit:
        raise InvalidArgument(
            f"the value pickles to {_size(len(data))}, over the grid's {_size(limit)} limit per "
            "value; nothing was uploaded"
        )
    ref = client.upload_blob(data)
    # package sync: a call given this Ref needs what its pickle references
    remember_put(ref.sha256, obj, data)
    return ref


class ArgsEncoder:
    """Encodes calls' arguments; one encoder per ``.remote()`` or per ``.map()``, so a value given to many calls
    of one ``.map()`` is pickled, hashed and uploaded once (the memo keeps it alive, so its id stays its own).

    Two steps, so that a mistake in any call is found before anything leaves this machine: ``pickle`` (no
    network) then ``send`` (the grid's limits, blob uploads). A ``.map()`` pickles every item first, holding each
    distinct value's pickle until ``send`` uploads it.
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        # id of a value -> the value, its pickle or its blob, the Refs in it
        self._memo: dict[int, _Pickled] = {}

    def encode(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], where: str = ""
    ) -> tuple[bytes, list[str]]:
        """(the args pickle, the SHA-256 of each blob it references, in order); nothing is uploaded for a call
        whose arguments cannot all be sent."""
        return self.send([self.pickle(args, kwargs, where)])[0]

    def pickle(self, args: tuple[Any, ...], kwargs: dict[str, Any], where: str = "") -> PickledCall:
        """Each argument pickled on its own, once per encoder however often it is given; nothing is sent."""
        named = [(f"argument {i}", value) for i, value in enumerate(args)]
        named += [(f"argument {key!r}", value) for key, value in kwargs.items()]
        for name, value in named:
            known = self._memo.get(id(value))
            if isinstance(value, Ref) or (known is not None and known.value is value):
                continue
            try:
                self._memo[id(value)] = _pickle_argument(value)
            except Exception as exc:
                raise InvalidArguments(f"cannot send {name}{where} to the grid: {exc}") from exc
        return PickledCall(named, len(args), list(kwargs), where)

    def pickle_of(self, value: Any) -> tuple[bytes | None, tuple[Ref, ...]]:
        """An argument's pickle (None for a Ref) and the Refs in it: package sync reads the modules they reference."""
        if isinstance(value, Ref):
            return None, (value,)
        pickled = self._memo[id(value)]
        return (pickled.stored if isinstance(pickled.stored, bytes) else None), pickled.refs

    def send(self, calls: list[PickledCall]) -> list[tuple[bytes, list[str]]]:
        """Every argument of every call checked against the grid's limits, then the large ones uploaded (each
        once) and each call's args pickle written: (args pickle, its blobs) per call."""
        limits = self.client.limits()
        limit = limits["max_payload_bytes"]
        # A grid older than the data plane names no threshold: everything goes inline, as it expects.
        threshold = limits.get("blob_threshold_bytes") or float("inf")
        for call in calls:
            # what travels as a blob: a Ref's hash, a large value's id
            as_blobs: set[int | str] = set()
            for name, value in call.named:
                stored = self._stored(value)
                if isinstance(stored, bytes) and len(stored) > limit:
                    raise InvalidArgument(
                        f"{name}{call.where} pickles to {_size(len(stored))}, over the grid's "
                        f"{_size(limit)} limit per argument; nothing was uploaded "
                        "(nanogrid up --max-payload-bytes raises it)"
                    )
                if isinstance(stored, Ref) or len(stored) > threshold:
                    as_blobs.add(stored.sha256 if isinstance(stored, Ref) else id(value))
                as_blobs.update(ref.sha256 for ref in self._nested(value))
            if len(as_blobs) > MAX_BLOBS_PER_CALL:
                raise InvalidArgument(
                    f"{len(as_blobs)} blobs (large arguments and Refs) in one call{call.where}; "
                    f"at most {MAX_BLOBS_PER_CALL}; nothing was uploaded"
                )
        return [self._write(call, threshold) for call in calls]

    def _stored(self, value: Any) -> bytes | Ref:
        return value if isinstance(value, Ref) else self._memo[id(value)].stored

    def _nested(self, value: Any) -> tuple[Ref, ...]:
        return () if isinstance(value, Ref) else self._memo[id(value)].refs

    def _write(self, call: PickledCall, threshold: float) -> tuple[bytes, list[str]]:
        blobs: list[str] = []
        encoded: list[_Inline | _Blob] = []

        def index(sha256: str) -> int:
            if sha256 not in blobs:
                blobs.append(sha256)
            return blobs.index(sha256)

        for _, value in call.named:
            stored = self._stored(value)
            if isinstance(stored, bytes) and len(stored) > threshold:
                stored = self.client.upload_blob(stored)
                # its pickle is freed; later calls reference the blob
                self._memo[id(value)].stored = stored
            refs = {ref.sha256: index(ref.sha256) for ref in self._nested(value)}
            encoded.append(
                _Blob(index(stored.sha256), refs)
                if isinstance(stored, Ref)
                else _Inline(stored, refs)
            )
        positional = encoded[: call.positional]
        keyword = dict(zip(call.keywords, encoded[call.positional :], strict=True))
        out = io.BytesIO()
        _ArgsPickler(out).dump((positional, keyword))
        return out.getvalue(), blobs


@dataclass
class PickledCall:
    """One call's arguments, pickled by an ``ArgsEncoder`` (the pickles stay in its memo) and not yet sent."""

    named: list[tuple[str, Any]]  # ("argument 0", value), ..., ("argument 'key'", value)
    positional: int  # how many of them are positional
    keywords: list[str]
    where: str  # " (item 3 of .map())" in messages


@dataclass
class _Pickled:
    value: Any  # kept alive, so its id stays its own while the encoder lives
    stored: bytes | Ref  # its pickle, or the blob it was uploaded as
    refs: tuple[Ref, ...]  # the Refs inside it, each named ("r", sha256) by its pickle


def _pickle_argument(value: Any) -> _Pickled:
    """cloudpickle as it is; only a value that holds Refs (Ref.__reduce__ refused) is pickled again naming them,
    so that every other argument keeps the C pickler's speed (a persistent_id hook is a Python call per object)."""
    try:
        return _Pickled(value, cloudpickle.dumps(value, protocol=PROTOCOL), ())
    except RefOutsideArguments:
        pass
    out = io.BytesIO()
    pickler = _RefPickler(out)
    pickler.dump(value)
    return _Pickled(value, out.getvalue(), tuple(pickler.refs.values()))


class _RefPickler(cloudpickle.Pickler):
    """cloudpickle, writing each Ref as the persistent id ("r", sha256) and collecting them."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=PROTOCOL)
        self.refs: dict[str, Ref] = {}

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is Ref:
            self.refs.setdefault(obj.sha256, obj)
            return ("r", obj.sha256)
        return None


@dataclass
class _Inline:
    data: bytes
    refs: dict[str, int]  # the Refs inside it: hash -> index in the call's blobs


@dataclass
class _Blob:
    index: int
    refs: dict[str, int]


class _ArgsPickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=PROTOCOL)

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Inline | _Blob):
            kind, value = ("i", obj.data) if isinstance(obj, _Inline) else ("b", obj.index)
            # the 2-item form older grids read
            return (kind, value, obj.refs) if obj.refs else (kind, value)
        return None


class ArgsUnpickler(pickle.Unpickler):
    """Reads an args pickle given its blobs (the bootstrap has its own copy of this; here for tests and tools).

    ``loaded``: the call's blobs already unpickled, by index, shared with the argument's own unpicklers so that
    one blob (a Ref given twice, at the top and in a list) is one object."""

    def __init__(
        self,
        data: bytes | bytearray,
        blobs: list[Any],
        loaded: dict[int, Any] | None = None,
        refs: dict[str, int] | None = None,
    ) -> None:
        super().__init__(io.BytesIO(data))
        self.blobs, self.loaded, self.refs = blobs, {} if loaded is None else loaded, refs or {}

    def persistent_load(self, pid: Any) -> Any:
        if pid[0] == "r":  # a Ref inside an argument
            return self._blob(self.refs[pid[1]], {})
        kind, value, refs = pid if len(pid) == 3 else (*pid, {})
        if kind == "i":
            return ArgsUnpickler(value, self.blobs, self.loaded, refs).load()
        return self._blob(value, refs)

    def _blob(self, index: int, refs: dict[str, int]) -> Any:
        if index not in self.loaded:
            self.loaded[index] = ArgsUnpickler(
                self.blobs[index], self.blobs, self.loaded, refs
            ).load()
        return self.loaded[index]


def sha256_of(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _size(n: int) -> str:
    return (
        f"{n / (1 << 30):.2f} GiB"
        if n >= 1 << 30
        else f"{n / (1 << 20):.1f} MiB"
        if n >= 1 << 20
        else f"{n} bytes"
    )
