"""The seed platform's AI functions on NanoGrid, unchanged: ``requests.post(AI_ENDPOINT + "/api/generate")`` and the
seed's ``ai_client``, in sandboxes that have no network.

``AI_ENDPOINT`` is an address on the sandbox's own loopback, served by the bootstrap's forwarder, which hands each
request to the worker's AI gateway over the sandbox's channel. What must never happen: a seed function that cannot
reach the AI node it was written for (no ``requests``, no ``ai_client``, no ``AI_ENDPOINT``); tokens used but not
counted (``llm_token_count`` 0); the forwarder opening more than the gateway's inference routes (``/api/pull``,
``/api/delete`` reaching the node); a function with AI turned off left with a silence or a network error instead of
a reason.
"""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from nanogrid_backend.embedded import EmbeddedGrid
from tests import fake_ollama
from tests.conftest import ROOT, require_docker, start_grid
from tests.fake_ollama import FakeOllama

pytestmark = pytest.mark.integration

# Seed 004, section 5.3 (demo 2, the AI summary bot): summarizer.py, verbatim (blank lines with spaces and all).
SUMMARIZER = (Path(__file__).parent / "seed_ai_summarizer.py.txt").read_text(encoding="utf-8")
TEXT = "인공지능(AI)은 인간의 학습능력, 추론능력, 지각능력을 인공적으로 구현한 컴퓨터 시스템입니다."

# The seed's AI SDK as its README shows it: the model comes from the run's modelId (LLM_MODEL).
WITH_AI_CLIENT = """import os
import ai_client

def handler(event, context):
    return {"answer": ai_client.generate(event["prompt"]), "endpoint": os.environ.get("AI_ENDPOINT"),
            "chat": ai_client.chat([{"role": "user", "content": "hello there"}])}
"""

# What a curious (or hostile) function tries through AI_ENDPOINT: the node's admin routes, and the node while its
# module loads, outside any call.
PROBING = """import os
import requests

AT_LOAD = requests.get(os.environ["AI_ENDPOINT"] + "/api/tags", timeout=30)

def handler(event, context):
    base = os.environ["AI_ENDPOINT"]
    pull = requests.post(base + "/api/pull", json={"name": "llama3:70b"}, timeout=30)
    delete = requests.delete(base + "/api/delete", json={"name": "tiny"}, timeout=30)
    tags = requests.get(base + "/api/tags", timeout=30)
    with requests.Session() as session:  # one kept-alive connection, two requests
        twice = [session.get(base + "/api/tags", timeout=30).status_code for _ in range(2)]
    huge = requests.post(base + "/api/generate", data=b" " * (5 << 20), timeout=30)
    return {"at_load": [AT_LOAD.status_code, AT_LOAD.json()], "pull": [pull.status_code, pull.json()],
            "delete": [delete.status_code, delete.json()], "tags": [m["name"] for m in tags.json()["models"]],
            "twice": twice, "huge": huge.status_code}
"""

# What another process on the host would try where the sandbox shares the host's network: AI_ENDPOINT's port,
# without its path.
GUESSING = """import os
import ai_client
import requests

def handler(event, context):
    endpoint = os.environ["AI_ENDPOINT"]
    port = endpoint.split(":")[2].split("/")[0]
    guess = requests.get(f"http://127.0.0.1:{port}/api/tags", timeout=30)
    return {"endpoint": endpoint, "guess": guess.status_code, "answer": ai_client.generate("hi")}
"""

# Node's own fetch against AI_ENDPOINT, naming no model: the run's modelId is the one used.
NODE_FETCH = """exports.handler = async (event) => {
  const response = await fetch(process.env.AI_ENDPOINT + '/api/generate', { method: 'POST',
    headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: event.prompt, stream: false }) });
  const pull = await fetch(process.env.AI_ENDPOINT + '/api/pull', { method: 'POST', body: '{"name": "x"}' });
  return { status: response.status, answer: (await response.json()).response, pull: pull.status };
};
"""

