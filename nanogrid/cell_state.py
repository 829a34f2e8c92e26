"""Running a notebook cell on the grid so that the notebook ends in the state a local run leaves.

In the notebook, `plan_cell` finds the names a cell needs (the compiler's own scopes, from
`symtable`) and `pack_state` pickles them as one stream, so two names for one object stay one
object. In the sandbox, `run_cell` executes the cell, then sends back every name it bound, rebound
or deleted and every input whose pickled state changed (a mutation), compared by a hash of each
input's pickle taken before and after. Functions and classes made in the cell travel without
their globals and are rebuilt in the notebook with the notebook's namespace as their globals.

Standard library and cloudpickle only: `run_cell` is imported inside the sandbox.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import importlib
import inspect
import io
import linecache
import math
import os
import pickle
import re
import shlex
import subprocess
import symtable
import sys
import threading
import time
import timeit
import traceback
import types
from dataclasses import dataclass
from typing import Any

import cloudpickle

LINE_MAGICS = {"time", "timeit"}  # IPython line magics the sandbox runs itself
SHELL_CALLS = {"system", "getoutput"}  # `!cmd` and `x = !cmd`
TIMEIT_FLAGS = {"-n": int, "-r": int, "-q": None}
SANDBOX_NAMES = {
    "__builtins__",
    "__name__",
    "get_ipython",
}  # what run_cell puts into the cell's namespace
ATOMIC = (int, float, complex, bool, str, bytes, type(None), range)  # cannot change in place


class CellRefused(ValueError):
    """A line of the cell cannot run on the grid; ``line`` is its number in the cell."""

    def __init__(self, line: int, why: str) -> None:
        super().__init__(f"line {line}: {why}")
        self.line = line


class CellFailed(Exception):
    """How `run_cell` ends a cell that raised: its job fails, and the notebook still gets what the cell left.

    ``outcome`` is what `run_cell` returns for a cell that ends well (the names bound before the error, what it
    printed and drew); its ``error`` describes the cell's own exception, which travels pickled inside the state.
    The sandbox records ``job_error`` (that description) as the job's error, so the grid's history, /ui and
    `nanogrid jobs` show the cell's exception and its frames, not this wrapper.
    """

    @property
    def outcome(self) -> dict[str, Any]:
        return self.args[0]

    @property
    def job_error(self) -> dict[str, Any]:
        return self.outcome["error"]

    def __str__(self) -> str:
        return f"{self.job_error['type']}: {self.job_error['message']} (in a %%nanogrid cell)"


@dataclass(frozen=True)
class CellPlan:
    source: str  # plain Python: IPython syntax already transformed
    reads: list[str]  # names whose notebook values the cell needs: those the notebook has are sent
    has_value: bool  # the last statement is an expression, displayed as the cell's value


def plan_cell(source: str, filename: str = "<cell>") -> CellPlan:
    """Find what a (transformed) cell needs; a syntax error or an unsupported magic surfaces here, before sending."""
    tree = ast.parse(source, filename)
    reads = _scope_reads(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _is_shell_call(node.func):
            reads += _magic_reads(node)
        elif (
            isinstance(node, ast.Name)
            and node.id == "get_ipython"
            and not _inside_shell_call(node, tree)
        ):
            raise CellRefused(
                node.lineno,
                "get_ipython() on the grid supports only %time, %timeit, !cmd and x = !cmd",
            )
    reads += _updated_names(tree, None)
    has_value = bool(tree.body) and isinstance(tree.body[-1], ast.Expr)
    return CellPlan(source, list(dict.fromkeys(reads)), has_value)


def _scope_reads(source: str, filename: str, mode: str = "exec") -> list[str]:
    """Module-level names the code reads, in its own scope and in the functions and classes it defines."""
    top = symtable.symtable(source, filename, mode)
    reads = [s.get_name() for s in top.get_symbols() if s.is_referenced()]
    pending = list(top.get_children())
    while pending:
        table = pending.pop()
        reads += [s.get_name() for s in table.get_symbols() if s.is_global() and s.is_referenced()]
        pending += table.get_children()
    return reads


def _updated_names(node: ast.AST, declared_global: set[str] | None) -> list[str]:
    """Module-level names whose old value ``x += ...`` and ``del x`` need (symtable calls both a store): in module
    and class bodies (a class body finds the names it has not bound in the module), and in a function that
    declares them global (``declared_global``; None in a module or class body). A function's own locals are not."""
    names = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            names += _updated_names(
                child, None if isinstance(child, ast.ClassDef) else _globals_declared(child)
            )
            continue
        targets = (
            [child.target]
            if isinstance(child, ast.AugAssign)
            else child.targets
            if isinstance(child, ast.Delete)
            else []
        )
        names += [
            name.id
            for target in targets
            for name in ast.walk(target)
            if isinstance(name, ast.Name)
            and isinstance(name.ctx, (ast.Store, ast.Del))
            and (declared_global is None or name.id in declared_global)
        ]
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
        elif not isinstance(
            node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
        ):
            pending += ast.iter_child_nodes(node)
    return found


