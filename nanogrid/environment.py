"""Function environments: the packages, system packages, Python and variables a function runs with.

An ``Environment`` is declarative and content-hashed: the same pins, system packages, Python
and variables always give the same environment id, and the grid builds each id once. With no
argument, ``@remote`` mirrors the client (package sync): the third-party modules the function
references once pickled, the modules it imports, and the types of the values it is called
with, mapped to their distributions and pinned at the versions installed here, with what they
require. The user's own modules (files beside the notebook or script, not installed) go along
as files in the package.
"""

from __future__ import annotations

import dis
import hashlib
import json
import pickletools
import re
import sys
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from itertools import islice
from pathlib import Path
from typing import Any

from nanogrid.errors import NanoGridError

PLATFORM = "x86_64-manylinux_2_28"  # the wheels' platform: the grid's runtime images run glibc 2.36+
# A pin or range for one distribution, never a URL, path or installer option.
REQUIREMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}(\[[A-Za-z0-9._,-]{1,100}\])?"
                         r"(\s*(===|==|~=|!=|>=|<=|>|<)\s*[A-Za-z0-9.*+!_-]{1,64}(\s*,\s*(===|==|~=|!=|>=|<=|>|<)\s*"
                         r"[A-Za-z0-9.*+!_-]{1,64})*)?$")
SYSTEM_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]{0,99}$")  # a Debian package name
VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")
RESERVED_VARIABLES = ("NANOGRID_", "PYTHON", "PATH", "HOME", "LD_")  # the sandbox's own settings
GRID_PROVIDED = {"nanogrid", "cloudpickle"}  # every runtime has the grid's own copies
MAX_LOCAL_MODULE_BYTES = 8 << 20


class PackageSyncError(NanoGridError, ValueError):
    """A package the function needs cannot be mirrored onto the grid; the message says which and what to do."""


def distribution_name(requirement: str) -> str:
    """The normalised distribution name of a requirement (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\s\[=<>!~]", requirement, maxsplit=1)[0]).lower()


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
        if isinstance(self.packages, str) or isinstance(self.system, str):
            raise TypeError("packages and system take a list of names, e.g. packages=['pandas==2.2.3']")
        packages = tuple(sorted({p.strip() for p in self.packages if p.strip()}, key=_name))
        for requirement in packages:
            if not REQUIREMENT.match(requirement):
                raise ValueError(f"package {requirement!r} is not a requirement NanoGrid can install: give a name "
                                 "with an optional version, e.g. 'pandas' or 'pandas==2.2.3' (no URLs, paths or options)")
        for name in self.system:
            if not SYSTEM_PACKAGE.match(name):
                raise ValueError(f"system package {name!r} is not a Debian package name")
        for key, value in self.env.items():
            if not VARIABLE.match(key) or key.startswith(RESERVED_VARIABLES) or not isinstance(value, str):
                raise ValueError(f"environment variable {key!r}: names are letters, digits and '_', values are "
                                 f"strings, and {', '.join(RESERVED_VARIABLES)}... belong to the sandbox")
        if self.python is not None and not re.match(r"^3\.\d{1,2}$", self.python):
            raise ValueError(f"python must be a minor version such as '3.11', not {self.python!r}")
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
        return {"packages": list(self.packages), "system": list(self.system), "python": python,
                "env": dict(self.env), "platform": PLATFORM}

    @property
    def id(self) -> str:
        return environment_id(self.spec())

    @property
    def empty(self) -> bool:
        return not (self.packages or self.system or self.env)


def environment_id(spec: Mapping[str, Any]) -> str:
    return "env-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


# ---- package sync: which modules a function uses ------------------------------------------------------------


def modules_in_pickle(data: bytes) -> set[str]:
    """Top-level modules a pickle refers to: its globals (classes, functions) and cloudpickle's module imports."""
    found: set[str] = set()
    memo: dict[int, str | None] = {}
    recent: list[str | None] = []  # the last two values pushed, where they were strings
    subimport_next = False  # cloudpickle pickles a module as subimport("name")
    for opcode, arg, _ in pickletools.genops(data):
        name = opcode.name
        value: str | None = None
        if name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            value = str(arg)
            if subimport_next:
                found.add(value.split(".", 1)[0])
                subimport_next = False
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            value = memo.get(int(str(arg)))
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
            continue
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(str(arg))] = recent[-1] if recent else None
            continue
        elif name == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            found.add(module.split(".", 1)[0])
            subimport_next = attr in ("subimport", "dynamic_subimport")
        elif name == "STACK_GLOBAL" and len(recent) == 2 and recent[0]:
            found.add(recent[0].split(".", 1)[0])
            subimport_next = recent[1] in ("subimport", "dynamic_subimport")
        recent = (recent + [value])[-2:]
    return found


def modules_imported(fn: Callable[..., Any]) -> set[str]:
    """Modules the function's code imports when it runs (``import x`` inside the body), nested code included."""
    code = getattr(fn, "__code__", None)
    found: set[str] = set()
    pending = [code] if code is not None else []
    while pending:
        current = pending.pop()
        for instruction in dis.get_instructions(current):
            if instruction.opname == "IMPORT_NAME" and isinstance(instruction.argval, str):
                found.add(instruction.argval.split(".", 1)[0])
        pending += [c for c in current.co_consts if isinstance(c, types.CodeType)]
    return found


