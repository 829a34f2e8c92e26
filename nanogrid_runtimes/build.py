"""Build NanoGrid's runtime images without a registry (tests and CI call this; it skips what exists).

    python nanogrid_runtimes/build.py [--base IMAGE] [--force]

    python nanogrid_runtimes/build.py --python 3.13     # the Python 3.13 runtime, from Debian trixie

    python nanogrid_runtimes/build.py --runtime node    # the seed platform's other languages: node, go, cpp

1. Base image: unless --base names one that exists, `mmdebstrap` makes a minimal Debian root
   filesystem with python3 (and DEBIAN_PACKAGES) from Debian's packages (bookworm for Python 3.11,
   trixie for 3.13) and `docker import` turns it into nanogrid/debian-python:<suite>-<hash>.
2. Runtime image nanogrid/runtime-python:<minor> (and :latest for the grid's own Python) from
   nanogrid_runtimes/python/Dockerfile, with the bootstrap and the grid's own cloudpickle and NanoGrid
   client modules (for another Python, installed from wheels with uv at the grid's versions).
   Labels record the Python minor version (the grid serves each client the runtime of its own)
   and a hash of the build context (a changed bootstrap rebuilds the image).
3. Other languages (``--runtime node|go|cpp``): the same mmdebstrap base with Debian's nodejs,
   golang-go or g++, and that language's bootstrap from nanogrid_runtimes/<runtime>/ (Go's and C++'s are
   compiled while the image is built), tagged nanogrid/runtime-<runtime>:<version> and :latest and
   labelled ``nanogrid.runtime`` (the grid's name for it) and ``nanogrid.version``.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# python3-pil lets the tutorials' image functions run in the default image; add what your functions need.
DEBIAN_PACKAGES = ["python3", "python3-pil"]
DEBIAN_SUITES = {"3.11": "bookworm", "3.13": "trixie"}  # the Python each Debian release ships
HOST_PYTHON = "%d.%d" % sys.version_info[:2]
RUNTIME_REPOSITORY = "nanogrid/runtime-python"
RUNTIME_IMAGE = f"{RUNTIME_REPOSITORY}:latest"  # the grid's own Python


STEP_TIMEOUT_S = 900  # mmdebstrap, docker import and docker build each stop after this
# Debian package names (Debian policy 5.6.1), and what apt could read as a pattern rather than a name.
DEBIAN_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]{0,99}")
PATTERN_SIGNS = (
    ".+",
    ".*",
    "*",
    "?",
    "[",
    "]",
    "~",
    "^",
    "$",
    "|",
    "(",
    ")",
    "!",
    "{",
    "}",
    "/",
    "=",
    ":",
    ",",
)


def debian_base(python: str, packages: list[str]) -> str:
    suite = DEBIAN_SUITES[python]
    return (
        f"nanogrid/debian-python:{suite}-"
        + hashlib.sha256(" ".join(packages).encode()).hexdigest()[:8]
    )


def with_extra_packages(extra_packages: list[str] | None) -> list[str]:
    """The Debian packages of a runtime: the grid's own, then a function environment's ``system`` (sorted)."""
    return DEBIAN_PACKAGES + sorted(set(extra_packages or []) - set(DEBIAN_PACKAGES))


def runtime_tag(python: str, extra_packages: list[str] | None = None) -> str:
    """nanogrid/runtime-python:<minor>, or :<minor>-<hash> for a runtime with a function environment's packages."""
    image = f"{RUNTIME_REPOSITORY}:{python}"
    if extra_packages:
        image += (
            "-"
            + hashlib.sha256(" ".join(with_extra_packages(extra_packages)).encode()).hexdigest()[:8]
        )
    return image


def derived_images(python: str, extra_packages: list[str]) -> list[str]:
    """The images made for a function environment's Debian packages: its runtime, then the Debian base under it."""
    return [
        runtime_tag(python, extra_packages),
        debian_base(python, with_extra_packages(extra_packages)),
    ]


def debian_name_problem(name: str) -> str | None:
    """Why ``name`` is not one exact Debian package name (apt would read a regex or pattern), or None."""
    if not DEBIAN_NAME.fullmatch(name):
        return "Debian package names are lower-case letters, digits and + . - (starting with a letter or digit)"
    signs = [sign for sign in PATTERN_SIGNS if sign in name]
    if signs:
        return f"it holds {signs[0]!r}, which apt reads as a pattern, not a name"
    return None


