"""Function environments: the packages, system packages, Python and variables a function runs with.

An ``Environment`` is declarative and content-hashed: the same pins, system packages, Python
and variables always give the same environment id, and the grid builds each id once. With no
argument, ``@remote`` mirrors the client (package sync): the third-party modules the function's
pickle refers to (read from the pickle's opcodes, whatever form the import took), the modules its
code imports and its globals and closure reach, and what the pickles of the values it is called
with refer to (pyarrow under a pandas 3 DataFrame of strings), mapped to their distributions and
pinned at the versions installed here, with what they require. The user's own modules (files
beside the notebook or script, not installed) go along as files in the package.
"""

from __future__ import annotations

import dis
import json
import pickletools
import re
import sys
import threading
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache, partial
from importlib import metadata
from itertools import islice
from pathlib import Path
from typing import Any

from nanogrid_contract.environments import (
    PLATFORM,
    PYTHONS,
    REQUIREMENT,
    RESERVED_VARIABLES,
    SYSTEM_PACKAGE,
    SYSTEM_PATTERN,
    VARIABLE,
    distribution_name,
    environment_id,
)
from nanogrid_contract.errors import InvalidEnvironment, NanoGridError

_EXAMPLES = {"packages": "pandas==2.2.3", "system": "ffmpeg"}
GRID_PROVIDED = {
    "nanogrid",
    "nanogrid_contract",
    "cloudpickle",
}  # every runtime has the grid's own copies
GRID_OWN_MODULES = {
    "nanogrid_backend",
    "nanogrid_runtimes",
}  # the grid's side: never a user's module to ship
MAX_LOCAL_MODULE_BYTES = 8 << 20


class PackageSyncError(NanoGridError, ValueError):
    """A package the function needs cannot be mirrored onto the grid; the message says which and what to do."""


_name = distribution_name


@dataclass(frozen=True)
class Environment:
    """What a function runs with: ``Environment(packages=["pandas==2.2.3"], system=["ffmpeg"], python="3.11")``.

    ``packages`` are pip requirements (pins or ranges; wheels only), ``system`` Debian packages
    (Docker sandbox only), ``python`` the runtime's minor version (default: the client's, which
    pickled functions need), ``env`` environment variables. Equal settings give an equal ``id``.
    """

    packages: tuple[str, ...] = ()
    system: tuple[str, ...] = ()
    python: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for option in ("packages", "system"):
            names = getattr(self, option)
            if isinstance(names, str) or not all(isinstance(name, str) for name in names):
                raise InvalidEnvironment(
                    f"{option} takes a list of names, e.g. {option}=['{_EXAMPLES[option]}'], "
                    f"not {names!r}"
                )
        packages = tuple(sorted({p.strip() for p in self.packages if p.strip()}, key=_name))
        for requirement in packages:
            if not REQUIREMENT.match(requirement):
                raise InvalidEnvironment(
                    f"package {requirement!r} is not a requirement NanoGrid can install: give a name with an optional "
                    "version, e.g. 'pandas' or 'pandas==2.2.3' (no URLs, paths or options)"
                )
        for name in self.system:
            if not SYSTEM_PACKAGE.match(name) or SYSTEM_PATTERN.search(name):
                raise InvalidEnvironment(
                    f"system package {name!r} is not a Debian package name: lowercase letters, digits, '+', '-' and "
                    "'.', exactly as `apt-cache show` names it (apt would read '.+', '..' or a trailing '.' as a "
                    "pattern and install whatever matches)"
                )
        if not isinstance(self.env, Mapping):
            raise InvalidEnvironment(
                f"env takes a dict of variables, e.g. env={{'MODE': 'fast'}}, not {self.env!r}"
            )
        for key, value in self.env.items():
            if (
                not VARIABLE.match(key)
                or key.startswith(RESERVED_VARIABLES)
                or not isinstance(value, str)
            ):
                raise InvalidEnvironment(
                    f"environment variable {key!r}: names are letters, digits and '_', values are strings, and "
                    f"{', '.join(RESERVED_VARIABLES)}... belong to the sandbox"
                )
        if self.python is not None and self.python not in PYTHONS:
            raise InvalidEnvironment(
                f"python must be a minor version a runtime can have ({', '.join(PYTHONS)}), "
                f"not {self.python!r}"
            )
        object.__setattr__(self, "packages", packages)
        object.__setattr__(self, "system", tuple(sorted(set(self.system))))
        object.__setattr__(self, "env", dict(sorted(self.env.items())))

    def with_packages(self, packages: Iterable[str]) -> Environment:
        """This environment plus ``packages``; a package named in both keeps this environment's requirement."""
        mine = {_name(p) for p in self.packages}
        extra = [p for p in packages if _name(p) not in mine]
        return Environment(self.packages + tuple(extra), self.system, self.python, self.env)

    def spec(self) -> dict[str, Any]:
        """The manifest's ``environment``: everything that makes this environment what it is."""
        python = self.python or "%d.%d" % sys.version_info[:2]
        return {
            "packages": list(self.packages),
            "system": list(self.system),
            "python": python,
            "env": dict(self.env),
            "platform": PLATFORM,
        }

    @property
    def id(self) -> str:
        return environment_id(self.spec())

    @property
    def empty(self) -> bool:
        return not (self.packages or self.system or self.env)