def _is_shell_call(func: ast.expr) -> bool:
    """``get_ipython().<method>`` as IPython's input transformers write it."""
    return (
        isinstance(func, ast.Attribute)
        and isinstance(func.value, ast.Call)
        and isinstance(func.value.func, ast.Name)
        and func.value.func.id == "get_ipython"
    )


def _inside_shell_call(name: ast.Name, tree: ast.Module) -> bool:
    return any(
        isinstance(n, ast.Call) and _is_shell_call(n.func) and n.func.value.func is name  # type: ignore[attr-defined]
        for n in ast.walk(tree)
    )


def _magic_reads(call: ast.Call) -> list[str]:
    """Check one transformed magic or shell line; returns the names its text uses."""
    method = call.func.attr  # type: ignore[attr-defined]
    args = [
        a.value if isinstance(a, ast.Constant) and isinstance(a.value, str) else None
        for a in call.args
    ]
    line = call.lineno
    if method in SHELL_CALLS and args and args[0] is not None:
        return _expansion_reads(args[0], line)
    magic, text = args if method == "run_line_magic" and len(args) == 2 else (None, None)
    if magic is not None and text is not None:
        if magic not in LINE_MAGICS:
            raise CellRefused(
                line,
                f"%{magic} would act on the sandbox, not on this notebook; on the grid a cell "
                "can use %time, %timeit, !cmd and x = !cmd (run other magics in a cell of their own)",
            )
        statement = _timeit_statement(text, line) if magic == "timeit" else text
        try:
            return _scope_reads(statement, "<magic>")
        except SyntaxError as exc:
            raise CellRefused(line, f"%{magic}: {exc.msg}") from None
    if method == "run_cell_magic":
        raise CellRefused(
            line,
            "cell magics cannot run inside a %%nanogrid cell; use the line form (%time, %timeit)",
        )
    raise CellRefused(line, f"get_ipython().{method}() is not available on the grid")


def _expansion_reads(command: str, line: int) -> list[str]:
    """Names that IPython's ``$name`` and ``{expression}`` expansion in ``!cmd`` would read."""
    reads = re.findall(r"(?<!\$)\$([A-Za-z_]\w*)", command)
    for expression in re.findall(r"(?<!\{)\{([^{}]+)\}(?!\})", command):
        try:
            reads += _scope_reads(expression, "<expansion>", "eval")
        except SyntaxError:
            raise CellRefused(
                line, f"cannot expand {{{expression}}} in the shell command"
            ) from None
    return reads


def _timeit_statement(text: str, line: int) -> str:
    return " ".join(_timeit_options(shlex.split(text, posix=False), line)[1])


def _loop_count(timer: timeit.Timer) -> int:
    """As IPython does: grow the loop count until a run takes 0.2 s."""
    number = 1
    for index in range(10):
        number = 10**index
        if timer.timeit(number) >= 0.2:
            break
    return number


def _timeit_options(words: list[str], line: int) -> tuple[dict[str, Any], list[str]]:
    options: dict[str, Any] = {}
    while words and words[0].startswith("-") and words[0] in TIMEIT_FLAGS:
        flag = words.pop(0)
        kind = TIMEIT_FLAGS[flag]
        if kind is None:
            options[flag] = True
            continue
        if not words or not words[0].isdigit():
            raise CellRefused(line, f"%timeit {flag} needs a number")
        options[flag] = kind(words.pop(0))
    if words and re.fullmatch(r"-[A-Za-z]+", words[0]):
        raise CellRefused(line, f"%timeit {words[0]} is not supported on the grid (use -n, -r, -q)")
    return options, words


# Pickling a namespace as one stream: (name, value) records, one pickler so shared objects stay shared.