def names_file(suite: str) -> Path:
    """Where the names of a Debian release's packages are kept once mmdebstrap has fetched its index here."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "nanogrid" / "debian" / f"{suite}-amd64.names"


# suite -> (when its source changed, its names)
_known_names: dict[str, tuple[float, frozenset[str]]] = {}


def debian_package_names(suite: str) -> frozenset[str] | None:
    """Every package name in Debian ``suite`` (amd64), or None where this host has no list of them.

    The list mmdebstrap saved (see build_debian_base) comes first; else the host's own apt index
    when the host runs that Debian release. Read once per change (about 0.5 s for 64,000 names).
    """
    saved = names_file(suite)
    lists = Path("/var/lib/apt/lists")
    if saved.is_file():
        source, read = saved, lambda: saved.read_text()
    elif _host_codename() == suite and lists.is_dir() and shutil.which("apt-cache"):
        source, read = (
            lists,
            lambda: (
                subprocess.run(
                    ["apt-cache", "pkgnames"],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=True,
                ).stdout
            ),
        )
    else:
        return None
    changed = source.stat().st_mtime
    known = _known_names.get(suite)
    if known is None or known[0] != changed:
        try:
            known = changed, frozenset(read().split())
        except (OSError, subprocess.SubprocessError):
            return None
        _known_names[suite] = known
    return known[1] or None


def _host_codename() -> str:
    try:
        release = Path("/etc/os-release").read_text()
    except OSError:
        return ""
    found = re.search(r"^VERSION_CODENAME=\"?([a-z]+)", release, re.MULTILINE)
    return found.group(1) if found else ""


def unknown_debian_packages(python: str, names: list[str]) -> list[str]:
    """Names that are not exactly a package of the runtime's Debian release; SystemExit without a list to check."""
    suite = DEBIAN_SUITES[python]
    known = debian_package_names(suite)
    if known is None:
        sys.exit(
            f"this host has no list of Debian {suite}'s packages to check the names against; build a runtime "
            f"for Python {python} with nanogrid_runtimes/build.py --python {python} (which saves one)"
        )
    return [name for name in names if name not in known]


DEBIAN_BASE = debian_base(HOST_PYTHON, DEBIAN_PACKAGES) if HOST_PYTHON in DEBIAN_SUITES else ""
NANOGRID_MODULES = [
    "__init__.py",
    "errors.py",
    "cell_state.py",
    "ai.py",
]  # what a sandbox may import
CONTRACT_MODULES = ["__init__.py", "errors.py"]  # what nanogrid.errors is made of
# Copied from the grid's own environment, with what they need (requests: the seed's functions and ai_client use it).
SITE_DISTRIBUTIONS = ["cloudpickle", "ollama", "requests"]


BUILD_PREFIXES = (
    "nanogrid-rootfs-",
    "nanogrid-context-",
)  # temporary folders of builds (a root filesystem: 100+ MiB)


