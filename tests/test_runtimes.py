"""Node.js, Go and C++ functions (nanogrid_runtimes/node, go, cpp) on the embedded grid with Docker sandboxes,
through the seed platform's routes (``POST /upload`` with ``x-runtime``, ``POST /run``) and through ``/v1``.

What must never happen: a seed UI template that does not run as its users wrote it; a call that breaks its memory
limit or timeout and keeps running, or fails without saying why; a print that corrupts the channel; an output file
that does not come back; a compile error that looks like anything but a compile error; a grid that accepts a
runtime it cannot run.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from nanogrid_backend.embedded import EmbeddedGrid
from tests.conftest import ROOT, require, require_docker, start_grid

pytestmark = pytest.mark.integration

# The seed UI's templates (deploy/page.tsx), exactly as its editor gives them to users.
NODE_TEMPLATE = r"""exports.handler = async (event, context) => {
    /**
     * FaaS Function Handler
     *
     * @param {Object} event - Input event data
     * @param {Object} context - Execution context
     * @returns {Object} Response data
     */
    return {
        statusCode: 200,
        body: 'Hello from FaaS!'
    };
};

if (require.main === module) {
    const payload = process.env.PAYLOAD ? JSON.parse(process.env.PAYLOAD) : {};
    exports.handler(payload, {})
        .then(res => console.log(JSON.stringify(res)))
        .catch(err => console.error(err));
}"""
CPP_TEMPLATE = r"""#include <iostream>
#include <string>
#include <cstdlib>

extern "C" {
    const char* handler(const char* event) {
        // FaaS Function Handler
        return "{\"statusCode\": 200, \"body\": \"Hello from FaaS!\"}";
    }
}

int main() {
    const char* env_payload = std::getenv("PAYLOAD");
    std::string event = env_payload ? env_payload : "{}";
    std::cout << handler(event.c_str()) << std::endl;
    return 0;
}"""
GO_TEMPLATE = r"""package main

import (
    "encoding/json"
    "fmt"
    "os"
)

type Response struct {
    StatusCode int    `json:"statusCode"`
    Body       string `json:"body"`
}

func Handler(event map[string]interface{}) (Response, error) {
    // FaaS Function Handler
    return Response{
        StatusCode: 200,
        Body:       "Hello from FaaS!",
    }, nil
}

func main() {
    payload := os.Getenv("PAYLOAD")
    var event map[string]interface{}
    if payload != "" {
        json.Unmarshal([]byte(payload), &event)
    }

    res, _ := Handler(event)
    output, _ := json.Marshal(res)
    fmt.Println(string(output))
}"""
TEMPLATE_RESULT = {"statusCode": 200, "body": "Hello from FaaS!"}

# Per runtime: the seed's x-runtime, the file its UI zips the editor into, the handler /v1 names, build.py's name.
RUNTIMES = {
    "nodejs": {
        "file": "index.js",
        "handler": "index.handler",
        "build": "node",
        "template": NODE_TEMPLATE,
    },
    "go": {"file": "main.go", "handler": "main.Handler", "build": "go", "template": GO_TEMPLATE},
    "cpp": {
        "file": "main.cpp",
        "handler": "main.handler",
        "build": "cpp",
        "template": CPP_TEMPLATE,
    },
}

# A function that prints, writes an output file named after the event, and returns what it saw.
PRINTS_AND_WRITES = {
    "nodejs": r"""const fs = require('fs');
exports.handler = async (event, context) => {
    console.log('hello from node', event.name);
    console.error('a warning');
    fs.writeFileSync(`${process.env.OUTPUT_DIR}/report.txt`, `report for ${event.name}`);
    return {name: event.name, job: context.request_id === process.env.JOB_ID};
};""",
    "go": r"""package main

import (
    "fmt"
    "os"
)

func Handler(event map[string]interface{}, context map[string]interface{}) (map[string]interface{}, error) {
    fmt.Println("hello from go", event["name"])
    fmt.Fprintln(os.Stderr, "a warning")
    os.WriteFile(os.Getenv("OUTPUT_DIR")+"/report.txt", []byte(fmt.Sprint("report for ", event["name"])), 0o644)
    return map[string]interface{}{"name": event["name"], "job": context["request_id"] == os.Getenv("JOB_ID")}, nil
}

func main() {}
""",
    "cpp": r"""#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>

static std::string reply;  // lives past the call: the runtime reads the returned text after handler returns

