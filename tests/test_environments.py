"""Function environments: the client's packages go with a function, explicit ones are built once, failures are clear.

What must never happen: a function that uses pandas failing with ``No module named 'pandas'``; a
different pandas on the grid than on the client; a user's own ``helpers.py`` missing remotely; a
bad package name or an installer option slipping into the build; a half-built environment used;
two first calls building the same environment twice; a failed build stopping the grid.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import subprocess
import sys
import textwrap
import threading
import zipfile
from pathlib import Path

import cloudpickle
import httpx
import numpy
import pandas as pd
import pytest

import nanogrid
from nanogrid import environment as envmod
from nanogrid.environment import Environment, PackageSyncError
from nanogrid.packaging import FunctionPackage, build_zip
from nanogrid_backend.builds.builder import EnvironmentBuildError, Environments, check_spec
from tests.conftest import require, require_docker, start_grid, uploaded_manifest

PYTHON = "%d.%d" % sys.version_info[:2]


# ---- the client: environments, package sync ------------------------------------------------------------------


def test_an_environment_is_its_content_and_refuses_anything_but_requirements():
    """Equal settings give one id whatever their order; URLs, paths and installer options never get through."""
    a = Environment(packages=["pandas==2.2.3", "numpy"], env={"A": "1"})
    b = Environment(packages=["numpy", "pandas==2.2.3"], env={"A": "1"})
    assert (
        a.id == b.id and a.id != Environment(packages=["pandas==2.2.2", "numpy"], env={"A": "1"}).id
    )
    for bad in [
        "--index-url=https://evil.example/simple",
        "-e .",
        "pandas @ https://x/p.whl",
        "./local",
        "a b",
    ]:
        with pytest.raises(ValueError, match="not a requirement"):
            Environment(packages=[bad])
    with pytest.raises(ValueError, match="belong to the sandbox"):
        Environment(env={"PYTHONPATH": "/tmp"})
    with pytest.raises(TypeError, match="list of names"):
        Environment(packages="pandas")  # type: ignore[arg-type]


def test_the_grid_checks_a_manifest_environment_as_hostile_input():
    """A hand-made manifest cannot pass installer options, an unknown Python or reserved variables."""
    runtimes = {f"python{PYTHON}": PYTHON}
    good = Environment(packages=["six==1.17.0"]).spec()
    assert check_spec(good, runtimes)["packages"] == ["six==1.17.0"]
    for bad in [
        {**good, "packages": ["--extra-index-url", "http://x"]},
        {**good, "python": "2.7"},
        {**good, "env": {"LD_PRELOAD": "/x.so"}},
        {**good, "packages": "six"},
        "six",
    ]:
        with pytest.raises(EnvironmentBuildError):
            check_spec(bad, runtimes)


def test_package_sync_pins_the_clients_versions_of_what_the_function_and_its_arguments_use():
    """A DataFrame argument and a numpy global bring pandas and numpy at exactly the client's versions."""

    @nanogrid.remote
    def total(df):
        return float(numpy.sum(df.values))

    total._note_arguments((pd.DataFrame({"a": [1]}),), {})
    spec = total.package().manifest["environment"]
    assert f"pandas=={pd.__version__}" in spec["packages"]
    assert f"numpy=={numpy.__version__}" in spec["packages"]
    assert not any(
        p.startswith(("cloudpickle", "nanogrid")) for p in spec["packages"]
    )  # the grid brings its own

    @nanogrid.remote(packages=["numpy==1.26.4"])
    def explicit():
        return numpy.zeros(1)

    assert (
        "numpy==1.26.4" in explicit.package().manifest["environment"]["packages"]
    )  # explicit wins over synced


