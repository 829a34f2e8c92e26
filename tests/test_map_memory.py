"""A map's memory is bounded by its window, not by its number of calls: on the client, however slowly its
results are taken, and on the grid, once the map ends."""

from __future__ import annotations

import time
from typing import Any

import pytest

import nanogrid
import nanogrid.function

pytestmark = pytest.mark.integration


@nanogrid.remote
def echo(x: int) -> int:
    return x


def test_a_paused_map_sends_no_more_than_its_window(grid, monkeypatch):
    """What must never happen: a consumer that stops taking results while the client keeps sending calls and
    holding their results (a 100,000-call map read slowly would hold them all)."""
    client = nanogrid.connect(grid.url, api_key=grid.api_key)
    window, chunk = 10, 2
    monkeypatch.setattr(nanogrid.function, "MAP_WINDOW", window)
    sent = [0]
    stream = client.map_stream

    def counted(body: dict[str, Any]) -> Any:
        sent[0] += len(body["args_pickle"])
        return stream(body)

    monkeypatch.setattr(client, "map_stream", counted)
    results = echo.map(range(60), progress=False, chunk_size=chunk)
    assert next(results) == 0
    time.sleep(1.0)  # the senders would have sent everything by now, were they not held back
    assert sent[0] <= 1 + window + chunk, sent[0]
    assert list(results) == list(range(1, 60))  # and the rest still comes, in order
    assert sent[0] == 60


def test_the_grid_keeps_no_waiters_once_a_map_ends_or_is_abandoned(grid):
    nanogrid.connect(grid.url, api_key=grid.api_key)
    listeners = grid.grid.bus._listeners
    assert list(echo.map(range(300), progress=False)) == list(range(300))
    assert listeners.waited_on() == []
    results = echo.map(range(300), progress=False, chunk_size=10)
    next(results)
    results.close()  # the client goes away mid-map: its streams close, the grid forgets them
    deadline = time.monotonic() + 10
    while listeners.waited_on() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert listeners.waited_on() == []