extern "C" const char* handler(const char* event) {
    std::string text(event);  // {"name": "Ada"}
    size_t start = text.find('"', text.find(':')) + 1;
    std::string name = text.substr(start, text.find('"', start) - start);
    std::cout << "hello from cpp " << name << std::endl;
    std::cerr << "a warning" << std::endl;
    std::ofstream(std::string(std::getenv("OUTPUT_DIR")) + "/report.txt") << "report for " << name;
    reply = "{\"name\": \"" + name + "\", \"job\": " + (std::getenv("JOB_ID") ? "true" : "false") + "}";
    return reply.c_str();
}
""",
}

# A function that fills a gibibyte of memory, touching every page.
ALLOCATES_1_GIB = {
    "nodejs": "exports.handler = async () => { const kept = []; "
    "for (let i = 0; i < 64; i++) kept.push(Buffer.alloc(16 << 20, 1)); return kept.length; };",
    "go": "package main\n\nvar kept []byte\n\nfunc Handler(event map[string]interface{}) (int, error) {\n"
    "    kept = make([]byte, 1<<30)\n    for i := range kept {\n        kept[i] = 1\n    }\n"
    "    return len(kept), nil\n}\n",
    "cpp": "#include <cstring>\n#include <string>\nstatic std::string reply;\n"
    'extern "C" const char* handler(const char*) {\n    char* kept = new char[1 << 30];\n'
    "    std::memset(kept, 1, 1 << 30);\n    reply = std::to_string(int(kept[12345]));\n"
    "    return reply.c_str();\n}\n",
}

# A function that runs past any timeout.
SLEEPS = {
    "nodejs": "exports.handler = async () => { await new Promise(r => setTimeout(r, 60000)); return 'late'; };",
    "go": 'package main\n\nimport "time"\n\nfunc Handler(event map[string]interface{}) (string, error) {\n'
    '    time.Sleep(60 * time.Second)\n    return "late", nil\n}\n',
    "cpp": '#include <chrono>\n#include <thread>\nextern "C" const char* handler(const char*) {\n'
    '    std::this_thread::sleep_for(std::chrono::seconds(60));\n    return "\\"late\\"";\n}\n',
}

# A function that fails: an exception, a returned error, a thrown C++ exception.
FAILS = {
    "nodejs": (
        "exports.handler = async (event) => { throw new RangeError('bad input ' + event.n); };",
        "RangeError",
        "bad input 7",
    ),
    "go": (
        'package main\n\nimport "fmt"\n\nfunc Handler(event map[string]interface{}) (string, error) {\n'
        '    return "", fmt.Errorf("bad input %v", event["n"])\n}\n',
        "*errors.errorString",
        "bad input 7",
    ),
    "cpp": (
        '#include <stdexcept>\nextern "C" const char* handler(const char*) {\n'
        '    throw std::invalid_argument("bad input 7");\n}\n',
        "std::invalid_argument",
        "bad input 7",
    ),
}

# Code that does not compile (or, for Node.js, load): what the compiler says must reach the caller.
BROKEN = {
    "nodejs": ("exports.handler = async (event) => { return {; };", "SyntaxError"),
    "go": (
        "package main\n\nfunc Handler(event map[string]interface{}) (string, error) {\n"
        "    return undefinedThing, nil\n}\n",
        "undefined: undefinedThing",
    ),
    "cpp": (
        'extern "C" const char* handler(const char*) {\n    return undefined_thing;\n}\n',
        "'undefined_thing' was not declared",
    ),
}


def zipped(name: str, source: str) -> bytes:
    """What the seed UI sends: the editor's code, zipped under the runtime's file name."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(name, source)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedGrid]:
    """A grid with Docker sandboxes that serves every language: the images are built first (CI builds them in
    .ci/run; here build.py skips what is up to date), so the grid finds them when it starts."""
    require_docker()
    for spec in RUNTIMES.values():
        build = subprocess.run(
            [
                sys.executable,
                str(ROOT / "nanogrid_runtimes" / "build.py"),
                "--runtime",
                spec["build"],
            ],
            capture_output=True,
            text=True,
        )
        require(
            build.returncode == 0,
            f"nanogrid_runtimes/build.py --runtime {spec['build']} failed: {build.stderr.strip()}",
        )
    embedded = start_grid(
        tmp_path_factory.mktemp("runtimes-grid"), sandbox="docker", kill_grace_s=0.5
    )
    yield embedded
    embedded.stop()


@pytest.fixture(scope="module")
def http(grid: EmbeddedGrid) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=grid.url, headers={"x-api-key": grid.api_key}, timeout=180
    ) as client:
        yield client


def seed_deploy(http: httpx.Client, runtime: str, source: str, memory: int = 256) -> str:
    response = http.post(
        "/upload",
        headers={
            "x-runtime": runtime,
            "x-memory-mb": str(memory),
            "x-function-name": f"{runtime}-fn",
        },
        files={
            "file": ("function.zip", zipped(RUNTIMES[runtime]["file"], source), "application/zip")
        },
        data={"envVars": json.dumps({"GREETING": "hi"})},
    )
    assert response.status_code == 200, response.text
    return response.json()["functionId"]


