"""``/v1/blobs/{sha256}``: upload (PUT, streamed), exists (HEAD) and download (GET, streamed) of owner-scoped blobs;
``/v1/blobs/{sha256}/upload``: where to upload one (on S3 a presigned URL straight to the store, so large values do
not pass through the controller); ``/v1/jobs/{job_id}/ref``: a finished job's result as a blob, to pass on to other
calls (``job.ref()``).

An upload is written to a temporary file while it is hashed; it becomes a blob only when its hash
is its name and it ended whole. A client that disconnects mid-upload, or sends more than the grid's
max_payload_bytes, leaves nothing (nanogrid_backend/store/blobs.py).

A presigned URL is for exactly the caller's own key of that hash, that size and (where the store checks it) those
bytes; real S3 refuses any other body at upload. Whatever reaches the store, a worker hashes every blob it fetches
and refuses one whose bytes are not its name, so a wrong direct upload never reaches a function.
"""

from __future__ import annotations

import errno
import hashlib
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from nanogrid_backend.controller.routes.deps import Caller
from nanogrid_backend.models import ApiKey
from nanogrid_backend.store.blobs import BlobError, Blobs, blobs_of, key_for


class BlobRef(BaseModel):
    """A blob by hash, and its size: what ``nanogrid.Ref`` holds."""

    sha256: str
    size: int


class UploadOffer(BaseModel):
    """Where to send a blob: nowhere (``stored``), a presigned URL, or (``url`` null) ``PUT /v1/blobs/{sha256}``."""

    stored: bool = False  # this owner has it already (whole: of the declared size); nothing to send
    url: str | None = None  # PUT the bytes here, with ``headers``, within ``expires_in`` seconds
    headers: dict[str, str] = {}
    expires_in: int | None = None


def _space(request: Request) -> Blobs:
    return blobs_of(request.app.state.grid)


def _checked(sha256: str, caller: ApiKey) -> str:
    try:
        key_for(caller.name, sha256)
    except BlobError as exc:
        raise HTTPException(400, exc.message) from None
    return sha256


router = APIRouter(prefix="/v1", tags=["blobs"])


@router.head("/blobs/{sha256}", responses={404: {"description": "this owner has no such blob"}})
def exists(sha256: str, request: Request, caller: Caller) -> Response:
    size = _space(request).size(caller.name, _checked(sha256, caller))
    if size is None:
        return Response(status_code=404)
    return Response(headers={"content-length": str(size)})


@router.post(
    "/blobs/{sha256}/upload",
    response_model=UploadOffer,
    responses={413: {"description": "over the grid's max_payload_bytes"}},
)
def upload_offer(
    sha256: str, request: Request, size: Annotated[int, Query(ge=0)], caller: Caller
) -> dict:
    """Where to upload this blob of ``size`` bytes: on S3 (unless ``direct_uploads`` is off) a short-lived
    presigned PUT of exactly the caller's key, that size and that SHA-256; else through this controller.

    The size is a query parameter (no body): blob routes skip the body cap, since PUT streams its own."""
    blobs, config = _space(request), request.app.state.config
    # the caller's own scope, whatever hash they name
    key = key_for(caller.name, _checked(sha256, caller))
    if size > config.max_payload_bytes:
        raise HTTPException(
            413,
            f"a blob of {size} bytes, over the grid's {config.max_payload_bytes}-byte "
            "limit per value",
        )
    if blobs.size(caller.name, sha256) == size:
        # content-addressed; another size would be a damaged copy, replaced by the upload
        return {"stored": True}
    # stores that take uploads directly (S3Store)
    presign = getattr(blobs.store, "blob_upload_url", None)
    if not config.direct_uploads or presign is None:
        return {"url": None}
    url, headers, expires_in = presign(key, size, sha256)
    return {"url": url, "headers": headers, "expires_in": expires_in}


@router.put(
    "/blobs/{sha256}",
    status_code=201,
    responses={
        200: {"description": "already stored"},
        400: {"description": "the body does not hash to its name"},
        413: {"description": "over the grid's max_payload_bytes"},
        507: {"description": "the grid's disk is full"},
    },
)
async def upload(sha256: str, request: Request, caller: Caller) -> Response:
    blobs, limit = _space(request), request.app.state.config.max_payload_bytes
    _checked(sha256, caller)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(
            413, f"a blob of {int(declared)} bytes, over the grid's {limit}-byte limit per value"
        )
    stored = blobs.size(caller.name, sha256)
    if stored is not None and (
        declared is None or not declared.isdigit() or stored == int(declared)
    ):
        # content-addressed: the same bytes are stored already (else: damaged)
        return Response(status_code=200)
    path, digest, size = blobs.temp_file(), hashlib.sha256(), 0
    try:
        with path.open("xb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HTTPException(413, f"a blob over the grid's {limit}-byte limit per value")
                digest.update(chunk)
                f.write(chunk)
        blobs.commit(caller.name, sha256, path, digest.hexdigest())
    except ClientDisconnect:
        return Response(status_code=400)  # nobody reads it; the partial file is gone (finally)
    except BlobError as exc:
        raise HTTPException(exc.status, exc.message) from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise HTTPException(
                507,
                "the grid's disk is full; the blob was not stored (the registry and other "
                "data are unaffected)",
            ) from None
        raise
    finally:
        path.unlink(missing_ok=True)
    return Response(status_code=201)


@router.get("/blobs/{sha256}", responses={200: {"content": {"application/octet-stream": {}}}})
def download(sha256: str, request: Request, caller: Caller) -> StreamingResponse:
    blobs = _space(request)
    size = blobs.size(caller.name, _checked(sha256, caller))
    try:
        chunks = blobs.open(caller.name, sha256)
    except BlobError as exc:
        raise HTTPException(exc.status, exc.message) from None
    return StreamingResponse(
        chunks,
        media_type="application/octet-stream",
        headers={"content-length": str(size)} if size is not None else None,
    )


@router.post(
    "/jobs/{job_id}/ref",
    response_model=BlobRef,
    responses={
        404: {"description": "no such job (for this key's owner)"},
        409: {"description": "the job has not finished, or failed"},
        410: {"description": "its result was deleted after the retention"},
        422: {"description": "the function returns JSON (result='json')"},
    },
)
def result_ref(job_id: str, request: Request, caller: Caller) -> dict:
    """The job's result kept as a blob (made now from a small result stored with the job): pass its hash as a
    blob of the next call instead of downloading and uploading the value."""
    job = request.app.state.grid.registry.get_job(job_id)
    if job is None or job.owner != caller.name:  # another owner's job does not exist for you
        raise HTTPException(404, f"no job {job_id!r}")
    try:
        sha256, size = _space(request).result_ref(job)
    except BlobError as exc:
        raise HTTPException(exc.status, exc.message) from None
    return {"sha256": sha256, "size": size}
