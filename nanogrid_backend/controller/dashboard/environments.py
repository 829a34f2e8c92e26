"""The dashboard's built environments: those the owner's functions use (every one for an admin), and removing one."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from nanogrid_backend.controller.dashboard import forms
from nanogrid_backend.controller.dashboard.state import Dashboard, Session, board_of
from nanogrid_backend.models import FunctionRecord

router = APIRouter(prefix="/ui", include_in_schema=False)


def shown_environments(board: Dashboard, session: Session) -> tuple[list[dict[str, Any]], bool]:
    """The built environments this owner's functions use (every one for an admin key), with their users, and
    whether this key is an admin's. One another owner uses too is removable by an admin only."""
    grid = board.grid
    key = grid.registry.get_key(session.key_id)
    admin = bool(key and key.admin)
    users: dict[str, list[FunctionRecord]] = {}
    for f in grid.registry.list_functions(owner=None):
        env_id = forms.environment_of(board.manifest(f))
        if env_id:
            users.setdefault(env_id, []).append(f)
    shown = []
    for info in grid.environments.list() if grid.environments is not None else []:
        using = users.get(info["env_id"], [])
        mine = [f for f in using if f.owner == session.owner]
        if admin or mine:  # another owner's packages are theirs to see
            shown.append(
                {
                    **info,
                    "functions": using if admin else mine,
                    "removable": admin or len(mine) == len(using),
                }
            )
    return shown, admin


@router.get("/environments")
def environments(request: Request) -> HTMLResponse:
    board = board_of(request)
    session = board.signed_in(request)
    shown, admin = shown_environments(board, session)
    return board.page_of(
        session,
        "environments.html",
        "Environments",
        title="Environments",
        environments=shown,
        cache=board.grid.environments is not None,
        admin=admin,
    )


@router.post("/environments/{env_id}/remove")
def remove_environment(request: Request, env_id: str, csrf: str = Form("")) -> Response:
    board = board_of(request)
    session, _ = board.changing(request, csrf)
    found = {e["env_id"]: e for e in shown_environments(board, session)[0]}
    if env_id not in found or board.grid.environments is None:
        raise HTTPException(404, f"no environment {env_id!r} among those your functions use")
    if not found[env_id]["removable"]:
        raise HTTPException(
            403,
            f"environment {env_id} is used by other owners' functions too: only an admin "
            "key may remove it",
        )
    board.grid.environments.remove(env_id)
    return RedirectResponse("/ui/environments", status_code=303)