def v1_deploy(
    http: httpx.Client, runtime: str, source: str, *, memory: int = 256, timeout: float = 60
) -> str:
    spec = RUNTIMES[runtime]
    response = http.post(
        "/v1/upload",
        files={"file": ("package.zip", zipped(spec["file"], source), "application/zip")},
        data={
            "function_name": f"{runtime}-v1",
            "runtime": runtime,
            "handler": spec["handler"],
            "memory": str(memory),
            "timeout": str(timeout),
        },
    )
    assert response.status_code in (200, 201), response.text
    return response.json()["function_id"]


def v1_run(http: httpx.Client, function_id: str, payload: Any) -> dict[str, Any]:
    response = http.post("/v1/run", json={"function_id": function_id, "payload": payload})
    assert response.status_code == 200, response.text
    return response.json()


def test_health_lists_every_runtime_whose_image_is_built(http: httpx.Client) -> None:
    """A runtime with an image is served; /v1/health says so, with its language version."""
    runtimes = http.get("/v1/health").json()["runtimes"]
    assert {"nodejs", "go", "cpp"} <= set(runtimes)
    assert (
        runtimes["nodejs"].isdigit()
        and runtimes["go"].startswith("1.")
        and runtimes["cpp"].isdigit()
    )


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_the_seed_ui_template_runs_through_the_seed_routes(
    http: httpx.Client, runtime: str
) -> None:
    """The UI's template, deployed and invoked as the UI does it (sync, then async and polled), answers as the seed
    did: SUCCESS, exit code 0, the handler's JSON on stdout, peak memory measured."""
    function_id = seed_deploy(http, runtime, RUNTIMES[runtime]["template"])
    done = http.post(
        "/run", json={"functionId": function_id, "inputData": {"message": "Hello FaaS"}}
    ).json()
    assert done["status"] == "SUCCESS", done
    assert done["exitCode"] == 0 and done["result"] == TEMPLATE_RESULT
    assert json.loads(done["stdout"].strip().splitlines()[-1]) == TEMPLATE_RESULT
    assert done["peakMemoryBytes"] > 0
    accepted = http.post(
        "/run", json={"functionId": function_id, "inputData": {}}, headers={"x-async": "true"}
    )
    assert accepted.status_code == 202 and accepted.json()["status"] == "ACCEPTED"
    for _ in range(600):
        polled = http.get(f"/api/status/{accepted.json()['jobId']}").json()
        if polled["status"] != "pending":
            break
    assert polled["status"] == "SUCCESS" and polled["result"] == TEMPLATE_RESULT


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_the_template_runs_through_v1_and_stays_warm(http: httpx.Client, runtime: str) -> None:
    """Through /v1 the same template gives the same value; the second call reuses the sandbox (compiled once)."""
    function_id = v1_deploy(http, runtime, RUNTIMES[runtime]["template"])
    first = v1_run(http, function_id, {"name": "v1"})
    second = v1_run(http, function_id, {"name": "again"})
    assert first["status"] == second["status"] == "completed", (first, second)
    assert first["result"] == second["result"] == TEMPLATE_RESULT
    assert first["cold"] is True and second["cold"] is False
    assert first["sandbox_id"] == second["sandbox_id"]


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_prints_and_output_files_come_back(http: httpx.Client, runtime: str) -> None:
    """What the function prints is its stdout and stderr (never mixed into the result channel), and the file it
    writes to OUTPUT_DIR comes back as an output file."""
    function_id = v1_deploy(http, runtime, PRINTS_AND_WRITES[runtime])
    job = v1_run(http, function_id, {"name": "Ada"})
    assert job["status"] == "completed", job["error"]
    assert job["result"] == {"name": "Ada", "job": True}
    assert f"hello from {'node' if runtime == 'nodejs' else runtime} Ada" in job["stdout"]
    assert "a warning" in job["stderr"]
    assert [f["name"] for f in job["output_files"]] == ["report.txt"]
    assert http.get(job["output_files"][0]["url"]).content == b"report for Ada"
    again = v1_run(
        http, function_id, {"name": "Bob"}
    )  # a warm call: only its own output and its own file
    assert "Ada" not in again["stdout"] and "hello from" in again["stdout"]
    assert http.get(again["output_files"][0]["url"]).content == b"report for Bob"


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_the_memory_limit_stops_the_call_with_a_clear_error(
    http: httpx.Client, runtime: str
) -> None:
    """A gibibyte in a 256 MiB function: the call fails as out of memory, naming the limit, and the next call of
    the same function runs in a fresh sandbox."""
    function_id = v1_deploy(http, runtime, ALLOCATES_1_GIB[runtime], memory=256)
    job = v1_run(http, function_id, {})
    assert job["status"] == "failed", job
    assert job["error"]["kind"] == "memory", job["error"]
    assert "out of memory (limit 256 MiB" in job["error"]["message"]
    seed = http.post("/run", json={"functionId": function_id, "inputData": {}}).json()
    assert seed["status"] == "FAILED" and seed["exitCode"] == 137


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_the_timeout_stops_the_call(http: httpx.Client, runtime: str) -> None:
    """A call that sleeps past its 2 s timeout is stopped and reported as a timeout, never left running."""
    function_id = v1_deploy(http, runtime, SLEEPS[runtime], timeout=2)
    job = v1_run(http, function_id, {})
    assert job["status"] == "failed", job
    assert job["error"]["kind"] == "timeout" and "timed out after 2 s" in job["error"]["message"]
    assert job["finished_at"] - job["started_at"] < 30


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_a_failing_handler_reports_its_exception(http: httpx.Client, runtime: str) -> None:
    """A thrown exception (or a Go error) fails the call with its type and message; the seed sees FAILED, exit 1."""
    source, kind, message = FAILS[runtime]
    function_id = v1_deploy(http, runtime, source)
    job = v1_run(http, function_id, {"n": 7})
    assert job["status"] == "failed", job
    assert job["error"]["type"] == kind and job["error"]["message"] == message, job["error"]
    seed = http.post("/run", json={"functionId": function_id, "inputData": {"n": 7}}).json()
    assert seed["status"] == "FAILED" and seed["exitCode"] == 1 and message in seed["stderr"]


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_code_that_does_not_compile_is_a_clear_load_error(http: httpx.Client, runtime: str) -> None:
    """Go and C++ are compiled in the sandbox when the function loads (Node.js is parsed): the compiler's own
    words reach the caller as a load error."""
    source, said = BROKEN[runtime]
    function_id = v1_deploy(http, runtime, source)
    job = v1_run(http, function_id, {})
    assert job["status"] == "failed", job
    assert job["error"]["kind"] == "load" and said in job["error"]["message"], job["error"]


