"""What the dashboard's deploy, update, test-run and delete forms do, kept out of its pages (dashboard/functions.py).

Every change goes through the same core as the API: ``jobs.deploy`` checks and stores a package (and refuses what
``POST /v1/upload`` refuses), ``jobs.submit`` queues a test call. A form only turns its fields into an upload.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass
from typing import Any

import cloudpickle

from nanogrid_backend.controller import jobs
from nanogrid_backend.grid import Grid
from nanogrid_backend.models import ApiKey, FunctionRecord, JobRecord
from nanogrid_backend.package_checks import PackageError
from nanogrid_contract.environments import VARIABLE, environment_id
from nanogrid_contract.packages import build_zip

SECRET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
MAX_EDITOR_CHARS = 1 << 20


@dataclass(frozen=True)
class Starter:
    """A runtime's editor template: the source file the editor's text becomes, and its handler."""

    language: str
    filename: str
    handler: str
    code: str


STARTERS = {
    "python": Starter(
        "python",
        "main.py",
        "main.handler",
        '''def handler(event, context):
    """event: the call's JSON input; what it returns is the call's result."""
    name = event.get("name", "world")
    print(f"saying hello to {name}")
    return {"statusCode": 200, "body": f"Hello, {name}!"}
''',
    ),
    "nodejs": Starter(
        "nodejs",
        "index.js",
        "index.handler",
        """exports.handler = async (event, context) => {
    const name = event.name || "world";
    console.log(`saying hello to ${name}`);
    return { statusCode: 200, body: `Hello, ${name}!` };
};
""",
    ),
    "go": Starter(
        "go",
        "main.go",
        "main.Handler",
        """package main

import "fmt"

type Response struct {
    StatusCode int    `json:"statusCode"`
    Body       string `json:"body"`
}

func Handler(event map[string]interface{}) (Response, error) {
    name, ok := event["name"].(string)
    if !ok {
        name = "world"
    }
    fmt.Println("saying hello to", name)
    return Response{StatusCode: 200, Body: "Hello, " + name + "!"}, nil
}
""",
    ),
    "cpp": Starter(
        "cpp",
        "main.cpp",
        "main.handler",
        """#include <iostream>

