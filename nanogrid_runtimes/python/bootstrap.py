"""NanoGrid's Python bootstrap: the whole in-sandbox runtime.

Started once per sandbox as an unspecialised "stem cell". The agent talks to it in frames over
stdin (requests) and the original stdout (responses); before any user code runs, fds 1 and 2 are
pointed at capture files, so a ``print`` (or a child process writing to fd 1) can never corrupt
the result channel. One ``load`` frame specialises the sandbox to one function package; after
that it only serves ``call`` frames for that function (and ``calls``: a batch of short ones).

Frame: 8-byte header ``>II`` (JSON header length, body length), the JSON header, the raw body.
Only the standard library and cloudpickle are needed, so the same file runs in a plain process
and inside a Docker runtime image.

The function runs in this interpreter, so it could write frames of its own: the host therefore
trusts nothing it reads here (nanogrid_backend/sandbox/protocol.py checks every frame, and output files
travel as records the host writes itself). During a call the function may ask the host for one
thing over the same channel: an AI node request, sent by the forwarder that serves ``AI_ENDPOINT``
on the sandbox's own loopback (``AIForwarder``; also ``__nanogrid_channel__``).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import select
import shutil
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import zipfile
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Collection, Mapping
    from types import CodeType, ModuleType

# a frame's JSON header as the host sent it: every field is checked where it is used
Header = dict[str, Any]

CAPTURE_LIMIT = int(os.environ.get("NANOGRID_CAPTURE_LIMIT", 1 << 20))
CHUNK_BYTES = 1 << 20  # output file data travels in frames of at most this size
WORK_DIR = os.environ.get("NANOGRID_WORK_DIR") or os.getcwd()
OUTPUT_DIR = os.environ.get("NANOGRID_OUTPUT_DIR") or os.path.join(WORK_DIR, "output")
CODE_DIR = os.path.join(WORK_DIR, "code")
BOOTSTRAP_PID = os.getpid()


def read_exact(fd: int, n: int) -> bytes:
    chunks: list[bytes] = []
    left = n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> tuple[Header, bytes]:
    header_len, body_len = struct.unpack(">II", read_exact(fd, 8))
    header = json.loads(read_exact(fd, header_len))
    return header, read_exact(fd, body_len) if body_len else b""


WRITE_LOCK = threading.Lock()  # frames come from the main thread and the live-output thread


# a frame with a body up to this size goes out in one write (Docker relays each write)
ONE_WRITE_BYTES = 64 << 10


def write_frame(fd: int, header: Mapping[str, object], body: bytes | memoryview = b"") -> None:
    data = json.dumps(header).encode()
    head = struct.pack(">II", len(data), len(body)) + data
    with WRITE_LOCK:  # a large body is written after its header, never copied
        for buf in (head + body,) if len(body) <= ONE_WRITE_BYTES else (head, body):
            write_all(fd, buf)


def write_all(fd: int, data: bytes | memoryview) -> None:
    buf = memoryview(data)
    while buf:
        buf = buf[os.write(fd, buf) :]


# a larger result follows its reply in pieces (``result_size``, ``result_data`` frames)
STREAM_RESULT_OVER = 1 << 20
BLOB_CHUNK_BYTES = 4 << 20


# set where the host reads large results from the sandbox's disk
RESULT_FILE = os.environ.get("NANOGRID_RESULT_FILE") or ""


class Reply(TypedDict, total=False):
    """A call's reply header (``ok`` always; the host checks every field it reads)."""

    ok: bool
    error: dict[str, str]  # kind, type, module, message, traceback
    result_format: str  # "pickle" or "json"
    duration_ms: float
    stdout: str
    stderr: str
    peak_rss_bytes: int | None
    output_files: int
    result_size: int  # a large result: it follows the reply in pieces, or in ``result_file``
    result_file: bool


def write_reply(fd: int, reply: Reply, result: bytes) -> None:
    """The call's reply; a large result after it in pieces, so the host can spool it to disk as it arrives, or,
    where the host reads the sandbox's own disk (``NANOGRID_RESULT_FILE``), in that file."""
    if len(result) <= STREAM_RESULT_OVER:
        write_frame(fd, reply, result)
        return
    reply["result_size"] = len(result)
    if RESULT_FILE and result_to_file(result):
        reply["result_file"] = True
        write_frame(fd, reply)
        return
    write_frame(fd, reply)
    view = memoryview(result)
    for start in range(0, len(view), BLOB_CHUNK_BYTES):
        write_frame(fd, {"op": "result_data"}, view[start : start + BLOB_CHUNK_BYTES])


def result_to_file(result: bytes) -> bool:
    """Write a large result into the working directory for the host to read; False (nothing left) if the disk is
    too small for it: it then travels over the channel."""
    path = os.path.join(WORK_DIR, RESULT_FILE)
    try:
        with open(path, "wb") as f:
            f.write(result)
        return True
    except OSError:
        try:
            os.unlink(path)
        except OSError:
            pass
        return False


BLOB_FILE_PREFIX = ".nanogrid-blob-"


def read_blob_file(name: object, size: int) -> bytes:
    """A blob the host left in the working directory: read whole, then removed (its bytes live on in memory)."""
    if not isinstance(name, str) or "/" in name or not name.startswith(BLOB_FILE_PREFIX):
        raise ValueError("the host named a blob file outside the working directory")
    path = os.path.join(WORK_DIR, name)
    try:
        with open(path, "rb") as f:
            data = f.read(size + 1)
    finally:
        os.unlink(path)
    if len(data) != size:
        raise ValueError("the host's blob file does not match its announced size")
    return data


