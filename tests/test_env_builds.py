"""The grid's environment builds: few builds, no eviction in use, no pattern packages, no leftovers.

What must never happen: an environment's files deleted under a sandbox that uses it (a warm call
failing with FileNotFoundError in user code); an environment that adds one package to a built
one installing everything again, or importing other versions than it pins; ``system=["zsh.+"]``
reaching apt as a pattern (it installed 25 packages as root), or a 30,000-package list failing
as an internal error with a host path; a build killed midway leaving its files behind for ever.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

import nanogrid
from nanogrid.environment import Environment
from nanogrid.packaging import build_zip
from nanogrid_backend.builds import builder as envmod
from nanogrid_backend.builds.builder import EnvironmentBuildError, Environments, check_spec
from tests.conftest import require_docker, start_grid

PYTHON = "%d.%d" % sys.version_info[:2]
RUNTIMES = {f"python{PYTHON}": PYTHON}


def _spec(*packages: str, **settings: object) -> dict:
    return check_spec(Environment(packages=list(packages), **settings).spec(), RUNTIMES)  # type: ignore[arg-type]


def _installed(*packages: str):
    """A function in an environment of ``packages`` that says the version of the first one, as imported."""

    @nanogrid.remote(packages=list(packages))
    def installed():
        import importlib.metadata

        return importlib.metadata.version(packages[0].split("==")[0])

    return installed


# ---- eviction never takes an environment in use ---------------------------------------------------------------


@pytest.mark.integration
def test_a_warm_sandboxs_environment_survives_a_tight_cache_building_others(tmp_path):
    """A cache with room for about two small environments builds four more while a warm process sandbox reads its
    own environment's files between them: those files are never deleted (it was the least recently built), and
    the environments no sandbox uses any more are the ones that go."""
    grid = start_grid(
        tmp_path / "grid",
        stem_cells=0,
        pool_cap=2,
        env_cache_gb=150_000 / (1 << 30),
        kill_grace_s=0.5,
    )
    try:
        nanogrid.connect(grid.url, api_key=grid.api_key)

        @nanogrid.remote(packages=["six==1.16.0"])
        def read_six():
            from pathlib import Path

            import six

            return six.__version__, len(Path(six.__file__).read_bytes())

        first = read_six.remote()
        for packages in (["tomli==2.0.1"], ["iniconfig==2.0.0"], ["six==1.15.0"], ["tomli==2.0.0"]):
            assert _installed(*packages).remote() == packages[0].split("==")[1]
            assert read_six.remote() == first  # warm, in the same sandbox: its files are all there
        kept = [e["spec"]["packages"] for e in grid.grid.environments.list()]
        assert ["six==1.16.0"] in kept
        assert ["tomli==2.0.1"] not in kept and [
            "iniconfig==2.0.0"
        ] not in kept  # unused, so evicted
    finally:
        grid.stop()


@pytest.mark.integration
def test_warm_calls_keep_their_environment_recently_used(tmp_path, monkeypatch):
    """An environment served warm is the most recently used one, though another was built after its cold start
    (before, only cold starts counted, so the busiest environment looked the least recently used)."""
    monkeypatch.setattr(
        envmod, "NOTE_USE_EVERY_S", 0.0
    )  # every warm call notes its use (once a minute otherwise)
    grid = start_grid(tmp_path / "grid", stem_cells=0, kill_grace_s=0.5)
    try:
        nanogrid.connect(grid.url, api_key=grid.api_key)
        six = _installed("six==1.16.0")
        six.remote()
        _installed("tomli==2.0.1").remote()
        assert grid.grid.environments.list()[0]["spec"]["packages"] == ["tomli==2.0.1"]
        six.remote()  # warm
        assert grid.grid.environments.list()[0]["spec"]["packages"] == ["six==1.16.0"]
    finally:
        grid.stop()


# ---- environments grow by layers -----------------------------------------------------------------------------


def _imported(site: Path, modules: list[str]) -> dict[str, str]:
    """What a process sandbox imports from a layer: each module's version and file (no site-packages of ours)."""
    code = (
        "import importlib, json, sys\n"
        f"print(json.dumps({{m: [getattr(importlib.import_module(m), '__version__', ''), "
        f"importlib.import_module(m).__file__] for m in {modules!r}}}))"
    )
    done = subprocess.run(
        [sys.executable, "-s", "-P", "-c", code],
        env={"PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


@pytest.mark.integration
def test_an_environment_that_adds_a_package_grows_from_the_built_one_and_imports_exactly_its_pins(
    tmp_path,
):
    """Adding humanize to a built environment installs humanize alone, on top of the built one's files; the new
    environment imports exactly the pinned versions, and the built one is left as it was (no humanize in it,
    its preload unchanged)."""
    environments = Environments(tmp_path, runtimes=RUNTIMES)
    base = environments.ensure(_spec("six==1.16.0", "packaging==23.2"))
    base_preload = (base.site_dir / "sitecustomize.py").read_text()
    grown = environments.ensure(_spec("six==1.16.0", "packaging==23.2", "humanize==4.9.0"))
    info = next(e for e in environments.list() if e["env_id"] == grown.env_id)
    assert info["base"] == base.env_id and info["added"] == ["humanize"]
    imported = _imported(grown.site_dir, ["six", "packaging", "humanize"])
    assert {m: v for m, (v, _) in imported.items()} == {
        "six": "1.16.0",
        "packaging": "23.2",
        "humanize": "4.9.0",
    }
    assert all(where.startswith(str(grown.site_dir)) for _, where in imported.values())
    assert (
        "'humanize'" in (grown.site_dir / "sitecustomize.py").read_text()
    )  # the preload imports the new one too
    assert not (base.site_dir / "humanize").exists()
    assert (base.site_dir / "sitecustomize.py").read_text() == base_preload
    environments.remove(
        base.env_id
    )  # the grown one keeps its files (hard links), whatever happens to its base
    assert _imported(grown.site_dir, ["six", "humanize"])["six"][0] == "1.16.0"


@pytest.mark.integration
def test_a_package_that_needs_other_versions_than_the_built_environment_builds_from_scratch(
    tmp_path,
):
    """requests 2.28 needs urllib3 below 1.27, and the built environment has urllib3 2: the new environment is
    built from scratch with the urllib3 it needs (never the built one's), and the built one keeps its own."""
    environments = Environments(tmp_path, runtimes=RUNTIMES)
    base = environments.ensure(_spec("urllib3"))
    needs_older = environments.ensure(_spec("urllib3", "requests==2.28.2"))
    assert "base" not in next(e for e in environments.list() if e["env_id"] == needs_older.env_id)
    imported = _imported(needs_older.site_dir, ["urllib3", "requests"])
    assert imported["urllib3"][0].startswith("1.26.") and imported["requests"][0] == "2.28.2"
    assert _imported(base.site_dir, ["urllib3"])["urllib3"][0].startswith("2.")


@pytest.mark.integration
def test_a_grown_environments_image_is_its_bases_image_plus_one_small_layer(tmp_path):
    """Docker: the grown environment's image is the built one's image with one more layer, holding what it adds,
    and a container of it imports exactly the pinned versions as nobody."""
    require_docker()
    import docker

    client = docker.from_env()
    environments = Environments(
        tmp_path, runtimes=RUNTIMES, docker_images={PYTHON: "nanogrid/runtime-python:latest"}
    )
    base = environments.ensure(_spec("six==1.16.0"))
    grown = environments.ensure(_spec("six==1.16.0", "humanize==4.9.0"))
    try:
        assert base.image and grown.image
        base_layers = client.images.get(base.image).attrs["RootFS"]["Layers"]
        assert client.images.get(grown.image).attrs["RootFS"]["Layers"][:-1] == base_layers
        said = (
            client.containers.run(
                grown.image,
                entrypoint=[
                    "python3",
                    "-c",
                    "import six, humanize, os; print("
                    "six.__version__, humanize.__version__, os.getuid())",
                ],
                remove=True,
                network_mode="none",
            )
            .decode()
            .split()
        )
        assert said == ["1.16.0", "4.9.0", "65534"]
    finally:
        environments.remove(grown.env_id)
        environments.remove(base.env_id)


# ---- Debian packages: exact names, refused at upload ----------------------------------------------------------


def _upload(grid, environment: dict) -> httpx.Response:
    """A hand-made package with this manifest environment, as an attacker would send it (no client checks)."""
    manifest = {
        "name": "attack",
        "kind": "handler",
        "handler": "attack.handler",
        "environment": environment,
    }
    package = build_zip(
        {
            "manifest.json": json.dumps(manifest).encode(),
            "attack.py": b"def handler(event, context):\n    return 1\n",
        }
    )
    with httpx.Client(base_url=grid.url, headers={"x-api-key": grid.api_key}, timeout=30) as client:
        return client.post("/v1/upload", files={"file": ("attack.zip", package)})


def test_debian_package_names_are_exact_names_never_patterns():
    """Names apt would read as a regex, glob or pattern are refused before anything looks them up."""
    for pattern in [
        "zsh.+",
        "zsh.*",
        "zsh*",
        "zs?",
        "zsh[a-z]",
        "~nzsh",
        "^zsh",
        "zsh$",
        "?name(zsh)",
        "-zsh",
        "zsh/bookworm",
        "zsh=5.9",
        "Zsh",
    ]:
        with pytest.raises(EnvironmentBuildError, match="refused"):
            check_spec({**Environment().spec(), "system": [pattern]}, RUNTIMES)


@pytest.mark.integration
def test_a_system_package_pattern_or_unknown_name_is_refused_at_upload_and_nothing_is_built(
    tmp_path,
):
    """``system=["zsh.+"]`` made apt install about 25 packages as root: now the upload itself is refused (422)
    saying why, as are a name Debian does not have and a 30,000-package list, and no environment is built."""
    grid = start_grid(tmp_path / "grid", stem_cells=0)
    try:
        spec = Environment().spec()
        refused = _upload(grid, {**spec, "system": ["zsh.+"]})
        assert refused.status_code == 422 and "'.+'" in refused.text and "pattern" in refused.text
        from nanogrid_runtimes import build

        if build.debian_package_names(build.DEBIAN_SUITES[PYTHON]) is not None:
            unknown = _upload(grid, {**spec, "system": ["zsh-nanogrid-no-such-package"]})
            assert (
                unknown.status_code == 422
                and "no package named 'zsh-nanogrid-no-such-package'" in unknown.text
            )
        many = _upload(
            grid, {**spec, "packages": [f"nanogrid-pkg-{n}==1.0" for n in range(30_000)]}
        )
        assert many.status_code == 422 and "2000" in many.text
        assert ".venv" not in many.text
        assert grid.grid.environments.list() == []
    finally:
        grid.stop()


@pytest.mark.integration
def test_a_failed_build_names_the_package_and_never_a_host_path(tmp_path):
    """The installer's failure says which package, and nothing of the grid host's paths (its uv, its folders)."""
    environments = Environments(tmp_path, runtimes=RUNTIMES)
    packages = ["six==1.16.0", *(f"nanogrid-no-such-{n}==1.0" for n in range(12))]
    with pytest.raises(EnvironmentBuildError, match="nanogrid-no-such-") as failure:
        environments.ensure(_spec(*packages))
    assert str(tmp_path) not in failure.value.message and ".venv" not in failure.value.message
    assert "and 3 more" in failure.value.message  # long lists are named in short


# ---- no leftovers from killed builds ---------------------------------------------------------------------------


BUILD_IN_ANOTHER_PROCESS = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from nanogrid_backend.builds.builder import Environments
    root, python, image, spec = Path(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    Environments(root, runtimes={"python" + python: python}, docker_images={python: image}).ensure(spec)
""")


@pytest.mark.integration
def test_a_docker_build_killed_midway_leaves_nothing_once_swept_and_its_files_count_meanwhile(
    tmp_path,
):
    """kill -9 while an environment's image layer is being written left a large ``.layer-*.tar`` for ever, outside
    the cache's size. While its build runs it counts (an unused environment makes room); a new cache never
    removes a running build's file; once its process is gone the file goes."""
    require_docker()
    environments = Environments(tmp_path, runtimes=RUNTIMES, cap_bytes=1 << 20)
    unused = environments.ensure(_spec("iniconfig==2.0.0"))
    spec = _spec("tomli==2.0.1")
    folder = tmp_path / environments.ensure(spec).env_id
    with open(
        folder / "site" / "big.bin", "wb"
    ) as big:  # a large layer to write (sparse here, real in the tar)
        big.truncate(4 << 30)
    build = subprocess.Popen(
        [
            sys.executable,
            "-c",
            BUILD_IN_ANOTHER_PROCESS,
            str(tmp_path),
            PYTHON,
            "nanogrid/runtime-python:latest",
            json.dumps(spec),
        ],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not [p for p in folder.glob(".layer-*") if p.stat().st_size > 2 << 20]:
            assert build.poll() is None and time.monotonic() < deadline, (
                "the build never wrote its layer"
            )
            time.sleep(0.05)
        os.kill(build.pid, signal.SIGSTOP)  # mid-write, its owner alive
        Environments(
            tmp_path, runtimes=RUNTIMES
        )  # a cache starting meanwhile leaves a live build's files alone
        assert list(folder.glob(".layer-*"))
        environments.ensure(
            _spec("six==1.16.0")
        )  # over the cap only with the partial layer counted
        assert unused.env_id not in {e["env_id"] for e in environments.list()}
        os.kill(build.pid, signal.SIGKILL)
        build.wait()
        assert list(folder.glob(".layer-*")), (
            "the killed build left its layer (as before the sweep)"
        )
        Environments(tmp_path, runtimes=RUNTIMES)
        assert not list(folder.glob(".layer-*")) and not list(tmp_path.glob(".build-*"))
        assert (folder / "env.json").exists()  # the environment itself stays
    finally:
        if build.poll() is None:
            build.kill()
            build.wait()


@pytest.mark.integration
def test_a_sandbox_holding_an_environment_keeps_it_from_eviction_until_it_dies(tmp_path):
    """The cache's side of "in use": an environment held by a live sandbox, or pinned by a caller, is never
    evicted, whatever its age; once its sandbox has died it is."""
    environments = Environments(tmp_path, runtimes=RUNTIMES, cap_bytes=100_000)

    class Sandbox:  # all the cache asks of a sandbox: whether it is alive
        alive = True

    held, sandbox = environments.ensure(_spec("six==1.16.0")), Sandbox()
    environments.hold(held.env_id, sandbox)
    pinned = environments.ensure(_spec("tomli==2.0.1"))  # over the cap: the held one stays
    with environments.pinned(pinned.env_id):
        environments.ensure(_spec("iniconfig==2.0.0"))  # over the cap
        assert {held.env_id, pinned.env_id} <= {e["env_id"] for e in environments.list()}
    sandbox.alive = False
    environments.ensure(_spec("iniconfig==2.0.0"))
    assert held.env_id not in {e["env_id"] for e in environments.list()}


@pytest.mark.integration
def test_runtime_images_made_for_debian_packages_count_in_the_cache_and_go_with_their_last_environment(
    tmp_path,
):
    """The runtime built for an environment's ``system`` packages (a Debian base and a runtime image, 200+ MiB)
    counts in the cache's size, and goes when the last environment using it is evicted: never left behind,
    uncounted. (Its Debian base is tagged from the grid's own here, sparing a mmdebstrap run.)"""
    require_docker()
    from nanogrid_runtimes import build

    system = ["tree"]
    images = build.derived_images(PYTHON, system)
    subprocess.run(["docker", "tag", build.DEBIAN_BASE, images[1]], check=True, capture_output=True)
    environments = Environments(
        tmp_path,
        runtimes=RUNTIMES,
        docker_images={PYTHON: "nanogrid/runtime-python:latest"},
        cap_bytes=100 << 20,
    )
    try:
        with_tree = environments.ensure(_spec("six==1.16.0", system=system))
        assert all(build.image_exists(image) for image in images)
        environments.ensure(
            _spec("tomli==2.0.1")
        )  # the cache holds 200+ MiB: the least recently used goes
        assert with_tree.env_id not in {e["env_id"] for e in environments.list()}
        assert not any(build.image_exists(image) for image in images)
    finally:
        for image in images:
            subprocess.run(["docker", "image", "rm", image], capture_output=True)
        for built in environments.list():
            environments.remove(built["env_id"])


RUNTIME_BUILD_IN_ANOTHER_PROCESS = textwrap.dedent("""
    import time
    from nanogrid_runtimes import build
    with build.build_directory("nanogrid-rootfs-") as tmp:
        print(tmp, flush=True)
        time.sleep(600)  # mmdebstrap writing the root file system here
""")


def test_a_runtime_build_killed_midway_leaves_no_temporary_folder_once_swept(tmp_path):
    """A runtime build (mmdebstrap's root file system for system packages, 100+ MiB in /tmp) killed with -9 left
    its folder for ever: the cache removes it once the build's process is gone, never while it runs."""
    build = subprocess.Popen(
        [sys.executable, "-c", RUNTIME_BUILD_IN_ANOTHER_PROCESS], stdout=subprocess.PIPE, text=True
    )
    try:
        assert build.stdout is not None
        folder = Path(build.stdout.readline().strip())
        (folder / "rootfs.tar").write_bytes(b"\0" * 4096)
        Environments(tmp_path, runtimes=RUNTIMES)
        assert (folder / "rootfs.tar").exists()
        build.kill()
        build.wait()
        Environments(tmp_path, runtimes=RUNTIMES)
        assert not folder.exists() and not Path(f"{folder}.owner").exists()
    finally:
        if build.poll() is None:
            build.kill()
            build.wait()
