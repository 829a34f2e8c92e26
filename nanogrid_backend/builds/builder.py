"""Function environments on the grid: each distinct environment built once, cached by id, evicted LRU.

A layer is built on the host with uv into a temporary folder (wheels only, for the runtime's
Python and platform: no package code runs on the host) and renamed into place when complete, so
nothing half-built is ever used. Docker sandboxes get an image derived from the runtime image
with the layer copied in; process sandboxes get the layer on their ``PYTHONPATH``. A lock file
per environment makes concurrent first calls (threads, or several workers on one machine) build
once. With a shared store (S3), a worker fetches a layer another worker built before building.
An environment that adds packages to a built one grows from it by a layer (see layers.py).

Eviction never takes an environment in use (see users.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanogrid_backend.builds import layers as env_layers
from nanogrid_backend.builds.preload import write_grown_preload, write_preload
from nanogrid_backend.builds.users import EnvironmentUsers
from nanogrid_contract.environments import PLATFORM, REQUIREMENT, VARIABLE, environment_id

log = logging.getLogger(__name__)

BUILD_TIMEOUT_S = 600
ENV_IMAGE = "nanogrid/env"  # tagged nanogrid/env:<environment id>
MAX_PACKAGES = 2000  # a whole data-science environment is a few hundred distributions
MAX_SYSTEM_PACKAGES = 200  # as the upload checks (packages.MAX_ITEMS)
NOTE_USE_EVERY_S = 60.0  # a warm call marks its environment used at most this often (a file's time)
SWEEP_EVERY_S = 60.0  # how often the cache looks for what killed builds left behind
ENV_ID = re.compile(r"env-[0-9a-f]{1,64}")


class EnvironmentBuildError(Exception):
    """An environment could not be built; ``message`` carries the installer's words and names the packages."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class BuiltEnvironment:
    """What a sandbox starts with: a runtime (Python minor), a layer of packages and variables, an image for Docker."""

    env_id: str
    python: str
    site_dir: Path | None = None  # the layer, for process sandboxes' PYTHONPATH
    image: str | None = None  # the derived image, for Docker sandboxes
    variables: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Sandboxes with the same key are interchangeable stem cells."""
        return self.env_id


def too_little_memory(memory_mib: int) -> str:
    """Why a sandbox could not take a function's memory limit: it already holds more (its environment's preload)."""
    return (
        f"the function's memory limit ({memory_mib} MiB) is below what its sandbox holds before the function "
        "runs (the runtime and the packages of its environment, imported ahead); give it more, e.g. "
        "@remote(memory=512)"
    )


def check_names(spec: Any) -> None:
    """A manifest's ``environment`` names, checked as hostile input before anything is built (the controller runs
    this at upload): requirements only, a bounded number, and Debian packages by exact name, never a pattern."""
    if not isinstance(spec, dict):
        raise EnvironmentBuildError("the manifest's environment must be an object")
    packages, system, variables = (
        spec.get("packages", []),
        spec.get("system", []),
        spec.get("env", {}),
    )
    if not isinstance(packages, list) or not all(
        isinstance(p, str) and REQUIREMENT.fullmatch(p) for p in packages
    ):
        raise EnvironmentBuildError(
            f"environment packages must be requirements like 'pandas==2.2.3', "
            f"not {_shortened(packages)}"
        )
    if len(packages) > MAX_PACKAGES:
        raise EnvironmentBuildError(
            f"an environment lists at most {MAX_PACKAGES} packages; this one lists "
            f"{len(packages)} ({', '.join(packages[:3])}, ...): name the ones the function needs"
        )
    if not isinstance(system, list) or not all(isinstance(p, str) for p in system):
        raise EnvironmentBuildError(
            f"environment system packages must be Debian package names, not {_shortened(system)}"
        )
    check_system_packages(str(spec.get("python", "")), system)
    if not isinstance(variables, dict) or not all(
        isinstance(k, str)
        and VARIABLE.match(k)
        and isinstance(v, str)
        and not k.startswith(("NANOGRID_", "PYTHON", "PATH", "HOME", "LD_"))
        for k, v in variables.items()
    ):
        raise EnvironmentBuildError(
            "environment variables must be NAME: string, outside the sandbox's own names"
        )


def _shortened(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def check_system_packages(python: str, names: list[str]) -> None:
    """Debian packages are installed by apt as root while a runtime is built: exact names of the runtime's
    Debian release only. A name apt could read as a regex or pattern (``zsh.+`` installed 25 packages) and a
    name the release does not have are refused here, before anything is built."""
    from nanogrid_runtimes import build

    if not names:
        return
    if len(names) > MAX_SYSTEM_PACKAGES:
        raise EnvironmentBuildError(
            f"an environment lists at most {MAX_SYSTEM_PACKAGES} system packages, not {len(names)}"
        )
    for name in names:
        problem = build.debian_name_problem(name)
        if problem:
            raise EnvironmentBuildError(
                f"system package {_shortened(name)} is refused: {problem}; give exact "
                "Debian package names, e.g. system=['ffmpeg']"
            )
    suite = build.DEBIAN_SUITES.get(python)
    if suite is None:
        raise EnvironmentBuildError(
            f"system packages need a runtime built from Debian; this grid builds them for "
            f"Python {', '.join(build.DEBIAN_SUITES)}, not {python or 'an unnamed Python'}"
        )
    known = build.debian_package_names(suite)
    if known is None:
        raise EnvironmentBuildError(
            f"this grid cannot check system package names: it has no list of Debian {suite}'s "
            f"packages (one is saved when nanogrid_runtimes/build.py --python {python} builds "
            "the runtime on the grid's host with mmdebstrap), so it installs none"
        )
    unknown = [name for name in names if name not in known]
    if unknown:
        raise EnvironmentBuildError(
            f"Debian {suite} has no package named {', '.join(map(repr, unknown[:5]))}; "
            "system packages are exact Debian package names (see packages.debian.org)"
        )


def check_spec(spec: Any, runtimes: dict[str, str]) -> dict[str, Any]:
    """A manifest's ``environment``, checked as hostile input: installable names only, a Python this grid runs."""
    check_names(spec)
    packages, system, variables = (
        spec.get("packages", []),
        spec.get("system", []),
        spec.get("env", {}),
    )
    python = str(spec.get("python", ""))
    if python not in runtimes.values():
        raise EnvironmentBuildError(
            f"this grid has no Python {python} runtime; it runs "
            f"{', '.join(sorted(set(runtimes.values())))}"
        )
    if spec.get("platform", PLATFORM) != PLATFORM:
        raise EnvironmentBuildError(
            f"environment platform {spec.get('platform')!r}: this grid builds {PLATFORM}"
        )
    return {
        "packages": sorted(packages),
        "system": sorted(system),
        "python": python,
        "env": dict(sorted(variables.items())),
        "platform": PLATFORM,
    }


