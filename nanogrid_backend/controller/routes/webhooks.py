"""Webhook routes under ``/v1/webhooks``: an owner registers, lists and deletes their own hooks.

The hooks are sent by nanogrid_backend/notify.py.
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations, some of them local names.
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from nanogrid_backend.controller.routes.deps import Caller, CurrentGrid
from nanogrid_backend.notify import EVENTS, MAX_HOOKS_PER_OWNER, WebhookError, new_hook


class WebhookRequest(BaseModel):
    url: str = Field(
        max_length=2000, description="where to POST (a Slack incoming webhook works as it is)"
    )
    events: list[str] = Field(["failure"], description=f"some of {', '.join(EVENTS)}")
    function_id: str | None = Field(
        None, max_length=64, description="only this function's calls (default: all)"
    )
    threshold: dict[str, Any] | None = Field(
        None,
        description='e.g. {"metric": "error_rate", "above": 0.1, "window": "1h", "min_calls": 10}',
    )
    secret: str | None = Field(
        None, min_length=16, max_length=200, description="signing secret (default: made)"
    )


def public(hook: dict[str, Any]) -> dict[str, Any]:
    """A hook as listed: never its secret."""
    return {k: v for k, v in hook.items() if k != "secret"}


router = APIRouter(prefix="/v1/webhooks", tags=["operations"])


@router.post("", status_code=201)
def create(body: WebhookRequest, key: Caller, grid: CurrentGrid) -> dict:
    """Register a hook; the answer carries its signing secret, shown this once."""
    if len(grid.registry.list_webhooks(key.name)) >= MAX_HOOKS_PER_OWNER:
        raise HTTPException(
            409, f"an owner may have {MAX_HOOKS_PER_OWNER} webhooks; delete one first"
        )
    if body.function_id is not None:
        function = grid.registry.get_function(body.function_id)
        if function is None or function.owner != key.name:
            raise HTTPException(404, f"no function {body.function_id!r}")
    try:
        hook = new_hook(
            key.name,
            body.url,
            body.events,
            body.function_id,
            body.threshold,
            body.secret,
            grid.config.webhook_allow_networks,
        )
    except WebhookError as exc:
        raise HTTPException(422, str(exc)) from None
    grid.registry.put_webhook(hook)
    return hook


@router.get("")
def listing(key: Caller, grid: CurrentGrid) -> list[dict]:
    return [public(hook) for hook in grid.registry.list_webhooks(key.name)]


@router.delete("/{hook_id}")
def delete(hook_id: str, key: Caller, grid: CurrentGrid) -> dict:
    if not grid.registry.delete_webhook(key.name, hook_id):
        raise HTTPException(404, f"no webhook {hook_id!r}")
    return {"hook_id": hook_id, "deleted": True}
