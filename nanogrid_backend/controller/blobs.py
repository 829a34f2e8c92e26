"""``/v1/blobs/{sha256}``: upload (PUT, streamed), exists (HEAD) and download (GET, streamed) of owner-scoped blobs;
``/v1/jobs/{job_id}/ref``: a finished job's result as a blob, to pass on to other calls (``job.ref()``).

An upload is written to a temporary file while it is hashed; it becomes a blob only when its hash
is its name and it ended whole. A client that disconnects mid-upload, or sends more than the grid's
max_payload_bytes, leaves nothing (nanogrid_backend/blobs.py).
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from nanogrid_backend.blobs import BlobError, Blobs, blobs_of, key_for
from nanogrid_backend.models import ApiKey


class BlobRef(BaseModel):
    """A blob by hash, and its size: what ``nanogrid.Ref`` holds."""

    sha256: str
    size: int


def _space(request: Request) -> Blobs:
    return blobs_of(request.app.state.grid)


def _checked(sha256: str, caller: ApiKey) -> str:
    try:
        key_for(caller.name, sha256)
    except BlobError as exc:
        raise HTTPException(400, exc.message) from None
    return sha256


def routes(authorize: Callable[..., Any]) -> APIRouter:
    """The routes, authorised by the app's own caller dependency (API key and rate limit)."""
    router = APIRouter(prefix="/v1", tags=["blobs"])

    @router.head("/blobs/{sha256}", responses={404: {"description": "this owner has no such blob"}})
    def exists(sha256: str, request: Request, caller: ApiKey = Depends(authorize)) -> Response:
        size = _space(request).size(caller.name, _checked(sha256, caller))
        if size is None:
            return Response(status_code=404)
        return Response(headers={"content-length": str(size)})

    @router.put("/blobs/{sha256}", status_code=201, responses={200: {"description": "already stored"},
                                                        400: {"description": "the body does not hash to its name"},
                                                        413: {"description": "over the grid's max_payload_bytes"},
                                                        507: {"description": "the grid's disk is full"}})
    async def upload(sha256: str, request: Request, caller: ApiKey = Depends(authorize)) -> Response:
        blobs, limit = _space(request), request.app.state.config.max_payload_bytes
        _checked(sha256, caller)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"a blob of {int(declared)} bytes, over the grid's {limit}-byte limit per value")
        if blobs.size(caller.name, sha256) is not None:
            return Response(status_code=200)  # content-addressed: the same bytes are stored already
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
                raise HTTPException(507, "the grid's disk is full; the blob was not stored (the registry and other "
                                         "data are unaffected)") from None
            raise
        finally:
            path.unlink(missing_ok=True)
        return Response(status_code=201)

    @router.get("/blobs/{sha256}", responses={200: {"content": {"application/octet-stream": {}}}})
    def download(sha256: str, request: Request, caller: ApiKey = Depends(authorize)) -> StreamingResponse:
        blobs = _space(request)
        size = blobs.size(caller.name, _checked(sha256, caller))
        try:
            chunks = blobs.open(caller.name, sha256)
        except BlobError as exc:
            raise HTTPException(exc.status, exc.message) from None
        return StreamingResponse(chunks, media_type="application/octet-stream",
                                 headers={"content-length": str(size)} if size is not None else None)

    @router.post("/jobs/{job_id}/ref", response_model=BlobRef,
                 responses={404: {"description": "no such job (for this key's owner)"},
                            409: {"description": "the job has not finished, or failed"},
                            410: {"description": "its result was deleted after the retention"},
                            422: {"description": "the function returns JSON (result='json')"}})
    def result_ref(job_id: str, request: Request, caller: ApiKey = Depends(authorize)) -> dict:
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

    return router
