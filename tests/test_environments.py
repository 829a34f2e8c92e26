"""Function environments: the client's packages go with a function, explicit ones are built once, failures are clear.

What must never happen: a function that uses pandas failing with ``No module named 'pandas'``; a
different pandas on the grid than on the client; a user's own ``helpers.py`` missing remotely; a
bad package name or an installer option slipping into the build; a half-built environment used;
two first calls building the same environment twice; a failed build stopping the grid.
"""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import cloudpickle
import numpy
import pandas as pd
import pytest

import nanogrid
from backend.environments import EnvironmentBuildError, Environments, check_spec
from nanogrid import environment as envmod
from nanogrid.environment import Environment, PackageSyncError
from nanogrid.packaging import FunctionPackage, build_zip
from tests.conftest import require, require_docker, start_grid

PYTHON = "%d.%d" % sys.version_info[:2]


# ---- the client: environments, package sync ------------------------------------------------------------------


def test_an_environment_is_its_content_and_refuses_anything_but_requirements():
    """Equal settings give one id whatever their order; URLs, paths and installer options never get through."""
    a = Environment(packages=["pandas==2.2.3", "numpy"], env={"A": "1"})
    b = Environment(packages=["numpy", "pandas==2.2.3"], env={"A": "1"})
    assert a.id == b.id and a.id != Environment(packages=["pandas==2.2.2", "numpy"], env={"A": "1"}).id
    for bad in ["--index-url=https://evil.example/simple", "-e .", "pandas @ https://x/p.whl", "./local", "a b"]:
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
    for bad in [{**good, "packages": ["--extra-index-url", "http://x"]}, {**good, "python": "2.7"},
                {**good, "env": {"LD_PRELOAD": "/x.so"}}, {**good, "packages": "six"}, "six"]:
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
    assert not any(p.startswith(("cloudpickle", "nanogrid")) for p in spec["packages"])  # the grid brings its own

    @nanogrid.remote(packages=["numpy==1.26.4"])
    def explicit():
        return numpy.zeros(1)

    assert "numpy==1.26.4" in explicit.package().manifest["environment"]["packages"]  # explicit wins over synced


def test_a_package_installed_from_a_local_path_is_named_before_anything_is_sent(tmp_path, monkeypatch):
    """The grid cannot install what only exists on this disk: the client says which package, and what to do."""
    site = tmp_path / "site"
    (site / "homemade").mkdir(parents=True)
    (site / "homemade" / "__init__.py").write_text("VALUE = 1\n")
    info = site / "homemade-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: homemade\nVersion: 0.1\n")
    (info / "RECORD").write_text("homemade/__init__.py,,\n")
    (info / "direct_url.json").write_text(json.dumps({"url": f"file://{tmp_path}/homemade", "dir_info": {}}))
    monkeypatch.syspath_prepend(str(site))
    envmod._distributions_of_modules.cache_clear()
    try:
        with pytest.raises(PackageSyncError, match="homemade 0.1, which was installed from a local path"):
            envmod.pinned_distributions({"homemade"})
    finally:
        envmod._distributions_of_modules.cache_clear()


