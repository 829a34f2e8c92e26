"""The contract between client and grid: standard library only, the one thing both sides import of each other.

What must never happen: the contract pulling in a third-party package (the client would carry the grid's
dependencies); the grid importing the client; the grid's JSON for a job or function drifting from the keys the
client reads.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: str) -> list[tuple[str, str]]:
    """(file, imported module) for every import anywhere in a package's modules, lazy ones included."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((str(path.relative_to(ROOT)), node.module))
            elif isinstance(node, ast.Import):
                found += [(str(path.relative_to(ROOT)), alias.name) for alias in node.names]
    return found


def test_the_contract_imports_the_standard_library_only() -> None:
    modules = sorted(
        p.stem for p in (ROOT / "nanogrid_contract").glob("*.py") if p.stem != "__init__"
    )
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import importlib\n"
        f"for name in {modules!r}: importlib.import_module('nanogrid_contract.' + name)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules if not m.startswith('_')}"
        "             - set(sys.stdlib_module_names) - {'nanogrid_contract'}))"
    )
    # -S: no site-packages at all, so a third-party import fails here; -I: no user site, no PYTHON* variables
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script, str(ROOT)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
    outside = [
        (f, m)
        for f, m in _imports("nanogrid_contract")
        if m.split(".")[0] not in sys.stdlib_module_names
        and m.split(".")[0] != "nanogrid_contract"
        and m.split(".")[0] != "cronsim"
    ]  # cronsim: tried where the grid's extras are, and skipped if absent
    assert outside == []


def test_the_grid_never_imports_the_client() -> None:
    for package in ("nanogrid_backend", "nanogrid_runtimes"):
        client = [
            (f, m) for f, m in _imports(package) if m == "nanogrid" or m.startswith("nanogrid.")
        ]
        assert client == [], f"{package} imports the client: {client}"


def test_the_grids_job_and_function_views_are_the_contracts() -> None:
    from nanogrid_backend.controller import schemas
    from nanogrid_contract import views

    assert set(schemas.JobView.model_fields) == set(views.JobView.__annotations__)
    assert set(schemas.FunctionView.model_fields) == set(views.FunctionView.__annotations__)
    assert set(schemas.OutputFile.model_fields) == set(views.OutputFileView.__annotations__)
