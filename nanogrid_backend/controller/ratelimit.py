"""An API key's rate limit as the routes apply it: its rate and burst, and the Retry-After of a refusal.

The buckets themselves are the result bus's (nanogrid_backend/token_buckets.py): in process, or shared on Redis."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nanogrid_backend.config import GridConfig
    from nanogrid_backend.models import ApiKey


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def key_limits(key: ApiKey, config: GridConfig) -> tuple[float, int]:
    """A key's rate (requests per second) and burst: its own where it has them, else the grid's."""
    return (config.rate_limit if key.rate_limit is None else key.rate_limit), (
        key.rate_burst or config.rate_burst
    )