# ---- package sync: which modules a function uses ------------------------------------------------------------

# Callables a pickle calls with a module's name to import it: cloudpickle's (a module global, by name or by value),
# and the standard ones some libraries' reducers use.
_IMPORTERS = {
    ("cloudpickle.cloudpickle", "subimport"),
    ("cloudpickle.cloudpickle", "dynamic_subimport"),
    ("cloudpickle", "subimport"),
    ("cloudpickle", "dynamic_subimport"),
    ("importlib", "import_module"),
    ("builtins", "__import__"),
}
_STRINGS = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
}
_GETS = {"BINGET", "LONG_BINGET", "GET"}
_PUTS = {"MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"}
_TUPLES = {"TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"}
# Each opcode's effect on the stack: (values it takes, how many of them lie under a mark or -1, values it pushes).
_EFFECTS = {
    op.name: (
        len(op.stack_before),
        op.stack_before.index(pickletools.markobject)
        if pickletools.markobject in op.stack_before
        else -1,
        len(op.stack_after),
    )
    for op in pickletools.opcodes
}
MAX_SCAN_OPS = (
    1_000_000  # about a second; a larger pickle (a million small objects) counts as far as this
)


class _Global(tuple[str, str]):
    """A global a pickle names (module, attribute), on the scanner's stack."""


def _top(module_name: str) -> str:
    return module_name.split(".", 1)[0]


def modules_in_pickle(data: bytes) -> set[str]:
    """Top-level modules a pickle refers to: its globals (classes, functions, reducers) and the modules it imports.

    The opcodes run on a small model of the unpickler's stack, marks and memo, so a name counts however
    it arrives: fresh, or fetched from the memo (cloudpickle memoizes ``"numpy"`` when the code also
    names it, and ``subimport`` then gets it with a ``BINGET``). Only strings, tuples and globals are
    kept as values. Past ``MAX_SCAN_OPS`` opcodes the rest is not read (its values' types still count
    where an argument is scanned, and a module still missing in the sandbox is named then).
    """
    found: set[str] = set()
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    try:
        for count, (opcode, arg, _) in enumerate(pickletools.genops(data)):
            name = opcode.name
            takes, under_mark, pushes = _EFFECTS[name]
            # the values above the last mark, then what lies under it (a list, a dict)
            if under_mark >= 0:
                top = marks.pop()
                items = stack[top:]
                del stack[top - under_mark :]
            elif takes:
                items = stack[-takes:]
                del stack[-takes:]
            else:
                items = []
            pushed: Any = None
            if name in _STRINGS:
                pushed = str(arg)
            elif name in _GETS:
                pushed = memo.get(arg)  # type: ignore[arg-type]
            elif name in _PUTS:
                memo[len(memo) if name == "MEMOIZE" else arg] = items[0]  # type: ignore[index]
                stack += items  # a memo write leaves the stack as it was
                continue
            elif name == "MARK":
                marks.append(len(stack))
                continue
            elif name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                pushed = _Global((module, attr))
                found.add(_top(module))
            elif name == "STACK_GLOBAL" and isinstance(items[0], str) and isinstance(items[1], str):
                pushed = _Global((items[0], items[1]))
                found.add(_top(items[0]))
            elif name in _TUPLES:
                pushed = tuple(items)
            elif (
                name == "REDUCE" and isinstance(items[0], _Global) and tuple(items[0]) in _IMPORTERS
            ):
                if isinstance(items[1], tuple) and items[1] and isinstance(items[1][0], str):
                    found.add(_top(items[1][0]))
            if pushes:
                stack.append(pushed)
            if count >= MAX_SCAN_OPS:
                break
    except (
        ValueError,
        IndexError,
    ):  # a truncated or foreign pickle: what was found before the damage still counts
        pass
    found.discard("")
    return found