def interpreter_for(python: str) -> str | None:
    """A Python of this minor version on the host (the grid's own, pyenv's, or one on PATH), or None."""
    if python == "%d.%d" % sys.version_info[:2]:
        return sys.executable
    pyenv_root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    pyenv = sorted(pyenv_root.glob(f"versions/{python}.*/bin/python{python}"))
    if pyenv:
        return str(pyenv[-1])
    found = shutil.which(f"python{python}")
    # a pyenv shim of a version not installed only says so
    if found and "shims" not in Path(found).parts:
        return found
    return None


def compile_bytecode(site: Path, python: str) -> None:
    """Compile the layer's modules ahead (tests excluded): the sandbox cannot write them, and importing pandas and
    scikit-learn from source takes three times as long. Compiling runs none of the packages' code.

    Hash-based pycs (``unchecked-hash``) stay valid whatever the files' times become in an image.
    Without an interpreter of the environment's Python here, the layer goes as it is.
    """
    interpreter = interpreter_for(python)
    if interpreter is None:
        log.info(
            "no Python %s on this host to compile environment modules with; they compile as imported",
            python,
        )
        return
    try:
        done = subprocess.run(
            [
                interpreter,
                "-I",
                "-m",
                "compileall",
                "-q",
                "-j0",
                "-x",
                r"/tests?/",
                "--invalidation-mode",
                "unchecked-hash",
                str(site),
            ],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise EnvironmentBuildError(
            f"compiling the environment's modules took over {BUILD_TIMEOUT_S} s; gave up"
        ) from None
    # a module with a syntax error for this Python: it fails when imported, as it would
    if done.returncode != 0:
        log.info(
            "some modules of %s did not compile: %s", site.parent.name, done.stdout.strip()[-500:]
        )


def without_host_paths(text: str) -> str:
    """A build's message as the user sees it: the grid host's file paths are no business of theirs."""
    return re.sub(r"(?<![\w.~-])/(?:[\w.+@~-]+/)+[\w.+@~-]*", "<path>", text)


def uv_command() -> list[str]:
    """uv from the grid's own environment (a dependency of NanoGrid)."""
    beside = Path(sys.executable).with_name("uv")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "uv"]