def test_a_dataframe_argument_alone_brings_pandas_to_the_grid():
    """A function that never names pandas gets it when a call passes a DataFrame (the argument is unpickled there)."""
    uploads: list[dict] = []

    def grid(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/health":
            return httpx.Response(
                200, json={"runtimes": {f"python{PYTHON}": PYTHON}, "blob_threshold_bytes": 1 << 20}
            )
        if (manifest := uploaded_manifest(request)) is not None:
            uploads.append(manifest)
            return httpx.Response(201, json={"function_id": "fn-1"})
        return httpx.Response(
            200,
            json={
                "job_id": "job-1",
                "status": "completed",
                "result_pickle": base64.b64encode(cloudpickle.dumps(1)).decode(),
            },
        )

    def rows(table):  # names no pandas: only its argument does
        return len(table)

    remote_rows = nanogrid.RemoteFunction(
        rows,
        client=nanogrid.Client(
            "http://grid.test", api_key="k", transport=httpx.MockTransport(grid)
        ),
    )
    assert remote_rows.remote(pd.DataFrame({"a": [1]})) == 1
    assert f"pandas=={pd.__version__}" in uploads[-1]["environment"]["packages"]


def test_a_package_installed_from_a_local_path_is_named_before_anything_is_sent(
    tmp_path, monkeypatch
):
    """The grid cannot install what only exists on this disk: the client says which package, and what to do."""
    site = tmp_path / "site"
    (site / "homemade").mkdir(parents=True)
    (site / "homemade" / "__init__.py").write_text("VALUE = 1\n")
    info = site / "homemade-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: homemade\nVersion: 0.1\n")
    (info / "RECORD").write_text("homemade/__init__.py,,\n")
    (info / "direct_url.json").write_text(
        json.dumps({"url": f"file://{tmp_path}/homemade", "dir_info": {}})
    )
    monkeypatch.syspath_prepend(str(site))
    envmod._distributions_of_modules.cache_clear()
    try:
        with pytest.raises(
            PackageSyncError, match="homemade 0.1, which was installed from a local path"
        ):
            envmod.pinned_distributions({"homemade"})
    finally:
        envmod._distributions_of_modules.cache_clear()