def modules_imported(fn: Callable[..., Any]) -> set[str]:
    """Modules the function's code imports when it runs (``import x`` inside the body), nested code included."""
    code = getattr(fn, "__code__", None)
    found: set[str] = set()
    for current in _code_objects(code) if code is not None else ():
        for instruction in dis.get_instructions(current):
            if instruction.opname == "IMPORT_NAME" and isinstance(instruction.argval, str):
                found.add(_top(instruction.argval))
    found.discard("")
    return found


def _code_objects(code: types.CodeType) -> list[types.CodeType]:
    """A code object and every code object nested in it (inner functions, class bodies, comprehensions)."""
    found, pending = [], [code]
    while pending:
        current = pending.pop()
        found.append(current)
        pending += [c for c in current.co_consts if isinstance(c, types.CodeType)]
    return found


def modules_of_function(fn: Callable[..., Any]) -> set[str]:
    """Modules a function reaches through its globals, closure and defaults, walked the way cloudpickle carries it.

    A module object counts (``import numpy``, ``from a import b`` for a submodule b), and so does the
    module of a function or class it names; a function or class that cloudpickle carries by value
    (defined in the notebook or script, or inside another function) is walked in turn: its own
    globals and closure, or the methods of a class.
    """
    found: set[str] = set()
    seen: set[int] = set()
    pending: list[Any] = [fn]
    while pending:
        value = pending.pop()
        if value is None or id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, types.ModuleType):
            found.add(_top(value.__name__))
        elif isinstance(value, staticmethod | classmethod | types.MethodType):
            pending.append(value.__func__)
        elif isinstance(value, property):
            pending += [value.fget, value.fset, value.fdel]
        elif isinstance(value, types.FunctionType | type):
            # its code goes along: what it reaches counts, not where it was defined
            if _carried_by_value(value):
                pending += _reachable(value)
            else:
                found.add(_top(getattr(value, "__module__", None) or ""))
        # ``from numpy import arange``: a C function of numpy
        elif isinstance(value, types.BuiltinFunctionType):
            found.add(_top(getattr(value, "__module__", None) or "builtins"))
        else:
            found.add(_top(getattr(type(value), "__module__", "") or ""))
    found.discard("")
    return found


def _carried_by_value(value: types.FunctionType | type) -> bool:
    """Whether cloudpickle pickles this function or class by value (its code goes along) rather than by name."""
    module_name = getattr(value, "__module__", None)
    module = sys.modules.get(module_name) if module_name else None
    if module is None or module_name in ("__main__", "__mp_main__"):
        return True
    import cloudpickle

    if module_name in cloudpickle.list_registry_pickle_by_value():
        return True
    target: Any = module
    for part in value.__qualname__.split("."):
        target = getattr(target, part, None)
    return target is not value


