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
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
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


def debian_base(python: str, packages: list[str]) -> str:
    suite = DEBIAN_SUITES[python]
    return f"nanogrid/debian-python:{suite}-" + hashlib.sha256(" ".join(packages).encode()).hexdigest()[:8]


DEBIAN_BASE = debian_base(HOST_PYTHON, DEBIAN_PACKAGES) if HOST_PYTHON in DEBIAN_SUITES else ""
NANOGRID_MODULES = ["__init__.py", "errors.py", "cells.py", "ai.py"]  # what a sandbox may import
SITE_DISTRIBUTIONS = ["cloudpickle", "ollama"]  # copied from the grid's own environment, with what they need


def docker(*args: str, capture: bool = False) -> str:
    result = subprocess.run(["docker", *args], text=True, capture_output=True)
    if result.returncode != 0:
        sys.exit(f"nanogrid_runtimes/build.py: docker {args[0]} failed:\n{result.stderr.strip()}")
    return result.stdout.strip() if capture else ""


def image_exists(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


def label(name: str, key: str) -> str:
    return docker("image", "inspect", "--format", f'{{{{ index .Config.Labels "{key}" }}}}', name, capture=True)


def build_debian_base(python: str, packages: list[str]) -> str:
    name = debian_base(python, packages)
    if shutil.which("mmdebstrap") is None:
        sys.exit("nanogrid_runtimes/build.py: mmdebstrap is missing (apt-get install mmdebstrap), or pass --base IMAGE")
    with tempfile.TemporaryDirectory(prefix="nanogrid-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        print(f"building {name} with mmdebstrap (about 20 s) ...", flush=True)
        done = subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", "--include=" + ",".join(packages),
                               DEBIAN_SUITES[python], str(rootfs)], capture_output=True, text=True)
        if done.returncode != 0:  # an unknown package name, or no Debian mirror reachable from this host
            said = "\n".join(line for line in done.stderr.splitlines() if line.startswith("E:") or "Unable to locate"
                             in line or "no installation candidate" in line)
            sys.exit(f"nanogrid_runtimes/build.py: mmdebstrap could not make a Debian {DEBIAN_SUITES[python]} root file "
                     f"system with {', '.join(packages)}:\n{(said or done.stderr).strip()[-1500:]}")
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
    shutil.copy(HERE / "python" / "sdk.py", site / "sdk.py")  # the seed platform's `import sdk`
    for module in NANOGRID_MODULES:
        shutil.copy(ROOT / "nanogrid" / module, site / "nanogrid" / module)
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
    done = subprocess.run([*command, "pip", "install", "--quiet", "--target", str(site), "--python-version", python,
                           "--python-platform", "x86_64-manylinux_2_28", "--only-binary", ":all:", *pins],
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"nanogrid_runtimes/build.py: could not install {', '.join(pins)} for Python {python}:\n{done.stderr}")


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
        pending += [re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0] for r in dist.requires or [] if "extra ==" not in r]
    return found


def _copy_distribution(name: str, site: Path) -> None:
    dist = metadata.distribution(name)
    for file in dist.files or []:
        parts = file.parts
        if parts[0].endswith(".dist-info") or "__pycache__" in parts or parts[0] == ".." or file.suffix == ".pth":
            continue
        target = site / file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(file.locate(), target)


