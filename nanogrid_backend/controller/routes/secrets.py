"""/v1/secrets: an owner's named sets of environment variables, sealed before they are stored.

Values go in and never come out: every answer names the variables only. A function gets them by naming
the secret (``@remote(secrets=["NAME"])``); the worker opens it as it loads the function's sandbox.
"""

import json
import time
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from nanogrid_backend.controller.routes.deps import Caller, CurrentGrid
from nanogrid_backend.models import ApiKey, SecretRecord
from nanogrid_backend.secretbox import SecretError, check_secret


class SecretValues(BaseModel):
    values: dict[str, str] = Field(
        description="variable name -> value; replaces the secret's earlier values"
    )


class SecretView(BaseModel):
    name: str
    variables: list[str] = Field(description="the variable names; values are never shown")
    created_at: float
    updated_at: float


def view(secret: SecretRecord) -> dict[str, Any]:
    return {
        "name": secret.name,
        "variables": secret.variables,
        "created_at": secret.created_at,
        "updated_at": secret.updated_at,
    }


router = APIRouter(prefix="/v1/secrets", tags=["secrets"])


@router.put("/{name}", response_model=SecretView)
def set_secret(name: str, body: SecretValues, key: Caller, grid: CurrentGrid) -> dict[str, Any]:
    owner: ApiKey = key
    try:
        check_secret(name, body.values)
    except SecretError as exc:
        raise HTTPException(422, str(exc)) from None
    earlier = grid.registry.get_secret(owner.name, name)
    now = time.time()
    sealed = grid.secrets.seal(json.dumps(body.values).encode(), owner.name, name)
    secret = SecretRecord(
        owner.name, name, sealed, sorted(body.values), earlier.created_at if earlier else now, now
    )
    grid.registry.put_secret(secret)
    return view(secret)


@router.get("", response_model=list[SecretView])
def list_secrets(key: Caller, grid: CurrentGrid) -> list[dict[str, Any]]:
    return [view(s) for s in grid.registry.list_secrets(key.name)]


@router.delete("/{name}", response_model=SecretView)
def delete_secret(name: str, key: Caller, grid: CurrentGrid) -> dict[str, Any]:
    secret = grid.registry.get_secret(key.name, name)
    if secret is None or not grid.registry.delete_secret(key.name, name):
        raise HTTPException(404, f"no secret {name!r}; `nanogrid secrets list` shows yours")
    return view(secret)
