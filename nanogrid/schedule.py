"""Schedules: ``@remote(schedule=...)`` functions that run on their own, by cron in a time zone or every period.

    @nanogrid.remote(schedule=nanogrid.Cron("0 * * * *", timezone="Europe/Oslo"))
    def hourly(): ...

    hourly.deploy()                 # registers the schedule (and points it at this version)
    hourly.schedule_info().pause()  # .resume(), .remove(); nanogrid.schedules() lists them all

Each run is an ordinary job (``trigger: "schedule"`` on the job), retried by the function's policy and
reported to failure webhooks. A schedule is its owner's alone and is named after its function.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from nanogrid_contract.errors import APIError, InvalidArgument
from nanogrid_contract.schedules import check_cron, check_overlap, check_period

if TYPE_CHECKING:
    from nanogrid.client import Client


class Cron:
    """Fire at the times a cron expression names, read in ``timezone`` (daylight saving as cron does it)."""

    def __init__(self, expression: str, timezone: str = "UTC", *, overlap: str = "skip") -> None:
        check_cron(expression, timezone)
        check_overlap(overlap)
        self.expression, self.timezone, self.overlap = expression, timezone, overlap

    def body(self) -> dict[str, Any]:
        return {"cron": self.expression, "timezone": self.timezone, "overlap": self.overlap}

    def __repr__(self) -> str:
        return f"Cron({self.expression!r}, timezone={self.timezone!r}, overlap={self.overlap!r})"


class Period:
    """Fire every fixed interval, counted from when the schedule was registered."""

    def __init__(
        self,
        *,
        days: float = 0,
        hours: float = 0,
        minutes: float = 0,
        seconds: float = 0,
        overlap: str = "skip",
    ) -> None:
        for name, value in (
            ("days", days),
            ("hours", hours),
            ("minutes", minutes),
            ("seconds", seconds),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise InvalidArgument(
                    f"Period({name}=...) takes a number of at least 0, not {value!r}"
                )
        check_period(days * 86400 + hours * 3600 + minutes * 60 + seconds)
        check_overlap(overlap)
        self.seconds = float(days * 86400 + hours * 3600 + minutes * 60 + seconds)
        self.overlap = overlap

    def body(self) -> dict[str, Any]:
        return {"period_s": self.seconds, "overlap": self.overlap}

    def __repr__(self) -> str:
        return f"Period(seconds={self.seconds:g}, overlap={self.overlap!r})"


def as_schedule(value: str | Cron | Period) -> Cron | Period:
    """``schedule=`` as given to ``@remote``: a cron string (UTC), a ``Cron`` or a ``Period``."""
    if isinstance(value, Cron | Period):
        return value
    if isinstance(value, str):
        return Cron(value)
    raise InvalidArgument(
        f"schedule is a cron string, nanogrid.Cron(...) or nanogrid.Period(...), not {value!r}"
    )


class Schedule:
    """A registered schedule as the grid last showed it, with what its owner may do to it."""

    def __init__(self, client: Client, view: dict[str, Any]) -> None:
        self._client = client
        self._update(view)

    def _update(self, view: dict[str, Any]) -> None:
        self.view = view
        self.name: str = view["name"]
        self.function_id: str = view["function_id"]
        self.paused: bool = view["paused"]
        self.next_due: float | None = view["next_due"]
        # newest first: outcome, lateness, catch-up
        self.firings: list[dict[str, Any]] = view.get("firings", [])

    def refresh(self) -> Schedule:
        self._update(self._client.request("GET", f"/schedules/{self.name}").json())
        return self

    def pause(self) -> Schedule:
        """No more firings until ``resume()``; a run already going carries on."""
        self._update(self._client.request("POST", f"/schedules/{self.name}/pause").json())
        return self

    def resume(self) -> Schedule:
        """Fire again from the next due time on; the due times that passed while paused are not made up."""
        self._update(self._client.request("POST", f"/schedules/{self.name}/resume").json())
        return self

    def remove(self) -> None:
        """Delete the schedule and its firings; the jobs it ran stay in history."""
        self._client.request("DELETE", f"/schedules/{self.name}")

    def __repr__(self) -> str:
        cron = self.view.get("cron")
        every = (
            f"{cron} ({self.view.get('timezone')})"
            if cron
            else f"every {self.view.get('period_s'):g} s"
        )
        state = "paused" if self.paused else f"next {_when(self.next_due)}"
        return f"<Schedule {self.name} {every}, {state}>"


def register(
    client: Client, name: str, function_id: str, spec: Cron | Period, args_pickle: str
) -> Schedule:
    body = {"function_id": function_id, "args_pickle": args_pickle, **spec.body()}
    return Schedule(client, client.request("PUT", f"/schedules/{name}", json=body).json())


def lookup(client: Client, name: str) -> Schedule | None:
    try:
        return Schedule(client, client.request("GET", f"/schedules/{name}").json())
    except APIError as exc:
        if exc.status == 404:
            return None
        raise


def schedules(client: Client | None = None) -> list[Schedule]:
    """Your schedules on the grid (another owner's are never shown)."""
    from nanogrid.client import get_client

    client = client or get_client()
    return [Schedule(client, view) for view in client.request("GET", "/schedules").json()]


def _when(timestamp: float | None) -> str:
    return (
        "-"
        if timestamp is None
        else datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    )