_loading = (
    threading.local()
)  # the namespace (and the objects it already has) that a state stream loads into


def _namespace() -> dict[str, Any]:
    """Unpickled where a function's globals were the sending side's namespace: the receiving side's namespace."""
    return _loading.namespace


def _existing(name: str) -> Any:
    """Unpickled where the sending side referred to an object the receiving side already has under ``name``."""
    return _loading.refs[name]


class _NamespaceGlobals(dict):
    def __reduce__(self) -> tuple[Any, ...]:
        return (_namespace, ())


class ModuleNotHere(types.ModuleType):
    """A module the other side has and this side lacks (``import humanize`` in a cell run with ``--packages
    humanize``): the name comes back, and using it says where the module is."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(name)
        self.__why = why

    def __getattr__(self, attribute: str) -> Any:
        # what tools probe for (_repr_html_, __wrapped__): simply not there
        if attribute.startswith("_"):
            raise AttributeError(attribute)
        raise ModuleNotFoundError(
            f"{self.__name__} is installed where the cell ran, not here ({self.__why}); use it "
            "in %%nanogrid cells, or install it here",
            name=self.__name__,
        )

    def __repr__(self) -> str:
        return f"<module {self.__name__!r} (installed where the cell ran, not here)>"


def _module(name: str) -> types.ModuleType:
    """Unpickled where the sending side had the module ``name``: this side's, or a stand-in saying it is not here."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        return ModuleNotHere(name, str(exc))


class StatePickler(cloudpickle.Pickler):
    """Pickles a notebook's (or a cell's) names.

    The globals of every function defined in the namespace travel as a reference that the other
    side resolves to its own namespace. ``refs`` maps ids of objects the other side already has
    to their names; ``drop_globals`` leaves out the values a function reads from its globals (the
    receiving namespace has them).
    """

    def __init__(
        self,
        file: Any,
        namespace: dict[str, Any],
        refs: dict[int, str] | None = None,
        drop_globals: bool = False,
        buffer_callback: Any = None,
    ) -> None:
        super().__init__(file, protocol=5, buffer_callback=buffer_callback)
        self.namespace = namespace
        self.refs = refs or {}
        self.drop_globals = drop_globals
        self.globals_ref[id(namespace)] = _NamespaceGlobals()

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.ModuleType) and (
            isinstance(obj, ModuleNotHere) or sys.modules.get(obj.__name__) is obj
        ):
            return _module, (
                obj.__name__,
            )  # a module the receiving side lacks must not stop its names loading
        return super().reducer_override(obj)

    def _dynamic_function_reduce(self, func: Any) -> Any:
        reduced = super()._dynamic_function_reduce(func)
        if self.drop_globals and func.__globals__ is self.namespace:
            state, slotstate = reduced[2]
            reduced = (*reduced[:2], (state, {**slotstate, "__globals__": {}}), *reduced[3:])
        return reduced


class _RefPickler(StatePickler):
    """Also refers to objects the other side has (``refs``). A persistent_id is asked of every object, floats
    included, so only what a cell sends back pays for it, never the namespace going out or the hashing."""

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, ATOMIC):
            return None
        return self.refs.get(id(obj))


class _RefUnpickler(pickle.Unpickler):
    def persistent_load(self, pid: Any) -> Any:
        return _existing(pid)


@dataclass
class Packed:
    data: bytes
    sizes: dict[str, int]  # bytes each record added to the stream (shared objects count once)
    failed: dict[str, str]  # records that could not be pickled: why


def pack_state(
    records: list[tuple[str, Any]],
    namespace: dict[str, Any],
    refs: dict[int, str] | None = None,
    drop_globals: bool = False,
) -> Packed:
    """Pickle (key, value) records into one stream; a record that cannot be pickled is left out and named."""
    failed: dict[str, str] = {}
    while True:
        buffer = io.BytesIO()
        pickler = (_RefPickler if refs else StatePickler)(buffer, namespace, refs, drop_globals)
        sizes: dict[str, int] = {}
        for key, value in records:
            if key in failed:
                continue
            start = buffer.tell()
            try:
                pickler.dump((key, value))
            except Exception as exc:
                failed[key] = f"{type(value).__name__}: {exc}"
                break  # the pickler's memo now refers to bytes that are discarded: start again without it
            sizes[key] = buffer.tell() - start
        else:
            return Packed(buffer.getvalue(), sizes, failed)


