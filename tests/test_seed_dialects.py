"""Both seed dialects on one grid: seed 004's snake_case scripts and demo functions, extracted verbatim into
tests/seed_004/ (``test_e2e.sh``, ``hello.py``, ``image_processor.py``), next to the camelCase contract of
controller.js v2.8; the seed's runtime names; its function ids on NanoGrid's own ``/v1`` routes; ``/output``.

What must never happen: a seed script that reads ``null`` where its dialect promised a field, a camelCase client
answered in snake_case (or the other way round), a job polled in another dialect than it was submitted in, a grid
that serves keyless requests without ``--open`` or on an address other machines reach, a seed function that cannot
write to ``/output``, a seed function id that ``/v1`` says does not exist.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nanogrid.errors import ConfigError
from nanogrid_backend.config import GridConfig
from nanogrid_backend.embedded import EmbeddedGrid
from nanogrid_backend.package_checks import PackageError, seed_runtime
from tests.conftest import require, require_docker, start_grid

SEED_004 = (
    Path(__file__).parent / "seed_004"
)  # the seed document's files, as it prints them (.py kept as .txt)
ALB_DNS = "nanogrid-alb-xxx.ap-northeast-2.elb.amazonaws.com"  # test_e2e.sh's own, unchanged
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def seed_file(name: str) -> bytes:
    return (SEED_004 / (name if name.endswith(".sh") else name + ".txt")).read_bytes()


# the seed's runtime names (no grid needed)


def test_seed_runtime_names_map_to_the_grids_runtimes() -> None:
    """A seed runtime name must never be refused when the grid runs its language, nor silently run elsewhere."""
    runtimes = {
        "python3.11": "3.11",
        "python3.13": "3.13",
        "nodejs": "18",
        "go": "1.19",
        "cpp": "12",
    }
    assert seed_runtime("python3.11", runtimes) == ("python3.11", None)
    runtime, warning = seed_runtime("python3.9", runtimes)
    assert (
        runtime == "python3.11" and warning and "python3.9" in warning and "python3.11" in warning
    )
    assert seed_runtime("python3.12", runtimes)[0] == "python3.13"  # equally near: the newer one
    assert seed_runtime("nodejs18.x", runtimes) == ("nodejs", None)
    assert seed_runtime("go1.x", runtimes) == ("go", None)
    assert seed_runtime("cpp17", runtimes) == ("cpp", None)
    for name, why in (("ruby2.7", "Invalid runtime"), ("go1.x", "not installed")):
        with pytest.raises(PackageError, match=why) as raised:
            seed_runtime(name, {"python3.11": "3.11"})
        assert raised.value.status == 400


def test_open_grid_is_refused_on_an_address_other_machines_reach(tmp_path: Path) -> None:
    """``--open`` must never serve keyless requests on a non-loopback address."""
    with pytest.raises(ConfigError, match="loopback"):
        GridConfig.load(data_dir=tmp_path, host="0.0.0.0", open_access=True)
    assert GridConfig.load(data_dir=tmp_path, host="::1", open_access=True).open_access


# seed 004 against a grid started with --open


@pytest.fixture(scope="module")
def open_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedGrid]:
    require_docker()
    embedded = start_grid(
        tmp_path_factory.mktemp("open-grid"), sandbox="docker", kill_grace_s=0.5, open_access=True
    )
    yield embedded
    embedded.stop()


@pytest.fixture(scope="module")
def keyless(open_grid: EmbeddedGrid) -> Iterator[httpx.Client]:
    """A client as seed 004's scripts make one: no key at all."""
    with httpx.Client(base_url=open_grid.url, timeout=120) as client:
        yield client


def upload_snake(client: httpx.Client, name: str, runtime: str = "python3.9") -> dict:
    module = name.removesuffix(".py")
    response = client.post(
        "/upload",
        files={"file": (name, seed_file(name))},
        data={"function_name": module, "runtime": runtime, "handler": f"{module}.handler"},
    )
    assert response.status_code == 201, response.text
    return response.json()


