"""/v1/volumes: an owner's volumes (nanogrid_backend/volumes.py) and the files on them.

Every route is scoped to the caller's owner: a name another owner uses is, for this caller, a volume that does not
exist (404). Files go up as the caller's own blobs (``PUT /v1/blobs/{sha256}``, streamed and hashed, or straight to
S3) and are copied onto the volume by ``POST /v1/volumes/{name}/files``; they come down streamed from a descriptor
opened without following links.
"""

import asyncio
from typing import Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from nanogrid_backend.controller.routes.deps import Caller, CurrentGrid
from nanogrid_backend.store.blobs import BlobError, blobs_of
from nanogrid_backend.volumes import VolumeError, chunks


class VolumeSize(BaseModel):
    size_mib: int | None = Field(
        None,
        description="its size when it is made (default 1024); an existing volume "
        "keeps its own, and naming another is refused (409)",
    )


class VolumeView(BaseModel):
    name: str
    size_mib: int
    used_bytes: int = Field(description="what its files take on the grid's disk")
    created_at: float


class PutFile(BaseModel):
    path: str = Field(description="where on the volume, e.g. raw/train.csv")
    sha256: str = Field(description="one of the caller's blobs: the file's bytes")


class Entry(BaseModel):
    name: str
    kind: str = Field(description="file, dir, link or other")
    size: int
    modified: float


def _refused(exc: VolumeError | BlobError) -> HTTPException:
    return HTTPException(exc.status, str(exc) if isinstance(exc, VolumeError) else exc.message)


router = APIRouter(prefix="/v1/volumes", tags=["volumes"])


@router.put("/{name}", response_model=VolumeView)
def make(name: str, body: VolumeSize, key: Caller, grid: CurrentGrid) -> dict[str, Any]:
    try:
        return grid.volumes.create(key.name, name, body.size_mib)
    except VolumeError as exc:
        raise _refused(exc) from None


@router.get("", response_model=list[VolumeView])
def list_volumes(key: Caller, grid: CurrentGrid) -> list[dict[str, Any]]:
    return grid.volumes.list_volumes(key.name)


@router.get("/{name}", response_model=VolumeView)
def show(name: str, key: Caller, grid: CurrentGrid) -> dict[str, Any]:
    try:
        return grid.volumes.get(key.name, name)
    except VolumeError as exc:
        raise _refused(exc) from None


@router.delete("/{name}", response_model=VolumeView)
def delete(name: str, key: Caller, grid: CurrentGrid) -> dict[str, Any]:
    try:
        return grid.volumes.delete(key.name, name)
    except VolumeError as exc:
        raise _refused(exc) from None


@router.post("/{name}/files")
async def put_file(name: str, body: PutFile, key: Caller, grid: CurrentGrid) -> dict[str, Any]:
    def copy() -> int:
        grid.volumes.get(key.name, name)  # 404 before any blob is read
        with blobs_of(grid).local_files(key.name, [body.sha256]) as (path,):
            return grid.volumes.put(key.name, name, body.path, path)

    try:
        size = await asyncio.to_thread(copy)
    except (VolumeError, BlobError) as exc:
        raise _refused(exc) from None
    return {"path": body.path, "size": size}


@router.get("/{name}/files", responses={200: {"content": {"application/octet-stream": {}}}})
def get_file(
    name: str, key: Caller, grid: CurrentGrid, path: str = Query(...)
) -> StreamingResponse:
    try:
        fd, size = grid.volumes.open_file(key.name, name, path)
    except VolumeError as exc:
        raise _refused(exc) from None
    return StreamingResponse(
        chunks(fd, size),
        media_type="application/octet-stream",
        headers={"content-length": str(size)},
    )


@router.get("/{name}/list", response_model=list[Entry])
def listdir(name: str, key: Caller, grid: CurrentGrid, path: str = "") -> list[dict[str, Any]]:
    try:
        return grid.volumes.listdir(key.name, name, path)
    except VolumeError as exc:
        raise _refused(exc) from None


@router.delete("/{name}/files")
def remove(name: str, key: Caller, grid: CurrentGrid, path: str = Query(...)) -> dict[str, Any]:
    try:
        grid.volumes.remove(key.name, name, path)
    except VolumeError as exc:
        raise _refused(exc) from None
    return {"path": path, "removed": True}