def modules_of_values(values: Iterable[Any]) -> set[str]:
    """Modules of the values' types (a DataFrame argument needs pandas), one level into lists, tuples and dicts."""
    found: set[str] = set()
    for value in values:
        items = [value]
        if isinstance(value, list | tuple | set | frozenset):
            items += islice(value, 100)  # never a copy of a large argument: every call of a .map() looks
        elif isinstance(value, dict):
            items += islice(value.values(), 100)
        for item in items:
            module = getattr(type(item), "__module__", "") or ""
            found.add(module.split(".", 1)[0])
    return found


@lru_cache(maxsize=1)
def _distributions_of_modules() -> dict[str, list[str]]:
    return dict(metadata.packages_distributions())


def _is_local(module_name: str) -> Path | None:
    """The file or folder of a module the user wrote (not installed, not the standard library), else None."""
    if module_name in sys.stdlib_module_names or module_name in sys.builtin_module_names:
        return None
    if module_name in _distributions_of_modules() or module_name in ("__main__", "__mp_main__"):
        return None
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if not file or not file.endswith(".py"):
        return None
    path = Path(file).resolve()
    if any(part in ("site-packages", "dist-packages") for part in path.parts):
        return None
    if Path(sys.base_prefix).resolve() in path.parents or Path(sys.prefix).resolve() in path.parents:
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
    pending = [dist for module in sorted(set(modules)) for dist in owners.get(module, [])
               if module not in sys.stdlib_module_names]
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
                f"version with @remote(packages=['{dist.metadata['Name']}==...'])")
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
        module = sys.modules.get(module_name)
        pending += [m for m in _modules_used_by(module) if m not in seen]
    total = sum(len(b) for b in files.values())
    if total > MAX_LOCAL_MODULE_BYTES:
        raise PackageSyncError(f"the local modules the function uses ({', '.join(sorted(files))}) add up to "
                               f"{total >> 20} MiB; move large data out of them and read it at run time")
    return files


def _modules_used_by(module: types.ModuleType | None) -> set[str]:
    """Top-level modules a module's globals refer to (its imports, and where its functions and classes come from)."""
    found: set[str] = set()
    for value in vars(module).values() if module is not None else ():
        if isinstance(value, types.ModuleType):
            found.add(value.__name__.split(".", 1)[0])
        elif isinstance(value, type | types.FunctionType):
            found.add((getattr(value, "__module__", "") or "").split(".", 1)[0])
    return found


def requirements_for(fn: Callable[..., Any], pickled: bytes, argument_modules: Iterable[str] = ()) -> Requirements:
    """Package sync: the pinned packages and local module files a function needs, from the client's environment."""
    modules = modules_in_pickle(pickled) | modules_imported(fn) | set(argument_modules)
    modules.discard("")
    local = local_module_files(modules)
    local_names = {name.split("/", 1)[0].removesuffix(".py") for name in local}
    third_party = set(modules) - local_names
    for name in local:  # what the user's own modules import needs installing too
        third_party |= _modules_used_by(sys.modules.get(name.split("/", 1)[0].removesuffix(".py")))
    return Requirements(tuple(pinned_distributions(third_party)), local)


def for_cell(source: str, namespace: Mapping[str, Any], packages: Iterable[str] | str | None = None
             ) -> tuple[Environment, dict[str, bytes]]:
    """The environment and local module files for a ``%%nanogrid`` cell.

    ``source`` is the cell's code, ``namespace`` the notebook's globals (the values the cell reads
    go along, so their types count), ``packages`` what ``--packages`` named (a list, or a string
    of names separated by spaces or commas). Explicit packages win over synced ones of the same
    name. Returns the environment for the cell's package manifest (``spec()``) and the files of
    the user's own modules the cell uses, to add to the package beside the cell source.
    """
    import ast

    if isinstance(packages, str):
        packages = [p for p in re.split(r"[\s,]+", packages) if p]
    modules: set[str] = set()
    try:
        tree = ast.parse(source)
    except SyntaxError:
        tree = None
    names: set[str] = set()
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".", 1)[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module.split(".", 1)[0])
        elif isinstance(node, ast.Name):
            names.add(node.id)
    values = [namespace[name] for name in names if name in namespace]
    for value in values:
        if isinstance(value, types.ModuleType):
            modules.add(value.__name__.split(".", 1)[0])
        elif isinstance(value, type | types.FunctionType):
            modules.add((getattr(value, "__module__", "") or "").split(".", 1)[0])
    modules |= modules_of_values(v for v in values if not isinstance(v, types.ModuleType))
    modules.discard("")
    local = local_module_files(modules)
    local_names = {name.split("/", 1)[0].removesuffix(".py") for name in local}
    synced = pinned_distributions(modules - local_names)
    return Environment(tuple(packages or ())).with_packages(synced), local
