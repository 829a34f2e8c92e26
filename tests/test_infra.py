"""Terraform in infra/, checked without an AWS account: it parses, modules and callers line up, checkov passes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import hcl2
import pytest

INFRA = Path(__file__).resolve().parents[1] / "infra"
META_ARGUMENTS = {
    "source",
    "count",
    "for_each",
    "depends_on",
    "providers",
    "version",
    "__start_line__",
    "__end_line__",
}


def parse(directory: Path) -> dict[str, list]:
    merged: dict[str, list] = {}
    for path in sorted(directory.glob("*.tf")):
        with path.open() as f:
            for block, items in hcl2.load(f).items():
                merged.setdefault(block, []).extend(items)
    return merged


def names(parsed: dict[str, list], block: str) -> dict[str, dict]:
    return {name: body for item in parsed.get(block, []) for name, body in item.items()}


def source(call: dict) -> Path:
    value = call["source"]
    return (INFRA / (value[0] if isinstance(value, list) else value)).resolve()


def test_every_tf_file_parses():
    files = sorted(INFRA.rglob("*.tf"))
    assert len(files) >= 30
    for path in files:
        with path.open() as f:
            hcl2.load(f)


def test_modules_get_exactly_the_variables_they_declare():
    root = parse(INFRA)
    for name, call in names(root, "module").items():
        module_dir = source(call)
        assert module_dir.is_dir(), f"module {name}: no {module_dir}"
        declared = names(parse(module_dir), "variable")
        passed = set(call) - META_ARGUMENTS
        assert passed <= set(declared), (
            f"module {name} gets undeclared {sorted(passed - set(declared))}"
        )
        required = {v for v, body in declared.items() if "default" not in body}
        assert required <= passed, f"module {name} misses {sorted(required - passed)}"


def test_references_name_outputs_and_variables_that_exist():
    root = parse(INFRA)
    modules = names(root, "module")
    outputs = {name: set(names(parse(source(call)), "output")) for name, call in modules.items()}
    root_text = "\n".join(p.read_text() for p in INFRA.glob("*.tf"))
    for module, output in re.findall(r"module\.(\w+)(?:\[\d+\])?\.(\w+)", root_text):
        assert output in outputs[module], f"module.{module}.{output} is not an output of {module}"
    for directory in [INFRA, *(p for p in (INFRA / "modules").iterdir() if p.is_dir())]:
        declared = set(names(parse(directory), "variable"))
        text = "\n".join(p.read_text() for p in directory.glob("*.tf"))
        for variable in set(re.findall(r"\bvar\.(\w+)", text)):
            assert variable in declared, f"{directory.name}: var.{variable} is not declared"


def test_every_variable_and_output_is_described():
    for directory in [INFRA, *(p for p in (INFRA / "modules").iterdir() if p.is_dir())]:
        parsed = parse(directory)
        for block in ("variable", "output"):
            for name, body in names(parsed, block).items():
                assert body.get("description"), (
                    f"{directory.name}: {block} {name} has no description"
                )


def test_checkov_finds_nothing_not_suppressed_with_a_reason():
    skips = re.findall(
        r"checkov:skip=([A-Z0-9_]+)(:?)(.*)", "\n".join(p.read_text() for p in INFRA.rglob("*.tf"))
    )
    assert skips and all(colon and reason.strip() for _, colon, reason in skips), (
        "every skip needs a written reason"
    )
    checkov = shutil.which("checkov") or str(Path(sys.executable).parent / "checkov")
    result = subprocess.run(
        [checkov, "-d", str(INFRA), "--framework", "terraform", "--quiet", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(result.stdout)
    summary = report["summary"]
    failed = [f"{c['check_id']} {c['resource']}" for c in report["results"]["failed_checks"]]
    assert summary["failed"] == 0, failed
    assert summary["passed"] > 100
    if summary.get("parsing_errors"):
        pytest.fail(f"checkov could not parse: {summary['parsing_errors']}")