# Go's own net/http against AI_ENDPOINT, naming no model: the grid's default model is the one used.
GO_HTTP = """package main

import (
    "bytes"
    "encoding/json"
    "net/http"
    "os"
)

func Handler(event map[string]interface{}) (map[string]interface{}, error) {
    body, _ := json.Marshal(map[string]interface{}{"prompt": event["prompt"], "stream": false})
    response, err := http.Post(os.Getenv("AI_ENDPOINT")+"/api/generate", "application/json", bytes.NewReader(body))
    if err != nil {
        return nil, err
    }
    defer response.Body.Close()
    answer := map[string]interface{}{}
    json.NewDecoder(response.Body).Decode(&answer)
    return map[string]interface{}{"status": response.StatusCode, "answer": answer["response"]}, nil
}

func main() {}
"""
# C++ has no HTTP client in its image: plain sockets against AI_ENDPOINT, the node's answer returned as it came.
CPP_SOCKETS = r"""#include <arpa/inet.h>
#include <cstdlib>
#include <string>
#include <sys/socket.h>
#include <unistd.h>

static std::string reply;

extern "C" const char* handler(const char* event) {
    std::string endpoint = std::getenv("AI_ENDPOINT");  // http://127.0.0.1:PORT
    sockaddr_in node{};
    node.sin_family = AF_INET;
    node.sin_port = htons(std::atoi(endpoint.substr(endpoint.rfind(':') + 1).c_str()));
    inet_pton(AF_INET, "127.0.0.1", &node.sin_addr);
    int conn = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(conn, reinterpret_cast<sockaddr*>(&node), sizeof node) != 0) return "\"no connection\"";
    std::string body = "{\"prompt\": \"one two\", \"stream\": false}";
    std::string request = "POST /api/generate HTTP/1.1\r\nHost: ai\r\nConnection: close\r\nContent-Length: " +
                          std::to_string(body.size()) + "\r\n\r\n" + body;
    send(conn, request.data(), request.size(), 0);
    std::string answer;
    char buf[4096];
    for (ssize_t n; (n = recv(conn, buf, sizeof buf, 0)) > 0;) answer.append(buf, size_t(n));
    close(conn);
    reply = answer.substr(answer.find("\r\n\r\n") + 4);
    return reply.c_str();
}
"""
SOURCE_FILES = {"python": "main.py", "nodejs": "index.js", "go": "main.go", "cpp": "main.cpp"}


def upload(
    client: httpx.Client, source: str, model: str | None = None, runtime: str = "python"
) -> str:
    """POST /upload as the seed's UI sends it: the editor's code, zipped (plus the default modelId, if any)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(SOURCE_FILES[runtime], source)
    response = client.post(
        "/upload",
        headers={"x-runtime": runtime, "x-memory-mb": "256"},
        files={"file": ("function.zip", buffer.getvalue(), "application/zip")},
        data={"modelId": model} if model else {},
    )
    assert response.status_code == 200, response.text
    return response.json()["functionId"]


def run(
    client: httpx.Client, function_id: str, event: dict[str, Any], model: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"functionId": function_id, "inputData": event}
    if model:
        body["modelId"] = model
    response = client.post("/run", json=body)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def node() -> Iterator[FakeOllama]:
    """An AI node that has the seed's default model too (summarizer.py names llama3:8b)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fake_ollama, "MODELS", [*fake_ollama.MODELS, "llama3:8b"])
        with FakeOllama() as fake:
            yield fake