def build(base: str | None, force: bool, python: str = HOST_PYTHON, extra_packages: list[str] | None = None) -> str:
    """Build (or find up to date) the runtime image of ``python``; returns its name.

    ``extra_packages`` (Debian packages a function environment asks for) give a runtime of its own,
    tagged with a hash of them.
    """
    packages = DEBIAN_PACKAGES + sorted(set(extra_packages or []) - set(DEBIAN_PACKAGES))
    image = f"{RUNTIME_REPOSITORY}:{python}"
    if extra_packages:
        image += "-" + hashlib.sha256(" ".join(packages).encode()).hexdigest()[:8]
    if base is None:
        if python not in DEBIAN_SUITES:
            sys.exit(f"nanogrid_runtimes/build.py: no Debian release ships Python {python}; "
                     f"choose one of {', '.join(DEBIAN_SUITES)} or pass --base IMAGE")
        base = debian_base(python, packages)
        if not image_exists(base) or force:
            build_debian_base(python, packages)
    elif not image_exists(base):
        sys.exit(f"nanogrid_runtimes/build.py: no image {base!r} here, and this machine cannot pull one")
    tags = [image] + ([RUNTIME_IMAGE] if python == HOST_PYTHON and not extra_packages else [])
    with tempfile.TemporaryDirectory(prefix="nanogrid-context-") as tmp:
        context = Path(tmp)
        digest = prepare_context(context, python)
        if not force and all(image_exists(tag) and label(tag, "nanogrid.context") == digest
                             and label(tag, "nanogrid.base") == base for tag in tags):
            print(f"{image} is up to date")
            return image
        found = docker("run", "--rm", "--network=none", base, "python3", "-c",
                       "import sys; print('%d.%d' % sys.version_info[:2])", capture=True)
        if found != python:
            sys.exit(f"nanogrid_runtimes/build.py: {base} runs Python {found}, not {python}")
        print(f"building {image} on {base} (Python {python}) ...", flush=True)
        docker("build", "--quiet", "--build-arg", f"BASE={base}", "--label", f"nanogrid.python={python}",
               "--label", f"nanogrid.context={digest}", "--label", f"nanogrid.base={base}",
               *[arg for tag in tags for arg in ("-t", tag)], str(context))
    return image


def runtime_image(python: str, extra_packages: list[str]) -> str:
    """The runtime of ``python`` with extra Debian packages (a function environment's ``system``)."""
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
    base = f"nanogrid/debian-{runtime}:{LANGUAGE_SUITE}-" + hashlib.sha256(" ".join(packages).encode()).hexdigest()[:8]
    if not image_exists(base) or force:
        if shutil.which("mmdebstrap") is None:
            sys.exit("nanogrid_runtimes/build.py: mmdebstrap is missing (apt-get install mmdebstrap)")
        with tempfile.TemporaryDirectory(prefix="nanogrid-rootfs-") as tmp:
            rootfs = Path(tmp) / "rootfs.tar"
            print(f"building {base} with mmdebstrap ...", flush=True)
            subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", "--include=" + ",".join(packages),
                            LANGUAGE_SUITE, str(rootfs)], check=True)
            docker("import", "--change", 'CMD ["/bin/sh"]', str(rootfs), base)
    return base


def build_language(runtime: str, force: bool) -> str:
    """Build (or find up to date) nanogrid/runtime-<runtime>; returns its name."""
    grid_name, packages, version_command = LANGUAGE_RUNTIMES[runtime]
    base = language_base(runtime, force)
    image = language_image(runtime)
    with tempfile.TemporaryDirectory(prefix="nanogrid-context-") as tmp:
        context = Path(tmp)
        for path in (HERE / runtime).iterdir():
            if path.is_file():
                shutil.copy(path, context / path.name)
        digest = hashlib.sha256()
        for path in sorted(context.iterdir()):
            path.chmod(0o644)
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        context_hash = digest.hexdigest()[:16]
        if not force and image_exists(image) and label(image, "nanogrid.context") == context_hash \
                and label(image, "nanogrid.base") == base:
            print(f"{image} is up to date")
            return image
        version = docker("run", "--rm", "--network=none", base, "sh", "-c", version_command, capture=True)
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)?", version):
            sys.exit(f"nanogrid_runtimes/build.py: {base} reports {runtime} version {version!r}")
        print(f"building {image} ({runtime} {version}) on {base} ...", flush=True)
        docker("build", "--quiet", "--build-arg", f"BASE={base}", "--label", f"nanogrid.runtime={grid_name}",
               "--label", f"nanogrid.version={version}", "--label", f"nanogrid.context={context_hash}",
               "--label", f"nanogrid.base={base}", "-t", image, "-t", f"nanogrid/runtime-{runtime}:{version}",
               str(context))
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="an existing image with python3 (default: build a Debian one)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the images exist")
    parser.add_argument("--python", default=HOST_PYTHON, help=f"the runtime's Python: {', '.join(DEBIAN_SUITES)} "
                                                              f"(default: this interpreter's, {HOST_PYTHON})")
    parser.add_argument("--runtime", default="python", choices=["python", *LANGUAGE_RUNTIMES],
                        help="which runtime image to build (default: python)")
    args = parser.parse_args()
    if args.runtime != "python":
        print(build_language(args.runtime, args.force))
        return
    print(build(args.base, args.force, args.python))


if __name__ == "__main__":
    main()