def _reachable(value: types.FunctionType | type) -> list[Any]:
    """What a function or class carried by value takes with it: globals its code names, closure, defaults, methods."""
    if isinstance(value, type):
        return [*vars(value).values(), *(base for base in value.__bases__ if base is not object)]
    names = {name for code in _code_objects(value.__code__) for name in code.co_names}
    reached = [value.__globals__[name] for name in names if name in value.__globals__]
    for cell in value.__closure__ or ():
        try:
            reached.append(cell.cell_contents)
        except ValueError:  # a cell not yet assigned
            pass
    return reached + list(value.__defaults__ or ()) + list((value.__kwdefaults__ or {}).values())


def modules_of_values(values: Iterable[Any]) -> set[str]:
    """Modules of the values' types (a DataFrame argument needs pandas), one level into lists, tuples and dicts."""
    found: set[str] = set()
    for value in values:
        items = [value]
        if isinstance(value, list | tuple | set | frozenset):
            # never a copy of a large argument: every call of a .map() looks
            items += islice(value, 100)
        elif isinstance(value, dict):
            items += islice(value.values(), 100)
        for item in items:
            module = getattr(type(item), "__module__", "") or ""
            found.add(_top(module))
    found.discard("")
    return found


# Arguments: the modules a value's pickle references, scanned once per kind of value. Values of one signature
# (their type; a container's item types; numpy and pandas dtypes, which decide whether pyarrow is pickled)
# pickle to the same modules, so a .map() over 10,000 items scans one of them.
_SCANNED: dict[Any, frozenset[str]] = {}
_MAX_SCANNED = 4096
_SCANNED_LOCK = threading.Lock()
_PLAIN = frozenset({int, float, complex, str, bytes, bool, type(None)})  # pickled without a global
_CODE = (types.FunctionType, types.MethodType, type, partial, types.ModuleType)


def value_signature(value: Any, depth: int = 0) -> Any:
    """What decides which modules a value's pickle references, cheaply; None where that cannot be told cheaply
    (an object-dtype array holds anything), so the value is scanned itself."""
    kind = type(value)
    if kind in _PLAIN:
        return kind
    # each carries its own code and globals: one function says nothing of the next
    if isinstance(value, _CODE):
        return None
    if depth == 0 and kind in (list, tuple, set, frozenset):
        items = frozenset([value_signature(item, 1) for item in islice(value, 100)])
        return None if None in items else (kind, items)
    if depth == 0 and kind is dict:
        items = frozenset(
            [value_signature(item, 1) for pair in islice(value.items(), 100) for item in pair]
        )
        return None if None in items else (kind, items)
    if str(getattr(kind, "__module__", "")).startswith(("numpy", "pandas")):
        dtypes = [
            getattr(value, "dtype", None),
            getattr(getattr(value, "index", None), "dtype", None),
            getattr(getattr(value, "columns", None), "dtype", None),
        ]
        frame: Any = getattr(value, "dtypes", None)
        dtypes += list(frame) if hasattr(frame, "tolist") else []
        if any(str(dtype) == "object" for dtype in dtypes):
            return None
        return (kind, tuple(dtypes))
    return kind


def modules_of_argument(value: Any, pickled: bytes | None = None) -> frozenset[str]:
    """Modules an argument needs where it is unpickled: what its pickle references (``pickled``, the bytes the call
    sends, else pickled here) and its type's; cached per ``value_signature``."""
    signature = value_signature(value)
    try:
        with _SCANNED_LOCK:
            known = _SCANNED.get(signature) if signature is not None else None
    except TypeError:  # an unhashable dtype
        signature, known = None, None
    if known is not None:
        return known
    if pickled is None:
        import cloudpickle

        try:
            pickled = cloudpickle.dumps(value, protocol=5)
        except Exception:  # pickling fails at the call with its own message; the type still counts
            pickled = b""
    modules = (
        frozenset(modules_in_pickle(pickled) | modules_of_values([value]))
        if pickled
        else frozenset(modules_of_values([value]))
    )
    if signature is not None:
        with _SCANNED_LOCK:
            if len(_SCANNED) >= _MAX_SCANNED:
                _SCANNED.clear()
            _SCANNED[signature] = modules
    return modules