def read_blobs(fd: int, sizes: list[int]) -> list[bytes | bytearray]:
    """The blobs the call's args pickle references: each filled in place from the ``blob`` frames that follow, or
    read whole from a file the host wrote into the working directory (a ``blob_file`` frame; the Docker sandbox's
    own disk, faster than the engine's stream)."""
    blobs: list[bytes | bytearray] = []
    for size in sizes:
        blob: bytes | bytearray = bytearray(0)
        view, filled = memoryview(b""), 0
        while filled < size:
            header_len, body_len = struct.unpack(">II", read_exact(fd, 8))
            header = json.loads(read_exact(fd, header_len))
            if header.get("op") == "blob_file" and not filled and not body_len:
                blob = read_blob_file(header.get("name"), size)
                break
            if header.get("op") != "blob" or filled + body_len > size:
                raise ValueError("the host sent a blob that does not match its announced size")
            if not filled:
                blob = bytearray(size)
                view = memoryview(blob)
            target = view[filled : filled + body_len]
            while target:
                got = os.readv(fd, [target])
                if not got:
                    raise EOFError
                target = target[got:]
            filled += body_len
        blobs.append(blob)
    return blobs


class BlobCache:
    """The blobs this sandbox received, kept for later calls of its function (one function version, one owner).

    Keyed by SHA-256, least recently used dropped first, at most ``limit`` bytes (the host's share of the
    function's memory, sent with each call) and ``MAX_KEPT`` blobs. The call header names its blobs
    (``blob_ids``, ``blobs`` sizes); this answers with a ``need`` frame listing the ones it lacks, and the host
    sends only those. Kept blobs are only ever read by the unpickler, so each call gets objects of its own:
    nothing an earlier call did to its arguments shows in a later one.
    """

    MAX_KEPT = 256  # the host remembers more of what it sent (1024), so an honest answer is never taken for a lie

    def __init__(self) -> None:
        self.kept: dict[str, bytes] = {}  # sha256 -> the blob, least recently used first
        self.total = 0

    def needed(self, ids: list[str], sizes: list[int]) -> list[int]:
        """Which of the call's blobs (their indices) the host must send."""
        return [
            n
            for n, sha in enumerate(ids)
            if sha not in self.kept or len(self.kept[sha]) != sizes[n]
        ]

    def receive(
        self, fd: int, reply_fd: int, ids: list[str], sizes: list[int], limit: int
    ) -> list[bytes | bytearray | None]:
        need = self.needed(ids, sizes)
        # Room first, before the new blobs arrive: the least recently used go, never one this call uses.
        self.shrink(limit - sum(sizes[n] for n in need), keep=set(ids))
        write_frame(reply_fd, {"op": "need", "blobs": need})
        arrived = dict(zip(need, read_blobs(fd, [sizes[n] for n in need])))  # noqa: B905 (Python 3.8+)
        blobs: list[bytes | bytearray | None] = []
        for n, sha in enumerate(ids):
            kept = self.kept.pop(sha, None)
            self.total -= len(kept) if kept is not None else 0
            blob = arrived.pop(n, kept)  # None: claimed but not kept; ArgsUnpickler says so
            if blob is not None and len(blob) <= limit:
                # Kept as bytes: immutable, and unpickled without a copy of the whole blob first (io.BytesIO
                # copies a bytearray, not bytes): each later call costs one copy, its own objects.
                blob = self.kept[sha] = (
                    blob if isinstance(blob, bytes) else bytes(blob)
                )  # the most recently used now
                self.total += len(blob)
            blobs.append(blob)
        self.shrink(limit)
        return blobs

    def shrink(self, limit: int, keep: Collection[str] = ()) -> None:
        for sha in [sha for sha in self.kept if sha not in keep]:
            if self.total <= limit and len(self.kept) <= self.MAX_KEPT:
                return
            self.total -= len(self.kept.pop(sha))


BLOB_CACHE = BlobCache()


class ArgsUnpickler(pickle.Unpickler):
    """An args pickle's persistent ids: ("i", bytes) an argument's own pickle, ("b", n) the call's n-th blob; with a
    third item {sha256: n} when the argument holds Refs, which its own pickle names ("r", sha256)."""

    def __init__(
        self,
        data: bytes | bytearray,
        blobs: list[bytes | bytearray | None],
        loaded: dict[int, Any] | None = None,
        refs: dict[str, int] | None = None,
    ) -> None:
        super().__init__(io.BytesIO(data))
        self.blobs, self.loaded, self.refs = blobs, {} if loaded is None else loaded, refs or {}

    def persistent_load(self, pid: Any) -> Any:
        if pid[0] == "r":  # a Ref inside an argument: the call's blob of that hash
            return self.blob(self.refs[pid[1]], {})
        kind, value, refs = pid if len(pid) == 3 else (*pid, {})
        if kind == "i":
            return ArgsUnpickler(value, self.blobs, self.loaded, refs).load()
        return self.blob(value, refs)

    def blob(self, n: int, refs: dict[str, int]) -> Any:
        # one blob given twice in a call is one object, as it was in the caller's
        if n not in self.loaded:
            data, self.blobs[n] = (
                self.blobs[n],
                None,
            )  # its bytes are freed as soon as the value exists
            if data is None:
                raise LookupError(
                    f"blob {n} of this call is neither in the sandbox's blob cache nor was it sent"
                )
            self.loaded[n] = ArgsUnpickler(data, self.blobs, self.loaded, refs).load()
        return self.loaded[n]


