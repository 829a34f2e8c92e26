"""Arguments and results of any size: content-addressed blobs, ``put`` and references, and the args codec.

Each top-level argument of a call is pickled once, on its own (cloudpickle, protocol 5). One at most
``threshold`` bytes travels inline, inside the call's small args pickle; a larger one is uploaded as a
blob named by its SHA-256 (``PUT /v1/blobs/{sha256}``, after a ``HEAD`` that skips what the grid has
already) and the args pickle carries only a reference to it (a pickle persistent id). The sandbox
resolves the references from the blobs the worker sends with the call. ``put(obj)`` uploads a value
explicitly; the ``Ref`` it returns may be passed as an argument to any number of calls.

The persistent ids in the args pickle: ``("i", bytes)`` an argument's own pickle, inline;
``("b", n)`` the call's ``n``-th blob (``RunRequest.blobs``).
"""

from __future__ import annotations

import hashlib
import io
import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cloudpickle

from nanogrid.errors import InvalidArgument, InvalidArguments

if TYPE_CHECKING:
    from nanogrid.client import Client

PROTOCOL = 5
MAX_BLOBS_PER_CALL = 256  # the controller refuses more


@dataclass(frozen=True)
class Ref:
    """A value stored on the grid by ``nanogrid.put``; passed as an argument, the function receives the value.

    Only top-level arguments are resolved (as in Ray): a Ref inside a list stays unresolved and cannot be sent.
    """

    sha256: str
    size: int  # bytes of the value's pickle

    def __repr__(self) -> str:
        return f"<nanogrid.Ref {self.sha256[:12]} {_size(self.size)}>"

    def __reduce__(self) -> Any:
        raise TypeError("a nanogrid.Ref is resolved only as a top-level argument of a call (f.remote(ref)), not "
                        "inside another value")


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
        raise InvalidArgument(f"the value pickles to {_size(len(data))}, over the grid's {_size(limit)} limit per "
                              "value; nothing was uploaded")
    return client.upload_blob(data)


class ArgsEncoder:
    """Encodes calls' arguments; one encoder per ``.remote()`` or per ``.map()``, so a value given to many calls
    of one ``.map()`` is pickled, hashed and uploaded once (the memo keeps it alive, so its id stays its own).

    Two steps, so that a mistake in any call is found before anything leaves this machine: ``pickle`` (no
    network) then ``send`` (the grid's limits, blob uploads). A ``.map()`` pickles every item first, holding each
    distinct value's pickle until ``send`` uploads it.
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self._memo: dict[int, tuple[Any, bytes | Ref]] = {}  # id of a value -> (the value, its pickle or its blob)

    def encode(self, args: tuple[Any, ...], kwargs: dict[str, Any], where: str = "") -> tuple[bytes, list[str]]:
        """(the args pickle, the SHA-256 of each blob it references, in order); nothing is uploaded for a call
        whose arguments cannot all be sent."""
        return self.send([self.pickle(args, kwargs, where)])[0]

    def pickle(self, args: tuple[Any, ...], kwargs: dict[str, Any], where: str = "") -> PickledCall:
        """Each argument pickled on its own, once per encoder however often it is given; nothing is sent."""
        named = [(f"argument {i}", value) for i, value in enumerate(args)]
        named += [(f"argument {key!r}", value) for key, value in kwargs.items()]
        for name, value in named:
            known = self._memo.get(id(value))
            if isinstance(value, Ref) or (known is not None and known[0] is value):
                continue
            try:
                self._memo[id(value)] = (value, cloudpickle.dumps(value, protocol=PROTOCOL))
            except Exception as exc:
                raise InvalidArguments(f"cannot send {name}{where} to the grid: {exc}") from exc
        return PickledCall(named, len(args), list(kwargs), where)

    def send(self, calls: list[PickledCall]) -> list[tuple[bytes, list[str]]]:
        """Every argument of every call checked against the grid's limits, then the large ones uploaded (each
        once) and each call's args pickle written: (args pickle, its blobs) per call."""
        limits = self.client.limits()
        limit = limits["max_payload_bytes"]
        # A grid older than the data plane names no threshold: everything goes inline, as it expects.
        threshold = limits.get("blob_threshold_bytes") or float("inf")
        for call in calls:
            as_blobs: set[int | str] = set()  # what travels as a blob: a Ref's hash, a large value's id
            for name, value in call.named:
                stored = self._stored(value)
                if isinstance(stored, bytes) and len(stored) > limit:
                    raise InvalidArgument(f"{name}{call.where} pickles to {_size(len(stored))}, over the grid's "
                                          f"{_size(limit)} limit per argument; nothing was uploaded "
                                          "(nanogrid up --max-payload-bytes raises it)")
                if isinstance(stored, Ref) or len(stored) > threshold:
                    as_blobs.add(stored.sha256 if isinstance(stored, Ref) else id(value))
            if len(as_blobs) > MAX_BLOBS_PER_CALL:
                raise InvalidArgument(f"{len(as_blobs)} large arguments in one call{call.where}; at most "
                                      f"{MAX_BLOBS_PER_CALL}; nothing was uploaded")
        return [self._write(call, threshold) for call in calls]

    def _stored(self, value: Any) -> bytes | Ref:
        return value if isinstance(value, Ref) else self._memo[id(value)][1]

    def _write(self, call: PickledCall, threshold: float) -> tuple[bytes, list[str]]:
        blobs: list[str] = []
        encoded: list[_Inline | _Blob] = []
        for _, value in call.named:
            stored = self._stored(value)
            if isinstance(stored, bytes) and len(stored) > threshold:
                stored = self.client.upload_blob(stored)
                self._memo[id(value)] = (value, stored)  # its pickle is freed; later calls reference the blob
            if isinstance(stored, Ref):
                if stored.sha256 not in blobs:
                    blobs.append(stored.sha256)
                encoded.append(_Blob(blobs.index(stored.sha256)))
            else:
                encoded.append(_Inline(stored))
        positional = encoded[:call.positional]
        keyword = dict(zip(call.keywords, encoded[call.positional:], strict=True))
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
class _Inline:
    data: bytes


@dataclass
class _Blob:
    index: int


class _ArgsPickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=PROTOCOL)

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Inline):
            return ("i", obj.data)
        if isinstance(obj, _Blob):
            return ("b", obj.index)
        return None


class ArgsUnpickler(pickle.Unpickler):
    """Reads an args pickle given its blobs (the bootstrap has its own copy of this; here for tests and tools)."""

    def __init__(self, data: bytes, blobs: list[bytes]) -> None:
        super().__init__(io.BytesIO(data))
        self.blobs = blobs

    def persistent_load(self, pid: Any) -> Any:
        kind, value = pid
        return cloudpickle.loads(value if kind == "i" else self.blobs[value])


def sha256_of(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _size(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"