# sha256 of a value given to nanogrid.put -> the modules its pickle references
_PUT: dict[str, frozenset[str]] = {}


def remember_put(sha256: str, value: Any, pickled: bytes) -> None:
    """Note what a value uploaded with ``nanogrid.put`` references, for the calls its Ref is given to."""
    modules = modules_of_argument(value, pickled)
    with _SCANNED_LOCK:
        if len(_PUT) >= _MAX_SCANNED:
            _PUT.clear()
        _PUT[sha256] = modules


def modules_of_put(sha256: str) -> frozenset[str]:
    """The modules a value put from this process references (none known for a Ref made elsewhere, e.g. a job's)."""
    with _SCANNED_LOCK:
        return _PUT.get(sha256, frozenset())


@lru_cache(maxsize=1)
def _distributions_of_modules() -> dict[str, list[str]]:
    return dict(metadata.packages_distributions())


def _is_local(module_name: str) -> Path | None:
    """The file or folder of a module the user wrote (not installed, not the standard library), else None."""
    if module_name in sys.stdlib_module_names or module_name in sys.builtin_module_names:
        return None
    if module_name in _distributions_of_modules() or module_name in ("__main__", "__mp_main__"):
        return None
    if module_name in GRID_PROVIDED or module_name in GRID_OWN_MODULES:
        return None  # the grid's own copies are in every runtime, even where this one is a checkout (editable)
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if not file or not file.endswith(".py"):
        return None
    path = Path(file).resolve()
    if any(part in ("site-packages", "dist-packages") for part in path.parts):
        return None
    if (
        Path(sys.base_prefix).resolve() in path.parents
        or Path(sys.prefix).resolve() in path.parents
    ):
        return None
    return path.parent if path.name == "__init__.py" else path


def _local_source_url(dist: metadata.Distribution) -> str | None:
    """Where a distribution was installed from, when that was a local path rather than an index."""
    try:
        direct = json.loads(dist.read_text("direct_url.json") or "null")
    except ValueError:
        return None
    if isinstance(direct, dict) and str(direct.get("url", "")).startswith("file:"):
        return direct["url"]
    return None


def _requirements_of(dist: metadata.Distribution) -> list[str]:
    names = []
    for requirement in dist.requires or []:
        if "extra ==" in requirement or "extra==" in requirement:
            continue
        names.append(_name(requirement))
    return names


def pinned_distributions(modules: Iterable[str]) -> list[str]:
    """``name==version`` for the distributions providing ``modules`` and what they require, as installed here.

    Raises PackageSyncError for one installed from a local path: the grid cannot install that.
    """
    owners = _distributions_of_modules()
    pending = [
        dist
        for module in sorted(set(modules))
        for dist in owners.get(module, [])
        if module not in sys.stdlib_module_names
    ]
    pins: dict[str, str] = {}
    while pending:
        name = _name(pending.pop())
        if name in pins or name in GRID_PROVIDED:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a requirement that is not installed here (a marker for another platform)
        url = _local_source_url(dist)
        if url is not None:
            raise PackageSyncError(
                f"the function uses {dist.metadata['Name']} {dist.version}, which was installed from a local path "
                f"({url}), so the grid cannot install it from the package index; publish it, or name an installable "
                f"version with @remote(packages=['{dist.metadata['Name']}==...'])"
            )
        pins[name] = f"{dist.metadata['Name']}=={dist.version}"
        pending += _requirements_of(dist)
    return sorted(pins.values(), key=_name)


@dataclass(frozen=True)
class Requirements:
    """What package sync found: pins for the index, and the user's own module files to ship with the code."""

    packages: tuple[str, ...]
    local_files: dict[str, bytes]


