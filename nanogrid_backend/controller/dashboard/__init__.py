"""The dashboard at ``/ui``: server-rendered pages (Jinja2, inline SVG charts, no JavaScript) for an operator.

Over the same data as the ``/v1`` operations API, for one who never opens a notebook: deploy, test-run, update and
delete functions (through the API's own core, forms.py), their calls and errors over time, jobs with their output
files, the built environments, workers and load tests.

One module per page group (account, functions, jobs, environments, workers, loadtests), sharing state.py: the
sessions (signing in, CSRF tokens) and the templates. Each page shows only the signed-in owner's functions, calls,
environments, load tests and warm sandboxes; refusals and errors on /ui are pages.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanogrid_backend.controller.dashboard import (
    account,
    environments,
    functions,
    jobs,
    loadtests,
    workers,
)
from nanogrid_backend.controller.dashboard.state import Dashboard, NotSignedIn
from nanogrid_backend.controller.jobs import BadRequest
from nanogrid_backend.package_checks import PackageError

router = APIRouter()
for pages in (account, functions, jobs, environments, workers, loadtests):
    router.include_router(pages.router)


async def sign_in_first(request: Request, exc: Exception) -> Response:
    """A page asked for without a session goes to the sign-in form."""
    return RedirectResponse("/ui/login", status_code=303)


def install_error_pages(app: FastAPI, dashboard: Dashboard) -> None:
    """Any refusal or error on a /ui path answered as a page (the API's handlers answer JSON everywhere else): after
    the API's own handlers are installed, each is wrapped."""
    app.add_exception_handler(NotSignedIn, sign_in_first)
    for kind in (
        StarletteHTTPException,
        PackageError,
        BadRequest,
        RequestValidationError,
        Exception,
    ):
        api_handler = app.exception_handlers.get(kind)
        if api_handler is not None:
            app.add_exception_handler(kind, dashboard.as_page(api_handler))
