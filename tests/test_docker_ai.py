"""Docker sandboxes and the AI node: functions that ask reach it through the worker, and nothing else.

What must never happen: a sandbox (with ai=True or not) opening a connection to another host, here
a container the test starts itself on Docker's default network.
"""

from __future__ import annotations

from collections.abc import Iterator

import docker
import pytest

import nanogrid
from tests.conftest import require_docker, start_grid
from tests.fake_ollama import FakeOllama

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ai_docker_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    require_docker()
    engine = docker.from_env()
    with FakeOllama() as node:
        grid = start_grid(
            tmp_path_factory.mktemp("docker-ai"),
            sandbox="docker",
            ai_endpoint=node.url,
            ai_model="tiny",
            stem_cells=1,
        )
        image = grid.grid.pool.factory.image
        other = engine.containers.run(
            image,
            entrypoint=["python3", "-m", "http.server", "8000"],
            detach=True,
            remove=True,
            user="65534:65534",
            working_dir="/tmp",
        )  # another host
        other.reload()
        try:
            yield grid, other.attrs["NetworkSettings"]["IPAddress"]
        finally:
            grid.stop()
            other.kill()


def test_only_functions_that_ask_reach_the_ai_node_and_nothing_else(ai_docker_grid):
    grid, other_host = ai_docker_grid
    nanogrid.connect(grid.url, api_key=grid.api_key)

    @nanogrid.remote(ai=True, timeout=60)
    def with_ai(other):
        import socket

        import nanogrid.ai

        answer = nanogrid.ai.generate("hello").response
        streamed = "".join(
            chunk.message.content
            for chunk in nanogrid.ai.chat([{"role": "user", "content": "hi there"}], stream=True)
        )
        try:
            socket.create_connection((other, 8000), timeout=3).close()
            reached = "connected"
        except OSError as exc:
            reached = type(exc).__name__
        return answer, streamed, nanogrid.ai.usage(), reached

    job = with_ai.spawn(other_host)
    answer, streamed, usage, reached = job.result(timeout=60)
    assert answer == "[tiny] summary: hello"
    assert streamed.strip() == "[tiny] summary: hi there"
    assert (
        usage["calls"] == 2 and job.ai_usage == usage
    )  # the host's count matches what the client saw
    assert reached != "connected"  # no network at all, AI or not

    @nanogrid.remote(timeout=60)
    def without_ai():
        import nanogrid.ai

        return nanogrid.ai.generate("hello")

    with pytest.raises(RuntimeError, match=r"ai=True"):
        without_ai.remote()