def local_module_files(modules: Iterable[str]) -> dict[str, bytes]:
    """The user's own modules among ``modules``, and the local modules they use in turn, as package files."""
    files: dict[str, bytes] = {}
    seen: set[str] = set()
    pending = list(modules)
    while pending:
        module_name = pending.pop()
        if module_name in seen:
            continue
        seen.add(module_name)
        path = _is_local(module_name)
        if path is None:
            continue
        sources = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        base = path.parent
        for source in sources:
            if "__pycache__" not in source.parts:
                files[str(source.relative_to(base))] = source.read_bytes()
        pending += [m for m in _modules_used_by(module_name) if m not in seen]
    total = sum(len(b) for b in files.values())
    if total > MAX_LOCAL_MODULE_BYTES:
        raise PackageSyncError(
            f"the local modules the function uses ({', '.join(sorted(files))}) add up to "
            f"{total >> 20} MiB; move large data out of them and read it at run time"
        )
    return files


def _modules_used_by(module_name: str) -> set[str]:
    """Top-level modules a loaded module and its loaded submodules refer to: their imports, and where their
    functions and classes come from (a local package's ``helpers.stats`` may be the one that imports numpy)."""
    found: set[str] = set()
    loaded = [
        m
        for name, m in list(sys.modules.items())
        if name == module_name or name.startswith(module_name + ".")
    ]
    for module in loaded:
        for value in list(vars(module).values()):
            if isinstance(value, types.ModuleType):
                found.add(_top(value.__name__))
            elif isinstance(value, type | types.FunctionType):
                found.add(_top(getattr(value, "__module__", "") or ""))
    found.discard("")
    return found


# Sticky environments: in a notebook (a Jupyter kernel), every distribution synced for any function or cell stays
# in the environments synced after it, and the distributions the notebook's own names refer to (its imports, the
# types of its values) join from the start, so a session's environments settle on one id that the grid has built,
# instead of one small environment per function. None: on in a kernel, off in scripts and tests.
STICKY: bool | None = None
# third-party modules synced so far in this process (while sticky)
_SYNCED_MODULES: set[str] = set()


def _sticky() -> bool:
    if STICKY is not None:
        return STICKY
    get_ipython = getattr(sys.modules.get("IPython"), "get_ipython", None)
    shell = get_ipython() if callable(get_ipython) else None
    # a notebook's shell has a kernel; a terminal's has none
    return getattr(shell, "kernel", None) is not None


def requirements_of_modules(modules: Iterable[str]) -> Requirements:
    """Package sync for a set of top-level modules: the user's own ones as files, the rest pinned as installed here
    (what the user's own modules import included)."""
    modules = set(modules) - {"", "__main__", "__mp_main__"}
    local = local_module_files(modules)
    local_names = {name.split("/", 1)[0].removesuffix(".py") for name in local}
    third_party = modules - local_names
    for name in local_names:
        third_party |= _modules_used_by(name)
    third_party -= local_names
    if _sticky():
        owners = _distributions_of_modules()
        _SYNCED_MODULES.update(m for m in third_party | _notebook_modules() if m in owners)
        third_party |= _SYNCED_MODULES
    return Requirements(tuple(pinned_distributions(third_party)), local)


# module -> whether the grid can install its distributions (cached per process)
_INSTALLABLE: dict[str, bool] = {}


def _notebook_modules() -> set[str]:
    """Third-party modules the notebook's own names refer to (``import pandas as pd``, ``from sklearn... import
    LinearRegression``, a DataFrame): what the session works with, synced with the first environment instead of one
    layer at a time as each cell first touches it. Only what the grid can install (not a package installed from a
    local path: that stays the concern of the function that uses it)."""
    get_ipython = getattr(sys.modules.get("IPython"), "get_ipython", None)
    shell = get_ipython() if callable(get_ipython) else None
    namespace, hidden = getattr(shell, "user_ns", None), getattr(shell, "user_ns_hidden", {})
    if not isinstance(namespace, dict):
        return set()
    found: set[str] = set()
    for name, value in list(namespace.items()):
        if name.startswith("_") or hidden.get(name, _ABSENT) is value:
            continue
        if isinstance(value, types.ModuleType):
            found.add(_top(value.__name__))
        elif isinstance(value, type | types.FunctionType | types.BuiltinFunctionType):
            found.add(_top(getattr(value, "__module__", "") or ""))
        else:
            found.add(_top(getattr(type(value), "__module__", "") or ""))
    owners = _distributions_of_modules()
    candidates = {m for m in found if m in owners and m not in sys.stdlib_module_names}
    for module in candidates - _INSTALLABLE.keys():
        try:
            pinned_distributions({module})
            _INSTALLABLE[module] = True
        except PackageSyncError:
            _INSTALLABLE[module] = False
    return {m for m in candidates if _INSTALLABLE[m]}