extern "C" {
    const char* handler(const char* event) {
        std::cout << "got " << event << std::endl;
        return "{\\"statusCode\\": 200, \\"body\\": \\"Hello from C++!\\"}";
    }
}
""",
    ),
}


def starter_for(runtime: str) -> Starter:
    """The template of a grid runtime (``python3.11`` is python)."""
    return (
        STARTERS["python"]
        if runtime.startswith("python")
        else STARTERS.get(runtime, STARTERS["python"])
    )


def parse_env(text: str) -> dict[str, str]:
    """``NAME=value`` lines (blank lines and ``#`` comments skipped) as environment variables."""
    found = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, equals, value = line.partition("=")
        name = name.strip()
        if not equals or not VARIABLE.match(name):
            raise PackageError(
                f"environment variables, line {number}: write NAME=value with NAME made of letters, "
                f"digits and _ (not {line[:40]!r})"
            )
        found[name] = value.strip()
    return found


def parse_secrets(text: str) -> list[str]:
    """Secret names, separated by commas or spaces (the secrets themselves are set on the Secrets API)."""
    names = [n for n in re.split(r"[\s,]+", text.strip()) if n]
    for name in names:
        if not SECRET_NAME.match(name):
            raise PackageError(
                f"secret names are letters, digits, _ . and - (at most 64), not {name[:40]!r}"
            )
    return names


def upload_of(
    runtime: str, code: str, filename: str, data: bytes, handler: str
) -> tuple[str, bytes, str]:
    """(file name, bytes, handler) for ``jobs.deploy``: an uploaded zip as it is, an uploaded source file under its
    own name, else the editor's text as the runtime's source file."""
    starter = starter_for(runtime)
    entry = starter.handler.rsplit(".", 1)[1]
    if data:
        if data[:4] == b"PK\x03\x04" or filename.endswith(".zip"):
            return "package.zip", data, handler
        name = filename.rsplit("/", 1)[-1] or starter.filename
        if name.endswith(".py"):
            return name, data, handler or f"{name.rsplit('.', 1)[0]}.{entry}"
        return (
            "package.zip",
            build_zip({name: data}),
            handler or f"{name.rsplit('.', 1)[0]}.{entry}",
        )
    if not code.strip():
        raise PackageError("nothing to deploy: write code in the editor or choose a file")
    if len(code) > MAX_EDITOR_CHARS:
        raise PackageError(
            f"the editor holds {len(code)} characters; upload a zip above {MAX_EDITOR_CHARS}", 413
        )
    return "package.zip", build_zip({starter.filename: code.encode()}), handler or starter.handler


def deploy(
    grid: Grid, key: ApiKey, fields: dict[str, str], filename: str, data: bytes
) -> FunctionRecord:
    """The deploy form: checked and stored by ``jobs.deploy``, as ``POST /v1/upload`` does."""
    runtime = fields.get("runtime", "")
    name, package, handler = upload_of(
        runtime, fields.get("code", ""), filename, data, fields.get("handler", "")
    )
    form: dict[str, Any] = {
        "name": fields.get("name", "").strip(),
        "runtime": runtime,
        "handler": handler,
        "memory": fields.get("memory") or None,
        "timeout": fields.get("timeout") or None,
        "description": fields.get("description", "").strip(),
    }
    if not form["name"]:
        raise PackageError("give the function a name (letters, digits, _ . -)")
    env, secrets = parse_env(fields.get("env", "")), parse_secrets(fields.get("secrets", ""))
    if env:
        form["env"] = env
    if secrets:
        form["secrets"] = secrets
    record, _ = jobs.deploy(grid, key, name, package, form)
    return record


def manifest_of(grid: Grid, function: FunctionRecord) -> dict[str, Any]:
    with zipfile.ZipFile(io.BytesIO(grid.store.get_package(function.function_id))) as zf:
        return json.loads(zf.read("manifest.json"))


def new_version(
    grid: Grid, key: ApiKey, function: FunctionRecord, memory: str, description: str
) -> FunctionRecord:
    """The same package with another memory size or description, deployed as a new version (ids are content
    hashes); the old version keeps its history."""
    with zipfile.ZipFile(io.BytesIO(grid.store.get_package(function.function_id))) as zf:
        files = {name: zf.read(name) for name in zf.namelist()}
    manifest = json.loads(files["manifest.json"])
    if memory.strip():
        try:
            manifest["memory"] = int(memory)
        except ValueError:
            raise PackageError(f"memory is a whole number of MiB, not {memory[:20]!r}") from None
    manifest["description"] = description.strip()[:1000]
    if function.stable_id:
        manifest["stable_id"] = function.stable_id
    files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    record, _ = jobs.deploy(grid, key, "package.zip", build_zip(files), {})
    return record


def environment_of(manifest: dict[str, Any]) -> str | None:
    """The environment id a package asks for; None for the plain runtime."""
    spec = manifest.get("environment")
    return environment_id(spec) if spec else None


def test_call(grid: Grid, key: ApiKey, function: FunctionRecord, text: str) -> JobRecord:
    """Queue one call with the form's JSON input (an event, or a Python function's argument list)."""
    try:
        value = json.loads(text or "{}")
    except ValueError as exc:
        raise jobs.BadRequest(f"the input is not JSON: {exc}") from None
    if function.kind == "pickle":
        if not isinstance(value, list):
            raise jobs.BadRequest("a Python function takes a JSON list of arguments, e.g. [1, 2]")
        payloads = [("pickle", cloudpickle.dumps((tuple(value), {})))]
    else:
        payloads = jobs.encode_payloads(function, [value], None, jobs.inline_cap(grid.config))
    (job,) = jobs.new_jobs(function, payloads, key.name)
    jobs.submit(grid, function, [job], None, key.max_timeout_s)
    return job


def delete(grid: Grid, versions: list[FunctionRecord]) -> None:
    """Delete every version, as ``DELETE /v1/functions/{id}`` does each: the record, then the package."""
    for version in versions:
        grid.registry.delete_function(version.function_id)
        grid.store.delete_package(version.function_id)