class Capture:
    """One file behind fd 1 or 2, emptied before each call and read back (bounded) after."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        path = os.path.join(WORK_DIR, name)
        file_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(file_fd, fd)
        os.close(file_fd)

    def reset(self) -> None:
        if os.lseek(self.fd, 0, os.SEEK_CUR):
            os.ftruncate(self.fd, 0)
            os.lseek(self.fd, 0, os.SEEK_SET)

    def read(self) -> str:
        size = os.fstat(self.fd).st_size
        if not size:
            return ""
        data = os.pread(self.fd, min(size, CAPTURE_LIMIT), 0)
        text = data.decode("utf-8", errors="replace")
        if size > CAPTURE_LIMIT:
            text += f"\n[nanogrid: output truncated, {size - CAPTURE_LIMIT} more bytes not kept]\n"
        return text


def complete_utf8(data: bytes) -> int:
    """The length of ``data`` without a UTF-8 character cut off at its end."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # ASCII or the first byte of a character
            need = (
                1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            )
            return len(data) if need <= back else len(data) - back
    return len(data)


class LiveOutput:
    """Sends what a call prints while it runs (``log`` frames), so its caller can follow a long call.

    One thread for the sandbox's life, active only during a call: every 0.1 s it sends what the
    capture files gained, at most the capture limit per call. ``end()`` returns only once no more
    frames can follow, so the call's reply is the last frame of the call.
    """

    INTERVAL_S = 0.1

    def __init__(self, fd: int, captures: list[Capture]) -> None:
        self.fd, self.captures = fd, captures
        self.lock = threading.Lock()
        self.active = False
        self.wake = threading.Event()
        threading.Thread(target=self._run, name="nanogrid-live-output", daemon=True).start()

    def begin(self) -> None:
        with self.lock:
            self.offsets, self.sent, self.active = [0, 0], 0, True
        self.wake.set()

    def end(self) -> None:
        with self.lock:
            self.active = False

    def _run(self) -> None:
        while True:
            self.wake.wait()
            time.sleep(self.INTERVAL_S)
            with self.lock:
                if not self.active:
                    self.wake.clear()
                    continue
                try:
                    self._send_new()
                except OSError:
                    self.active = False

    def _send_new(self) -> None:
        for index, capture in enumerate(self.captures):
            size = os.fstat(capture.fd).st_size
            left = min(size - self.offsets[index], 64 << 10, CAPTURE_LIMIT - self.sent)
            if left > 0:
                data = os.pread(capture.fd, left, self.offsets[index])
                # a character cut in two waits for its other half
                data = data[: complete_utf8(data)]
                if not data:
                    continue
                self.offsets[index] += len(data)
                self.sent += len(data)
                write_frame(self.fd, {"op": "log", "stream": ("stdout", "stderr")[index]}, data)


class Context(dict[str, Any]):
    """The second argument of ``handler(event, context)``, shaped like AWS Lambda's; also the seed platform's
    dict (``context["request_id"]``, ``context.get("function_id")``)."""

    def __init__(
        self, job_id: object, function_name: object, memory_mib: object, deadline: float
    ) -> None:
        super().__init__(
            request_id=job_id,
            job_id=job_id,
            function_id=os.environ.get("FUNCTION_ID"),
            function_name=function_name,
            memory_mb=memory_mib,
            output_dir=OUTPUT_DIR,
            llm_model=os.environ.get("LLM_MODEL"),
        )
        self.aws_request_id = self.job_id = job_id
        self.function_name = function_name
        self.memory_limit_in_mb = memory_mib
        self._deadline = deadline

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


# the seed platform's limit for PAYLOAD; above it the event is in PAYLOAD_FILE
PAYLOAD_FILE_OVER = 100 * 1024


def seed_environment(job_id: object, body: bytes) -> None:
    """The seed platform's per-call variables: JOB_ID, OUTPUT_DIR, and PAYLOAD or, over 100 KB, PAYLOAD_FILE."""
    os.environ.update({"JOB_ID": str(job_id or ""), "OUTPUT_DIR": OUTPUT_DIR})
    if len(body) > PAYLOAD_FILE_OVER:
        path = os.path.join(WORK_DIR, "payload.json")
        with open(path, "wb") as f:
            f.write(body)
        os.environ.pop("PAYLOAD", None)
        os.environ["PAYLOAD_FILE"] = path
    else:
        os.environ.pop("PAYLOAD_FILE", None)
        os.environ["PAYLOAD"] = body.decode() if body else "{}"