def test_the_users_own_module_beside_the_caller_goes_in_the_package(tmp_path, monkeypatch):
    """``from helpers import double`` works remotely: helpers.py (and what it imports locally) ships as files."""
    (tmp_path / "helpers_env_test.py").write_text("import util_env_test\n\ndef double(x):\n"
                                                  "    return util_env_test.twice(x)\n")
    (tmp_path / "util_env_test.py").write_text("def twice(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from helpers_env_test import double  # noqa: PLC0415

    @nanogrid.remote
    def use(x):
        return double(x)

    files = set(_zip_names(use.package().data))
    assert {"helpers_env_test.py", "util_env_test.py"} <= files


def _zip_names(data: bytes) -> list[str]:
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return zf.namelist()


def test_for_cell_gives_the_magic_an_environment_and_local_files():
    """What ``%%nanogrid --packages`` calls: imports in the cell and the types of the values it reads count."""
    environment, files = envmod.for_cell("import numpy as np\nout = df.sum()", {"df": pd.DataFrame({"a": [1]})},
                                         "humanize==4.9.0, six")
    assert f"pandas=={pd.__version__}" in environment.packages
    assert f"numpy=={numpy.__version__}" in environment.packages
    assert {"humanize==4.9.0", "six"} <= set(environment.packages) and files == {}


# ---- the grid: building, caching, failing ----------------------------------------------------------------------


def test_a_failed_build_leaves_nothing_behind_and_an_interrupted_one_is_cleaned_up(tmp_path):
    """The cache only ever holds complete environments; a build killed midway leaves a temp folder that goes."""
    environments = Environments(tmp_path, runtimes={f"python{PYTHON}": PYTHON})
    spec = check_spec(Environment(packages=["no-such-package-nanogrid-3f1c"]).spec(), environments.runtimes)
    with pytest.raises(EnvironmentBuildError, match="no-such-package-nanogrid-3f1c"):
        environments.ensure(spec)
    assert environments.list() == [] and not list(tmp_path.glob("env-*")) and not list(tmp_path.glob(".build-*"))
    (tmp_path / ".build-env-0123abcd-deadbeef" / "site").mkdir(parents=True)  # the grid was killed mid-build
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
def test_functions_get_the_clients_pandas_explicit_packages_and_local_modules(env_grid, tmp_path, monkeypatch):
    """The same pandas and numpy as here, a package the client lacks, a helper module: all remote, in one grid."""
    nanogrid.connect(env_grid.url, api_key=env_grid.api_key)

    @nanogrid.remote
    def summarise(df):
        return df.groupby("k").sum(), pd.__version__, numpy.__version__

    frame, pandas_version, numpy_version = summarise.remote(pd.DataFrame({"k": [1, 1, 2], "v": [1, 2, 3]}))
    assert (pandas_version, numpy_version) == (pd.__version__, numpy.__version__)
    assert frame.to_dict() == {"v": {1: 3, 2: 3}}
    assert summarise.remote(pd.DataFrame({"k": [1], "v": [5]}))[0].to_dict() == {"v": {1: 5}}  # built once, warm now

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

    with pytest.raises(nanogrid.EnvironmentBuildFailed, match="pandaz-nanogrid-typo-91ab") as failure:
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
    caplog.set_level(logging.INFO, logger="backend.environments")

    @nanogrid.remote(environment=Environment(packages=["six==1.16.0"]))
    def six_version(_):
        import six

        return six.__version__

    results: list[object] = []
    threads = [threading.Thread(target=lambda i=i: results.append(six_version.remote(i))) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results == ["1.16.0", "1.16.0"]
    builds = [r for r in caplog.records if r.getMessage().startswith("building environment")]
    assert len(builds) == 1


# ---- Python 3.13 ------------------------------------------------------------------------------------------------


def _python313() -> Path | None:
    found = sorted(Path("/root/.pyenv/versions").glob("3.13.*/bin/python"))
    return found[-1] if found else None


@pytest.mark.integration
def test_a_function_pickled_by_python_3_13_runs_on_the_3_13_runtime(tmp_path):
    """A 3.13 client is served by the 3.13 runtime (Debian trixie), listed on /health, not refused."""
    require_docker()
    build = subprocess.run([sys.executable, "runtimes/build.py", "--python", "3.13"], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[1])
    require(build.returncode == 0, f"runtimes/build.py --python 3.13 failed: {build.stderr.strip()[-500:]}")
    python = _python313()
    require(python is not None, "no Python 3.13 interpreter (pyenv) to pickle a function with")
    site = tmp_path / "site"
    site.mkdir()
    (site / "cloudpickle").symlink_to(Path(cloudpickle.__file__).parent)  # pure Python: the same code runs on 3.13
    script = textwrap.dedent("""
        import base64, sys, cloudpickle
        def where(x):
            return sys.version_info[:2], x * 2
        print(base64.b64encode(cloudpickle.dumps(where)).decode())
        print(base64.b64encode(cloudpickle.dumps(((21,), {}))).decode())
    """)
    done = subprocess.run([str(python), "-c", script], capture_output=True, text=True, env={"PYTHONPATH": str(site)},
                          check=True)
    function_pickle, args_pickle = done.stdout.split()
    manifest = {"name": "where", "kind": "pickle", "runtime": "python3.13", "handler": "function.pkl",
                "python": "3.13"}
    package = FunctionPackage(build_zip({"manifest.json": json.dumps(manifest).encode(),
                                         "function.pkl": base64.b64decode(function_pickle)}), manifest)
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
