"""Docker sandboxes and the AI node: only functions that ask get a route, and it leads nowhere else."""

from __future__ import annotations

import textwrap
import time
from collections.abc import Iterator

import docker
import pytest

import nanogrid
from tests.conftest import require_docker, start_grid

pytestmark = pytest.mark.integration

NETWORK = "nanogrid-test-ai"
IMAGE = "nanogrid/runtime-python:latest"

# A stand-in AI node that runs in a container of the runtime image: the standard library speaking
# the two Ollama endpoints the test uses (a fixture, like tests/fake_ollama.py).
FAKE_NODE = textwrap.dedent("""
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Node(BaseHTTPRequestHandler):
        def reply(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.reply({"models": [{"name": "tiny:latest", "model": "tiny:latest"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.reply({"model": body["model"], "created_at": "2026-11-23T00:00:00Z", "done": True,
                        "response": "[%s] in a container" % body["model"], "prompt_eval_count": 3, "eval_count": 4})

    ThreadingHTTPServer(("0.0.0.0", 11434), Node).serve_forever()
""")


@pytest.fixture(scope="module")
def ai_docker_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    require_docker()
    engine = docker.from_env()
    grid = start_grid(tmp_path_factory.mktemp("docker-ai"), sandbox="docker", ai_endpoint="http://fake-ai-node:11434",
                      ai_model="tiny", docker_ai_network=NETWORK, stem_cells=1)
    node = engine.containers.run(IMAGE, entrypoint=["python3", "-c", FAKE_NODE], name="fake-ai-node", detach=True,
                                 remove=True, network=NETWORK, user="65534:65534")
    other = engine.containers.run(IMAGE, entrypoint=["python3", "-m", "http.server", "8000"], detach=True,
                                  remove=True, user="65534:65534", working_dir="/tmp")  # another host
    time.sleep(1.0)
    other.reload()
    try:
        yield grid, other.attrs["NetworkSettings"]["IPAddress"]
    finally:
        grid.stop()
        for container in (node, other):
            container.kill()
        time.sleep(1.0)
        for network in engine.networks.list(names=[NETWORK]):
            network.remove()


def test_only_functions_that_ask_reach_the_ai_node_and_nothing_else(ai_docker_grid):
    grid, other_host = ai_docker_grid
    nanogrid.connect(grid.url, api_key=grid.api_key)

    @nanogrid.remote(ai=True, timeout=60)
    def with_ai(other):
        import socket

        import nanogrid.ai

        answer = nanogrid.ai.generate("hello").response
        try:
            socket.create_connection((other, 8000), timeout=3).close()
            reached = "connected"
        except OSError as exc:
            reached = type(exc).__name__
        return answer, nanogrid.ai.usage(), reached

    job = with_ai.spawn(other_host)
    answer, usage, reached = job.result(timeout=60)
    assert answer == "[tiny] in a container"
    assert usage == {"calls": 1, "prompt_tokens": 3, "completion_tokens": 4} and job.ai_usage == usage
    assert reached != "connected"  # the AI network has no route to any other host

    @nanogrid.remote(timeout=60)
    def without_ai():
        import nanogrid.ai

        return nanogrid.ai.generate("hello")

    with pytest.raises(RuntimeError, match=r"ai=True"):
        without_ai.remote()
