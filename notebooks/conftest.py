"""nbval runs the tutorials against a grid started here, before any notebook kernel starts.

The kernels inherit NANOGRID_URL from this process, so `nanogrid.connect()` in a notebook finds it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from backend.config import GridConfig
from backend.embedded import EmbeddedGrid

_data_dir = tempfile.TemporaryDirectory(prefix="nanogrid-notebooks-")
_grid = EmbeddedGrid(GridConfig.load(data_dir=Path(_data_dir.name), port=0, kill_grace_s=0.5)).start()
os.environ["NANOGRID_URL"] = _grid.url
os.environ["NANOGRID_API_KEY"] = _grid.api_key


def pytest_sessionfinish(session, exitstatus):
    _grid.stop()
    _data_dir.cleanup()