def test_the_users_own_module_beside_the_caller_goes_in_the_package(tmp_path, monkeypatch):
    """``from helpers import double`` works remotely: helpers.py (and what it imports locally) ships as files."""
    (tmp_path / "helpers_env_test.py").write_text(
        "import util_env_test\n\ndef double(x):\n    return util_env_test.twice(x)\n"
    )
    (tmp_path / "util_env_test.py").write_text("def twice(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from helpers_env_test import double  # noqa: PLC0415

    @nanogrid.remote
    def use(x):
        return double(x)

    files = set(_zip_names(use.package().data))
    assert {"helpers_env_test.py", "util_env_test.py"} <= files


def _zip_names(data: bytes) -> list[str]:

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return zf.namelist()


def test_for_cell_gives_the_magic_an_environment_and_local_files():
    """What ``%%nanogrid --packages`` calls: imports in the cell and the types of the values it reads count."""
    environment, files = envmod.for_cell(
        "import numpy as np\nout = df.sum()",
        {"df": pd.DataFrame({"a": [1]})},
        "humanize==4.9.0, six",
    )
    assert f"pandas=={pd.__version__}" in environment.packages
    assert f"numpy=={numpy.__version__}" in environment.packages
    assert {"humanize==4.9.0", "six"} <= set(environment.packages) and files == {}


# ---- the grid: building, caching, failing ----------------------------------------------------------------------


def test_a_failed_build_leaves_nothing_behind_and_an_interrupted_one_is_cleaned_up(tmp_path):
    """The cache only ever holds complete environments; a build killed midway leaves a temp folder that goes."""
    environments = Environments(tmp_path, runtimes={f"python{PYTHON}": PYTHON})
    spec = check_spec(
        Environment(packages=["no-such-package-nanogrid-3f1c"]).spec(), environments.runtimes
    )
    with pytest.raises(EnvironmentBuildError, match="no-such-package-nanogrid-3f1c"):
        environments.ensure(spec)
    assert (
        environments.list() == []
        and not list(tmp_path.glob("env-*"))
        and not list(tmp_path.glob(".build-*"))
    )
    (tmp_path / ".build-env-0123abcd-deadbeef" / "site").mkdir(
        parents=True
    )  # the grid was killed mid-build
    Environments(tmp_path, runtimes=environments.runtimes)
    assert not list(tmp_path.glob(".build-*"))


@pytest.fixture(params=["process", "docker"])
def sandbox(request: pytest.FixtureRequest) -> str:
    if request.param == "docker":
        require_docker()
    return request.param


@pytest.fixture()
def env_grid(sandbox, tmp_path):
    embedded = start_grid(tmp_path / "grid", sandbox=sandbox, kill_grace_s=0.5)
    yield embedded
    embedded.stop()


@pytest.mark.integration
def test_functions_get_the_clients_pandas_explicit_packages_and_local_modules(
    env_grid, tmp_path, monkeypatch
):
    """The same pandas and numpy as here, a package the client lacks, a helper module: all remote, in one grid."""
    nanogrid.connect(env_grid.url, api_key=env_grid.api_key)

    @nanogrid.remote
    def summarise(df):
        return df.groupby("k").sum(), pd.__version__, numpy.__version__

    frame, pandas_version, numpy_version = summarise.remote(
        pd.DataFrame({"k": [1, 1, 2], "v": [1, 2, 3]})
    )
    assert (pandas_version, numpy_version) == (pd.__version__, numpy.__version__)
    assert frame.to_dict() == {"v": {1: 3, 2: 3}}
    assert summarise.remote(pd.DataFrame({"k": [1], "v": [5]}))[0].to_dict() == {
        "v": {1: 5}
    }  # built once, warm now

    with pytest.raises(ImportError):
        import humanize  # noqa: F401  (the client does not have it; the function does)

    @nanogrid.remote(packages=["humanize==4.9.0"])
    def natural(n):
        import humanize

        return humanize.intcomma(n), humanize.__file__

    text, where = natural.remote(1234567)
    assert text == "1,234,567" and "/site-packages/" not in where  # from the environment's layer

    (tmp_path / "helpers_beside.py").write_text("def double(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from helpers_beside import double  # noqa: PLC0415

    @nanogrid.remote
    def use_helper(x):
        return double(x)

    assert use_helper.remote(21) == 42
    listed = {tuple(e["spec"]["packages"]) for e in env_grid.grid.environments.list()}
    assert ("humanize==4.9.0",) in listed


@pytest.mark.integration
def test_an_unknown_package_fails_in_seconds_with_its_name_and_the_grid_serves_on(env_grid):
    """A typo in a package name: EnvironmentBuildFailed with uv's reason, nothing cached, other calls fine."""
    nanogrid.connect(env_grid.url, api_key=env_grid.api_key)

    @nanogrid.remote(packages=["pandaz-nanogrid-typo-91ab"])
    def typo():
        return 1

    with pytest.raises(
        nanogrid.EnvironmentBuildFailed, match="pandaz-nanogrid-typo-91ab"
    ) as failure:
        typo.remote()
    assert "not found" in str(failure.value)
    assert env_grid.grid.environments.list() == []

    @nanogrid.remote
    def fine():
        return "ok"

    assert fine.remote() == "ok"


@pytest.mark.integration
def test_two_first_calls_of_a_new_environment_build_it_once(env_grid, caplog):
    """Concurrent first calls wait for one build instead of racing two installs into the cache."""
    nanogrid.connect(env_grid.url, api_key=env_grid.api_key)
    caplog.set_level(logging.INFO, logger="nanogrid_backend.builds.builder")

    @nanogrid.remote(environment=Environment(packages=["six==1.16.0"]))
    def six_version(_):
        import six

        return six.__version__

    results: list[object] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(six_version.remote(i))) for i in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results == ["1.16.0", "1.16.0"]
    builds = [r for r in caplog.records if r.getMessage().startswith("building environment")]
    assert len(builds) == 1


# ---- Python 3.13 ------------------------------------------------------------------------------------------------


def _python313() -> Path | None:
    from nanogrid_backend.builds.builder import interpreter_for

    found = interpreter_for("3.13")
    return Path(found) if found else None


@pytest.mark.integration
def test_a_function_pickled_by_python_3_13_runs_on_the_3_13_runtime(tmp_path):
    """A 3.13 client is served by the 3.13 runtime (Debian trixie), listed on /health, not refused."""
    require_docker()
    build = subprocess.run(
        [sys.executable, "nanogrid_runtimes/build.py", "--python", "3.13"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    require(
        build.returncode == 0,
        f"nanogrid_runtimes/build.py --python 3.13 failed: {build.stderr.strip()[-500:]}",
    )
    python = _python313()
    require(
        python is not None,
        "no Python 3.13 interpreter to pickle a function with (pyenv's, or python3.13 on "
        "PATH): .ci/run looks for one",
    )
    site = tmp_path / "site"
    site.mkdir()
    (site / "cloudpickle").symlink_to(
        Path(cloudpickle.__file__).parent
    )  # pure Python: the same code runs on 3.13
    script = textwrap.dedent("""
        import base64, sys, cloudpickle
        def where(x):
            return sys.version_info[:2], x * 2
        print(base64.b64encode(cloudpickle.dumps(where)).decode())
        print(base64.b64encode(cloudpickle.dumps(((21,), {}))).decode())
    """)
    done = subprocess.run(
        [str(python), "-c", script],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(site)},
        check=True,
    )
    function_pickle, args_pickle = done.stdout.split()
    manifest = {
        "name": "where",
        "kind": "pickle",
        "runtime": "python3.13",
        "handler": "function.pkl",
        "python": "3.13",
    }
    package = FunctionPackage(
        build_zip(
            {
                "manifest.json": json.dumps(manifest).encode(),
                "function.pkl": base64.b64decode(function_pickle),
            }
        ),
        manifest,
    )
    embedded = start_grid(tmp_path / "grid", sandbox="docker")
    try:
        client = nanogrid.connect(embedded.url, api_key=embedded.api_key)
        assert client.runtimes()["python3.13"] == "3.13"
        function_id = client.deploy(package)
        view = client.run({"function_id": function_id, "args_pickle": args_pickle})
        assert view["status"] == "completed", view
        assert cloudpickle.loads(base64.b64decode(view["result_pickle"])) == ((3, 13), 42)
    finally:
        embedded.stop()


# ---- speed: layers as one docker load, packages imported ahead ----------------------------------------------------


def _fake_distribution(site: Path, name: str, module_source: str) -> None:
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text(module_source)
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "RECORD").write_text(f"{name}/__init__.py,,\n{info.name}/RECORD,,\n")


def test_the_preload_never_touches_the_channel_and_never_stops_the_sandbox(tmp_path):
    """A package that prints, reads stdin or raises at import must not corrupt the bootstrap's channel (fds 0 and
    1), nor keep the interpreter from starting: its output goes to stderr and the channel's bytes stay unread."""
    site = tmp_path / "site"
    _fake_distribution(
        site,
        "noisy",
        "import sys, os\nprint('noise on stdout')\nos.write(1, b'raw noise')\n"
        "LEFT = sys.stdin.read()\n",
    )
    _fake_distribution(site, "broken", "raise SystemExit('a package that exits at import')\n")
    _fake_distribution(site, "fine", "VALUE = 1\n")
    from nanogrid_backend.builds.builder import write_preload

    assert write_preload(site, "env-test", ["noisy==1.0", "broken", "fine"]) == [
        "broken",
        "fine",
        "noisy",
    ]
    script = (
        "import sys; print('channel:', sorted(m for m in ('noisy', 'fine', 'broken') if m in sys.modules), "
        "sys.stdin.read(), sys.modules['noisy'].LEFT == '')"
    )
    done = subprocess.run(
        [sys.executable, "-s", "-P", "-c", script],
        input="frame bytes",
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(site)},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "channel: ['fine', 'noisy'] frame bytes True\n"
    assert "noise on stdout" in done.stderr and "raw noise" in done.stderr


def _wait_for_stem(embedded, env_id: str) -> None:
    """Until the pool holds a started stem cell of the environment (it is started after the first use)."""
    import time

    deadline = time.monotonic() + 120
    while not embedded.grid.pool.snapshot()["stem_cells_by_environment"].get(env_id):
        assert time.monotonic() < deadline, "no stem cell of the environment was started"
        time.sleep(0.2)


@pytest.mark.integration
def test_a_new_function_in_a_built_environment_finds_its_packages_imported_in_a_sandbox_as_hardened(
    env_grid, sandbox
):
    """The environment's stem cell imported its packages before any function came (so a new function starts in
    milliseconds), without making the sandbox weaker: the layer stays read-only and root-owned, the function
    runs as nobody with no network in Docker, and a memory limit below what the stem cell holds is a clear error."""
    nanogrid.connect(env_grid.url, api_key=env_grid.api_key)
    env = Environment(packages=["humanize==4.9.0", f"numpy=={numpy.__version__}"])

    @nanogrid.remote(environment=env)
    def first():
        import humanize

        return humanize.intcomma(1000)

    assert first.remote() == "1,000"
    _wait_for_stem(env_grid, env.id)

    @nanogrid.remote(environment=env)
    def probe():
        import os
        import socket
        import sys

        import humanize

        package = os.path.dirname(humanize.__file__)
        try:
            open(os.path.join(package, "planted.py"), "w").close()
            writable = True
        except OSError:
            writable = False
        try:
            socket.create_connection(("127.0.0.1", 9), timeout=1).close()
            network = "reached"
        except OSError as exc:
            network = type(exc).__name__
        return (
            {"humanize", "numpy"} <= set(sys.modules),
            os.getuid(),
            writable,
            os.stat(package).st_uid,
            network,
        )

    preloaded, uid, writable, owner, network = probe.remote()
    assert preloaded is True and writable is False
    if sandbox == "docker":
        assert (uid, owner) == (65534, 0) and network != "reached"
        _wait_for_stem(env_grid, env.id)

        @nanogrid.remote(
            environment=env, memory=16
        )  # the stem cell holds Python and numpy: more than that
        def tiny():
            return 1

        with pytest.raises(nanogrid.OutOfMemory, match="below what its sandbox holds"):
            tiny.remote()


@pytest.mark.integration
def test_an_environment_image_is_the_runtime_plus_one_layer_with_the_runtimes_settings(tmp_path):
    """The image made with docker load keeps the runtime's user, entry point and labels, adds exactly one layer,
    and a layer whose files change on the host is never mistaken for the image's (a new id is a new image)."""
    require_docker()
    import docker

    client = docker.from_env()
    runtime = client.images.get("nanogrid/runtime-python:latest")
    environments = Environments(
        tmp_path, runtimes={f"python{PYTHON}": PYTHON}, docker_images={PYTHON: runtime.tags[0]}
    )
    spec = check_spec(
        Environment(packages=["six==1.16.0"], env={"RUN": str(tmp_path)}).spec(),
        environments.runtimes,
    )
    built = environments.ensure(spec)
    try:
        image = client.images.get(built.image)
        assert image.attrs["RootFS"]["Layers"][:-1] == runtime.attrs["RootFS"]["Layers"]
        assert len(image.attrs["RootFS"]["Layers"]) == len(runtime.attrs["RootFS"]["Layers"]) + 1
        assert image.attrs["Config"]["User"] == runtime.attrs["Config"]["User"] == "65534:65534"
        assert image.attrs["Config"]["Entrypoint"] == runtime.attrs["Config"]["Entrypoint"]
        assert (
            image.labels["nanogrid.base"] == runtime.id
            and image.labels["nanogrid.env"] == built.env_id
        )
        listing = client.containers.run(
            built.image,
            entrypoint=["ls", "-ln", "/opt/nanogrid/env/six.py"],
            remove=True,
            network_mode="none",
        ).decode()
        assert listing.startswith("-rw-r--r--") and " 0 0 " in listing
        assert environments.ensure(spec).image == built.image  # built once
    finally:
        environments.remove(built.env_id)


# ---- AWS mode: a fleet builds each environment once ---------------------------------------------------------------


@pytest.mark.integration
def test_a_second_worker_fetches_the_environment_the_first_built_from_the_store(tmp_path):
    """Workers on the AWS adapters (moto's S3, SQS, DynamoDB; redis-server): the first worker builds the environment
    and shares it through the store; a second worker, on another data dir, fetches it instead of building it
    again. What must never happen: a fleet where every worker runs its own install of the same environment."""
    import shutil

    from tests.aws_cluster import Cluster

    require(
        shutil.which("redis-server") is not None,
        "redis-server is not installed (apt-get install redis-server)",
    )
    (tmp_path / "aws").mkdir()
    cluster = Cluster(tmp_path / "aws", workers=1, slots=1)
    try:
        nanogrid.connect(cluster.url, api_key=cluster.key)
        env = Environment(packages=["six==1.16.0"])

        @nanogrid.remote(environment=env, timeout=120)
        def first():
            import six

            return six.__version__

        assert first.remote() == "1.16.0"
        first_log = (tmp_path / "aws" / "worker0.log").read_text()
        assert (
            f"building environment {env.id}" in first_log
            and f"shared environment {env.id}" in first_log
        )
        cluster.procs[
            "worker0"
        ].terminate()  # the next call can only go to a worker that never built it
        cluster.procs["worker0"].wait(30)
        cluster.start_worker(1)

        @nanogrid.remote(environment=env, timeout=120)
        def second():
            import six

            return six.__version__, six.__file__

        version, where = second.remote()
        assert version == "1.16.0" and "/worker1/" in where
        second_log = (tmp_path / "aws" / "worker1.log").read_text()
        assert f"fetched environment {env.id} from the shared store" in second_log
        assert f"building environment {env.id}" not in second_log
    finally:
        cluster.stop()


# ---- Debian system packages ----------------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_debian_package_runs_in_the_docker_sandbox_and_the_process_sandbox_refuses_it_clearly(
    tmp_path,
):
    """``system=["jq"]``: the grid builds a runtime with jq (mmdebstrap on the host, as for the runtime itself) and
    the function runs it as nobody, with no network. The process sandbox cannot install Debian packages: it says
    so before building anything, never a ``FileNotFoundError: jq`` from deep inside the call."""
    require_docker()
    env = Environment(system=["jq"])

    @nanogrid.remote(environment=env, timeout=60)
    def query(document):
        import os
        import subprocess

        done = subprocess.run(
            ["jq", "-c", ".items | map(. * 2)"],
            input=document,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip(), os.getuid()

    docker_grid = start_grid(tmp_path / "docker", sandbox="docker", kill_grace_s=0.5)
    try:
        nanogrid.connect(docker_grid.url, api_key=docker_grid.api_key)
        assert query.remote('{"items": [1, 2, 3]}') == ("[2,4,6]", 65534)
    finally:
        docker_grid.stop()
    process_grid = start_grid(tmp_path / "process", kill_grace_s=0.5)
    try:
        nanogrid.connect(process_grid.url, api_key=process_grid.api_key)
        with pytest.raises(
            nanogrid.EnvironmentBuildFailed, match=r"system packages \(jq\) need the Docker sandbox"
        ):
            query.remote('{"items": []}')
        assert process_grid.grid.environments.list() == []
    finally:
        process_grid.stop()