@pytest.mark.integration
def test_seed_004_e2e_script_passes_unchanged(open_grid: EmbeddedGrid, tmp_path: Path) -> None:
    """Seed 004's test_e2e.sh, byte for byte, must never read null where it expects a function or job id."""
    for tool in ("bash", "curl", "jq"):
        require(shutil.which(tool) is not None, f"{tool} is not installed (apt-get install {tool})")
    (tmp_path / "test_e2e.sh").write_bytes(seed_file("test_e2e.sh"))
    (tmp_path / "hello.py").write_bytes(seed_file("hello.py"))
    port = open_grid.url.rsplit(":", 1)[1]
    # The script's ALB name, reached on this grid: curl's own configuration, the script untouched.
    (tmp_path / ".curlrc").write_text(f"connect-to = {ALB_DNS}:80:127.0.0.1:{port}\n")
    env = {**os.environ, "HOME": str(tmp_path), "CURL_HOME": str(tmp_path)}
    done = subprocess.run(
        ["bash", "test_e2e.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "=== Test Complete ===" in out
    function_id = re.search(rf'"function_id": "({UUID})"', out)
    assert function_id, out
    assert '"body": "Hello, Test!"' in out  # the sync run, PAYLOAD {"name": "Test"}
    assert re.search(rf'"job_id": "job-{UUID}",\s*"status": "pending"', out), (
        out
    )  # the async answer
    assert '"body": "Hello, World!"' in out and out.count('"status": "completed"') == 2, (
        out
    )  # the polled status
    assert "null" not in out.split("[3/5]")[1], out


@pytest.mark.integration
def test_image_processor_writes_to_output_and_gets_links(keyless: httpx.Client) -> None:
    """A seed function writing /output/resized.png must never fail, nor lose the file."""
    from PIL import Image

    function_id = upload_snake(keyless, "image_processor.py")["function_id"]
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, format="PNG")
    payload = {
        "image_base64": base64.b64encode(buffer.getvalue()).decode(),
        "width": 100,
        "height": 100,
    }
    answer = keyless.post("/run", json={"function_id": function_id, "payload": payload}).json()
    assert answer["status"] == "completed", answer
    assert answer["result"]["new_size"] == [100, 100] and answer["result"]["original_size"] == [
        64,
        48,
    ]
    (link,) = answer["output_files"]
    assert "/resized.png?" in link
    image = Image.open(
        io.BytesIO(httpx.get(link, timeout=30).raise_for_status().content)
    )  # signed: no key
    assert image.size == (100, 100)


@pytest.mark.integration
def test_output_dir_tmpdir_and_python_memory_up_to_10240(keyless: httpx.Client) -> None:
    """/output must never be missing or differ from OUTPUT_DIR, TMPDIR never unset, 10240 MiB never refused."""
    source = (
        "import os\n\ndef handler(event, context):\n"
        "    open('/output/probe.txt', 'w').write('x')\n"
        "    return {'same': os.path.samefile('/output', os.environ['OUTPUT_DIR']),\n"
        "            'tmpdir': os.environ.get('TMPDIR'), 'writable': os.access(os.environ['TMPDIR'], os.W_OK)}\n"
    )
    response = keyless.post(
        "/upload",
        headers={"x-runtime": "python", "x-memory-mb": "10240"},
        files={"file": ("main.py", source.encode())},
    )
    assert response.status_code == 200, response.text
    answer = keyless.post("/run", json={"functionId": response.json()["functionId"]}).json()
    assert answer["status"] == "SUCCESS", answer
    assert answer["result"] == {"same": True, "tmpdir": "/tmp", "writable": True}
    assert answer["outputFiles"] == ["probe.txt"] and answer["allocatedMemoryMb"] == 10240


@pytest.mark.integration
def test_each_dialect_is_answered_in_its_own_shape(keyless: httpx.Client) -> None:
    """A camelCase client must never get snake_case (nor the reverse), in /run and in /status of its own jobs."""
    snake = upload_snake(keyless, "hello.py")
    assert (
        set(snake) >= {"function_id", "function_name", "s3_key", "created_at"}
        and "success" not in snake
    )
    camel = keyless.post(
        "/upload",
        headers={"x-runtime": "python"},
        files={"file": ("hello.py", seed_file("hello.py"))},
    )
    assert camel.status_code == 200 and set(camel.json()) == {"success", "functionId"}
    # the snake function called in camelCase, and the camel one in snake_case: the request decides
    camel_run = keyless.post(
        "/run", json={"functionId": snake["function_id"], "inputData": {"name": "A"}}
    ).json()
    assert (
        camel_run["status"] == "SUCCESS"
        and camel_run["result"]["body"] == "Hello, A!"
        and "job_id" not in camel_run
    )
    snake_run = keyless.post(
        "/run", json={"function_id": camel.json()["functionId"], "payload": {"name": "B"}}
    ).json()
    assert snake_run["status"] == "completed" and snake_run["result"]["body"] == "Hello, B!"
    assert (
        set(snake_run) >= {"job_id", "result", "output_files", "execution_time_ms"}
        and "jobId" not in snake_run
    )
    # async: each job polled in the dialect it was submitted in
    queued = keyless.post(
        "/run", headers={"x-async": "true"}, json={"function_id": snake["function_id"]}
    )
    assert queued.status_code == 202 and queued.json()["status"] == "pending"
    accepted = keyless.post(
        "/api/run", headers={"x-async": "true"}, json={"functionId": snake["function_id"]}
    )
    assert accepted.status_code == 202 and accepted.json()["status"] == "ACCEPTED"
    for _ in range(600):
        polled = keyless.get(f"/status/{queued.json()['job_id']}").json()
        if polled["status"] not in ("pending", "running"):
            break
    assert polled["status"] == "completed" and polled["result"]["body"] == "Hello, World!", polled
    for _ in range(600):
        camel_polled = keyless.get(f"/api/status/{accepted.json()['jobId']}").json()
        if camel_polled["status"] != "pending":
            break
    assert camel_polled["status"] == "SUCCESS" and "job_id" not in camel_polled
    unknown = keyless.get("/status/job-00000000-0000-0000-0000-000000000000").json()
    assert unknown == {"job_id": "job-00000000-0000-0000-0000-000000000000", "status": "pending"}


@pytest.mark.integration
def test_seed_runtime_names_and_a_version_warning(keyless: httpx.Client) -> None:
    """python3.9 must never be refused on a grid with another Python, nor run there without saying so."""
    response = keyless.post(
        "/upload",
        files={"file": ("hello.py", seed_file("hello.py"))},
        data={"function_name": "hello", "runtime": "python3.9", "handler": "hello.handler"},
    )
    assert response.status_code == 201
    assert "python3.9 runs on python3." in response.headers["warning"]
    refused = keyless.post(
        "/upload",
        files={"file": ("hello.py", seed_file("hello.py"))},
        data={"function_name": "hello", "runtime": "ruby2.7", "handler": "hello.handler"},
    )
    assert refused.status_code == 400 and "Invalid runtime" in refused.json()["error"]
    late = keyless.post(
        "/upload",
        files={"file": ("hello.py", seed_file("hello.py"))},
        data={
            "function_name": "hello",
            "runtime": "python3.11",
            "handler": "hello.handler",
            "timeout": "forever",
        },
    )
    assert late.status_code == 400 and "timeout" in late.json()["error"]


@pytest.mark.integration
def test_seed_function_id_works_on_v1_routes(keyless: httpx.Client) -> None:
    """A seed function's uuid must never be unknown to /v1: views, history, windows, autotune, loadtests, runs."""
    seed_id = upload_snake(keyless, "hello.py")["function_id"]
    ran = keyless.post("/run", json={"function_id": seed_id, "payload": {"name": "v1"}}).json()
    assert ran["status"] == "completed"
    view = keyless.get(f"/v1/functions/{seed_id}").raise_for_status().json()
    assert view["stable_id"] == seed_id and view["function_id"].startswith("fn-")
    for route in ("history", "windows", "autotune"):
        assert keyless.get(f"/v1/functions/{seed_id}/{route}").status_code == 200, route
    history = keyless.get(f"/v1/functions/{seed_id}/history").json()
    assert [call["job_id"] for call in history["items"]] == [ran["job_id"]]
    run = keyless.post(
        "/v1/run", json={"function_id": seed_id, "payload": {"name": "native"}}
    ).json()
    assert run["result"]["body"] == "Hello, native!"
    started = keyless.post(
        "/v1/loadtests", json={"function_id": seed_id, "rps": 2, "duration_s": 1}
    )
    assert started.status_code == 202 and started.json()["function_id"] == view["function_id"]
    assert keyless.get("/v1/functions/00000000-0000-0000-0000-000000000000").status_code == 404


@pytest.mark.integration
def test_keyless_requests_are_refused_without_open(docker_grid: EmbeddedGrid) -> None:
    """Without --open, a request without a key must never reach a function (seed or /v1 routes)."""
    for method, route in (
        ("post", "/upload"),
        ("post", "/run"),
        ("get", "/status/job-x"),
        ("get", "/v1/functions"),
    ):
        assert httpx.request(method, docker_grid.url + route, timeout=30).status_code == 401, route


def test_seed_004_files_are_the_documents_own() -> None:
    """The extracted files must never drift from what seed 004 prints (checked when the seed document is here)."""
    documents = (
        sorted(Path("/work/shared/seeds").glob("004_*.txt"))
        if Path("/work/shared/seeds").is_dir()
        else []
    )
    if not documents:
        pytest.skip("the seed documents are not on this machine")
    text = documents[0].read_text(encoding="utf-8")
    for name in ("hello.py", "summarizer.py", "image_processor.py", "test_e2e.sh"):
        block = re.search(r"\*\*" + re.escape(name) + r":\*\*\n```\w*\n(.*?)```", text, re.S)
        assert block is not None and block[1].encode() == seed_file(name), name


@pytest.mark.integration
def test_node_functions_write_to_output_too(keyless: httpx.Client) -> None:
    """A Node.js function writing /output must never fail, on its first call or the next (the mount is emptied,
    never removed)."""
    if "nodejs" not in keyless.get("/health").json()["runtimes"]:
        pytest.skip(
            "the Node.js runtime image is not built (nanogrid_runtimes/build.py --runtime node)"
        )
    source = (
        "const fs = require('fs');\n"
        "exports.handler = async (event) => { fs.writeFileSync('/output/n.txt', String(event.n));\n"
        "  return { same: fs.realpathSync(process.env.OUTPUT_DIR) === '/output', tmp: process.env.TMPDIR }; };\n"
    )
    response = keyless.post(
        "/upload",
        files={"file": ("index.js", source.encode())},
        data={"function_name": "writer", "runtime": "nodejs18.x", "handler": "index.handler"},
    )
    assert response.status_code == 201, response.text
    for n in (1, 2):
        answer = keyless.post(
            "/run", json={"function_id": response.json()["function_id"], "payload": {"n": n}}
        ).json()
        assert answer["status"] == "completed", answer
        assert answer["result"] == {"same": True, "tmp": "/tmp"}
        (link,) = answer["output_files"]
        assert httpx.get(link, timeout=30).text == str(n)


@pytest.mark.integration
def test_process_sandbox_has_output_too(grid: EmbeddedGrid) -> None:
    """With bubblewrap, a seed function in the process sandbox must never find /output missing, and the root
    must stay read-only around it."""
    require(
        "bubblewrap namespaces" in grid.grid.describe_sandbox(),
        "the process sandbox runs without bubblewrap here",
    )
    source = (
        "import os\n\ndef handler(event, context):\n"
        "    open('/output/p.txt', 'w').write('p')\n"
        "    try:\n        open('/evil', 'w')\n        root = 'writable'\n"
        "    except OSError:\n        root = 'read-only'\n"
        "    return {'same': os.path.samefile('/output', os.environ['OUTPUT_DIR']), 'root': root,\n"
        "            'tmpdir': os.environ.get('TMPDIR')}\n"
    )
    with httpx.Client(base_url=grid.url, headers={"x-api-key": grid.api_key}, timeout=60) as client:
        response = client.post("/upload", files={"file": ("main.py", source.encode())})
        answer = client.post("/run", json={"functionId": response.json()["functionId"]}).json()
    assert answer["status"] == "SUCCESS", answer
    assert answer["result"] == {"same": True, "root": "read-only", "tmpdir": "/tmp"}
    assert answer["outputFiles"] == ["p.txt"]


@pytest.mark.integration
def test_open_grid_never_serves_a_browser_without_a_key(keyless: httpx.Client) -> None:
    """A web page (cross-site form post, or a DNS-rebound page reading results) must never act as the local
    owner of an --open grid: browsers say Origin or Sec-Fetch-Site, scripts say neither."""
    upload = keyless.post(
        "/upload",
        headers={"origin": "http://evil.example"},
        files={"file": ("hello.py", seed_file("hello.py"))},
        data={"function_name": "x", "runtime": "python", "handler": "hello.handler"},
    )
    assert upload.status_code == 401
    listing = keyless.get(
        "/v1/functions", headers={"sec-fetch-site": "same-origin", "host": "rebound.example"}
    )
    assert listing.status_code == 401
    assert keyless.get("/functions").status_code == 200  # the same request from a script


@pytest.mark.integration
def test_nanogrid_loadtest_takes_a_seed_id(open_grid: EmbeddedGrid, keyless: httpx.Client) -> None:
    """`nanogrid loadtest <uuid>` must never answer "no function" for a function uploaded through the seed."""
    seed_id = upload_snake(keyless, "hello.py")["function_id"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "nanogrid.cli",
            "loadtest",
            seed_id,
            "--url",
            open_grid.url,
            "--rps",
            "4",
            "--duration",
            "1",
            "--payload",
            '{"name": "load"}',
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NANOGRID_API_KEY": open_grid.api_key},
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["planned"], summary["completed"], summary["failed"]) == (4, 4, 0)
