"""Live output: what a running call prints reaches its caller while it runs, once, in order.

What must never happen: output seen only when the call ends, output shown twice, output lost
because the call timed out or crashed, or a follower reading another owner's job.
"""

from __future__ import annotations

import httpx
import pytest

import nanogrid
from nanogrid_backend.keys import create_key

pytestmark = pytest.mark.integration


def test_a_running_call_is_followed_as_it_prints(client):
    @nanogrid.remote(timeout=60)
    def train(epochs):
        import sys
        import time

        for epoch in range(epochs):
            print(f"epoch {epoch} loss {1 / (epoch + 1):.3f} — ✓")
            if epoch == 0:
                print("a warning", file=sys.stderr)
            time.sleep(1.0)
        return "trained"

    job = train.spawn(3)
    seen = []
    for stream, text in job.stream(poll_s=1.0):
        if not seen:  # the first line arrives while the call is still running, not at its end
            assert client.status(job.job_id)["status"] == "running"
        seen.append((stream, text))
    assert job.result() == "trained"
    stdout = "".join(text for stream, text in seen if stream == "stdout")
    stderr = "".join(text for stream, text in seen if stream == "stderr")
    assert (
        stdout == job.stdout == "".join(f"epoch {n} loss {1 / (n + 1):.3f} — ✓\n" for n in range(3))
    )  # once, in order
    assert stderr == job.stderr == "a warning\n"
    assert job.logs() == {"stdout": stdout, "stderr": stderr}


def test_remote_prints_the_function_output_here_once(client, capsys):
    @nanogrid.remote(timeout=60)
    def chatty(slow):
        import time

        print("starting")
        if slow:
            time.sleep(1.5)  # past the point where .remote() starts following the call live
        print("done")
        return 7

    assert chatty.remote(False) == 7
    assert capsys.readouterr().out == "starting\ndone\n"
    assert chatty.remote(True) == 7
    assert capsys.readouterr().out == "starting\ndone\n"


def test_output_printed_before_a_timeout_is_kept(client):
    @nanogrid.remote(timeout=3)
    def hangs():
        import time

        print("got this far")
        time.sleep(60)

    job = hangs.spawn()
    with pytest.raises(nanogrid.FunctionTimeout):
        job.result(timeout=60)
    assert job.stdout == "got this far\n"


def test_another_owners_job_log_does_not_exist(grid):
    nanogrid.connect(grid.url, api_key=grid.api_key)

    @nanogrid.remote(timeout=30)
    def secret():
        print("the secret")

    job = secret.spawn()
    job.result(timeout=30)
    other, _ = create_key(grid.grid.registry, "eve-logs")
    answer = httpx.get(f"{grid.url}/v1/jobs/{job.job_id}/logs", headers={"x-api-key": other})
    assert answer.status_code == 404 and "the secret" not in answer.text