_ABSENT = object()


def requirements_for(
    fn: Callable[..., Any], pickled: bytes, argument_modules: Iterable[str] = ()
) -> Requirements:
    """Package sync: the pinned packages and local module files a function needs, from the client's environment.

    Modules come from the function's pickle, the imports its code runs, the modules its globals and
    closure reach, and ``argument_modules`` (what its arguments' pickles referenced).
    """
    modules = (
        modules_in_pickle(pickled)
        | modules_imported(fn)
        | modules_of_function(fn)
        | set(argument_modules)
    )
    return requirements_of_modules(modules)


def pin_installed(requirements: Iterable[str]) -> list[str]:
    """Each requirement as given, except that a bare name this client has installed is pinned to its version
    (``pyarrow`` -> ``pyarrow==26.0.1``): the grid then runs what was tested here."""
    pinned = []
    for requirement in requirements:
        bare = requirement.strip()
        if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._,-]+\])?", bare):
            try:
                bare = f"{bare}=={metadata.version(_name(bare))}"
            except metadata.PackageNotFoundError:
                pass
        pinned.append(bare)
    return pinned


MISSING_MODULE = re.compile(r"No module named '([A-Za-z0-9_.]+)'")


def missing_package(text: str) -> tuple[str, list[str]] | None:
    """For a sandbox's ``No module named 'x'``: (the module, the pins that provide it here, its distribution
    first), when this client has that module from an installed distribution; else None."""
    found = MISSING_MODULE.search(text)
    if found is None:
        return None
    module = _top(found.group(1))
    owners = _distributions_of_modules().get(module)
    if not owners or module in sys.stdlib_module_names:
        return None
    pins = pinned_distributions({module})
    head = [p for p in pins if _name(p) == _name(owners[0])]
    return (module, head + [p for p in pins if p not in head]) if pins else None


def for_cell(
    source: str, namespace: Mapping[str, Any], packages: Iterable[str] | str | None = None
) -> tuple[Environment, dict[str, bytes]]:
    """The environment and local module files for a ``%%nanogrid`` cell.

    ``source`` is the cell's code, ``namespace`` the notebook's globals (the values the cell reads
    go along, so what their pickles reference counts), ``packages`` what ``--packages`` named (a list,
    or a string of names separated by spaces or commas). Explicit packages win over synced ones of the
    same name. Returns the environment for the cell's package manifest (``spec()``) and the files of
    the user's own modules the cell uses, to add to the package beside the cell source.

    The cell is found out as a function would be: its code compiled (imports it runs, names it reads),
    the values it reads scanned as pickles, and functions and classes of the notebook it calls walked.
    """
    import ast

    if isinstance(packages, str):
        packages = [p for p in re.split(r"[\s,]+", packages) if p]
    try:
        code = compile(
            source,
            "<nanogrid cell>",
            "exec",
            flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
            dont_inherit=True,
        )
    except (SyntaxError, ValueError):
        code = None  # not Python (yet): only the packages named explicitly
    modules: set[str] = set()
    if code is not None:
        cell = types.FunctionType(code, dict(namespace))
        modules |= modules_imported(cell) | modules_of_function(cell)
        read = {name for nested in _code_objects(code) for name in nested.co_names}
        for name in sorted(read & set(namespace)):
            # a notebook function's pickle holds its globals
            if not isinstance(namespace[name], types.ModuleType):
                modules |= modules_of_argument(namespace[name])
    found = requirements_of_modules(modules)
    return Environment(tuple(packages or ())).with_packages(found.packages), found.local_files