def unpack_state(
    data: bytes, namespace: dict[str, Any], refs: dict[str, Any] | None = None
) -> list[tuple[str, Any]]:
    stream = io.BytesIO(data)
    unpickler = _RefUnpickler(stream)
    records = []
    _loading.namespace, _loading.refs = namespace, refs or {}
    try:
        while stream.tell() < len(data):
            records.append(unpickler.load())
    finally:
        _loading.namespace = _loading.refs = None
    return records


class _HashWriter:
    def __init__(self) -> None:
        self.hash = hashlib.sha1(usedforsecurity=False)

    def write(self, data: Any) -> int:
        self.hash.update(data)
        return len(data)

    def buffer(self, view: pickle.PickleBuffer) -> bool:
        """Large buffers (numpy, bytearray) are hashed where they lie instead of being copied into the stream."""
        try:
            self.hash.update(view.raw())
            return False
        except BufferError:  # not contiguous: pickle it in-band instead
            return True


def fingerprint(value: Any, namespace: dict[str, Any]) -> bytes | None:
    """A hash of the value's pickled state; None for values that cannot change in place."""
    if isinstance(value, ATOMIC) or type(value).__name__ == "module":
        return None
    writer = _HashWriter()
    try:
        StatePickler(writer, namespace, drop_globals=True, buffer_callback=writer.buffer).dump(
            value
        )
    except Exception:
        # cannot tell: count it as changed, so that it is sent back (or named as unpicklable)
        return os.urandom(20)
    return writer.hash.digest()


# In the sandbox.


class ShellOutput(list):
    """What ``x = !cmd`` gives in the sandbox (IPython's SList there): the output's lines."""

    @property
    def s(self) -> str:
        return " ".join(self)

    @property
    def n(self) -> str:
        return "\n".join(self)

    @property
    def l(self) -> list[str]:  # noqa: E743  (IPython's name)
        return list(self)