@pytest.fixture(scope="module")
def docker_seed(
    node: FakeOllama, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    require_docker()
    for language in ("node", "go", "cpp"):  # built here if missing or out of date, as CI does
        built = subprocess.run(
            [sys.executable, str(ROOT / "nanogrid_runtimes" / "build.py"), "--runtime", language],
            capture_output=True,
            text=True,
        )
        assert built.returncode == 0, built.stderr
    grid = start_grid(
        tmp_path_factory.mktemp("seed-ai-docker"),
        sandbox="docker",
        ai_endpoint=node.url,
        ai_model="tiny",
        stem_cells=1,
    )
    try:
        with httpx.Client(
            base_url=grid.url, headers={"x-api-key": str(grid.api_key)}, timeout=120
        ) as client:
            yield client
    finally:
        grid.stop()


@pytest.fixture(scope="module")
def ai_off_grid(
    node: FakeOllama, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedGrid]:
    """A grid whose operator turned AI off for seed uploads (seed_ai = false): process sandboxes."""
    grid = start_grid(
        tmp_path_factory.mktemp("seed-ai-off"), ai_endpoint=node.url, ai_model="tiny", seed_ai=False
    )
    yield grid
    grid.stop()


def test_seed_summarizer_runs_unchanged_in_docker_and_its_tokens_are_counted(docker_seed, node):
    """The seed's own AI demo must get its answer in a sandbox without a network, and the tokens it used must show
    as llm_token_count on the run's answer and on its status."""
    function_id = upload(docker_seed, SUMMARIZER)
    before = len(node.requests)
    result = run(docker_seed, function_id, {"text": TEXT})
    assert result["status"] == "SUCCESS", result
    summary = result["result"]["summary"]
    assert summary.startswith("[llama3:8b] summary: 다음 텍스트를 3줄로 요약해줘:")
    assert result["result"]["original_length"] == len(TEXT)
    (request,) = node.requests[before:]
    prompt_words = len(request["prompt"].split())
    assert result["llm_token_count"] == prompt_words + len(summary.split())  # the node's own counts
    status = docker_seed.get(f"/status/{result['jobId']}").json()
    assert status["llm_token_count"] == result["llm_token_count"]


def test_ai_client_takes_the_model_of_the_upload_then_of_the_run(docker_seed, node):
    """``import ai_client`` must work, and its default model must be the upload's modelId unless the run names
    another: a run must never reach a model nobody chose."""
    function_id = upload(docker_seed, WITH_AI_CLIENT, model="summarizer")
    default = run(docker_seed, function_id, {"prompt": "a short text"})
    assert default["status"] == "SUCCESS", default
    assert default["result"]["answer"] == "[summarizer] summary: a short text"
    assert default["result"]["chat"] == "[summarizer] summary: hello there"
    assert default["result"]["endpoint"].startswith(
        "http://127.0.0.1:"
    )  # the sandbox's own loopback
    assert default["llm_token_count"] > 0
    chosen = run(docker_seed, function_id, {"prompt": "a short text"}, model="tiny")
    assert chosen["result"]["answer"] == "[tiny] summary: a short text"


def test_the_forwarder_opens_the_inference_routes_only_and_only_during_a_call(docker_seed, node):
    """Through AI_ENDPOINT a function must never pull, delete or otherwise administer the node, nor reach it while
    its module loads (outside a call, where no job would be charged); the model list stays readable."""
    function_id = upload(docker_seed, PROBING)
    result = run(docker_seed, function_id, {})
    assert result["status"] == "SUCCESS", result
    value = result["result"]
    assert value["pull"][0] == 403 and "inference routes" in value["pull"][1]["error"]
    assert value["delete"][0] == 403
    assert (
        value["at_load"][0] == 503
        and "only while the function is being called" in value["at_load"][1]["error"]
    )
    assert "llama3:8b" in value["tags"] and value["twice"] == [200, 200]
    assert value["huge"] == 413  # refused in the sandbox, before the channel
    assert not [seen for seen in node.seen if seen[1] in ("/api/pull", "/api/delete")]


def test_a_node_function_reaches_the_ai_node_through_its_own_loopback(docker_seed, node):
    """A Node.js seed function must reach the AI node at AI_ENDPOINT like a Python one: the run's model, tokens
    counted, the admin routes refused."""
    function_id = upload(docker_seed, NODE_FETCH, runtime="nodejs")
    result = run(docker_seed, function_id, {"prompt": "three words here"}, model="summarizer")
    assert result["status"] == "SUCCESS", result
    assert result["result"] == {
        "status": 200,
        "answer": "[summarizer] summary: three words here",
        "pull": 403,
    }
    assert result["llm_token_count"] == 3 + 5


def test_a_go_function_reaches_the_ai_node_with_the_grids_default_model(docker_seed, node):
    """A Go seed function must reach the AI node at AI_ENDPOINT too; a request naming no model, on a run naming
    none, gets the grid's default model."""
    result = run(docker_seed, upload(docker_seed, GO_HTTP, runtime="go"), {"prompt": "two words"})
    assert result["status"] == "SUCCESS", result
    assert result["result"] == {"status": 200, "answer": "[tiny] summary: two words"}
    assert result["llm_token_count"] == 2 + 4


def test_a_cpp_function_reaches_the_ai_node_with_the_runs_model(docker_seed, node):
    """A C++ seed function must reach the AI node at AI_ENDPOINT too (here over plain sockets)."""
    result = run(
        docker_seed, upload(docker_seed, CPP_SOCKETS, runtime="cpp"), {}, model="summarizer"
    )
    assert result["status"] == "SUCCESS", result
    assert result["result"]["response"] == "[summarizer] summary: one two"
    assert result["llm_token_count"] == 2 + 4


def test_a_function_with_ai_turned_off_is_told_why(ai_off_grid, node):
    """With AI turned off for seed uploads, a function's request must fail with a reason that says so (never a
    network error, never an answer), and nothing must reach the node."""
    with httpx.Client(
        base_url=ai_off_grid.url, headers={"x-api-key": str(ai_off_grid.api_key)}, timeout=120
    ) as client:
        before = len(node.requests)
        result = run(client, upload(client, WITH_AI_CLIENT), {"prompt": "a short text"})
        assert result["status"] == "FAILED"
        assert "AIError" in result["stderr"] and "this function may not use it" in result["stderr"]
        assert "seed_ai" in result["stderr"]
        summarizer = run(client, upload(client, SUMMARIZER), {"text": TEXT})
        assert summarizer["status"] == "FAILED" and summarizer["llm_token_count"] == 0
        assert len(node.requests) == before


def test_without_bubblewrap_the_forwarder_needs_its_secret_path(node, tmp_path):
    """Where a process sandbox shares the host's network (no bubblewrap), AI_ENDPOINT's port is on the host's
    loopback: without the endpoint's random path, no other process may spend the owner's tokens through it."""
    grid = start_grid(tmp_path, ai_endpoint=node.url, ai_model="tiny", bubblewrap="off")
    try:
        with httpx.Client(
            base_url=grid.url, headers={"x-api-key": str(grid.api_key)}, timeout=120
        ) as client:
            result = run(client, upload(client, GUESSING), {})
    finally:
        grid.stop()
    assert result["status"] == "SUCCESS", result
    assert result["result"]["answer"] == "[tiny] summary: hi"
    assert result["result"]["guess"] == 404
    assert len(result["result"]["endpoint"].rsplit("/", 1)[1]) == 32
