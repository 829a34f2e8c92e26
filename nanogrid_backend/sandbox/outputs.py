"""Output files received from a sandbox, written on the host by the host.

The sandbox sends ``file`` records (a relative name and a size) followed by ``data`` chunks. It
is not trusted to send either honestly, so every name is checked component by component, each
directory is entered with ``O_NOFOLLOW | O_DIRECTORY`` relative to its parent's descriptor
(``openat``), files are created with ``O_EXCL | O_NOFOLLOW`` (nothing is ever overwritten or
reached through a link), and sizes and counts are capped as the bytes arrive. On any breach
what was written is removed.

Where the sandbox has a disk of its own (``scratch.py``), the host reads the output directory from
that disk itself instead (``read_tree``): the same writer and checks, every directory and file opened
relative to its parent with ``O_NOFOLLOW``, only regular files taken (links, fifos and devices are
skipped, as the bootstrap skips them), and each file's size fixed when it is opened, so a process the
function left running cannot make the host read more than was counted.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
from pathlib import Path

from nanogrid_backend.sandbox.protocol import ProtocolViolation

MAX_NAME_BYTES = 1024
MAX_DEPTH = 16
_COMPONENT = re.compile(r"[^\x00-\x1f\x7f/\\]{1,255}")


class OutputQuotaExceeded(Exception):
    """The sandbox sent more output than the grid allows (a limit, not a forgery)."""


class HostWriteFailed(Exception):
    """The host could not write an output file (its disk is full, say): not the function's fault."""


def check_name(name: object) -> list[str]:
    """The components of a safe relative name, or ProtocolViolation."""
    if (
        not isinstance(name, str)
        or not name
        or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES
    ):
        raise ProtocolViolation("an output file without a valid name")
    parts = name.split("/")
    if len(parts) > MAX_DEPTH:
        raise ProtocolViolation("an output file nested too deep")
    for part in parts:
        if part in (".", "..") or not _COMPONENT.fullmatch(part):
            raise ProtocolViolation(
                f"an output file name that is not a plain relative path: {name[:80]!r}"
            )
    return parts