def peak_rss_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def peak_rss() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def clip(text: str, limit: int = CAPTURE_LIMIT // 2) -> str:
    """A message or traceback cut to what the host accepts (the whole exception still travels pickled)."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[nanogrid: {len(text) - limit} more characters not kept]"


# the sandbox's own scratch disk (the Docker sandbox)
DISK_MIB = os.environ.get("NANOGRID_DISK_MIB")


def out_of_disk(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what it was raised from) is the scratch disk filling up."""
    import errno

    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def full_volume() -> str:
    """'NAME' (mounted at PATH) of a volume the function mounts that has no room left, else ''."""
    import json

    for path, name in json.loads(os.environ.get("NANOGRID_VOLUMES") or "{}").items():
        try:
            room = os.statvfs(path)
        except OSError:
            continue
        if room.f_bavail * room.f_frsize < (1 << 20):
            return f"{name!r} (mounted at {path})"
    return ""


def describe_error(exc: BaseException, cloudpickle: ModuleType) -> tuple[dict[str, str], bytes]:
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if f.filename != __file__] or frames  # trim bootstrap frames
    text = "Traceback (most recent call last):\n" + "".join(traceback.format_list(user))
    text += "".join(traceback.format_exception_only(type(exc), exc))
    error = {
        "kind": "exception",
        "type": type(exc).__name__[:200],
        "module": type(exc).__module__[:200],
        "message": clip(str(exc)),
        "traceback": clip(text),
    }
    # an exception that says what the job's error is (a failed notebook cell)
    own = getattr(exc, "job_error", None)
    if isinstance(own, dict):
        error.update(
            {
                key: clip(str(own[key]))
                for key in ("type", "module", "message", "traceback")
                if key in own
            }
        )
    if isinstance(exc, MemoryError):
        error["kind"] = "memory"
    elif out_of_disk(exc) and full_volume():
        error["kind"] = "disk"
        error["message"] = clip(
            f"out of disk space: volume {full_volume()} is full; remove files from it or use a "
            f"larger volume ({exc})"
        )
    elif DISK_MIB and out_of_disk(exc):
        error["kind"] = "disk"
        error["message"] = clip(
            f"out of disk space: /tmp, the working and the output directory share this "
            f"function's {DISK_MIB} MiB disk; @remote(disk=MiB) raises it ({exc})"
        )
    try:
        body = cloudpickle.dumps(exc)
    except Exception:
        body = b""
    return error, body


def remember_source(manifest: dict[str, Any]) -> None:
    """Serve the packaged source to linecache under its original file name, for tracebacks."""
    import linecache

    name, first = manifest.get("source_file"), manifest.get("source_line")
    path = os.path.join(CODE_DIR, "source.py")
    if not name or not first or os.path.exists(name) or not os.path.exists(path):
        return
    with open(path) as f:
        lines = [""] * (first - 1) + f.read().splitlines(True)
    # mtime None: never re-checked against a file (linecache then never reads the size either)
    linecache.cache[name] = (None, None, lines, name)  # type: ignore[assignment]


def with_source_file(code: CodeType, name: str) -> CodeType:
    """``code`` and the code nested in it, named after the user's file again.

    Pickling may rename code objects (cloudpickle 3.1.3 calls them all ``<dynamic-code>``); the
    line numbers survive, so restoring the name lets tracebacks show the packaged source lines.
    """
    consts = tuple(
        with_source_file(c, name) if isinstance(c, type(code)) else c for c in code.co_consts
    )
    return code.replace(co_filename=name, co_consts=consts)


def restore_source_file(function: Any, manifest: dict[str, Any]) -> None:
    name = manifest.get("source_file")
    code = getattr(function, "__code__", None)
    if name and code is not None and code.co_firstlineno == manifest.get("source_line"):
        try:
            function.__code__ = with_source_file(code, name)
        except (AttributeError, TypeError, ValueError):
            pass  # a callable that is not a plain function keeps its names


def encode_json(value: object) -> bytes:
    try:
        return json.dumps(value).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the function returned a value JSON cannot encode: {exc}") from None


