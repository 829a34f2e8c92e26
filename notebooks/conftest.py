"""nbval runs the tutorials against a grid started here, before any notebook kernel starts.

The kernels inherit NANOGRID_URL from this process, so `nanogrid.connect()` in a notebook finds it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from backend.config import GridConfig
from backend.embedded import EmbeddedGrid
from tests.fake_ollama import FakeOllama

# The AI tutorial runs against a server speaking the Ollama API; set NANOGRID_TUTORIAL_AI_ENDPOINT
# (and NANOGRID_TUTORIAL_AI_MODEL) to run it against a real Ollama instead.
_ollama = None
if not os.environ.get("NANOGRID_TUTORIAL_AI_ENDPOINT"):
    _ollama = FakeOllama().__enter__()
_data_dir = tempfile.TemporaryDirectory(prefix="nanogrid-notebooks-")
_grid = EmbeddedGrid(GridConfig.load(
    data_dir=Path(_data_dir.name), port=0, kill_grace_s=0.5,
    sandbox="process",  # the AI node is reachable from process sandboxes; Docker ones have no network
    ai_endpoint=os.environ.get("NANOGRID_TUTORIAL_AI_ENDPOINT") or _ollama.url,
    ai_model=os.environ.get("NANOGRID_TUTORIAL_AI_MODEL") or "summarizer",
)).start()
os.environ["NANOGRID_URL"] = _grid.url
os.environ["NANOGRID_API_KEY"] = _grid.api_key


def pytest_sessionfinish(session, exitstatus):
    _grid.stop()
    _data_dir.cleanup()
    if _ollama is not None:
        _ollama.__exit__()