class OutputWriter:
    """Receives one call's output files into ``root`` (an empty directory only the host writes)."""

    def __init__(self, root: Path, max_bytes: int, max_files: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.total = 0
        self.names: list[str] = []
        self._fd: int | None = None
        self._left = 0  # bytes still due for the current file
        self._name = ""

    def begin(self, name: object, size: object) -> None:
        self._end_file()
        parts = check_name(name)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ProtocolViolation("an output file without a valid size")
        if len(self.names) >= self.max_files:
            raise OutputQuotaExceeded(f"more than {self.max_files} output files")
        if self.total + size > self.max_bytes:
            raise OutputQuotaExceeded(f"output files over the {self.max_bytes >> 20} MiB limit")
        self._name, self._left = "/".join(parts), size
        self._fd = self._create(parts)
        self.names.append(self._name)

    def write(self, data: bytes) -> None:
        if self._fd is None or len(data) > self._left:
            raise ProtocolViolation("output data beyond the size its file record announced")
        self._left -= len(data)
        self.total += len(data)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            raise HostWriteFailed(_describe(exc)) from None

    def copy_from(self, source_fd: int) -> None:
        """The current file's bytes from an open file (kernel to kernel, never through Python's memory)."""
        if self._fd is None:
            raise ProtocolViolation("output data without a file")
        offset = 0
        while self._left:
            try:  # sendfile: copy_file_range refuses to cross from the sandbox's filesystem to the host's
                copied = os.sendfile(self._fd, source_fd, offset, min(self._left, 1 << 30))
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
                    raise HostWriteFailed(_describe(exc)) from None
                raise ProtocolViolation(
                    f"an output file that could not be read: {self._name[:80]!r}"
                ) from None
            if not copied:
                break  # shorter than when it was opened: _end_file says so
            offset += copied
            self._left -= copied
            self.total += copied

    def finish(self) -> list[str]:
        self._end_file()
        return self.names

    def abort(self) -> None:
        """Remove whatever was received (the call's outputs are all kept or none are)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(mode=0o700, exist_ok=True)
        self.names, self.total = [], 0

    def _end_file(self) -> None:
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        if self._left:
            raise ProtocolViolation(
                f"an output file shorter than announced ({self._left} bytes missing)"
            )

    def _create(self, parts: list[str]) -> int:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        dir_fd = os.open(self.root, flags)
        try:
            for part in parts[:-1]:
                try:
                    os.mkdir(part, 0o700, dir_fd=dir_fd)
                except FileExistsError:
                    pass
                except OSError as exc:
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
                        raise HostWriteFailed(_describe(exc)) from None
                    raise ProtocolViolation(
                        f"an output directory that cannot be made: {part[:80]!r}"
                    ) from None
                try:
                    child = os.open(part, flags, dir_fd=dir_fd)
                except OSError as exc:
                    raise ProtocolViolation(
                        f"an output path through something that is not a directory: "
                        f"{'/'.join(parts)[:80]!r}"
                    ) from exc
                os.close(dir_fd)
                dir_fd = child
            try:
                return os.open(
                    parts[-1],
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                    dir_fd=dir_fd,
                )
            except FileExistsError:
                raise ProtocolViolation(
                    f"the output file {'/'.join(parts)[:80]!r} sent twice"
                ) from None
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
                    raise HostWriteFailed(_describe(exc)) from None
                raise ProtocolViolation(
                    f"an output file that cannot be created: {'/'.join(parts)[:80]!r}"
                ) from None
        finally:
            os.close(dir_fd)


def _describe(exc: OSError) -> str:
    """An OSError without the host path it may carry."""
    return os.strerror(exc.errno) if exc.errno else type(exc).__name__


def read_tree(parent: Path, names: tuple[str, ...], writer: OutputWriter) -> list[str]:
    """Take the output files under ``parent``/``names`` (a directory on the sandbox's own disk) into ``writer``.

    ``parent`` is the host's own directory; each of ``names`` and everything below is opened without
    following links, so nothing outside the sandbox's disk is ever read. No output directory: no files.
    """
    dir_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(parent, dir_flags)
    try:
        for name in names:
            try:
                child = os.open(name, dir_flags, dir_fd=fd)
            except FileNotFoundError:
                return writer.finish()
            except OSError:
                raise ProtocolViolation(
                    "the output directory was replaced by something that is not a directory"
                ) from None
            os.close(fd)
            fd = child
        _read_dir(fd, [], writer)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        os.close(fd)


def _read_dir(dir_fd: int, prefix: list[str], writer: OutputWriter) -> None:
    if len(prefix) >= MAX_DEPTH:
        raise ProtocolViolation("an output file nested too deep")
    with os.scandir(dir_fd) as entries:
        names = []
        for entry in entries:
            names.append(entry.name)
            if len(names) > writer.max_files + 1:
                raise OutputQuotaExceeded(f"more than {writer.max_files} output files")
    for name in sorted(names):
        try:
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue  # removed meanwhile
        if stat.S_ISDIR(info.st_mode):
            try:
                child = os.open(
                    name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd
                )
            except OSError:
                continue  # replaced by a link meanwhile: not followed
            try:
                _read_dir(child, [*prefix, name], writer)
            finally:
                os.close(child)
        elif stat.S_ISREG(info.st_mode):
            try:
                source = os.open(
                    name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
                )
            except OSError:
                continue  # replaced by a link meanwhile
            try:
                opened = os.fstat(source)
                if not stat.S_ISREG(opened.st_mode):
                    continue  # replaced by a fifo or a device meanwhile: never read
                writer.begin("/".join([*prefix, name]), opened.st_size)
                writer.copy_from(source)
            finally:
                os.close(source)