@contextmanager
def build_directory(prefix: str) -> Iterator[str]:
    """A temporary folder for one build, removed after it. Beside it, ``<folder>.owner`` stays locked while the
    build runs, so that what a killed build leaves is told apart from a running one's (remove_abandoned_directories);
    it is not in the folder, which may be a build context whose every file counts in the image's hash."""
    while True:
        folder = Path(tempfile.gettempdir()) / f"{prefix}{os.urandom(6).hex()}"
        try:
            owner = open(f"{folder}.owner", "x")  # noqa: SIM115  (held for the whole build, below)
            break
        except FileExistsError:
            continue
    with owner:
        fcntl.flock(owner, fcntl.LOCK_EX)  # before the folder exists: a sweep never sees it unowned
        folder.mkdir(mode=0o700)
        try:
            yield str(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            Path(f"{folder}.owner").unlink(missing_ok=True)


def remove_abandoned_directories() -> list[str]:
    """Remove the temporary folders of builds whose process is gone (killed: nothing removed them); returns them."""
    removed = []
    for prefix in BUILD_PREFIXES:
        for owner_file in Path(tempfile.gettempdir()).glob(prefix + "*.owner"):
            folder = owner_file.with_suffix("")
            try:
                with open(owner_file) as owner:
                    # only once the build holding it is gone
                    fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    shutil.rmtree(folder, ignore_errors=True)
                    owner_file.unlink()
                    removed.append(folder.name)
            except (BlockingIOError, FileNotFoundError, PermissionError):
                continue  # running, or removed meanwhile, or another user's
    return removed


def docker(*args: str, capture: bool = False) -> str:
    try:
        result = subprocess.run(
            ["docker", *args], text=True, capture_output=True, timeout=STEP_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        sys.exit(
            f"nanogrid_runtimes/build.py: docker {args[0]} took over {STEP_TIMEOUT_S} s; gave up"
        )
    if result.returncode != 0:
        sys.exit(f"nanogrid_runtimes/build.py: docker {args[0]} failed:\n{result.stderr.strip()}")
    return result.stdout.strip() if capture else ""


def image_exists(name: str) -> bool:
    return (
        subprocess.run(
            ["docker", "image", "inspect", name], capture_output=True, timeout=60
        ).returncode
        == 0
    )


def label(name: str, key: str) -> str:
    return docker(
        "image",
        "inspect",
        "--format",
        f'{{{{ index .Config.Labels "{key}" }}}}',
        name,
        capture=True,
    )


def build_debian_base(python: str, packages: list[str]) -> str:
    name = debian_base(python, packages)
    if shutil.which("mmdebstrap") is None:
        sys.exit(
            "nanogrid_runtimes/build.py: mmdebstrap is missing (apt-get install mmdebstrap), or pass --base IMAGE"
        )
    wrong = {name: debian_name_problem(name) for name in packages}
    for package, problem in wrong.items():
        if problem:  # names only, never a pattern: apt runs as root here
            sys.exit(
                f"nanogrid_runtimes/build.py: {package!r} is not a Debian package name: {problem}"
            )
    names = names_file(DEBIAN_SUITES[python])
    names.parent.mkdir(parents=True, exist_ok=True)
    with build_directory("nanogrid-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        print(f"building {name} with mmdebstrap (about 20 s) ...", flush=True)
        # The release's package names are kept (for checking environments' names before anything is built).
        keep_names = f'chroot "$1" apt-cache pkgnames > {tmp}/names'
        try:
            done = subprocess.run(
                [
                    "mmdebstrap",
                    "--quiet",
                    "--variant=minbase",
                    "--include=" + ",".join(packages),
                    f"--customize-hook={keep_names}",
                    DEBIAN_SUITES[python],
                    str(rootfs),
                ],
                capture_output=True,
                text=True,
                timeout=STEP_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            sys.exit(
                f"nanogrid_runtimes/build.py: mmdebstrap took over {STEP_TIMEOUT_S} s for Debian "
                f"{DEBIAN_SUITES[python]} with {', '.join(packages)}; gave up"
            )
        if done.returncode == 0 and (Path(tmp) / "names").stat().st_size:
            os.replace(Path(tmp) / "names", names)
        # an unknown package name, or no Debian mirror reachable from this host
        if done.returncode != 0:
            said = "\n".join(
                line
                for line in done.stderr.splitlines()
                if line.startswith("E:")
                or "Unable to locate" in line
                or "no installation candidate" in line
            )
            sys.exit(
                f"nanogrid_runtimes/build.py: mmdebstrap could not make a Debian {DEBIAN_SUITES[python]} root file "
                f"system with {', '.join(packages)}:\n{(said or done.stderr).strip()[-1500:]}"
            )
        docker("import", "--change", 'CMD ["python3"]', str(rootfs), name)
    return name


def prepare_context(directory: Path, python: str = HOST_PYTHON) -> str:
    """Copy the build context; returns a hash of everything in it (names, contents and modes)."""
    shutil.copy(HERE / "python" / "Dockerfile", directory / "Dockerfile")
    shutil.copy(HERE / "python" / "bootstrap.py", directory / "bootstrap.py")
    site = directory / "site"
    if python == HOST_PYTHON:
        for name in sorted(_with_dependencies(SITE_DISTRIBUTIONS)):
            _copy_distribution(name, site)
    else:
        _install_distributions(site, python)
    (site / "nanogrid").mkdir(parents=True, exist_ok=True)
    for module in (
        "sdk.py",
        "ai_client.py",
    ):  # the seed platform's `import sdk` and `import ai_client`
        shutil.copy(HERE / "python" / module, site / module)
    for module in NANOGRID_MODULES:
        shutil.copy(ROOT / "nanogrid" / module, site / "nanogrid" / module)
    (site / "nanogrid_contract").mkdir(exist_ok=True)
    for module in CONTRACT_MODULES:
        shutil.copy(ROOT / "nanogrid_contract" / module, site / "nanogrid_contract" / module)
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        # The sandbox runs as nobody: everything readable, whatever umask this build ran under.
        path.chmod(0o755 if path.is_dir() else 0o644)
        if path.is_file():
            digest.update(str(path.relative_to(directory)).encode() + b"\0644\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _install_distributions(site: Path, python: str) -> None:
    """The grid's versions of SITE_DISTRIBUTIONS, as wheels for another Python (uv, on this host)."""
    pins = [f"{name}=={metadata.version(name)}" for name in SITE_DISTRIBUTIONS]
    uv = Path(sys.executable).with_name("uv")
    command = [str(uv)] if uv.exists() else [sys.executable, "-m", "uv"]
    done = subprocess.run(
        [
            *command,
            "pip",
            "install",
            "--quiet",
            "--target",
            str(site),
            "--python-version",
            python,
            "--python-platform",
            "x86_64-manylinux_2_28",
            "--only-binary",
            ":all:",
            *pins,
        ],
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT_S,
    )
    if done.returncode != 0:
        sys.exit(
            f"nanogrid_runtimes/build.py: could not install {', '.join(pins)} for Python {python}:\n{done.stderr}"
        )


def _with_dependencies(names: list[str]) -> set[str]:
    """These distributions and what they require, as installed here (unmet markers are not installed)."""
    found: set[str] = set()
    pending = list(names)
    while pending:
        try:
            dist = metadata.distribution(pending.pop())
        except metadata.PackageNotFoundError:
            continue
        name = dist.metadata["Name"]
        if name in found:
            continue
        found.add(name)
        pending += [
            re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]
            for r in dist.requires or []
            if "extra ==" not in r
        ]
    return found


def _copy_distribution(name: str, site: Path) -> None:
    dist = metadata.distribution(name)
    for file in dist.files or []:
        parts = file.parts
        if (
            parts[0].endswith(".dist-info")
            or "__pycache__" in parts
            or parts[0] == ".."
            or file.suffix == ".pth"
        ):
            continue
        target = site / file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(file.locate(), target)


def build(
    base: str | None,
    force: bool,
    python: str = HOST_PYTHON,
    extra_packages: list[str] | None = None,
) -> str:
    """Build (or find up to date) the runtime image of ``python``; returns its name.

    ``extra_packages`` (Debian packages a function environment asks for) give a runtime of its own,
    tagged with a hash of them.
    """
    packages = with_extra_packages(extra_packages)
    image = runtime_tag(python, extra_packages)
    if base is None:
        if python not in DEBIAN_SUITES:
            sys.exit(
                f"nanogrid_runtimes/build.py: no Debian release ships Python {python}; "
                f"choose one of {', '.join(DEBIAN_SUITES)} or pass --base IMAGE"
            )
        base = debian_base(python, packages)
        if not image_exists(base) or force:
            build_debian_base(python, packages)
    elif not image_exists(base):
        sys.exit(
            f"nanogrid_runtimes/build.py: no image {base!r} here, and this machine cannot pull one"
        )
    tags = [image] + ([RUNTIME_IMAGE] if python == HOST_PYTHON and not extra_packages else [])
    with build_directory("nanogrid-context-") as tmp:
        context = Path(tmp)
        digest = prepare_context(context, python)
        if not force and all(
            image_exists(tag)
            and label(tag, "nanogrid.context") == digest
            and label(tag, "nanogrid.base") == base
            for tag in tags
        ):
            print(f"{image} is up to date")
            return image
        found = docker(
            "run",
            "--rm",
            "--network=none",
            base,
            "python3",
            "-c",
            "import sys; print('%d.%d' % sys.version_info[:2])",
            capture=True,
        )
        if found != python:
            sys.exit(f"nanogrid_runtimes/build.py: {base} runs Python {found}, not {python}")
        print(f"building {image} on {base} (Python {python}) ...", flush=True)
        docker(
            "build",
            "--quiet",
            "--build-arg",
            f"BASE={base}",
            "--label",
            f"nanogrid.python={python}",
            "--label",
            f"nanogrid.context={digest}",
            "--label",
            f"nanogrid.base={base}",
            *[arg for tag in tags for arg in ("-t", tag)],
            str(context),
        )
    return image


def runtime_image(python: str, extra_packages: list[str]) -> str:
    """The runtime of ``python`` with extra Debian packages (a function environment's ``system``).

    Only exact names of the runtime's Debian release go to apt (which runs as root while building).
    """
    for name in extra_packages:
        problem = debian_name_problem(name)
        if problem:
            sys.exit(f"{name!r} is not a Debian package name: {problem}")
    if python in DEBIAN_SUITES:
        unknown = unknown_debian_packages(python, extra_packages)
        if unknown:
            sys.exit(f"Debian {DEBIAN_SUITES[python]} has no package named {unknown[0]!r}")
    return build(None, False, python, extra_packages)


# The seed platform's other languages, from Debian's own packages (bookworm: Node 18, Go 1.19, g++ 12).
LANGUAGE_RUNTIMES = {
    # --runtime: (the grid's runtime name, Debian packages, the command that prints the version)
    "node": ("nodejs", ["nodejs", "unzip"], "node --version | tr -d v | cut -d. -f1"),
    "go": ("go", ["golang-go"], "go version | sed -E 's/.*go([0-9]+[.][0-9]+).*/\\1/'"),
    "cpp": ("cpp", ["g++", "unzip"], "g++ -dumpversion"),
}
LANGUAGE_SUITE = "bookworm"


def language_image(runtime: str) -> str:
    """The image the grid starts for a language runtime (see nanogrid_backend/grid.py)."""
    return f"nanogrid/runtime-{runtime}:latest"


def language_base(runtime: str, force: bool = False) -> str:
    """Debian minbase with the language's packages (mmdebstrap, about a minute), imported as an image."""
    packages = LANGUAGE_RUNTIMES[runtime][1]
    base = (
        f"nanogrid/debian-{runtime}:{LANGUAGE_SUITE}-"
        + hashlib.sha256(" ".join(packages).encode()).hexdigest()[:8]
    )
    if not image_exists(base) or force:
        if shutil.which("mmdebstrap") is None:
            sys.exit(
                "nanogrid_runtimes/build.py: mmdebstrap is missing (apt-get install mmdebstrap)"
            )
        with build_directory("nanogrid-rootfs-") as tmp:
            rootfs = Path(tmp) / "rootfs.tar"
            print(f"building {base} with mmdebstrap ...", flush=True)
            subprocess.run(
                [
                    "mmdebstrap",
                    "--quiet",
                    "--variant=minbase",
                    "--include=" + ",".join(packages),
                    LANGUAGE_SUITE,
                    str(rootfs),
                ],
                check=True,
                timeout=STEP_TIMEOUT_S,
            )
            docker("import", "--change", 'CMD ["/bin/sh"]', str(rootfs), base)
    return base


def build_language(runtime: str, force: bool) -> str:
    """Build (or find up to date) nanogrid/runtime-<runtime>; returns its name."""
    grid_name, packages, version_command = LANGUAGE_RUNTIMES[runtime]
    base = language_base(runtime, force)
    image = language_image(runtime)
    with build_directory("nanogrid-context-") as tmp:
        context = Path(tmp)
        for path in (HERE / runtime).iterdir():
            if path.is_file():
                shutil.copy(path, context / path.name)
        digest = hashlib.sha256()
        for path in sorted(context.iterdir()):
            path.chmod(0o644)
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        context_hash = digest.hexdigest()[:16]
        if (
            not force
            and image_exists(image)
            and label(image, "nanogrid.context") == context_hash
            and label(image, "nanogrid.base") == base
        ):
            print(f"{image} is up to date")
            return image
        version = docker(
            "run", "--rm", "--network=none", base, "sh", "-c", version_command, capture=True
        )
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)?", version):
            sys.exit(f"nanogrid_runtimes/build.py: {base} reports {runtime} version {version!r}")
        print(f"building {image} ({runtime} {version}) on {base} ...", flush=True)
        docker(
            "build",
            "--quiet",
            "--build-arg",
            f"BASE={base}",
            "--label",
            f"nanogrid.runtime={grid_name}",
            "--label",
            f"nanogrid.version={version}",
            "--label",
            f"nanogrid.context={context_hash}",
            "--label",
            f"nanogrid.base={base}",
            "-t",
            image,
            "-t",
            f"nanogrid/runtime-{runtime}:{version}",
            str(context),
        )
    return image


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base", help="an existing image with python3 (default: build a Debian one)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the images exist")
    parser.add_argument(
        "--python",
        default=HOST_PYTHON,
        help=f"the runtime's Python: {', '.join(DEBIAN_SUITES)} "
        f"(default: this interpreter's, {HOST_PYTHON})",
    )
    parser.add_argument(
        "--runtime",
        default="python",
        choices=["python", *LANGUAGE_RUNTIMES],
        help="which runtime image to build (default: python)",
    )
    args = parser.parse_args()
    if args.runtime != "python":
        print(build_language(args.runtime, args.force))
        return
    print(build(args.base, args.force, args.python))


if __name__ == "__main__":
    main()
