"""Build NanoGrid's runtime images without a registry (tests and CI call this; it skips what exists).

    python runtimes/build.py [--base IMAGE] [--force]

1. Base image: unless --base names one that exists, `mmdebstrap` makes a minimal Debian bookworm
   root filesystem with python3 (and DEBIAN_PACKAGES) from Debian's packages and `docker import`
   turns it into nanogrid/debian-python:bookworm-<hash of the package list>.
2. Runtime image nanogrid/runtime-python:latest from runtimes/python/Dockerfile, with the
   bootstrap and the grid's own cloudpickle and NanoGrid client modules. Labels record the Python
   minor version (the grid refuses functions pickled by another) and a hash of the build context
   (a changed bootstrap rebuilds the image).
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
DEBIAN_BASE = "nanogrid/debian-python:bookworm-" + hashlib.sha256(" ".join(DEBIAN_PACKAGES).encode()).hexdigest()[:8]
RUNTIME_IMAGE = "nanogrid/runtime-python:latest"
NANOGRID_MODULES = ["__init__.py", "errors.py", "cells.py", "ai.py"]  # what a sandbox may import
SITE_DISTRIBUTIONS = ["cloudpickle", "ollama"]  # copied from the grid's own environment, with what they need


def docker(*args: str, capture: bool = False) -> str:
    result = subprocess.run(["docker", *args], text=True, capture_output=True)
    if result.returncode != 0:
        sys.exit(f"runtimes/build.py: docker {args[0]} failed:\n{result.stderr.strip()}")
    return result.stdout.strip() if capture else ""


def image_exists(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


def label(name: str, key: str) -> str:
    return docker("image", "inspect", "--format", f'{{{{ index .Config.Labels "{key}" }}}}', name, capture=True)


def build_debian_base() -> None:
    if shutil.which("mmdebstrap") is None:
        sys.exit("runtimes/build.py: mmdebstrap is missing (apt-get install mmdebstrap), or pass --base IMAGE")
    with tempfile.TemporaryDirectory(prefix="nanogrid-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        print(f"building {DEBIAN_BASE} with mmdebstrap (about 20 s) ...", flush=True)
        subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", "--include=" + ",".join(DEBIAN_PACKAGES),
                        "bookworm", str(rootfs)], check=True)
        docker("import", "--change", 'CMD ["python3"]', str(rootfs), DEBIAN_BASE)


def prepare_context(directory: Path) -> str:
    """Copy the build context; returns a hash of everything in it."""
    shutil.copy(HERE / "python" / "Dockerfile", directory / "Dockerfile")
    shutil.copy(HERE / "python" / "bootstrap.py", directory / "bootstrap.py")
    site = directory / "site"
    for name in sorted(_with_dependencies(SITE_DISTRIBUTIONS)):
        _copy_distribution(name, site)
    (site / "nanogrid").mkdir()
    for module in NANOGRID_MODULES:
        shutil.copy(ROOT / "nanogrid" / module, site / "nanogrid" / module)
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


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


def build(base: str | None, force: bool) -> str:
    if base is None:
        base = DEBIAN_BASE
        if not image_exists(base) or force:
            build_debian_base()
    elif not image_exists(base):
        sys.exit(f"runtimes/build.py: no image {base!r} here, and this machine cannot pull one")
    with tempfile.TemporaryDirectory(prefix="nanogrid-context-") as tmp:
        context = Path(tmp)
        digest = prepare_context(context)
        if not force and image_exists(RUNTIME_IMAGE) and label(RUNTIME_IMAGE, "nanogrid.context") == digest \
                and label(RUNTIME_IMAGE, "nanogrid.base") == base:
            print(f"{RUNTIME_IMAGE} is up to date")
            return RUNTIME_IMAGE
        python = docker("run", "--rm", "--network=none", base, "python3", "-c",
                        "import sys; print('%d.%d' % sys.version_info[:2])", capture=True)
        print(f"building {RUNTIME_IMAGE} on {base} (Python {python}) ...", flush=True)
        docker("build", "--quiet", "--build-arg", f"BASE={base}", "--label", f"nanogrid.python={python}",
               "--label", f"nanogrid.context={digest}", "--label", f"nanogrid.base={base}",
               "-t", RUNTIME_IMAGE, str(context))
    return RUNTIME_IMAGE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="an existing image with python3 (default: build a Debian one)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the images exist")
    args = parser.parse_args()
    print(build(args.base, args.force))


if __name__ == "__main__":
    main()
