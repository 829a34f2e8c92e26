"""Schedule timings: cron expressions in a time zone, periods and overlap policies, checked alike on both sides."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from nanogrid_contract.errors import InvalidArgument

MIN_PERIOD_S = 1.0  # the scheduler looks at due times about twice a second
MAX_PERIOD_S = 366 * 86400.0
OVERLAPS = ("skip", "queue")


def check_cron(expression: str, timezone: str) -> None:
    """Refuse a cron expression or time zone the scheduler could not use, saying which part is wrong."""
    zone = check_timezone(timezone)
    try:  # loaded here: `import nanogrid` stays cheap inside a sandbox
        from cronsim import CronSim, CronSimError
    # a client without the grid's extras: the grid checks the expression when it is registered
    except ImportError:
        if not isinstance(expression, str):
            raise InvalidArgument(
                f"a cron schedule is a string such as '0 * * * *', not {expression!r}"
            ) from None
        return

    if not isinstance(expression, str):
        raise InvalidArgument(
            f"a cron schedule is a string such as '0 * * * *', not {expression!r}"
        )
    try:
        CronSim(expression, datetime.now(zone))
    except CronSimError as exc:
        raise InvalidArgument(
            f"cron expression {expression!r}: {exc} (five fields: minute hour day-of-month month "
            "day-of-week, e.g. '0 * * * *' for every hour)"
        ) from None


def check_timezone(timezone: str) -> ZoneInfo:
    if not isinstance(timezone, str) or not timezone:
        raise InvalidArgument(
            f"timezone is an IANA name such as 'Europe/Oslo' or 'UTC', not {timezone!r}"
        )
    try:
        return ZoneInfo(timezone)
    except (
        ZoneInfoNotFoundError,
        ValueError,
        OSError,
    ):  # OSError: a folder of zones ('Europe'), a name too long
        raise InvalidArgument(
            f"unknown time zone {timezone!r}: use an IANA name such as 'Europe/Oslo' or 'UTC'"
        ) from None


def check_overlap(overlap: str) -> None:
    if overlap not in OVERLAPS:
        raise InvalidArgument(
            f"overlap is 'skip' (a run still going makes the next firing skip) or 'queue' (the next "
            f"run waits for it), not {overlap!r}"
        )


def check_period(seconds: float) -> None:
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not MIN_PERIOD_S <= seconds <= MAX_PERIOD_S
    ):
        raise InvalidArgument(
            f"a period is at least {MIN_PERIOD_S:g} s and at most 366 days, not {seconds!r} s"
        )