class OutputDir:
    """The output directory as each call sees it: emptied before the call, its files counted after.

    Where it is a mount point (``/output`` in a Docker sandbox and in a process sandbox under bubblewrap: no function
    can remove or replace it) it is read through a descriptor held open, so a call looks up no path: in a container
    whose root filesystem is fuse-overlayfs, every lookup from ``/`` is a round trip through the storage daemon,
    three of them per call before. Elsewhere (a process sandbox without bubblewrap, where a function may remove or
    replace it) by its path."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(path, exist_ok=True)
        self.ref: int | str = (
            os.open(path, os.O_RDONLY | os.O_DIRECTORY) if os.path.ismount(path) else path
        )

    def empty(self) -> bool:
        try:
            return not os.listdir(self.ref)  # with a descriptor: getdents on it, no lookup
        except OSError:  # removed, or a file took its place: the next call makes it again
            return False

    def clear(self) -> None:
        """Ready for a call: empty, and a directory."""
        if not self.empty():
            shutil.rmtree(self.path, ignore_errors=True)
            os.makedirs(self.path, exist_ok=True)

    def count_files(self) -> int:
        return 0 if self.empty() else sum(len(files) for _, _, files in os.walk(self.path))


class Runtime:
    def __init__(self, ai: AIForwarder | None = None) -> None:
        self.manifest: dict[str, Any] | None = None
        self.function: Any = None  # the loaded function (any callable), until then None
        self.ai = ai  # the AIForwarder behind AI_ENDPOINT, if the sandbox has a loopback
        self.output = OutputDir(OUTPUT_DIR)

    def load(self, header: Header, body: bytes) -> None:
        import cloudpickle

        # the function's settings
        os.environ.update({str(k): str(v) for k, v in (header.get("env") or {}).items()})
        os.makedirs(CODE_DIR, exist_ok=True)
        with zipfile.ZipFile(io.BytesIO(body)) as zf:
            zf.extractall(CODE_DIR)
        with open(os.path.join(CODE_DIR, "manifest.json")) as f:
            self.manifest = json.load(f)
        if self.manifest.get("model"):  # the function's own default model (a seed upload's modelId)
            os.environ["LLM_MODEL"] = str(self.manifest["model"])
        grant_ai(self.ai)  # before the module loads: it may read AI_ENDPOINT
        sys.path.insert(0, CODE_DIR)
        # the seed's ``sdk`` module sits beside this file
        sys.path.append(os.path.dirname(os.path.abspath(__file__)))
        remember_source(self.manifest)
        if self.manifest["kind"] == "pickle":
            with open(os.path.join(CODE_DIR, "function.pkl"), "rb") as f:
                self.function = cloudpickle.load(f)
            restore_source_file(self.function, self.manifest)
        else:
            module_name, _, attr = self.manifest["handler"].rpartition(".")
            module = __import__(module_name, fromlist=[attr])
            if (
                attr == "handler"
                and not hasattr(module, "handler")
                and callable(getattr(module, "main", None))
            ):
                attr = "main"  # the seed platform's runner: handler(event, context), else main(event, context)
            if not hasattr(module, attr):
                raise AttributeError(
                    f"{module_name}.py defines no {attr}(event, context)"
                    + (" (nor main(event, context))" if attr == "handler" else "")
                )
            self.function = getattr(module, attr)
        # Limits apply from here on: to the user's code, not to loading it.
        import resource

        if header.get("rlimit_data"):
            resource.setrlimit(resource.RLIMIT_DATA, (header["rlimit_data"],) * 2)
        if header.get("max_output_bytes"):
            resource.setrlimit(resource.RLIMIT_FSIZE, (header["max_output_bytes"],) * 2)

    def call(
        self,
        header: Header,
        body: bytes,
        captures: list[Capture],
        live: LiveOutput | None,
        blobs: list[bytes | bytearray | None],
    ) -> tuple[Reply, bytes]:
        import cloudpickle

        manifest = self.manifest
        assert manifest is not None  # calls are served only once a load succeeded

        for capture in captures:
            capture.reset()
        if live is not None:
            live.begin()
        self.output.clear()  # the agent moves outputs out after each call
        measure_rss = header.get("measure_rss", True)  # not needed where the agent reads a cgroup
        ai = sys.modules.get("nanogrid.ai")
        if ai is not None:
            ai.reset_usage()
        default_model = os.environ.get("LLM_MODEL")
        if header.get("model"):  # this call's choice of model for the AI node
            os.environ["LLM_MODEL"] = header["model"]
        if measure_rss:
            peak_rss_reset()
        reply: Reply = {"ok": True}
        result = b""
        started = time.perf_counter()
        try:
            if manifest["kind"] == "pickle":
                args, kwargs = ArgsUnpickler(body, list(blobs)).load()
                del blobs[:]
                value = self.function(*args, **kwargs)
                # data-only: the caller never unpickles anything
                if manifest.get("result") == "json":
                    result = encode_json(value)
                    reply["result_format"] = "json"
                else:
                    result = cloudpickle.dumps(value)
                    reply["result_format"] = "pickle"
            else:
                event = json.loads(body) if body else None
                seed_environment(header.get("job_id"), body)
                deadline = time.monotonic() + header.get("timeout", 300)
                context = Context(
                    header.get("job_id"), manifest.get("name"), manifest.get("memory"), deadline
                )
                result = encode_json(self.function(event, context))
                reply["result_format"] = "json"
        except BaseException as exc:  # SystemExit and KeyboardInterrupt are the function's too
            reply["ok"] = False
            reply["error"], result = describe_error(exc, cloudpickle)
            if manifest.get("result") == "json":
                result = b""  # the exception as text only (type, message, traceback)
        # a child the function forked: it must never answer the agent
        if os.getpid() != BOOTSTRAP_PID:
            os._exit(0)
        if live is not None:
            live.end()
        reply["duration_ms"] = (time.perf_counter() - started) * 1000
        sys.stdout.flush()
        sys.stderr.flush()
        reply["stdout"], reply["stderr"] = captures[0].read(), captures[1].read()
        if measure_rss:
            reply["peak_rss_bytes"] = peak_rss()
        reply["output_files"] = self.output.count_files()
        if default_model is None:
            os.environ.pop("LLM_MODEL", None)
        else:
            os.environ["LLM_MODEL"] = default_model
        return reply, result


def send_outputs(fd: int, limit: int | None) -> None:
    """Send each regular file of the output directory as a ``file`` record and its ``data`` chunks.

    Records, not an archive: the host checks every name and size itself and writes the files
    with its own hands, so nothing here is trusted to be well formed.
    """
    import stat

    try:
        files = []
        for root, dirs, names in os.walk(OUTPUT_DIR):
            dirs.sort()
            for name in sorted(names):
                path = os.path.join(root, name)
                info = os.lstat(path)
                if stat.S_ISREG(info.st_mode):  # links, fifos and devices are never sent
                    files.append((os.path.relpath(path, OUTPUT_DIR), path, info.st_size))
        total = sum(size for _, _, size in files)
        if limit and total > limit:
            raise OSError(f"output files total {total >> 20} MiB, over the {limit >> 20} MiB limit")
        for name, path, size in files:
            write_frame(fd, {"op": "file", "name": name, "size": size})
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    write_frame(fd, {"op": "data"}, chunk)
        write_frame(fd, {"op": "done", "ok": True})
    except OSError as exc:
        write_frame(
            fd, {"op": "done", "ok": False, "error": {"kind": "output", "message": str(exc)}}
        )
    shutil.rmtree(OUTPUT_DIR, ignore_errors=True)
    os.makedirs(OUTPUT_DIR, exist_ok=True)


def run_calls(
    fd: int, runtime: Runtime, header: Header, body: bytes, captures: list[Capture], request_fd: int
) -> None:
    """A batch of short calls from one frame (``calls``: job_id, timeout and payload size of each; the payloads one
    after the other in the body), each answered by its own reply as it ends. A call that wrote output files, returned
    a large result or ran out of memory ends the batch: the host takes its files (``outputs``) or result, and runs
    the rest later. A call the host cancels while it waits (a ``skip`` frame naming it, read before each call starts)
    is answered as cancelled and never started."""
    calls = header.get("calls") or []
    sizes = [call.get("size") for call in calls] if isinstance(calls, list) and calls else None
    if (
        sizes is None
        or not all(isinstance(n, int) and n >= 0 for n in sizes)
        or sum(sizes) != len(body)
    ):
        write_frame(
            fd,
            {
                "ok": False,
                "error": {"kind": "protocol", "message": "a calls frame that does not add up"},
            },
        )
        return
    offset, skipped = 0, set[object]()  # the job ids the host cancelled while they waited
    for call, size in zip(calls, sizes):  # noqa: B905 (Python 3.9: no strict=; one size per call, above)
        payload = body[offset : offset + size]
        offset += size
        read_skips(request_fd, skipped)
        if call.get("job_id") in skipped:
            write_frame(
                fd,
                {
                    "ok": False,
                    "error": {"kind": "cancelled", "message": "cancelled before it started"},
                },
            )
            continue
        one: Header = {
            "job_id": call.get("job_id"),
            "timeout": call.get("timeout"),
            "measure_rss": header.get("measure_rss"),
            "model": header.get("model"),
        }
        reply, result = runtime.call(one, payload, captures, None, [])
        # Out of this process before the next call starts: whatever that call does to the sandbox (os._exit, a
        # segfault, the OOM killer), this call's outcome has reached the host and is never lost or run again.
        write_reply(fd, reply, result)
        if (
            len(result) > STREAM_RESULT_OVER
            or reply["output_files"]
            or (not reply["ok"] and reply["error"].get("kind") == "memory")
        ):
            return  # the host takes this call's result or files before any other call could write its own


def read_skips(request_fd: int, skipped: set[object]) -> None:
    """The ``skip`` frames the host sent since the batch began (one poll, no wait): calls cancelled while they
    waited in the batch."""
    try:
        while select.select([request_fd], [], [], 0)[0]:
            header, _ = read_frame(request_fd)
            if header.get("op") == "skip":
                skipped.add(header.get("job_id"))
    except EOFError:
        return  # the host is gone: the next reply fails to reach it, and the sandbox ends


class Channel:
    """Requests from the function to the host during a call (the AI node is reached this way).

    Importable as the module ``__nanogrid_channel__``; the sandbox has no network of its own.
    """

    def __init__(self, request_fd: int, reply_fd: int) -> None:
        self.request_fd, self.reply_fd = request_fd, reply_fd
        self.lock = threading.Lock()

    def request(self, header: Mapping[str, object], body: bytes = b"") -> tuple[Header, bytes]:
        with self.lock:  # one request and its answer at a time, whatever threads the function runs
            write_frame(self.reply_fd, header, body)
            return read_frame(self.request_fd)


AI_CHANNEL = (
    "nanogrid:channel"  # AI_ENDPOINT as the worker gives it to a function that may use the AI node
)
AI_PORT = 11434  # Ollama's own port, on the sandbox's own loopback
# the worker's gateway takes no more (nanogrid_backend/worker/ai_gateway.py)
AI_MAX_REQUEST_BYTES = 4 << 20
AI_MAX_HEAD_BYTES = 64 << 10
# Devices every new network namespace gets (all down, no address): a namespace with only these is the sandbox's own.
NAMESPACE_DEVICES = {
    "lo",
    "tunl0",
    "sit0",
    "ip6tnl0",
    "gre0",
    "gretap0",
    "erspan0",
    "ip_vti0",
    "ip6_vti0",
    "ip6gre0",
}
AI_REFUSED = (
    "no AI node in this sandbox: this function may not use it. A NanoGrid function declares "
    "@nanogrid.remote(ai=True) (or %%nanogrid --ai), on a grid started with --ai-endpoint URL (AI_ENDPOINT); "
    "a seed upload may use it unless the grid's operator turned that off (seed_ai = false)"
)
AI_OUTSIDE_CALL = (
    "the AI node is reachable only while the function is being called, not while its module loads "
    "nor after its call returned"
)


class AIForwarder:
    """``AI_ENDPOINT`` inside the sandbox: an HTTP server on the sandbox's own loopback that hands each request to
    the worker over the channel (an ``ai`` frame), where the AI gateway decides (inference routes only, within the
    owner's budget) and counts the tokens. The sandbox has no network: this is how code written for a reachable
    Ollama (``requests.post(AI_ENDPOINT + "/api/generate")``, the seed's ``ai_client``, Ollama's own client) gets
    its answer, and nothing else becomes reachable through it.

    It listens on Ollama's own port where the sandbox has a network namespace of its own (Docker, bubblewrap).
    Where it shares the host's (a process sandbox without bubblewrap), on a free port under a random path, so that
    no other process on the host can spend the owner's tokens. Requests are forwarded only while a call runs (the
    host reads ``ai`` frames only then); a function without AI access gets a 403 saying why, never a silence.
    Answers come back whole (the gateway counts the tokens of the final object), streamed ones as NDJSON lines.
    """

    def __init__(self, channel_request: Callable[[Header, bytes], tuple[Header, bytes]]) -> None:
        import socket

        self.channel_request, self.allowed = (
            channel_request,
            False,
        )  # until the function's settings say otherwise
        self.gate = threading.Condition()
        self.calling, self.in_flight = False, 0
        own_network = {name for _, name in socket.if_nameindex()} <= NAMESPACE_DEVICES
        self.listener, self.prefix = socket.socket(), ""
        try:
            if not own_network:
                raise OSError("the host's network: no fixed port")
            self.listener.bind(("127.0.0.1", AI_PORT))
        except OSError:
            self.listener.close()
            self.listener, self.prefix = socket.socket(), "/" + os.urandom(16).hex()
            self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = "http://127.0.0.1:%d%s" % (self.listener.getsockname()[1], self.prefix)
        threading.Thread(target=self._accept, name="nanogrid-ai-forwarder", daemon=True).start()

    def begin_call(self) -> None:
        with self.gate:
            self.calling = True

    def end_call(self) -> None:
        """No more requests; returns once those under way have their answers (before the call's reply is sent)."""
        with self.gate:
            self.calling = False
            while self.in_flight:
                self.gate.wait()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(
                target=self._serve, args=(conn,), name="nanogrid-ai-connection", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        """One connection's requests (HTTP/1.1 keep-alive), answered in order."""
        pending = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in pending:
                    data = conn.recv(65536)
                    if not data or len(pending) > AI_MAX_HEAD_BYTES:
                        return
                    pending += data
                head, _, pending = pending.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, version = (lines[0].split(" ") + ["", "", ""])[:3]
                headers = dict(
                    (name.strip().lower(), value.strip())
                    for name, _, value in (line.partition(":") for line in lines[1:])
                )
                keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
                size = headers.get("content-length", "0")
                if "transfer-encoding" in headers or not size.isdigit():
                    self._respond(
                        conn, 411, {"error": "send the request with a Content-Length"}, False
                    )
                    return
                if headers.get("expect", "").lower() == "100-continue":
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                # read and dropped, so that the refusal reaches the function
                if int(size) > AI_MAX_REQUEST_BYTES:
                    left = int(size) - len(pending)
                    while left > 0:
                        data = conn.recv(min(left, 1 << 20))
                        if not data:
                            return
                        left -= len(data)
                    self._respond(
                        conn,
                        413,
                        {
                            "error": f"an AI request of {size} bytes (at most "
                            f"{AI_MAX_REQUEST_BYTES} bytes)"
                        },
                        False,
                    )
                    return
                while len(pending) < int(size):
                    data = conn.recv(65536)
                    if not data:
                        return
                    pending += data
                body, pending = pending[: int(size)], pending[int(size) :]
                status, answer = self._answer(method, target, body)
                self._respond(conn, status, answer, keep)
                if not keep:
                    return

    def _answer(self, method: str, target: str, body: bytes) -> tuple[int, dict[str, str] | bytes]:
        """The gateway's status and answer for one request; a refusal of the forwarder's own as a dict."""
        path = target.split("?", 1)[0]
        if path.startswith(("http://", "https://")):  # the absolute form a proxy gets
            path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
        if self.prefix:
            if not path.startswith(self.prefix + "/"):
                return 404, {
                    "error": "not found: AI_ENDPOINT names this sandbox's address of the AI node"
                }
            path = path[len(self.prefix) :]
        if not self.allowed:
            return 403, {"error": AI_REFUSED}
        body = self._with_model(method, body)
        with self.gate:
            if not self.calling:
                return 503, {"error": AI_OUTSIDE_CALL}
            self.in_flight += 1
        try:
            header, answer = self.channel_request(
                {"op": "ai", "method": method, "path": path}, body
            )
        except (OSError, EOFError, ValueError) as exc:
            return 502, {
                "error": f"the worker did not answer this AI request ({type(exc).__name__})"
            }
        finally:
            with self.gate:
                self.in_flight -= 1
                self.gate.notify_all()
        status = header.get("status")
        return (status if isinstance(status, int) and 100 <= status < 600 else 502), answer

    @staticmethod
    def _with_model(method: str, body: bytes) -> bytes:
        """A request that names no model gets this call's (LLM_MODEL: the run's modelId, else the function's or the
        grid's default), as the seed's ai_client chose it."""
        model = os.environ.get("LLM_MODEL")
        if method != "POST" or not model:
            return body
        try:
            request = json.loads(body)
        except ValueError:
            return body  # the gateway says what is wrong with it
        if not isinstance(request, dict) or request.get("model"):
            return body
        return json.dumps({**request, "model": model}).encode()

    @staticmethod
    def _respond(
        conn: socket.socket, status: int, answer: dict[str, str] | bytes, keep: bool
    ) -> None:
        if isinstance(answer, dict):
            answer = json.dumps(answer).encode()
        lines = answer.strip().count(b"\n")
        head = (
            f"HTTP/1.1 {status} {'OK' if status < 400 else 'Error'}\r\n"
            f"Content-Type: {'application/x-ndjson' if lines else 'application/json'}; charset=utf-8\r\n"
            f"Content-Length: {len(answer)}\r\nConnection: {'keep-alive' if keep else 'close'}\r\n\r\n"
        )
        try:
            conn.sendall(head.encode() + answer)
        except OSError:
            pass  # the function stopped waiting


def start_ai_forwarder(
    channel_request: Callable[[Header, bytes], tuple[Header, bytes]],
) -> AIForwarder | None:
    """The forwarder behind ``AI_ENDPOINT``, started with the stem cell (off the path of a cold start); None where
    the sandbox has no loopback to listen on (``nanogrid.ai`` then uses the channel directly)."""
    try:
        return AIForwarder(channel_request)
    except OSError:
        return None


def grant_ai(forwarder: AIForwarder | None) -> None:
    """``AI_ENDPOINT`` for the function being loaded: every sandbox has one (a function without AI access is told
    why there); the worker's ``nanogrid:channel`` says that this one may use the AI node."""
    allowed = os.environ.get("AI_ENDPOINT") == AI_CHANNEL
    if forwarder is None:
        if not allowed:
            os.environ.pop("AI_ENDPOINT", None)
        return
    forwarder.allowed = allowed
    os.environ["AI_ENDPOINT"] = forwarder.url


def channel_fds() -> tuple[int, int]:
    """Where frames come in and where replies go: the host's socket when it gave one (a Docker sandbox: the frames
    then skip the engine's attach stream), else stdin and stdout. Taken before any function runs; the host takes
    no other connection, and no function sees the variable."""
    path = os.environ.pop("NANOGRID_CHANNEL", "")
    if not path:
        return 0, os.dup(1)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    fd = sock.detach()
    return fd, os.dup(fd)


def main() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails with EFBIG instead
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))  # also as PID 1 in a container
    stdin_fd, reply_fd = channel_fds()
    os.makedirs(WORK_DIR, exist_ok=True)
    captures = [Capture(1, "stdout.log"), Capture(2, "stderr.log")]
    # Line-buffered, so what a call prints reaches the capture file (and its live followers) as it prints it.
    sys.stdout = io.TextIOWrapper(
        os.fdopen(1, "wb", closefd=False), write_through=True, line_buffering=True
    )
    sys.stderr = io.TextIOWrapper(
        os.fdopen(2, "wb", closefd=False), write_through=True, line_buffering=True
    )
    sys.stdin = open(os.devnull)
    # Imported now, in the stem cell, rather than by the first call's load: cloudpickle, the limits' module, and the
    # codec of the package's file names (each import looks up paths under /, which in a container on fuse-overlayfs
    # are requests to the storage daemon).
    import encodings.cp437  # noqa: F401
    import resource  # noqa: F401

    import cloudpickle  # noqa: F401

    request = Channel(stdin_fd, reply_fd).request
    channel = type(sys)("__nanogrid_channel__")
    channel.request = request  # type: ignore[attr-defined]  # a module of its own making: its names are set here
    sys.modules["__nanogrid_channel__"] = channel

    runtime = Runtime(start_ai_forwarder(request))
    live = LiveOutput(reply_fd, captures)
    write_frame(
        reply_fd,
        {"ok": True, "op": "ready", "python": "%d.%d" % sys.version_info[:2], "blob_cache": True},
    )
    while True:
        try:
            header, body = read_frame(stdin_fd)
        except EOFError:
            return
        op = header.get("op")
        if op == "load" and runtime.function is None:
            try:
                runtime.load(header, body)
                write_frame(reply_fd, {"ok": True})
            except Exception as exc:
                error, _ = describe_error(exc, cloudpickle)
                error["kind"] = "load"
                write_frame(reply_fd, {"ok": False, "error": error})
        elif op == "call" and runtime.function is not None:
            # the host asks which of the call's blobs this sandbox still keeps
            if "blob_ids" in header:
                blobs = BLOB_CACHE.receive(
                    stdin_fd,
                    reply_fd,
                    header["blob_ids"],
                    header.get("blobs") or [],
                    header.get("cache_bytes") or 0,
                )
            else:
                # typed as the cache's list (None: absent)
                blobs = list(read_blobs(stdin_fd, header.get("blobs") or []))
            if runtime.ai is not None:
                runtime.ai.begin_call()
            try:
                reply, result = runtime.call(
                    header, body, captures, live if header.get("live") else None, blobs
                )
            finally:
                if runtime.ai is not None:
                    runtime.ai.end_call()  # an AI answer under way arrives before the call's reply
            write_reply(reply_fd, reply, result)
            del reply, result
        elif op == "calls" and runtime.function is not None:
            run_calls(reply_fd, runtime, header, body, captures, stdin_fd)
        elif op == "skip":
            pass  # a cancel that came after its batch had ended: that call already has its reply
        elif op == "outputs":
            send_outputs(reply_fd, header.get("limit"))
        else:
            write_frame(
                reply_fd,
                {"ok": False, "error": {"kind": "protocol", "message": f"unexpected {op!r}"}},
            )


if __name__ == "__main__":
    main()
