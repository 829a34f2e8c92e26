"""MkDocs hook: writes the HTTP reference page from the controller's OpenAPI schema at build time."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

PAGE = "http/reference.md"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def openapi_schema() -> dict[str, Any]:
    """The schema of the app a grid serves, built on a throwaway grid in a temporary data dir (never started)."""
    from nanogrid_backend.config import GridConfig
    from nanogrid_backend.controller.app import create_app
    from nanogrid_backend.grid import Grid

    umask = os.umask(
        0o022
    )  # a grid sets its process's umask to 077: the site's files must stay readable
    try:
        with tempfile.TemporaryDirectory(prefix="nanogrid-docs-") as data_dir:
            # Never started, and nothing outside the temp dir: no sandbox, no cgroup, no namespaces.
            grid = Grid(
                GridConfig(
                    data_dir=Path(data_dir),
                    sandbox="process",
                    stem_cells=0,
                    cgroups="off",
                    bubblewrap="off",
                )
            )
            try:
                return create_app(grid, manage_grid=False).openapi()
            finally:
                grid.stop()
    finally:
        os.umask(umask)


def cell(text: Any) -> str:
    """Text made safe for one cell of a Markdown table."""
    return " ".join(str(text).split()).replace("|", "\\|")


def type_of(schema: dict[str, Any]) -> str:
    """A short name for a parameter's or body's type."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " or ".join(type_of(s) for s in schema["anyOf"] if s.get("type") != "null")
    if schema.get("type") == "array":
        return f"list of {type_of(schema.get('items', {}))}"
    return str(schema.get("type", "any"))


def fields_markdown(schema: dict[str, Any], components: dict[str, Any]) -> list[str]:
    """The fields of a request body's schema, one table row each."""
    if "$ref" in schema:
        schema = components.get(schema["$ref"].rsplit("/", 1)[-1], {})
    properties = schema.get("properties", {})
    if not properties:
        return []
    required = set(schema.get("required", []))
    lines = ["| field | type | required | what |", "|---|---|---|---|"]
    for name, field in properties.items():
        lines.append(
            f"| `{name}` | {cell(type_of(field))} | {'yes' if name in required else 'no'}"
            f" | {cell(field.get('description', ''))} |"
        )
    return lines + [""]


def response_text(response: dict[str, Any]) -> str:
    """A response's description, with the type of its JSON body where it has one."""
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    shape = type_of(schema) if schema else ""
    if shape in (
        "",
        "any",
        "ErrorDetail",
    ):  # every error has the one body the page names at its top
        return cell(response.get("description", ""))
    return f"{cell(response.get('description', ''))} (`{cell(shape)}`)"


def operation_markdown(
    path: str, method: str, op: dict[str, Any], common: dict[str, str], components: dict[str, Any]
) -> list[str]:
    lines = [f"### `{method.upper()} {path}`", ""]
    if op.get("summary"):
        lines += [op["summary"], ""]
    if op.get("description"):
        lines += [op["description"].strip(), ""]
    if op.get("parameters"):
        lines += ["| parameter | in | type | required | what |", "|---|---|---|---|---|"]
        for p in op["parameters"]:
            schema = p.get("schema", {})
            what = p.get("description") or schema.get("description", "")
            lines.append(
                f"| `{p['name']}` | {p['in']} | {cell(type_of(schema))} | {'yes' if p.get('required') else 'no'}"
                f" | {cell(what)} |"
            )
        lines.append("")
    body = op.get("requestBody")
    if body:
        for kind, content in body.get("content", {}).items():
            schema = content.get("schema", {})
            lines += [
                f"Body{' (required)' if body.get('required') else ''}: `{kind}`, `{cell(type_of(schema))}`",
                "",
            ]
            lines += fields_markdown(schema, components)
    own = {
        status: r
        for status, r in op.get("responses", {}).items()
        if common.get(status) != r.get("description")
    }
    lines += ["| status | meaning |", "|---|---|"]
    lines += [
        f"| {status} | {response_text(response)} |" for status, response in sorted(own.items())
    ]
    return lines + [""]


def common_errors(operations: list[dict[str, Any]]) -> dict[str, str]:
    """The error statuses (with their meaning) that most routes share: listed once, not under each route."""
    counts = Counter(
        (status, r.get("description", ""))
        for op in operations
        for status, r in op.get("responses", {}).items()
        if status.startswith(("4", "5"))
    )
    return {status: text for (status, text), n in counts.items() if n * 5 >= len(operations) * 4}


def reference_markdown(schema: dict[str, Any]) -> str:
    info = schema.get("info", {})
    components = schema.get("components", {}).get("schemas", {})
    sections: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for path, item in schema.get("paths", {}).items():
        section = path.split("/")[2] if path.startswith("/v1/") else path.strip("/")
        for method in METHODS:
            if method in item:
                sections.setdefault(section, []).append((path, method, item[method]))
    common = common_errors([op for operations in sections.values() for _, _, op in operations])
    lines = [
        "# HTTP reference",
        "",
        f"Every path of NanoGrid's own API, from the OpenAPI schema of {info.get('title', 'the controller')} "
        f"{info.get('version', '')} (a running grid serves the same schema at `/openapi.json`). Every route "
        "needs an API key (`x-api-key: KEY` or `Authorization: Bearer KEY`); every error answers "
        '`{"detail", "error"}` ([errors](index.md#errors)). The seed platform\'s routes are on '
        "[their own page](seed.md).",
        "",
        "Any route may also answer these; each route lists what else it answers:",
        "",
        "| status | meaning |",
        "|---|---|",
    ]
    lines += [f"| {status} | {cell(text)} |" for status, text in sorted(common.items())]
    lines.append("")
    for section, operations in sections.items():
        lines += [f"## {section}", ""]
        for path, method, op in operations:
            lines += operation_markdown(path, method, op, common, components)
    return "\n".join(lines)


def on_files(files: Files, config: MkDocsConfig) -> Files:
    files.append(File.generated(config, PAGE, content=reference_markdown(openapi_schema())))
    return files
