"""Schemathesis against the live controller: generated requests from the OpenAPI schema, bounded.

Every check runs except `positive_data_acceptance`: the schema cannot say which bytes make a
valid zip or which ids exist, so a schema-valid but meaningless upload is rightly refused (400/404).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import start_grid
from tests.fake_ollama import FakeOllama

pytestmark = pytest.mark.integration

SCHEMATHESIS = shutil.which("schemathesis") or str(
    Path(__file__).resolve().parents[1] / ".venv/bin/schemathesis"
)
MAX_EXAMPLES = 30


def test_fuzzed_api_gives_no_server_errors_and_keeps_to_its_schema(tmp_path):
    with FakeOllama() as ollama:  # with an AI node, so /models answers rather than 503
        grid = start_grid(
            tmp_path / "grid", stem_cells=1, workers=1, ai_endpoint=ollama.url, ai_model="tiny"
        )
        summary = fuzz(grid)
    generated = re.search(r"(\d+) generated, (\d+) passed", summary)
    assert generated and int(generated.group(1)) > 300, summary
    print(f"schemathesis: {generated.group(0)}")


def fuzz(grid) -> str:
    try:
        result = subprocess.run(
            [
                SCHEMATHESIS,
                "run",
                f"{grid.url}/openapi.json",
                "-H",
                f"x-api-key: {grid.api_key}",
                "--max-examples",
                str(MAX_EXAMPLES),
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
                "--seed",
                "20261123",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        grid.stop()
    summary = result.stdout[-4000:]
    assert result.returncode == 0, summary
    return summary
