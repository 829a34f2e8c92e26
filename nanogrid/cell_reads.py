"""Which module-level names code reads: the compiler's scopes (symtable), less those it surely binds before reading.

`%%nanogrid` sends a cell the notebook's values of these names, so a name the cell only writes, or binds before
it reads it (``import math`` then ``math.pi``, ``with open(p) as f`` then ``f.read()``), is never sent: its
notebook value may be large, or one that cannot travel. Where a path may skip the binding the name is read.
"""

from __future__ import annotations

import ast
import symtable
from collections.abc import Iterable


def names_read(source: str, filename: str, mode: str = "exec") -> list[str]:
    """Module-level names ``source`` reads, in its own statements and in the functions and classes it makes."""
    top = symtable.symtable(source, filename, mode)
    if mode != "exec":  # an expression binds nothing before it reads (but a walrus, which counts as read anyway)
        return [s.get_name() for s in top.get_symbols() if s.is_referenced()] + _nested_reads(top)
    tree = ast.parse(source, filename)
    module = _ModuleReads()
    module.block(tree.body, set())
    own = module.own - set(module.reads)  # of the compiler's reads, those the walk saw only where they were bound
    reads = [s.get_name() for s in top.get_symbols() if s.is_referenced() and s.get_name() not in own]
    return list(dict.fromkeys(reads + module.reads + _nested_reads(top) + _updated_in_functions(tree)))


def _nested_reads(top: symtable.SymbolTable) -> list[str]:
    """Module-level names read by the functions, lambdas and comprehensions the code makes, whenever they run (class
    bodies run once, in order, and are `_ModuleReads`'s; the functions in them are these)."""
    reads: list[str] = []
    pending = list(top.get_children())
    while pending:
        table = pending.pop()
        if table.get_type() != "class":
            reads += [s.get_name() for s in table.get_symbols() if s.is_global() and s.is_referenced()]
        pending += table.get_children()
    return reads