class RemoteRepr:
    """Stands in for a cell value that could not be brought back: shows the value's own repr."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


class _StreamRecorder:
    """Passes writes through to the real stream and remembers the order of stdout and stderr writes."""

    def __init__(self, target: Any, fd: int, segments: list[list[int]]) -> None:
        self._target, self._fd, self._segments = target, fd, segments

    def write(self, text: str) -> int:
        if text:
            if self._segments and self._segments[-1][0] == self._fd:
                self._segments[-1][1] += len(text)
            else:
                self._segments.append([self._fd, len(text)])
        return self._target.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


def _format_time(seconds: float, precision: int = 3) -> str:
    """A duration as IPython's %time and %timeit print it."""
    if seconds >= 60.0:
        parts, left = [], seconds
        for suffix, length in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
            value = int(left / length)
            if value > 0:
                left %= length
                parts.append(f"{value}{suffix}")
            if left < 1:
                break
        return " ".join(parts)
    units, scaling = ["s", "ms", "\xb5s", "ns"], [1, 1e3, 1e6, 1e9]
    order = min(-int(math.floor(math.log10(seconds)) // 3), 3) if seconds > 0.0 else 3
    return "%.*g %s" % (precision, seconds * scaling[order], units[order])


class SandboxShell:
    """The ``get_ipython()`` a cell sees on the grid: shell commands and the %time / %timeit magics."""

    def __init__(self, namespace: dict[str, Any]) -> None:
        self.user_ns = namespace

    def var_expand(self, command: str) -> str:
        """IPython's ``$name`` and ``{expression}`` expansion, against the cell's namespace."""

        def expression(match: re.Match[str]) -> str:
            return str(eval(match.group(1), self.user_ns))

        command = re.sub(r"(?<!\{)\{([^{}]+)\}(?!\})", expression, command)
        command = re.sub(
            r"(?<!\$)\$([A-Za-z_]\w*)",
            lambda m: str(self.user_ns.get(m.group(1), m.group(0))),
            command,
        )
        return command.replace("$$", "$").replace("{{", "{").replace("}}", "}")

    def system(self, command: str) -> None:
        """``!cmd``: its output (stdout and stderr together) goes to the cell's stdout, as in a kernel."""
        sys.stdout.flush()
        with subprocess.Popen(
            self.var_expand(command),
            shell=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
        ) as process:
            for line in process.stdout:  # type: ignore[union-attr]
                sys.stdout.write(line)
        self.user_ns["_exit_code"] = process.returncode

    def getoutput(self, command: str, split: bool = True, depth: int = 0) -> Any:
        """``x = !cmd``: the output's lines."""
        result = subprocess.run(
            self.var_expand(command),
            shell=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
        return ShellOutput(result.stdout.splitlines()) if split else result.stdout

    def run_line_magic(self, name: str, line: str, _stack_depth: int = 1) -> Any:
        if name == "time":
            return self._time(line)
        if name == "timeit":
            return self._timeit(line)
        raise NotImplementedError(f"%{name} is not available on the grid")

    def _time(self, statement: str) -> Any:
        tree = ast.parse(statement, "<timed>")
        expression = len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr)
        code = compile(
            ast.Expression(tree.body[0].value) if expression else tree,  # type: ignore[attr-defined]
            "<timed>",
            "eval" if expression else "exec",
        )
        wall = time.perf_counter()
        times = os.times()
        value = None
        if expression:
            value = eval(code, self.user_ns)
        else:
            exec(code, self.user_ns)
        wall = time.perf_counter() - wall
        after = os.times()
        user, system = after.user - times.user, after.system - times.system
        print(
            f"CPU times: user {_format_time(user)}, sys: {_format_time(system)}, total: {_format_time(user + system)}"
        )
        print(f"Wall time: {_format_time(wall)}")
        return value

    def _timeit(self, line: str) -> None:
        options, words = _timeit_options(shlex.split(line, posix=False), 0)
        timer = timeit.Timer(" ".join(words), globals=self.user_ns)
        number: int = options["-n"] if "-n" in options else _loop_count(timer)
        runs = options.get("-r", 7)
        timings = [t / number for t in timer.repeat(runs, number)]
        if options.get("-q"):
            return
        mean = sum(timings) / len(timings)
        std = math.sqrt(sum((t - mean) ** 2 for t in timings) / len(timings))
        print(
            f"{_format_time(mean)} ± {_format_time(std)} per loop (mean ± std. dev. of {runs} run"
            f"{'s' if runs != 1 else ''}, {number:,} loop{'s' if number != 1 else ''} each)"
        )


def _figures() -> list[tuple[bytes, str]]:
    """Open matplotlib figures as PNGs (as the inline backend shows them), then closed so none travels back open."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return []
    shown = []
    for number in pyplot.get_fignums():
        figure = pyplot.figure(number)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", bbox_inches="tight")
        shown.append((buffer.getvalue(), repr(figure)))
    pyplot.close("all")
    return shown


def _describe_error(exc: BaseException, filename: str) -> dict[str, Any]:
    """The exception and a traceback of the user's frames only (from the cell's first frame on).

    ``frames`` lets the notebook show the traceback as IPython shows a local one: each frame's place, its
    function's qualified name and its parameters' names (``in normalise(values)``).
    """
    walked = list(traceback.walk_tb(exc.__traceback__))
    summaries = traceback.extract_tb(exc.__traceback__)
    first = next((i for i, f in enumerate(summaries) if f.filename == filename), len(summaries))
    user = [
        (f, frame)
        for f, (frame, _) in zip(summaries[first:], walked[first:], strict=True)
        if f.filename != __file__
    ]
    text = (
        "Traceback (most recent call last):\n"
        + "".join(traceback.format_list([f for f, _ in user]))
        if user
        else ""
    )
    text += "".join(traceback.format_exception_only(type(exc), exc))
    return {
        "type": type(exc).__name__,
        "module": type(exc).__module__,
        "message": str(exc),
        "traceback": text,
        "frames": [_frame_of(f, frame.f_code) for f, frame in user],
    }


def _frame_of(summary: traceback.FrameSummary, code: Any) -> dict[str, Any]:
    """One frame of a remote traceback: where it stood, and its function's name and parameters."""
    args, varargs, varkw = inspect.getargs(code)
    return {
        "file": summary.filename,
        "line": summary.lineno or 1,
        "first": code.co_firstlineno,
        "name": code.co_name,
        "qualname": getattr(code, "co_qualname", code.co_name),
        "args": args,
        "varargs": varargs,
        "varkw": varkw,
    }


def run_cell(
    source: str, filename: str, display_source: str, inputs: bytes, sent: list[str], has_value: bool
) -> dict[str, Any]:
    """Runs in the sandbox: execute the cell in a namespace made of its inputs; return what changed.

    A cell that raises ends its job failed: `CellFailed` carries what it returns otherwise, so the cell's
    exception comes back with the names bound before it.
    """
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    shell = SandboxShell(namespace)
    namespace["get_ipython"] = lambda: shell
    linecache.cache[filename] = (
        len(display_source),
        None,
        display_source.splitlines(True),
        filename,
    )
    # pyplot renders off-screen; figures come back as images
    os.environ.setdefault("MPLBACKEND", "Agg")
    segments: list[list[int]] = []
    value: Any = None
    error: BaseException | None = None
    try:
        # functions' globals may add names they read
        namespace.update(unpack_state(inputs, namespace))
    except Exception as exc:
        raise _failed_to_load(exc, filename) from None
    diff_started = time.perf_counter()
    originals = {k: v for k, v in namespace.items() if k not in SANDBOX_NAMES}
    before = {k: fingerprint(v, namespace) for k, v in originals.items()}
    diff_s = time.perf_counter() - diff_started
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (
        _StreamRecorder(stdout, 1, segments),
        _StreamRecorder(stderr, 2, segments),
    )
    try:
        tree = ast.parse(source, filename)
        last = tree.body.pop() if has_value else None
        exec(compile(tree, filename, "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), filename, "eval"), namespace)  # type: ignore[attr-defined]
    except BaseException as exc:  # SystemExit and KeyboardInterrupt are the cell's too
        error = exc
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = stdout, stderr
    figures = _figures()
    diff_started = time.perf_counter()
    changed = [
        k
        for k, v in namespace.items()
        if k not in SANDBOX_NAMES
        and not _closed_file(v)
        and (k not in originals or v is not originals[k] or fingerprint(v, namespace) != before[k])
    ]
    mutated = [k for k in changed if k in originals and namespace[k] is originals[k]]
    deleted = [k for k in originals if k not in namespace]
    unchanged = {id(originals[k]): k for k in sent if k in originals and k not in changed}
    diff_s += time.perf_counter() - diff_started
    records: list[tuple[str, Any]] = [("name:" + k, namespace[k]) for k in changed]
    records += [("value", value), ("error", error)]
    packed = pack_state(records, namespace, unchanged, drop_globals=True)
    if "value" in packed.failed:
        records[-2] = ("value", RemoteRepr(repr(value)))
        packed = pack_state(records, namespace, unchanged, drop_globals=True)
    outcome = {
        "state": packed.data,
        "sizes": {
            k.removeprefix("name:"): n for k, n in packed.sizes.items() if k.startswith("name:")
        },
        "mutated": mutated,
        "deleted": deleted,
        "unpicklable": {
            k.removeprefix("name:"): why
            for k, why in packed.failed.items()
            if k.startswith("name:")
        },
        "error": None if error is None else _describe_error(error, filename),
        "streams": segments,
        "figures": figures,
        "diff_ms": diff_s * 1000,  # hashing the inputs before and after, and comparing
    }
    if error is not None:
        raise CellFailed(outcome)
    return outcome


def _closed_file(value: Any) -> bool:
    """A closed file (``with open(...) as f:``) stays behind: it cannot travel, and a local run leaves it useless."""
    return isinstance(value, io.IOBase) and value.closed


def _failed_to_load(exc: Exception, filename: str) -> CellFailed:
    """The notebook's names could not be rebuilt here (a module the sandbox lacks): nothing ran."""
    error = _describe_error(exc, filename)
    error["message"] = (
        f"the notebook's names could not be loaded in the sandbox: {error['message']}"
    )
    error["traceback"] = f"{error['type']}: {error['message']}\n"
    packed = pack_state([("value", None), ("error", None)], {})
    return CellFailed(
        {
            "state": packed.data,
            "sizes": {},
            "mutated": [],
            "deleted": [],
            "unpicklable": {},
            "error": error,
            "streams": [],
            "figures": [],
        }
    )


def load_state(data: bytes, user_ns: dict[str, Any], sent: dict[str, Any]) -> dict[str, Any]:
    """In the notebook: the records of `run_cell`'s state, functions rebuilt with ``user_ns`` as their globals."""
    keep = user_ns.get("__builtins__")
    try:
        return dict(unpack_state(data, user_ns, sent))
    finally:  # cloudpickle sets __builtins__ on the globals of each function it rebuilds
        if keep is None:
            user_ns.pop("__builtins__", None)
        else:
            user_ns["__builtins__"] = keep