def _installer_message(text: str, packages: list[str]) -> str:
    """The installer's own explanation, without its progress noise, with a hint for the common cases."""
    lines = [
        line
        for line in text.strip().splitlines()
        if line.strip() and not line.startswith(("Resolved", "Prepared", "Installed", " +"))
    ]
    said = "\n".join(lines[-25:])
    hint = ""
    if "no wheels" in said or "only-binary" in said or "no usable wheels" in said:
        hint = (
            "\nNanoGrid installs wheels only, so that no package code runs while building; this package has no "
            "wheel for the runtime's Python and platform: pick a version that has one"
        )
    elif "not found in the package registry" in said or "was not found" in said:
        hint = "\nCheck the package name, and that it is published on the package index"
    named = ", ".join(packages[:10]) + (
        f" and {len(packages) - 10} more" if len(packages) > 10 else ""
    )
    return without_host_paths(f"could not install {named}:\n{said}{hint}")


class Environments:
    """The grid's environment cache under ``root`` (one folder per environment id)."""

    def __init__(
        self,
        root: Path,
        *,
        runtimes: dict[str, str],
        docker_images: dict[str, str] | None = None,
        cap_bytes: int = 0,
        identity: str = "",
        shared: Any = None,
    ) -> None:
        self.root = root
        self.runtimes = runtimes  # runtime name -> Python minor version
        self.docker_images = (
            docker_images  # Python minor -> runtime image, when sandboxes are Docker containers
        )
        self.cap_bytes = cap_bytes
        self.identity = identity or "grid-" + hashlib.sha256(str(root).encode()).hexdigest()[:12]
        self.shared = shared  # a BlobStore others build into (AWS mode), or None
        self._docker_client: Any = None
        # (Python, Debian packages) -> runtime image
        self._system_bases: dict[tuple[str, tuple[str, ...]], str] = {}
        self.users = EnvironmentUsers(root / ".locks")
        self._noted: dict[str, float] = {}  # environment id -> when its use was last written down
        self._swept = 0.0
        root.mkdir(parents=True, exist_ok=True)
        (root / ".locks").mkdir(exist_ok=True)
        self._remove_abandoned_builds()

    # ---- what the worker asks -----------------------------------------------------------------------------

    def for_manifest(
        self, manifest: dict[str, Any], progress: Callable[[str], None] = lambda _: None
    ) -> BuiltEnvironment | None:
        """The environment a function package asks for, built if needed; None for the plain runtime of its Python."""
        python = str(manifest.get("python") or "")
        spec = manifest.get("environment")
        if not spec:
            default = next(iter(self.runtimes.values()), "")
            if (
                not python
                or python == default
                or self.docker_images is None
                or python not in self.docker_images
            ):
                return None
            return BuiltEnvironment(f"python{python}", python, image=self.docker_images[python])
        spec = check_spec(spec, self.runtimes)
        if spec["system"] and self.docker_images is None:
            raise EnvironmentBuildError(
                f"system packages ({', '.join(spec['system'])}) need the Docker sandbox; "
                "this grid runs process sandboxes"
            )
        return self.ensure(spec, progress, for_call=True)

    def ensure(
        self,
        spec: dict[str, Any],
        progress: Callable[[str], None] = lambda _: None,
        for_call: bool = False,
    ) -> BuiltEnvironment:
        """The environment built (or found); ``for_call``: a call's sandbox is to start with it, and it counts as in
        use until then (the call may queue for a place in the pool)."""
        env_id = environment_id(spec)
        folder = self.root / env_id
        with self._env_lock(env_id, progress):
            if not (folder / "env.json").exists():
                self._build_layer(env_id, spec, progress)
            image = (
                self._ensure_image(env_id, spec, progress)
                if self.docker_images is not None
                else None
            )
            self._touch(env_id)
            if for_call:
                self.users.starting(env_id)
        self._sweep_now_and_then()
        self._evict(keep=env_id)
        return BuiltEnvironment(
            env_id,
            spec["python"],
            site_dir=folder / "site",
            image=image,
            variables=dict(spec["env"]),
        )

    # ---- in use: never evicted (see users.py) -----------------------------------------------------------

    def hold(self, env_id: str, sandbox: Any) -> None:
        """Count ``sandbox`` (just started with this environment) as using it for as long as it is alive."""
        if ENV_ID.fullmatch(env_id):  # the plain runtimes and language images are not in this cache
            self.users.started(env_id, sandbox)

    def note_use_of(self, sandbox: Any) -> None:
        """A warm call in ``sandbox``: its environment's last use moves to now (a file's time, at most once a
        minute per environment), so that the LRU order sees environments served warm all day."""
        env_id = self.users.environment_of(sandbox)
        if (
            env_id is not None
            and time.monotonic() - self._noted.get(env_id, 0.0) > NOTE_USE_EVERY_S
        ):
            self._touch(env_id)
        self._sweep_now_and_then()

    @contextmanager
    def pinned(self, env_id: str) -> Iterator[None]:
        """Keep an environment from eviction meanwhile (for a caller that uses one without a sandbox)."""
        self.users.starting(env_id)
        try:
            yield
        finally:
            self.users.done_starting(env_id)

    # ---- building -----------------------------------------------------------------------------------------

    @contextmanager
    def _env_lock(self, env_id: str, progress: Callable[[str], None]) -> Iterator[None]:
        """One build per environment: across threads and processes on this machine (flock)."""
        with open(self.root / ".locks" / f"{env_id}.lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                progress(f"waiting for environment {env_id}, which another call is building")
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _build_layer(
        self, env_id: str, spec: dict[str, Any], progress: Callable[[str], None]
    ) -> None:
        folder = self.root / env_id
        temporary = self.root / f".build-{env_id}-{uuid.uuid4().hex[:8]}"
        temporary.mkdir()
        try:
            grown: dict[str, Any] = {}
            if not self._fetch_shared(env_id, temporary):
                grown = self._grow(env_id, spec, temporary, progress)
                if not grown:
                    self._install(env_id, spec, temporary / "site", progress)
                    write_preload(temporary / "site", env_id, spec["packages"])
                    compile_bytecode(temporary / "site", spec["python"])
                self._share(env_id, temporary)
            (temporary / env_layers.PINS).write_text(
                env_layers.pins_text(env_layers.installed_pins(temporary / "site"))
            )
            size = grown.pop("size", None) or _bytes_in(temporary / "site")
            if self.cap_bytes and size > self.cap_bytes:
                raise EnvironmentBuildError(
                    f"environment {env_id} is {size >> 20} MiB, over the grid's environment "
                    f"cache cap of {self.cap_bytes >> 20} MiB (nanogrid up --env-cache-gb)"
                )
            (temporary / "env.json").write_text(
                json.dumps(
                    {"env_id": env_id, "spec": spec, "size": size, "built_at": time.time(), **grown}
                )
            )
            os.rename(temporary, folder)  # complete, or not there at all
        finally:
            shutil.rmtree(temporary, ignore_errors=True)

    def _grow(
        self, env_id: str, spec: dict[str, Any], temporary: Path, progress: Callable[[str], None]
    ) -> dict[str, Any]:
        """Build ``spec`` as a built environment plus a layer of what it adds (see layers.py); what env.json
        records of that, or {} when no built environment fits (the caller builds from scratch)."""
        base = env_layers.choose_base(spec, self.list(), self.root)
        # the new preload's bytecode replaces the base's
        if base is None or interpreter_for(spec["python"]) is None:
            return {}
        with self.pinned(base["env_id"]):
            base_folder = self.root / base["env_id"]
            base_pins = env_layers.read_pins(base_folder)
            added = env_layers.resolve_on(
                uv_command(), spec, base, base_pins or {}, temporary, BUILD_TIMEOUT_S
            )
            if base_pins is None or added is None or not (base_folder / "site").is_dir():
                return {}
            started = time.monotonic()
            progress(
                f"building environment {env_id} on {base['env_id']}: adding {', '.join(sorted(added)) or 'nothing'}"
            )
            layer = temporary / env_layers.LAYER
            self._install(
                env_id,
                {**spec, "packages": [f"{n}=={v}" for n, v in sorted(added.items())]},
                layer,
                progress,
                dependencies=False,
            )
            env_layers.link_tree(base_folder / "site", temporary / "site")
            write_grown_preload(temporary / "site", layer, env_id, spec["packages"])
            compile_bytecode(layer, spec["python"])
            env_layers.link_tree(layer, temporary / "site")
        log.info(
            "built environment %s on %s in %.1f s",
            env_id,
            base["env_id"],
            time.monotonic() - started,
        )
        return env_layers.describe(base, added, _bytes_in(layer))

    def _install(
        self,
        env_id: str,
        spec: dict[str, Any],
        site: Path,
        progress: Callable[[str], None],
        dependencies: bool = True,
    ) -> None:
        packages = spec["packages"]
        site.mkdir()
        if not packages:
            return
        started = time.monotonic()
        what = ", ".join(packages[:10]) + (
            f" and {len(packages) - 10} more" if len(packages) > 10 else ""
        )
        progress(f"building environment {env_id}: installing {what}")
        log.info("building environment %s (Python %s): installing %s", env_id, spec["python"], what)
        # any number of them, never a long command
        requirements = site.parent / f".requirements-{site.name}.txt"
        requirements.write_text("".join(f"{p}\n" for p in packages))
        command = [
            *uv_command(),
            "pip",
            "install",
            "--quiet",
            "--target",
            str(site),
            "--python-version",
            spec["python"],
            "--python-platform",
            PLATFORM,
            "--only-binary",
            ":all:",
            "--no-progress",
            *([] if dependencies else ["--no-deps"]),
            "--requirement",
            str(requirements),
        ]
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise EnvironmentBuildError(
                f"installing {what} took over {BUILD_TIMEOUT_S} s; gave up"
            ) from None
        except OSError as exc:
            raise EnvironmentBuildError(
                f"could not start the installer for {what}: {exc.strerror}"
            ) from None
        finally:
            requirements.unlink(missing_ok=True)
        if done.returncode != 0:
            log.warning("environment %s failed to build: %s", env_id, done.stderr.strip()[-2000:])
            raise EnvironmentBuildError(_installer_message(done.stderr or done.stdout, packages))
        elapsed = time.monotonic() - started
        progress(f"built environment {env_id} in {elapsed:.1f} s")
        log.info("built environment %s in %.1f s", env_id, elapsed)

    def _ensure_image(
        self, env_id: str, spec: dict[str, Any], progress: Callable[[str], None]
    ) -> str:
        """The runtime image of the environment's Python with the layer on top (rebuilt if the runtime changed).

        A grown environment's image is its base's image plus its own layer, while that image is there and
        made from the same runtime; otherwise the runtime plus its whole site."""
        assert self.docker_images is not None
        if spec["python"] not in self.docker_images:
            raise EnvironmentBuildError(
                f"this grid has no Docker runtime image for Python {spec['python']}"
            )
        runtime = self._system_base(spec) if spec["system"] else self.docker_images[spec["python"]]
        on, tag, folder = (
            self._docker().api.inspect_image(runtime),
            f"{ENV_IMAGE}:{env_id}",
            self.root / env_id,
        )
        if _labels(self._inspect(tag)).get("nanogrid.base") == on["Id"]:
            return tag
        runtime_id, site = on["Id"], folder / "site"
        base = json.loads((folder / "env.json").read_text()).get("base")
        parent = (
            self._inspect(f"{ENV_IMAGE}:{base}")
            if base and (folder / env_layers.LAYER).is_dir()
            else {}
        )
        if _labels(parent).get("nanogrid.base") == runtime_id:
            on, site = parent, folder / env_layers.LAYER
        started = time.monotonic()
        progress(f"building environment {env_id}: image {tag}")
        labels = {
            "nanogrid.grid": self.identity,
            "nanogrid.env": env_id,
            "nanogrid.base": runtime_id,
        }
        load_layer_image(on, site, tag, labels)
        log.info("built image %s in %.1f s", tag, time.monotonic() - started)
        return tag

    def _inspect(self, image: str) -> dict[str, Any]:
        """What Docker says of an image here; {} when there is none."""
        import docker.errors

        try:
            return dict(self._docker().api.inspect_image(image))
        except docker.errors.ImageNotFound:
            return {}

    def _docker(self) -> Any:
        """One Docker client for this cache, made on first use (process-sandbox grids never need one)."""
        if self._docker_client is None:
            import docker

            self._docker_client = docker.from_env(timeout=120)
        return self._docker_client

    def _system_base(self, spec: dict[str, Any]) -> str:
        """A runtime image with Debian packages added (mmdebstrap on the host, see nanogrid_runtimes/build.py).

        Checked against the runtime's build context once per grid process (that check copies and
        hashes the context: not something for every new function).
        """
        from nanogrid_runtimes import build

        key = (spec["python"], tuple(spec["system"]))
        if key not in self._system_bases or not build.image_exists(self._system_bases[key]):
            try:
                self._system_bases[key] = build.runtime_image(
                    spec["python"], extra_packages=spec["system"]
                )
            except SystemExit as exc:
                raise EnvironmentBuildError(
                    without_host_paths(
                        f"could not build a runtime with the Debian packages "
                        f"{', '.join(spec['system'])}: {exc}"
                    )
                ) from None
            except subprocess.TimeoutExpired:
                raise EnvironmentBuildError(
                    f"building a runtime with the Debian packages {', '.join(spec['system'])} "
                    "took too long; gave up"
                ) from None
        return self._system_bases[key]

    # ---- sharing layers between workers (AWS mode) ---------------------------------------------------------

    def _shared_key(self, env_id: str) -> str:
        return f"environments/{env_id}.tar"

    def _fetch_shared(self, env_id: str, temporary: Path) -> bool:
        """The layer another worker built and shared, unpacked into ``temporary``; False when there is none."""
        if self.shared is None:
            return False
        archive = temporary / "shared.tar"
        try:
            with open(archive, "wb") as out:
                for chunk in self.shared.open_blob(self._shared_key(env_id)):
                    out.write(chunk)
            # Written by a grid worker (the store's environments/ prefix), never by a sandbox.
            with tarfile.open(archive) as tar:
                tar.extractall(temporary, filter="data")
        except FileNotFoundError:
            return False
        except Exception as exc:
            log.warning(
                "could not fetch environment %s from the shared store (building it here): %s",
                env_id,
                exc,
            )
            shutil.rmtree(temporary / "site", ignore_errors=True)
            return False
        finally:
            archive.unlink(missing_ok=True)
        log.info("fetched environment %s from the shared store", env_id)
        return (temporary / "site").is_dir()

    def _share(self, env_id: str, temporary: Path) -> None:
        """Put a layer built here where other workers look before building (streamed from a file, not memory)."""
        if self.shared is None:
            return
        archive = temporary / "shared.tar"
        try:
            with tarfile.open(archive, "w") as tar:
                tar.add(temporary / "site", arcname="site")
            # removes the file once sent
            self.shared.put_blob_file(self._shared_key(env_id), archive)
            log.info("shared environment %s through the store", env_id)
        except Exception as exc:
            log.warning("could not share environment %s: %s", env_id, exc)
        finally:
            archive.unlink(missing_ok=True)

    # ---- the cache: listing, last use, eviction ------------------------------------------------------------

    def _touch(self, env_id: str) -> None:
        """Mark the environment used now: its ``used`` file's time, which every process on this machine sees."""
        try:
            (self.root / env_id / "used").touch()
        except FileNotFoundError:
            return  # removed meanwhile (nanogrid envs --remove)
        self._noted[env_id] = time.monotonic()

    def list(self) -> list[dict[str, Any]]:
        """Built environments, most recently used first: id, packages, size, last use."""
        found = []
        for folder in self.root.glob("env-*"):
            try:
                info = json.loads((folder / "env.json").read_text())
            except (OSError, ValueError):
                continue
            used = folder / "used"
            info["last_used"] = used.stat().st_mtime if used.exists() else info.get("built_at", 0)
            found.append(info)
        return sorted(found, key=lambda i: -i["last_used"])

    def remove(self, env_id: str) -> bool:
        """Delete an environment's layer and image, and the runtime made for its Debian packages when no other
        environment here uses that; False if there is none."""
        if not ENV_ID.fullmatch(env_id):
            return False
        folder = self.root / env_id
        try:
            spec = json.loads((folder / "env.json").read_text())["spec"]
        except (OSError, ValueError, KeyError):
            spec = None
        existed = folder.exists()
        trash = self.root / f".removed-{env_id}-{uuid.uuid4().hex[:8]}"
        if existed:
            os.rename(folder, trash)  # gone at once for new calls; the files go after
            shutil.rmtree(trash, ignore_errors=True)
        if self.docker_images is not None:
            existed = self._remove_image(f"{ENV_IMAGE}:{env_id}") or existed
            if spec and spec.get("system"):
                self._remove_unused_runtimes(spec)
        return existed

    def _remove_image(self, image: str) -> bool:
        """``docker image rm`` (refused by Docker while a container runs it, which is what we want)."""
        try:
            return (
                subprocess.run(
                    ["docker", "image", "rm", image], capture_output=True, timeout=120
                ).returncode
                == 0
            )
        except subprocess.TimeoutExpired:
            return False

    def _remove_unused_runtimes(self, spec: dict[str, Any]) -> None:
        from nanogrid_runtimes import build

        key = (spec["python"], tuple(spec["system"]))
        if spec["python"] not in build.DEBIAN_SUITES or any(
            (i["spec"]["python"], tuple(i["spec"]["system"])) == key for i in self.list()
        ):
            return
        self._system_bases.pop(key, None)
        for image in build.derived_images(spec["python"], spec["system"]):
            if self._remove_image(image):
                log.info("removed %s: no environment here uses it now", image)

    def _runtime_bytes(
        self, environments: Iterable[dict[str, Any]]
    ) -> dict[tuple[str, tuple[str, ...]], int]:
        """(Python, Debian packages) -> the bytes of the runtime images made for them (its Debian base counted
        once), for those that the environments listed use."""
        from nanogrid_runtimes import build

        sizes: dict[tuple[str, tuple[str, ...]], int] = {}
        if self.docker_images is None:
            return sizes
        for key in {
            (i["spec"]["python"], tuple(i["spec"]["system"]))
            for i in environments
            if i["spec"]["system"]
        }:
            if key[0] not in build.DEBIAN_SUITES:
                continue
            runtime, debian = (
                int(self._inspect(image).get("Size") or 0)
                for image in build.derived_images(key[0], list(key[1]))
            )
            sizes[key] = max(runtime, debian)  # the runtime is its Debian base plus a few layers
        return sizes

    def _partial_bytes(self) -> int:
        """What builds under way (or killed, until swept) hold on disk: temporary folders and image layer tars."""
        partial = [
            *self.root.glob(".build-*"),
            *self.root.glob(".removed-*"),
            *self.root.glob("env-*/.layer-*"),
        ]
        return sum(_bytes_in(path) if path.is_dir() else _size_of(path) for path in partial)

    def _evict(self, keep: str) -> None:
        """Least recently used environments go while the cache is over its cap; never one in use (the one just
        used, one with a live sandbox here or in another process on this machine, one a call is about to
        start). The runtime images made for Debian packages count, and go with the last environment using them."""
        if not self.cap_bytes:
            return
        environments = self.list()
        runtimes = self._runtime_bytes(environments)
        total = (
            sum(i["size"] for i in environments) + sum(runtimes.values()) + self._partial_bytes()
        )
        for info in reversed(environments):
            if total <= self.cap_bytes:
                return
            env_id, key = info["env_id"], (info["spec"]["python"], tuple(info["spec"]["system"]))
            if env_id == keep or not self._remove_unused(env_id):
                continue
            log.info("evicted environment %s (%d MiB) from the cache", env_id, info["size"] >> 20)
            total -= info["size"]
            environments.remove(info)
            if key in runtimes and not any(
                (i["spec"]["python"], tuple(i["spec"]["system"])) == key for i in environments
            ):
                total -= runtimes.pop(key)
        if total > self.cap_bytes:
            log.info(
                "the environment cache holds %d MiB, over its cap of %d MiB: the rest is in use",
                total >> 20,
                self.cap_bytes >> 20,
            )

    def _remove_unused(self, env_id: str) -> bool:
        """Remove the environment unless it is in use or being built; both locks are held while it goes, so no
        sandbox starts holding it meanwhile."""
        self.users.release_unused()
        locks = self.root / ".locks"
        with (
            open(locks / f"{env_id}.lock", "w") as building,
            open(locks / f"{env_id}.use", "a") as using,
        ):
            try:
                fcntl.flock(building, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(using, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return self.remove(env_id)  # closing the files lets go of both locks

    def _sweep_now_and_then(self) -> None:
        if time.monotonic() - self._swept > SWEEP_EVERY_S:
            self._remove_abandoned_builds()

    def _remove_abandoned_builds(self) -> None:
        """What builds that stopped midway left (the grid was killed: temporary folders, an image layer's tar):
        never used, so removed, at start and then now and then. A build under way holds its environment's lock;
        a runtime build's temporary folder (mmdebstrap's root file system) its own (nanogrid_runtimes/build.py)."""
        from nanogrid_runtimes import build

        self._swept = time.monotonic()
        for name in build.remove_abandoned_directories():
            log.info("removed %s, left by a runtime build that was stopped", name)
        for temporary in self.root.glob(".removed-*"):
            shutil.rmtree(temporary, ignore_errors=True)
        partial = [
            (path, path.name.removeprefix(".build-").rsplit("-", 1)[0])
            for path in self.root.glob(".build-*")
        ]
        partial += [(path, path.parent.name) for path in self.root.glob("env-*/.layer-*")]
        for path, env_id in partial:
            with open(self.root / ".locks" / f"{env_id}.lock", "w") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # another process is building it right now
                log.info("removing %s, left by a build that was stopped", path.name)
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                fcntl.flock(handle, fcntl.LOCK_UN)


def _labels(image: dict[str, Any]) -> dict[str, str]:
    return (image.get("Config") or {}).get("Labels") or {}


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _bytes_in(folder: Path) -> int:
    """The bytes of the files under ``folder`` (hard links to another environment's files counted here too)."""
    return sum(_size_of(p) for p in folder.rglob("*") if p.is_file())


def docker_runtimes(client: Any, default_image: str, default_python: str) -> dict[str, str]:
    """Python minor -> runtime image: the grid's default first, then every ``nanogrid/runtime-python:3.X`` here."""
    images = {default_python: default_image}
    repository = default_image.rsplit(":", 1)[0]
    for image in client.images.list(name=repository):
        python = (image.labels or {}).get("nanogrid.python", "")
        tags = [t for t in image.tags if t == f"{repository}:{python}"]
        if python and python not in images and tags:
            images[python] = tags[0]
    return images


LAYER_ROOT = "opt/nanogrid/env"  # where an environment's packages sit in its image (on PYTHONPATH)


def load_layer_image(base: dict[str, Any], site: Path, tag: str, labels: dict[str, str]) -> None:
    """Tag an image that is ``base`` plus one layer holding ``site`` at /opt/nanogrid/env, with ``docker load``.

    A ``docker build`` that copies a layer of 6,000 files goes through the storage driver file by
    file (20+ s with fuse-overlayfs); ``docker load`` unpacks the layer's tar straight into place
    (3 s). The archive follows Docker's image format: a manifest, an image config (the base's
    settings, its layers plus the new one, our labels, PYTHONPATH) and the new layer's tar; the
    base's layers are already here, so they are named but not sent. Files are root-owned and
    readable by all (the sandbox runs as nobody), whatever the grid's umask.
    """
    with tempfile.NamedTemporaryFile(dir=site.parent, prefix=".layer-", suffix=".tar") as layer:
        digest = _write_layer(site, layer)
        layer.flush()
        settings = dict(base["Config"] or {})
        settings["Env"] = [e for e in settings.get("Env") or [] if not e.startswith("PYTHONPATH=")]
        # The grid's own cloudpickle comes first; the environment's packages before Debian's.
        settings["Env"].append(f"PYTHONPATH=/opt/nanogrid/site:/{LAYER_ROOT}")
        settings["Labels"] = {**(settings.get("Labels") or {}), **labels}
        diff_ids = [*base["RootFS"]["Layers"], digest]
        config = json.dumps(
            {
                "architecture": base["Architecture"],
                "os": base["Os"],
                "config": settings,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            }
        ).encode()
        layers = [f"{d.removeprefix('sha256:')}/layer.tar" for d in diff_ids]
        manifest = json.dumps(
            [{"Config": "config.json", "RepoTags": [tag], "Layers": layers}]
        ).encode()
        loader = subprocess.Popen(
            ["docker", "load", "--quiet"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert loader.stdin is not None  # a pipe (above)
        try:
            with tarfile.open(fileobj=loader.stdin, mode="w|") as archive:
                for name, data in (("manifest.json", manifest), ("config.json", config)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
                archive.add(layer.name, arcname=layers[-1])
        except BrokenPipeError:
            pass  # docker load stopped reading: its stderr says why
        try:
            # closes its stdin: the archive is complete
            _, said = loader.communicate(timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            loader.kill()
            raise EnvironmentBuildError(
                f"docker load of image {tag} took over {BUILD_TIMEOUT_S} s; gave up"
            ) from None
    if loader.returncode != 0:
        raise EnvironmentBuildError(
            f"could not make the image {tag}: {said.decode(errors='replace').strip()}"
        )


def _write_layer(site: Path, out: Any) -> str:
    """Write ``site`` as a layer tar (parents included, root-owned, a+rX) to ``out``; returns its sha256 diff id."""
    digest = hashlib.sha256()

    class Hashing(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            digest.update(data)
            return out.write(data)

    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mode = 0o755 if info.isdir() or info.mode & 0o100 else 0o644
        return info

    with tarfile.open(fileobj=Hashing(), mode="w|", format=tarfile.PAX_FORMAT) as tar:
        parts = LAYER_ROOT.split("/")
        # /opt and /opt/nanogrid exist in the base: same owner and mode here
        for depth in range(1, len(parts)):
            parent = tarfile.TarInfo("/".join(parts[:depth]))
            parent.type, parent.mode, parent.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
            tar.addfile(parent)
        tar.add(site, arcname=LAYER_ROOT, filter=normalise)
    return "sha256:" + digest.hexdigest()
