"""Function environments on the grid: each distinct environment built once, cached by id, evicted LRU.

A layer is built on the host with uv into a temporary folder (wheels only, for the runtime's
Python and platform: no package code runs on the host) and renamed into place when complete, so
nothing half-built is ever used. Docker sandboxes get an image derived from the runtime image
with the layer copied in; process sandboxes get the layer on their ``PYTHONPATH``. A lock file
per environment makes concurrent first calls (threads, or several workers on one machine) build
once. With a shared store (S3), a worker fetches a layer another worker built before building.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanogrid.environment import PLATFORM, REQUIREMENT, SYSTEM_PACKAGE, VARIABLE, distribution_name, environment_id

log = logging.getLogger(__name__)

BUILD_TIMEOUT_S = 600
ENV_IMAGE = "nanogrid/env"  # tagged nanogrid/env:<environment id>


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
    return (f"the function's memory limit ({memory_mib} MiB) is below what its sandbox holds before the function "
            "runs (the runtime and the packages of its environment, imported ahead); give it more, e.g. "
            "@remote(memory=512)")


def check_spec(spec: Any, runtimes: dict[str, str]) -> dict[str, Any]:
    """A manifest's ``environment``, checked as hostile input: installable names only, a Python this grid runs."""
    if not isinstance(spec, dict):
        raise EnvironmentBuildError("the manifest's environment must be an object")
    packages, system, variables = spec.get("packages", []), spec.get("system", []), spec.get("env", {})
    python = str(spec.get("python", ""))
    if not isinstance(packages, list) or not all(isinstance(p, str) and REQUIREMENT.match(p) for p in packages):
        raise EnvironmentBuildError(f"environment packages must be requirements like 'pandas==2.2.3', not {packages!r}")
    if not isinstance(system, list) or not all(isinstance(p, str) and SYSTEM_PACKAGE.match(p) for p in system):
        raise EnvironmentBuildError(f"environment system packages must be Debian package names, not {system!r}")
    if not isinstance(variables, dict) or not all(isinstance(k, str) and VARIABLE.match(k) and isinstance(v, str)
                                                  and not k.startswith(("NANOGRID_", "PYTHON", "PATH", "HOME", "LD_"))
                                                  for k, v in variables.items()):
        raise EnvironmentBuildError("environment variables must be NAME: string, outside the sandbox's own names")
    if python not in runtimes.values():
        raise EnvironmentBuildError(f"this grid has no Python {python} runtime; it runs "
                                    f"{', '.join(sorted(set(runtimes.values())))}")
    if spec.get("platform", PLATFORM) != PLATFORM:
        raise EnvironmentBuildError(f"environment platform {spec.get('platform')!r}: this grid builds {PLATFORM}")
    return {"packages": sorted(packages), "system": sorted(system), "python": python, "env": dict(sorted(variables.items())),
            "platform": PLATFORM}


def interpreter_for(python: str) -> str | None:
    """A Python of this minor version on the host (the grid's own, pyenv's, or one on PATH), or None."""
    if python == "%d.%d" % sys.version_info[:2]:
        return sys.executable
    pyenv_root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    pyenv = sorted(pyenv_root.glob(f"versions/{python}.*/bin/python{python}"))
    if pyenv:
        return str(pyenv[-1])
    found = shutil.which(f"python{python}")
    if found and "shims" not in Path(found).parts:  # a pyenv shim of a version not installed only says so
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
        log.info("no Python %s on this host to compile environment modules with; they compile as imported", python)
        return
    done = subprocess.run([interpreter, "-I", "-m", "compileall", "-q", "-j0", "-x", r"/tests?/",
                           "--invalidation-mode", "unchecked-hash", str(site)], capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT_S, stdin=subprocess.DEVNULL)
    if done.returncode != 0:  # a module with a syntax error for this Python: it fails when imported, as it would
        log.info("some modules of %s did not compile: %s", site.parent.name, done.stdout.strip()[-500:])


def uv_command() -> list[str]:
    """uv from the grid's own environment (a dependency of NanoGrid)."""
    beside = Path(sys.executable).with_name("uv")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "uv"]


