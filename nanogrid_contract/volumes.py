"""Volume names, paths on a volume and mount points: checked alike by the client and the grid."""

from __future__ import annotations

import re

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_COMPONENT = re.compile(r"[^\x00-\x1f\x7f/\\]{1,255}")
# Where the sandbox itself lives: a volume never hides its runtime, its disk or the system's directories.
RESERVED_MOUNTS = (
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/opt",
    "/output",
    "/proc",
    "/root",
    "/run",
    "/sandbox",
    "/sbin",
    "/sys",
    "/tmp",
    "/usr",
    "/var",
    "/nanogrid",
    "/home",
)


def check_volume_name(name: object) -> str:
    """A volume name: letters, digits, ``_ . -``, up to 63 characters, starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"a volume name is 1-63 letters, digits, '_', '.' or '-' (starting with a letter or digit), "
            f"not {name!r}"
        )
    return name


def check_volume_path(path: object) -> list[str]:
    """The components of a path inside a volume (relative; a leading '/' is the volume's root): no '..', no '.'."""
    if (
        not isinstance(path, str)
        or not path.strip("/")
        or len(path.encode("utf-8", "surrogatepass")) > 4096
    ):
        raise ValueError(f"a path on a volume names a file, e.g. 'raw/train.csv', not {path!r}")
    parts = path.strip("/").split("/")
    if len(parts) > 32 or any(p in (".", "..") or not _COMPONENT.fullmatch(p) for p in parts):
        raise ValueError(
            f"a path on a volume is plain names joined by '/' (no '.', '..' or empty parts): {path!r}"
        )
    return parts


def check_mount_path(path: object) -> str:
    """Where a sandbox sees a volume: an absolute path outside the sandbox's own directories, e.g. ``/data``."""
    if (
        not isinstance(path, str)
        or not path.startswith("/")
        or path != "/" + "/".join(check_volume_path(path))
    ):
        raise ValueError(f"a volume is mounted at an absolute path such as '/data', not {path!r}")
    top = "/" + path.split("/")[1]
    if top in RESERVED_MOUNTS:
        raise ValueError(
            f"a volume cannot be mounted at {path!r}: {top} is the sandbox's own "
            f"(pick another, such as /data or /mnt/name)"
        )
    return path
