"""Running a notebook cell on the grid: which names it reads and assigns, and the remote runner.

Standard library and cloudpickle only: `run_cell` is imported inside the sandbox.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

import cloudpickle


@dataclass(frozen=True)
class CellPlan:
    source: str
    reads: list[str]  # names the cell uses: those the notebook defines are sent along
    assigns: list[str]  # names the cell binds at top level: sent back into the notebook
    has_value: bool  # the last statement is an expression, displayed as the cell's value


def plan_cell(source: str) -> CellPlan:
    """Parse the cell; a syntax error surfaces here, before anything is sent."""
    tree = ast.parse(source)
    loaded: list[str] = []
    assigned: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else assigned).append(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            assigned.append(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            assigned.extend((alias.asname or alias.name).split(".")[0] for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Global):
            assigned.extend(node.names)
    top_level = _top_level_bindings(tree)
    reads = list(dict.fromkeys(loaded))  # the magic sends those the notebook has
    has_value = bool(tree.body) and isinstance(tree.body[-1], ast.Expr)
    return CellPlan(source, reads, [n for n in dict.fromkeys(assigned) if n in top_level], has_value)


def _top_level_bindings(tree: ast.Module) -> set[str]:
    """Names bound in the cell's own (module) scope, not inside functions or classes it defines."""
    names: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_Name(self, node: ast.Name) -> None:
            if not isinstance(node.ctx, ast.Load):
                names.add(node.id)

        def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
            names.add(node.name)  # the body is another scope

        visit_AsyncFunctionDef = visit_FunctionDef

        def visit_ClassDef(self, node: ast.ClassDef) -> None:
            names.add(node.name)

        def visit_Lambda(self, node: ast.Lambda) -> None:
            pass

        def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
            names.update((a.asname or a.name).split(".")[0] for a in node.names if a.name != "*")

        visit_ImportFrom = visit_Import

    Visitor().visit(tree)
    return names


def run_cell(source: str, inputs: dict[str, Any], assigns: list[str], has_value: bool) -> dict[str, Any]:
    """Runs in the sandbox: execute the cell in a namespace seeded with its inputs, return what it bound.

    Values that cannot be pickled are reported by name instead of failing the whole cell.
    """
    namespace: dict[str, Any] = {"__name__": "__main__", **inputs}
    tree = ast.parse(source)
    last = tree.body.pop() if has_value else None
    exec(compile(tree, "<cell>", "exec"), namespace)
    value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace) if last is not None else None
    returned: dict[str, Any] = {}
    unpicklable: dict[str, str] = {}
    for name in assigns:
        if name not in namespace:
            continue
        try:
            cloudpickle.dumps(namespace[name])
            returned[name] = namespace[name]
        except Exception as exc:
            unpicklable[name] = f"{type(namespace[name]).__name__}: {exc}"
    try:
        cloudpickle.dumps(value)
    except Exception as exc:
        unpicklable["(cell value)"] = f"{type(value).__name__}: {exc}"
        value = repr(value)
    return {"value": value, "names": returned, "unpicklable": unpicklable}