def test_a_seed_update_of_a_nodejs_function_keeps_its_runtime(http: httpx.Client) -> None:
    """PUT /functions/:id with a lone source file: the new code is index.js under the same id, still Node.js."""
    function_id = seed_deploy(http, "nodejs", NODE_TEMPLATE)
    updated = http.put(
        f"/functions/{function_id}",
        files={"file": ("index.js", b"exports.handler = async (e) => 'v2';")},
    )
    assert updated.status_code == 200 and updated.json()["functionId"] == function_id
    done = http.post("/run", json={"functionId": function_id, "inputData": {}}).json()
    assert done["status"] == "SUCCESS" and done["result"] == "v2"
    assert http.get(f"/functions/{function_id}").json()["runtime"] == "nodejs"


def test_a_program_without_a_handler_runs_as_the_seed_ran_it(http: httpx.Client) -> None:
    """A Go main that reads PAYLOAD and prints JSON (the seed's convention) runs once per call; its last line is the
    result and the rest its output."""
    source = (
        'package main\n\nimport (\n    "fmt"\n    "os"\n)\n\nfunc main() {\n    fmt.Println("working")\n'
        '    fmt.Printf("{\\"payload\\": %s}\\n", os.Getenv("PAYLOAD"))\n}\n'
    )
    function_id = v1_deploy(http, "go", source)
    job = v1_run(http, function_id, {"k": 1})
    assert job["status"] == "completed", job["error"]
    assert job["result"] == {"payload": {"k": 1}} and job["stdout"] == "working\n"


def test_a_process_sandbox_grid_refuses_the_other_languages(tmp_path: Path) -> None:
    """Where sandboxes are processes, Node.js, Go and C++ are refused at upload, saying which runtimes there are."""
    embedded = start_grid(tmp_path / "process-grid", sandbox="process")
    try:
        with httpx.Client(
            base_url=embedded.url, headers={"x-api-key": embedded.api_key}, timeout=60
        ) as http:
            response = http.post(
                "/upload",
                headers={"x-runtime": "go", "x-memory-mb": "128"},
                files={"file": ("function.zip", zipped("main.go", GO_TEMPLATE), "application/zip")},
            )
            assert response.status_code == 400
            assert "runtime go is not installed on this grid" in response.json()["error"]
            response = http.post(
                "/v1/upload",
                files={"file": ("p.zip", zipped("index.js", NODE_TEMPLATE))},
                data={"function_name": "n", "runtime": "nodejs", "handler": "index.handler"},
            )
            assert response.status_code == 422 and "unknown runtime 'nodejs'" in response.text
    finally:
        embedded.stop()