class _ModuleReads:
    """The module-level names a cell reads before it has surely bound them itself, statement by statement.

    A name the cell binds on every path before reading it (``import math`` then ``math.pi``, a ``for`` or ``with``
    target inside its body) is the cell's own: the notebook's value, perhaps one that cannot travel, is not
    needed. Where a path may skip a binding (a branch, a loop that runs no time, a ``try`` cut short, a context
    manager that swallows an exception, a walrus) the name counts as read.
    """

    def __init__(self) -> None:
        self.reads: list[str] = []  # read where the cell may not have bound them
        self.own: set[str] = set()  # read where the cell had surely bound them

    def block(self, body: list[ast.stmt], bound: set[str]) -> set[str]:
        """Go through ``body`` with ``bound`` (changed in place); what is surely bound afterwards."""
        for statement in body:
            self.statement(statement, bound)
        return bound

    def branch(self, body: list[ast.stmt], bound: set[str], also: Iterable[str] = ()) -> set[str]:
        return self.block(body, bound | set(also))

    def expression(self, node: ast.AST | None, bound: set[str]) -> None:
        """Read the names ``node`` reads in this scope (not in the functions or comprehensions it makes)."""
        pending = [node] if node is not None else []
        while pending:
            node = pending.pop()
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                self.read(node.id, bound)
            elif isinstance(node, ast.Lambda):
                pending += [*node.args.defaults, *(d for d in node.args.kw_defaults if d is not None)]
            elif isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
                pending.append(node.generators[0].iter)  # the rest runs in the comprehension's own scope
            elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                pending += ast.iter_child_nodes(node)

    def read(self, name: str, bound: set[str]) -> None:
        if name in bound:
            self.own.add(name)
        else:
            self.reads.append(name)

    def target(self, node: ast.AST, bound: set[str]) -> None:
        """Bind an assignment target: its names; ``a[i] = v`` and ``a.x = v`` read ``a`` and ``i``."""
        if isinstance(node, ast.Name):
            bound.add(node.id)
        elif isinstance(node, (ast.Tuple, ast.List)):
            for element in node.elts:
                self.target(element, bound)
        elif isinstance(node, ast.Starred):
            self.target(node.value, bound)
        else:
            self.expression(node, bound)

    def statement(self, node: ast.stmt, bound: set[str]) -> None:
        after: set[str] | None = None  # what a compound statement surely leaves bound, when it is not ``bound`` itself
        if isinstance(node, ast.Assign):
            self.expression(node.value, bound)
            for target in node.targets:
                self.target(target, bound)
        elif isinstance(node, ast.AnnAssign):
            self.expression(node.value, bound)
            self.expression(node.annotation, bound)
            if node.value is not None:
                self.target(node.target, bound)
            elif not isinstance(node.target, ast.Name):
                self.expression(node.target, bound)
        elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            self.expression(node.value, bound)
            self.read(node.target.id, bound)  # the old value, which symtable calls a store
            bound.add(node.target.id)
        elif isinstance(node, ast.Delete):
            for target in node.targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name) and isinstance(name.ctx, ast.Del):
                        self.read(name.id, bound)  # it must be there, which symtable calls a store
                        bound.discard(name.id)
                    elif isinstance(name, (ast.Subscript, ast.Attribute)):
                        self.expression(name, bound)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names if alias.name != "*")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self.definition(node, bound)
        elif isinstance(node, ast.If):
            self.expression(node.test, bound)
            after = self.branch(node.body, bound) & self.branch(node.orelse, bound)
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            self.expression(node.iter, bound)
            loop = set(bound)
            self.target(node.target, loop)
            after = bound & self.block(node.body, loop) & self.branch(node.orelse, bound)
        elif isinstance(node, ast.While):
            self.expression(node.test, bound)
            after = bound & self.branch(node.body, bound) & self.branch(node.orelse, bound)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            entered = set(bound)
            for item in node.items:
                self.expression(item.context_expr, entered)
                if item.optional_vars is not None:
                    self.target(item.optional_vars, entered)
            after = entered & self.branch(node.body, entered)  # a context manager may swallow the body's exception
        elif isinstance(node, (ast.Try, ast.TryStar)):
            after = self.branch(node.orelse, self.branch(node.body, bound))
            for handler in node.handlers:
                self.expression(handler.type, bound)
                caught = [handler.name] if handler.name else []
                after &= self.branch(handler.body, bound, caught) - set(caught)  # deleted at the handler's end
            if node.finalbody:  # it also runs after an exception no handler caught, maybe before any binding
                after = self.branch(node.finalbody, bound & after)
        elif isinstance(node, ast.Match):
            self.expression(node.subject, bound)
            after = set(bound)  # no case may match
            for case in node.cases:
                captured = {name for pattern in ast.walk(case.pattern)
                            for name in (getattr(pattern, "name", None), getattr(pattern, "rest", None))
                            if isinstance(name, str)}
                self.expression(case.pattern, bound)  # value patterns (Color.RED) read
                self.expression(case.guard, bound | captured)
                after &= self.branch(case.body, bound, captured)
        else:  # an expression, x[i] += v, assert, raise, global, pass, ...: what it reads, binding nothing
            self.expression(node, bound)
        if after is not None:
            bound.clear()
            bound.update(after)

    def definition(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef, bound: set[str]) -> None:
        """What a ``def`` or ``class`` evaluates where it stands (decorators, defaults, annotations, bases, and a
        class's body, where its own names come first), then the name it binds."""
        for decorator in node.decorator_list:
            self.expression(decorator, bound)
        if isinstance(node, ast.ClassDef):
            for base in [*node.bases, *(keyword.value for keyword in node.keywords)]:
                self.expression(base, bound)
            self.branch(node.body, bound)
        else:
            arguments = node.args
            for default in [*arguments.defaults, *(d for d in arguments.kw_defaults if d is not None)]:
                self.expression(default, bound)
            for argument in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs, arguments.vararg,
                             arguments.kwarg]:
                if argument is not None:
                    self.expression(argument.annotation, bound)
            self.expression(node.returns, bound)
        bound.add(node.name)


def _updated_in_functions(node: ast.AST) -> list[str]:
    """`_updated_names` of each function the module (or a class in it) defines."""
    names = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            names += _updated_names(child, _globals_declared(child))
        else:
            names += _updated_in_functions(child)
    return names


def _updated_names(node: ast.AST, declared_global: set[str] | None) -> list[str]:
    """Module-level names that ``x += ...`` and ``del x`` need the old value of (symtable calls both a store): in a
    function that declares them global (``declared_global``), and in a class body inside one (None: a class body
    looks up its own names in the module)."""
    names = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            body_globals = None if isinstance(child, ast.ClassDef) else _globals_declared(child)
            names += _updated_names(child, body_globals)
            continue
        targets = [child.target] if isinstance(child, ast.AugAssign) else child.targets if isinstance(child, ast.Delete) \
            else []
        names += [name.id for target in targets for name in ast.walk(target) if isinstance(name, ast.Name)
                  and isinstance(name.ctx, (ast.Store, ast.Del)) and (declared_global is None or name.id in declared_global)]
        names += _updated_names(child, declared_global)
    return names


def _globals_declared(function: ast.AST) -> set[str]:
    """The names a function's ``global`` statements name (not those of the functions and classes inside it)."""
    found: set[str] = set()
    pending = list(ast.iter_child_nodes(function))
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Global):
            found.update(node.names)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            pending += ast.iter_child_nodes(node)
    return found
