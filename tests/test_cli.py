"""The `nanogrid` command against a live grid, as an operator uses it from a shell."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def nanogrid(*args: str, url: str, key: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "NANOGRID_URL": url, "NANOGRID_API_KEY": key}
    return subprocess.run(
        [sys.executable, "-m", "nanogrid.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_deploy_invoke_status_jobs(grid, tmp_path):
    source = tmp_path / "greet.py"
    source.write_text("def handler(event, context):\n    return 'hi ' + event['who']\n")
    deployed = nanogrid(
        "deploy",
        str(source),
        "--name",
        "greet",
        "--handler",
        "greet.handler",
        url=grid.url,
        key=grid.api_key,
    )
    assert deployed.returncode == 0, deployed.stderr
    function_id = json.loads(deployed.stdout)["function_id"]

    invoked = nanogrid(
        "invoke", function_id, "--payload", '{"who": "ops"}', url=grid.url, key=grid.api_key
    )
    assert invoked.returncode == 0, invoked.stderr
    assert json.loads(invoked.stdout)["result"] == "hi ops"

    status = nanogrid("status", url=grid.url, key=grid.api_key)
    assert status.returncode == 0 and "warm idle" in status.stdout and "queue" in status.stdout

    jobs = nanogrid("jobs", url=grid.url, key=grid.api_key)
    assert jobs.returncode == 0 and "completed" in jobs.stdout


def test_errors_read_well_in_a_terminal(grid):
    bad_payload = nanogrid("invoke", "fn-x", "--payload", "{nope", url=grid.url, key=grid.api_key)
    assert bad_payload.returncode == 2 and "--payload is not JSON" in bad_payload.stderr
    missing = nanogrid("invoke", "fn-missing", url=grid.url, key=grid.api_key)
    assert (
        missing.returncode == 1
        and "no function 'fn-missing'" in missing.stderr
        and "Traceback" not in missing.stderr
    )
    unreachable = nanogrid("status", url="http://127.0.0.1:9")
    assert unreachable.returncode == 1 and "cannot reach the grid" in unreachable.stderr
