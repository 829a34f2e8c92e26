"""``nanogrid.Volume``: a named filesystem of yours on the grid that outlives calls.

    vol = nanogrid.Volume("datasets", size_mib=4096)    # made on first use; the same name is the same volume
    vol.put("train.csv", "raw/train.csv")              # from this machine to the volume
    @nanogrid.remote(volumes={"/data": vol})           # or {"/data": nanogrid.Volume("datasets", read_only=True)}
    def count(): return len(open("/data/raw/train.csv").read())
    vol.get("raw/train.csv", "copy.csv"); vol.listdir("raw"); vol.remove("raw/train.csv")

Every sandbox of yours that mounts it sees the same filesystem at once: no commit, no reload. The grid keeps volumes
per owner: another key's "datasets" is another volume, and nobody else can name, mount or read yours. The checks
here are the grid's own (it applies them again); they run before anything is sent.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanogrid_contract.errors import InvalidArgument
from nanogrid_contract.volumes import check_mount_path, check_volume_name, check_volume_path

if TYPE_CHECKING:
    from nanogrid.client import Client

DOWNLOAD_PIECE = 4 << 20


class Volume:
    """A volume of yours, by name, made on first use with ``size_mib`` (default 1024) when it does not exist yet;
    an existing one keeps its size (naming another size is refused). Writes to a full volume raise ``OSError``
    ENOSPC in the sandbox; a call that filled it fails with ``nanogrid.OutOfDisk`` naming it.
    ``read_only=True``: sandboxes that mount this object see it read-only."""

    def __init__(
        self,
        name: str,
        size_mib: int | None = None,
        *,
        read_only: bool = False,
        client: Client | None = None,
    ) -> None:
        try:
            self.name = check_volume_name(name)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if size_mib is not None and (
            isinstance(size_mib, bool) or not isinstance(size_mib, int) or size_mib <= 0
        ):
            raise InvalidArgument(
                f"size_mib is a whole number of MiB, e.g. size_mib=4096, not {size_mib!r}"
            )
        self.size_mib = size_mib
        self.read_only = read_only
        self._client = client
        self._made = False

    def __repr__(self) -> str:
        return f"<nanogrid.Volume {self.name!r}{' read-only' if self.read_only else ''}>"

    def __getstate__(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "_client": None,
            "_made": False,
        }  # a connection never travels with a function

    @property
    def client(self) -> Client:
        from nanogrid.client import get_client

        return self._client or get_client()

    def ensure(self) -> dict[str, Any]:
        """Make the volume on the grid unless it exists; its description (name, size_mib, used_bytes)."""
        info = self.client.request(
            "PUT", f"/volumes/{self.name}", json={"size_mib": self.size_mib}
        ).json()
        self._made = True
        return info

    def info(self) -> dict[str, Any]:
        return self.client.request("GET", f"/volumes/{self.name}").json()

    def put(self, local_path: str | os.PathLike[str], remote_path: str) -> int:
        """Copy a file from this machine to ``remote_path`` on the volume (replacing what was there); its size.

        The bytes go up as one of your blobs (content-addressed: the same file is sent once), then the grid copies
        them onto the volume."""
        remote_path = _path(remote_path)
        if not self._made:
            self.ensure()
        with open(local_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size:
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                    ref = self.client.upload_blob(data)  # type: ignore[arg-type]  # any buffer: hashed and sliced
            else:
                ref = self.client.upload_blob(b"")
        reply = self.client.request(
            "POST", f"/volumes/{self.name}/files", json={"path": remote_path, "sha256": ref.sha256}
        ).json()
        return int(reply["size"])

    def get(self, remote_path: str, local_path: str | os.PathLike[str]) -> int:
        """Copy ``remote_path`` on the volume to a file on this machine; its size."""
        client = self.client
        target = Path(local_path)
        partial = target.with_name(target.name + ".partial")
        size = 0
        with client._http.stream(
            "GET", f"/volumes/{self.name}/files", params={"path": _path(remote_path)}, timeout=None
        ) as response:
            if response.status_code >= 400:
                response.read()
                from nanogrid.client import _api_error

                raise _api_error(response)
            with partial.open("wb") as f:
                for piece in response.iter_raw(DOWNLOAD_PIECE):
                    f.write(piece)
                    size += len(piece)
        partial.replace(target)
        return size

    def read(self, remote_path: str) -> bytes:
        """A (small) file on the volume, as bytes."""
        return self.client.request(
            "GET", f"/volumes/{self.name}/files", params={"path": _path(remote_path)}
        ).content

    def listdir(self, remote_path: str = "/") -> list[dict[str, Any]]:
        """Entries of a directory on the volume: ``{"name", "kind" (file|dir|link|other), "size", "modified"}``."""
        if remote_path.strip("/"):
            remote_path = _path(remote_path)
        return self.client.request(
            "GET", f"/volumes/{self.name}/list", params={"path": remote_path}
        ).json()

    def remove(self, remote_path: str) -> None:
        """Remove a file or a directory (with what is in it) from the volume."""
        self.client.request(
            "DELETE", f"/volumes/{self.name}/files", params={"path": _path(remote_path)}
        )

    def delete(self) -> dict[str, Any]:
        """Remove the volume and everything on it (refused while a sandbox has it mounted)."""
        self._made = False
        return self.client.request("DELETE", f"/volumes/{self.name}").json()


def volumes(client: Client | None = None) -> list[dict[str, Any]]:
    """Your volumes: name, size_mib, used_bytes, created_at."""
    from nanogrid.client import get_client

    return (client or get_client()).request("GET", "/volumes").json()


def manifest_volumes(volumes: dict[str, Volume] | None) -> list[dict[str, Any]]:
    """``@remote(volumes={"/data": vol})`` as the manifest says it (sorted by path, so the package hash is stable);
    InvalidArgument for a path or value that cannot be mounted."""
    if not volumes:
        return []
    if not isinstance(volumes, dict):
        raise InvalidArgument(
            "volumes is a dict of mount path -> nanogrid.Volume, e.g. {'/data': Volume('data')}"
        )
    entries: list[dict[str, Any]] = []
    for path, volume in sorted(volumes.items()):
        if not isinstance(volume, Volume):
            raise InvalidArgument(
                f"volumes[{path!r}] is a nanogrid.Volume, not {type(volume).__name__}"
            )
        try:
            check_mount_path(path)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        entries.append({"name": volume.name, "path": path, "read_only": volume.read_only})
    paths = [str(e["path"]) for e in entries]
    for a in paths:
        for b in paths:
            if a != b and b.startswith(a + "/"):
                raise InvalidArgument(
                    f"volumes mounted at {a!r} and inside it at {b!r}: mount them side by side"
                )
    return entries


def _path(path: str) -> str:
    try:
        return "/".join(check_volume_path(path))
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