def _installer_message(text: str, packages: list[str]) -> str:
    """The installer's own explanation, without its progress noise, with a hint for the common cases."""
    lines = [line for line in text.strip().splitlines() if line.strip() and not line.startswith(("Resolved", "Prepared",
                                                                                                   "Installed", " +"))]
    said = "\n".join(lines[-25:])
    hint = ""
    if "no wheels" in said or "only-binary" in said or "no usable wheels" in said:
        hint = ("\nNanoGrid installs wheels only, so that no package code runs while building; this package has no "
                "wheel for the runtime's Python and platform: pick a version that has one")
    elif "not found in the package registry" in said or "was not found" in said:
        hint = "\nCheck the package name, and that it is published on the package index"
    return f"could not install {', '.join(packages)}:\n{said}{hint}"


class Environments:
    """The grid's environment cache under ``root`` (one folder per environment id)."""

    def __init__(self, root: Path, *, runtimes: dict[str, str], docker_images: dict[str, str] | None = None,
                 cap_bytes: int = 0, identity: str = "", shared: Any = None) -> None:
        self.root = root
        self.runtimes = runtimes  # runtime name -> Python minor version
        self.docker_images = docker_images  # Python minor -> runtime image, when sandboxes are Docker containers
        self.cap_bytes = cap_bytes
        self.identity = identity or "grid-" + hashlib.sha256(str(root).encode()).hexdigest()[:12]
        self.shared = shared  # a BlobStore others build into (AWS mode), or None
        self._docker_client: Any = None
        self._system_bases: dict[tuple[str, tuple[str, ...]], str] = {}  # (Python, Debian packages) -> runtime image
        root.mkdir(parents=True, exist_ok=True)
        (root / ".locks").mkdir(exist_ok=True)
        self._remove_abandoned_builds()

    # ---- what the worker asks -----------------------------------------------------------------------------

    def for_manifest(self, manifest: dict[str, Any], progress: Callable[[str], None] = lambda _: None
                     ) -> BuiltEnvironment | None:
        """The environment a function package asks for, built if needed; None for the plain runtime of its Python."""
        python = str(manifest.get("python") or "")
        spec = manifest.get("environment")
        if not spec:
            default = next(iter(self.runtimes.values()), "")
            if not python or python == default or self.docker_images is None or python not in self.docker_images:
                return None
            return BuiltEnvironment(f"python{python}", python, image=self.docker_images[python])
        spec = check_spec(spec, self.runtimes)
        if spec["system"] and self.docker_images is None:
            raise EnvironmentBuildError(f"system packages ({', '.join(spec['system'])}) need the Docker sandbox; "
                                        "this grid runs process sandboxes")
        return self.ensure(spec, progress)

    def ensure(self, spec: dict[str, Any], progress: Callable[[str], None] = lambda _: None) -> BuiltEnvironment:
        env_id = environment_id(spec)
        folder = self.root / env_id
        with self._env_lock(env_id, progress):
            if not (folder / "env.json").exists():
                self._build_layer(env_id, spec, progress)
            image = self._ensure_image(env_id, spec, progress) if self.docker_images is not None else None
            self._touch(env_id)
        self._evict(keep=env_id)
        return BuiltEnvironment(env_id, spec["python"], site_dir=folder / "site", image=image,
                                variables=dict(spec["env"]))

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

    def _build_layer(self, env_id: str, spec: dict[str, Any], progress: Callable[[str], None]) -> None:
        folder = self.root / env_id
        temporary = self.root / f".build-{env_id}-{uuid.uuid4().hex[:8]}"
        temporary.mkdir()
        try:
            if not self._fetch_shared(env_id, temporary):
                self._install(env_id, spec, temporary / "site", progress)
                write_preload(temporary / "site", env_id, spec["packages"])
                compile_bytecode(temporary / "site", spec["python"])
                self._share(env_id, temporary)
            size = sum(p.stat().st_size for p in (temporary / "site").rglob("*") if p.is_file())
            if self.cap_bytes and size > self.cap_bytes:
                raise EnvironmentBuildError(f"environment {env_id} is {size >> 20} MiB, over the grid's environment "
                                            f"cache cap of {self.cap_bytes >> 20} MiB (nanogrid up --env-cache-gb)")
            (temporary / "env.json").write_text(json.dumps({"env_id": env_id, "spec": spec, "size": size,
                                                            "built_at": time.time()}))
            os.rename(temporary, folder)  # complete, or not there at all
        finally:
            shutil.rmtree(temporary, ignore_errors=True)

    def _install(self, env_id: str, spec: dict[str, Any], site: Path, progress: Callable[[str], None]) -> None:
        packages = spec["packages"]
        site.mkdir()
        if not packages:
            return
        started = time.monotonic()
        what = ", ".join(packages)
        progress(f"building environment {env_id}: installing {what}")
        log.info("building environment %s (Python %s): installing %s", env_id, spec["python"], what)
        command = [*uv_command(), "pip", "install", "--quiet", "--target", str(site), "--python-version",
                   spec["python"], "--python-platform", PLATFORM, "--only-binary", ":all:", "--no-progress",
                   "--", *packages]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise EnvironmentBuildError(f"installing {what} took over {BUILD_TIMEOUT_S} s; gave up") from None
        if done.returncode != 0:
            log.warning("environment %s failed to build: %s", env_id, done.stderr.strip()[-2000:])
            raise EnvironmentBuildError(_installer_message(done.stderr or done.stdout, packages))
        elapsed = time.monotonic() - started
        progress(f"built environment {env_id} in {elapsed:.1f} s")
        log.info("built environment %s in %.1f s", env_id, elapsed)

    def _ensure_image(self, env_id: str, spec: dict[str, Any], progress: Callable[[str], None]) -> str:
        """The runtime image of the environment's Python with the layer on top (rebuilt if the runtime changed)."""
        import docker.errors

        assert self.docker_images is not None
        if spec["python"] not in self.docker_images:
            raise EnvironmentBuildError(f"this grid has no Docker runtime image for Python {spec['python']}")
        client = self._docker()
        base = self._system_base(spec) if spec["system"] else self.docker_images[spec["python"]]
        base_info = client.api.inspect_image(base)
        tag = f"{ENV_IMAGE}:{env_id}"
        try:
            if ((client.api.inspect_image(tag)["Config"] or {}).get("Labels") or {}).get("nanogrid.base") == base_info["Id"]:
                return tag
        except docker.errors.ImageNotFound:
            pass
        started = time.monotonic()
        progress(f"building environment {env_id}: image {tag}")
        labels = {"nanogrid.grid": self.identity, "nanogrid.env": env_id, "nanogrid.base": base_info["Id"]}
        load_layer_image(base_info, self.root / env_id / "site", tag, labels)
        log.info("built image %s in %.1f s", tag, time.monotonic() - started)
        return tag

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
        if key not in self._system_bases:
            try:
                self._system_bases[key] = build.runtime_image(spec["python"], extra_packages=spec["system"])
            except SystemExit as exc:
                raise EnvironmentBuildError(f"could not build a runtime with the Debian packages "
                                            f"{', '.join(spec['system'])}: {exc}") from None
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
            log.warning("could not fetch environment %s from the shared store (building it here): %s", env_id, exc)
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
            self.shared.put_blob_file(self._shared_key(env_id), archive)  # removes the file once sent
            log.info("shared environment %s through the store", env_id)
        except Exception as exc:
            log.warning("could not share environment %s: %s", env_id, exc)
        finally:
            archive.unlink(missing_ok=True)

    # ---- the cache: listing, last use, eviction ------------------------------------------------------------

    def _touch(self, env_id: str) -> None:
        (self.root / env_id / "used").touch()

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
        """Delete an environment's layer and image; False if there is none."""
        if not re.match(r"^env-[0-9a-f]{1,64}$", env_id):
            return False
        folder = self.root / env_id
        existed = folder.exists()
        trash = self.root / f".removed-{env_id}-{uuid.uuid4().hex[:8]}"
        if existed:
            os.rename(folder, trash)  # gone at once for new calls; the files go after
            shutil.rmtree(trash, ignore_errors=True)
        if self.docker_images is not None:
            done = subprocess.run(["docker", "image", "rm", f"{ENV_IMAGE}:{env_id}"], capture_output=True)
            existed = existed or done.returncode == 0
        return existed

    def _evict(self, keep: str) -> None:
        """Least recently used environments go while the cache is over its cap (the one just used stays)."""
        if not self.cap_bytes:
            return
        environments = self.list()
        total = sum(i["size"] for i in environments)
        for info in reversed(environments):
            if total <= self.cap_bytes:
                return
            if info["env_id"] == keep:
                continue
            log.info("evicting environment %s (%d MiB) from the cache", info["env_id"], info["size"] >> 20)
            if self.remove(info["env_id"]):
                total -= info["size"]

    def _remove_abandoned_builds(self) -> None:
        """Temporary folders of builds that stopped midway (the grid was killed): never used, so removed."""
        for temporary in self.root.glob(".removed-*"):
            shutil.rmtree(temporary, ignore_errors=True)
        for temporary in self.root.glob(".build-*"):
            env_id = temporary.name.removeprefix(".build-").rsplit("-", 1)[0]
            with open(self.root / ".locks" / f"{env_id}.lock", "w") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # another process is building it right now
                shutil.rmtree(temporary, ignore_errors=True)
                fcntl.flock(handle, fcntl.LOCK_UN)


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
PRELOAD_MODULE = "sitecustomize.py"  # Python imports it at start from the layer: the environment's preload


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
        config = json.dumps({"architecture": base["Architecture"], "os": base["Os"], "config": settings,
                             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
        layers = [f"{d.removeprefix('sha256:')}/layer.tar" for d in diff_ids]
        manifest = json.dumps([{"Config": "config.json", "RepoTags": [tag], "Layers": layers}]).encode()
        loader = subprocess.Popen(["docker", "load", "--quiet"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
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
            _, said = loader.communicate(timeout=BUILD_TIMEOUT_S)  # closes its stdin: the archive is complete
        except subprocess.TimeoutExpired:
            loader.kill()
            raise EnvironmentBuildError(f"docker load of image {tag} took over {BUILD_TIMEOUT_S} s; gave up") from None
    if loader.returncode != 0:
        raise EnvironmentBuildError(f"could not make the image {tag}: {said.decode(errors='replace').strip()}")


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
        for depth in range(1, len(parts)):  # /opt and /opt/nanogrid exist in the base: same owner and mode here
            parent = tarfile.TarInfo("/".join(parts[:depth]))
            parent.type, parent.mode, parent.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
            tar.addfile(parent)
        tar.add(site, arcname=LAYER_ROOT, filter=normalise)
    return "sha256:" + digest.hexdigest()


def preload_modules(site: Path, packages: list[str]) -> list[str]:
    """The top-level modules of the distributions ``packages`` name, as installed in ``site`` (from their RECORD)."""
    wanted = {distribution_name(p) for p in packages}
    modules: list[str] = []
    for info in sorted(site.glob("*.dist-info")):
        if distribution_name(info.name.removesuffix(".dist-info").rsplit("-", 1)[0]) not in wanted:
            continue
        try:
            record = (info / "RECORD").read_text(errors="replace")
        except OSError:
            continue
        for line in record.splitlines():
            top = line.split(",", 1)[0].split("/", 1)
            name = top[0].removesuffix(".py") if len(top) > 1 or top[0].endswith(".py") else ""
            if (name.isidentifier() and not name.startswith("_") and name not in modules
                    and ((site / name / "__init__.py").is_file() or (site / f"{name}.py").is_file())):
                modules.append(name)
    return modules


PRELOAD_TEMPLATE = '''"""Generated by NanoGrid: import environment {env_id}'s packages while a sandbox starts.

A sandbox of this environment imports them as a stem cell, before any function is loaded, so a
new function finds them in memory. Never fatal: an import that fails is skipped, and importing
stops once the process holds NANOGRID_PRELOAD_MIB (default {budget}) MiB. The channel's fds are
kept out of reach meanwhile (stdout goes to stderr, stdin reads nothing).
"""


def _preload(names):
    import os
    import sys

    budget = int(os.environ.get("NANOGRID_PRELOAD_MIB", "{budget}"))
    saved = os.dup(0), os.dup(1)
    nothing = os.open(os.devnull, os.O_RDONLY)
    os.dup2(nothing, 0)
    os.dup2(2, 1)
    try:
        for name in names:
            with open("/proc/self/statm") as statm:
                if int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") > budget << 20:
                    break
            try:
                __import__(name)
            except BaseException:
                pass
    finally:
        try:
            sys.stdout.flush()
        except BaseException:
            pass
        os.dup2(saved[0], 0)
        os.dup2(saved[1], 1)
        for fd in (*saved, nothing):
            os.close(fd)


_preload({modules!r})
del _preload
'''
PRELOAD_BUDGET_MIB = 160  # below the Docker stem cell's 256 MiB, with room for the bootstrap


def write_preload(site: Path, env_id: str, packages: list[str]) -> list[str]:
    """Put the preload module into a layer; returns the modules it imports."""
    modules = preload_modules(site, packages)
    if modules and not (site / PRELOAD_MODULE).exists():  # a package's own sitecustomize stays as it is
        (site / PRELOAD_MODULE).write_text(PRELOAD_TEMPLATE.format(env_id=env_id, budget=PRELOAD_BUDGET_MIB,
                                                                   modules=modules))
    return modules
