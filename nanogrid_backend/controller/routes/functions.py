"""``/v1/upload``, ``/v1/packages`` and ``/v1/functions``: deploy a package, list, show and delete the caller's
functions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse

from nanogrid_backend.controller import jobs
from nanogrid_backend.controller.routes.deps import Caller, CurrentGrid, function_or_404
from nanogrid_backend.controller.schemas import Deleted, ErrorDetail, FunctionView

router = APIRouter(prefix="/v1")


@router.post(
    "/upload",
    response_model=FunctionView,
    status_code=201,
    responses={200: {"model": FunctionView, "description": "identical package already uploaded"}},
)
async def upload(
    caller: Caller,
    grid: CurrentGrid,
    file: Annotated[UploadFile, File(description="a .py file or a zip package")],
    # Optional, but not nullable: a form field is either sent or not.
    function_name: Annotated[str, Form(max_length=64)] = None,  # type: ignore[assignment]
    runtime: Annotated[str, Form(max_length=32)] = None,  # type: ignore[assignment]
    handler: Annotated[str, Form(max_length=200)] = None,  # type: ignore[assignment]
    timeout: Annotated[float, Form(description="seconds")] = None,  # type: ignore[assignment]
    memory: Annotated[int, Form(description="MiB")] = None,  # type: ignore[assignment]
) -> JSONResponse:
    data = await file.read()
    form = {
        "name": function_name,
        "runtime": runtime,
        "handler": handler,
        "timeout": timeout,
        "memory": memory,
    }
    record, created = jobs.deploy(grid, caller, file.filename or "package.zip", data, form)
    return JSONResponse(record.to_dict(), status_code=201 if created else 200)


PACKAGE_TYPES = ("application/zip", "application/octet-stream")


@router.post(
    "/packages",
    response_model=FunctionView,
    status_code=201,
    responses={
        200: {"model": FunctionView, "description": "identical package already uploaded"},
        415: {"model": ErrorDetail, "description": "a body that is not a zip (Content-Type)"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "the package's zip; sent as application/zip (the client) or application/octet-stream",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def upload_package(request: Request, caller: Caller, grid: CurrentGrid) -> JSONResponse:
    """A zip package as the request's whole body, its manifest saying everything ``/v1/upload``'s form fields
    would: what the Python client sends. No multipart form to build or to parse: a new function's first call
    spent ~2 ms of its ~6 ms upload on that. Checked and stored exactly as ``/v1/upload`` does."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in PACKAGE_TYPES:
        raise jobs.BadRequest(
            f"send the package's zip as the body, with Content-Type: application/zip (not "
            f"{content_type or 'none'}); a .py file or form fields go to POST /v1/upload",
            415,
        )
    data = await request.body()
    form = dict.fromkeys(("name", "runtime", "handler", "timeout", "memory"))
    record, created = jobs.deploy(grid, caller, "package.zip", data, form)
    return JSONResponse(record.to_dict(), status_code=201 if created else 200)


@router.get("/functions", response_model=list[FunctionView])
def list_functions(caller: Caller, grid: CurrentGrid) -> list[dict]:
    return [f.to_dict() for f in grid.registry.list_functions(owner=caller.name)]


@router.get("/functions/{function_id}", response_model=FunctionView)
def get_function(function_id: str, request: Request, caller: Caller) -> dict:
    return function_or_404(request, function_id, caller).to_dict()


@router.delete("/functions/{function_id}", response_model=Deleted)
def delete_function(function_id: str, request: Request, caller: Caller, grid: CurrentGrid) -> dict:
    function_id = function_or_404(request, function_id, caller).function_id
    request.app.state.functions.pop(function_id, None)
    grid.registry.delete_function(function_id)
    grid.store.delete_package(function_id)
    return {"function_id": function_id, "deleted": True}
