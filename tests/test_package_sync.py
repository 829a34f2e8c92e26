"""Package sync from the user's side: whatever the client has and a call needs is in the sandbox.

What must never happen: a function that uses numpy or the user's own module (however it was
imported: ``import a``, ``import a.b``, ``import a as x``, ``from a import f``, a submodule, only
inside a nested function or a method) failing on the grid with ModuleNotFoundError; a DataFrame
argument failing because pandas 3 keeps its strings in pyarrow and pyarrow was not installed; a
sandbox missing a module the client has without the error naming the package and version to add;
a string where a list of names goes, or an environment that can never build, leaving the client.
"""

from __future__ import annotations

import base64
import io
import json
import pickletools
import re
import sys
import types
import zipfile
from collections.abc import Iterator

import cloudpickle
import httpx
import numpy
import pandas as pd
import pyarrow
import pytest

import nanogrid
from nanogrid import environment as envmod
from nanogrid.environment import (
    Environment,
    modules_in_pickle,
    modules_of_function,
    value_signature,
)
from nanogrid.errors import InvalidArguments, InvalidEnvironment, MissingModule
from tests.conftest import uploaded_manifest

PYTHON = "%d.%d" % sys.version_info[:2]
NUMPY = f"numpy=={numpy.__version__}"
PYARROW = f"pyarrow=={pyarrow.__version__}"
SIX = "six==1.17.0"  # what the local package's submodule imports (the client's version, from the lock)

# A user's script or notebook: each import form, for an installed package (numpy) and for the user's own modules
# beside it (ps_helpers.py, and the package ps_pkg with a submodule that imports six).
SCRIPT = """
import numpy
import numpy.linalg
import numpy as np_alias
from numpy import arange
from numpy import linalg
import ps_helpers
import ps_pkg.sub
import ps_helpers as helpers_alias
from ps_helpers import double
from ps_pkg import sub

def import_a():
    return int(numpy.arange(3).sum())

def import_a_b():
    return float(numpy.linalg.norm([3.0, 4.0]))

def import_a_as_x():
    return int(np_alias.arange(3).sum())

def from_a_import_f():
    return int(arange(3).sum())

def from_a_import_submodule():
    return float(linalg.norm([3.0, 4.0]))

def nested_function():
    def inner():
        return int(numpy.ones(3).sum())
    return inner()

class Shape:
    def area(self):
        return float(numpy.prod([2.0, 3.0]))

def method_of_a_class():
    return Shape().area()

def local_import_a():
    return ps_helpers.double(21)

def local_import_a_b():
    return ps_pkg.sub.triple(14)

def local_import_a_as_x():
    return helpers_alias.double(21)

def local_from_a_import_f():
    return double(21)

def local_from_a_import_submodule():
    return sub.triple(14)

def local_nested_function():
    def inner():
        return ps_helpers.double(21)
    return inner()

class Doubler:
    def run(self):
        return ps_helpers.double(21)

def local_method_of_a_class():
    return Doubler().run()
"""

EXPECTED = {
    "import_a": 3,
    "import_a_b": 5.0,
    "import_a_as_x": 3,
    "from_a_import_f": 3,
    "from_a_import_submodule": 5.0,
    "nested_function": 3,
    "method_of_a_class": 6.0,
    "local_import_a": 42,
    "local_import_a_b": 42,
    "local_import_a_as_x": 42,
    "local_from_a_import_f": 42,
    "local_from_a_import_submodule": 42,
    "local_nested_function": 42,
    "local_method_of_a_class": 42,
}


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, types.FunctionType]]:
    """SCRIPT's functions as a notebook has them: defined in ``__main__``, so cloudpickle carries them by value."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "ps_helpers.py").write_text("def double(x):\n    return 2 * x\n")
    (folder / "ps_pkg").mkdir()
    (folder / "ps_pkg" / "__init__.py").write_text("")
    (folder / "ps_pkg" / "sub.py").write_text(
        "import six\n\ndef triple(x):\n    return 3 * x if six.PY3 else 0\n"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))
        namespace: dict[str, object] = {"__name__": "__main__"}
        exec(compile(SCRIPT, str(folder / "script.py"), "exec"), namespace)
        yield {name: fn for name, fn in namespace.items() if name in EXPECTED}  # type: ignore[misc]


def _zip_names(data: bytes) -> set[str]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return set(zf.namelist())


# ---- every import form: the pickle alone, the walk alone, and the package ------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_import_form_names_its_module_in_the_pickle_and_in_the_package(script, name):
    """The function's pickle alone names the module (whatever opcodes carry it), the walk of its globals alone does
    too, and its package pins numpy at the client's version or carries the user's module files."""
    fn = script[name]
    module = (
        "numpy"
        if not name.startswith("local_")
        else ("ps_pkg" if "a_b" in name or "submodule" in name else "ps_helpers")
    )
    assert module in modules_in_pickle(cloudpickle.dumps(fn))
    assert module in modules_of_function(fn)
    package = nanogrid.RemoteFunction(fn).package()
    packages = package.manifest.get("environment", {}).get("packages", [])
    if module == "numpy":
        assert NUMPY in packages
    elif module == "ps_pkg":
        assert {"ps_pkg/__init__.py", "ps_pkg/sub.py"} <= _zip_names(package.data)
        assert SIX in packages  # what the package's submodule imports
    else:
        assert "ps_helpers.py" in _zip_names(package.data)


def test_a_module_name_the_pickle_memoized_still_counts(script):
    """The reported bug: ``import numpy`` then ``numpy.arange`` pickles "numpy" once (the code names it too) and
    hands it to ``subimport`` from the memo; that name must be found as surely as a fresh one."""
    data = cloudpickle.dumps(script["import_a"])
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(data)]
    at = ops.index(("SHORT_BINUNICODE", "subimport"))
    assert [name for name, _ in ops[at + 1 : at + 5]][:3] == ["MEMOIZE", "STACK_GLOBAL", "MEMOIZE"]
    assert ops[at + 4][0] in ("BINGET", "LONG_BINGET")  # the module's name, from the memo
    assert "numpy" in modules_in_pickle(data)


# ---- arguments: what their pickles reference, optional dependencies included ------------------------------------


class RecordingGrid:
    """A controller that answers as a grid would and keeps each uploaded manifest (no sandbox runs anything)."""

    def __init__(self) -> None:
        self.manifests: list[dict] = []
        self.client = nanogrid.Client(
            "http://grid.test", api_key="k", transport=httpx.MockTransport(self.handle)
        )

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        done = {
            "status": "completed",
            "result_pickle": base64.b64encode(cloudpickle.dumps(1)).decode(),
        }
        if path == "/v1/health":
            return httpx.Response(
                200, json={"runtimes": {f"python{PYTHON}": PYTHON}, "blob_threshold_bytes": 1 << 20}
            )
        if (manifest := uploaded_manifest(request)) is not None:
            self.manifests.append(manifest)
            return httpx.Response(201, json={"function_id": f"fn-{len(self.manifests)}"})
        if path.startswith("/v1/blobs/"):
            return httpx.Response({"POST": 404, "HEAD": 404}.get(request.method, 201), json={})
        if path == "/v1/map":
            calls = json.loads(request.content)["args_pickle"]
            lines = [{"job_ids": [f"job-{i}" for i in range(len(calls))]}]
            lines += [{"index": i, "job_id": f"job-{i}", **done} for i in range(len(calls))]
            return httpx.Response(
                200, content="\n".join(json.dumps(line) for line in lines).encode()
            )
        return httpx.Response(200, json={"job_id": "job-1", **done})

    def packages(self) -> list[str]:
        return self.manifests[-1]["environment"]["packages"]


def _notebook_functions() -> tuple[types.FunctionType, types.FunctionType]:
    """Functions carried by value, as a notebook's are (a module-level one here would take this test module along,
    and with it everything the test modules import)."""

    def rows(table):  # names neither pandas nor pyarrow: only its argument does
        return len(table)

    def call(fn):
        return fn()

    return rows, call  # type: ignore[return-value]


rows, call = _notebook_functions()


def test_a_dataframe_argument_brings_pyarrow_which_pandas_3_pickles_its_strings_with():
    """A DataFrame of strings pickles pyarrow arrays (pandas 3's ``str``): the environment pins pyarrow at the
    client's version, though pandas does not require it and the function names neither."""
    grid = RecordingGrid()
    frame = pd.DataFrame({"name": ["a", "b"]})
    assert "pyarrow" in modules_in_pickle(cloudpickle.dumps(frame))
    assert nanogrid.RemoteFunction(rows, client=grid.client).remote(frame) == 1
    assert {f"pandas=={pd.__version__}", PYARROW, NUMPY} <= set(grid.packages())
    assert "pytest" not in " ".join(
        grid.packages()
    )  # only what the call needs, not this test's own imports


def test_map_scans_each_kind_of_item_so_a_late_dataframe_still_counts():
    """``.map()`` scans one item of each kind, not every item, and a kind first seen at the end still counts."""
    grid = RecordingGrid()
    items: list[object] = list(range(200)) + [pd.DataFrame({"name": ["a"]})]
    assert list(nanogrid.RemoteFunction(rows, client=grid.client).map(items, progress=False)) == [
        1
    ] * len(items)
    assert PYARROW in grid.packages()
    # Kinds: a DataFrame of numbers only (no pyarrow in its pickle) is not the same kind as one of strings.
    assert value_signature(pd.DataFrame([[1]])) != value_signature(pd.DataFrame({"name": ["a"]}))
    assert "pyarrow" not in modules_in_pickle(cloudpickle.dumps(pd.DataFrame([[1]])))


def test_each_function_given_as_an_argument_counts_on_its_own(script):
    """Functions are not one kind of value: a second function argument that uses numpy brings numpy, though the
    first one (which uses the user's own module, shipped as a file) did not."""
    grid = RecordingGrid()
    caller = nanogrid.RemoteFunction(call, client=grid.client)
    assert caller.remote(script["local_import_a"]) == 1
    assert NUMPY not in grid.manifests[-1].get("environment", {}).get("packages", [])
    assert caller.remote(script["import_a"]) == 1
    assert NUMPY in grid.packages()


def test_a_value_put_on_the_grid_brings_what_its_pickle_references():
    """``f.remote(nanogrid.put(frame))``: the call's arguments hold only a Ref, yet pandas and pyarrow go along."""
    grid = RecordingGrid()
    ref = nanogrid.put(pd.DataFrame({"name": ["a"]}), client=grid.client)
    assert nanogrid.RemoteFunction(rows, client=grid.client).remote(ref) == 1
    assert {f"pandas=={pd.__version__}", PYARROW} <= set(grid.packages())


def test_a_package_named_without_a_version_runs_at_the_clients_version():
    """``packages=["pyarrow"]`` means the pyarrow tested here; a package the client lacks stays as written."""

    @nanogrid.remote(packages=["pyarrow", "humanize"])
    def uses():
        return 1

    packages = uses.package().manifest["environment"]["packages"]
    assert PYARROW in packages and "humanize" in packages


def test_a_missing_module_the_client_has_is_named_with_the_package_to_add():
    """A sandbox's ``No module named 'pyarrow.lib'`` becomes the client's pin for it, its distribution first."""
    module, pins = envmod.missing_package("ModuleNotFoundError: No module named 'pyarrow.lib'") or (
        "",
        [],
    )
    assert module == "pyarrow" and pins[0] == PYARROW
    assert (
        envmod.missing_package("No module named 'no_such_module_ps'") is None
    )  # not the client's: left as it is


# ---- options refused where they are written ---------------------------------------------------------------------


def test_a_string_where_a_list_of_names_goes_is_refused_at_decoration():
    """``packages="humanize"`` would install h, u, m, ...: refused before anything is sent, saying what to write."""
    for option in ("packages", "secrets"):
        with pytest.raises(InvalidArguments, match=rf"write {option}=\['humanize'\]"):
            nanogrid.remote(**{option: "humanize"})
        with pytest.raises(InvalidArguments, match="list of names"):
            nanogrid.RemoteFunction(rows, **{option: [1]})
    with pytest.raises(InvalidEnvironment, match="not a requirement"):
        nanogrid.remote(packages=["--index-url=https://evil.example/simple"])


@pytest.mark.parametrize(
    "settings",
    [
        {"system": ["zsh.+"]},
        {"system": ["*"]},
        {"system": ["zsh."]},
        {"system": ["lib..so"]},
        {"python": "3.99"},
        {"python": "2.7"},
        {"packages": "pandas"},
        {"system": "ffmpeg"},
    ],
)
def test_an_environment_that_could_never_build_is_refused_on_the_client(settings):
    """A system package apt would read as a pattern, a Python no runtime has, a string for a list: refused with
    an error of NanoGrid's family that is still a ValueError for code that catches that."""
    with pytest.raises(InvalidEnvironment) as refused:
        Environment(**settings)
    assert isinstance(refused.value, ValueError) and isinstance(
        refused.value, nanogrid.NanoGridError
    )
    assert Environment(
        system=["g++", "libstdc++6", "ffmpeg"], python="3.13"
    ).system  # real Debian names pass


def test_a_python_the_function_cannot_load_on_is_refused_at_decoration():
    """A function pickled here loads only on this Python; asking for another would fail on every call."""
    other = "3.13" if PYTHON != "3.13" else "3.11"
    with pytest.raises(InvalidEnvironment, match=f"python='{other}'"):
        nanogrid.remote(environment=Environment(python=other))


# ---- cells and sessions ----------------------------------------------------------------------------------------


def test_a_cell_is_synced_from_what_its_values_and_functions_reference(script):
    """``%%nanogrid``: a DataFrame the cell reads brings pyarrow; a notebook function it calls brings numpy; a local
    module it imports goes as a file."""
    namespace = {
        "__name__": "__main__",
        "frame": pd.DataFrame({"name": ["a"]}),
        "go": script["import_a"],
    }
    environment, files = envmod.for_cell(
        "import ps_helpers\ntotal = go() + len(frame)", namespace, ["six"]
    )
    assert {PYARROW, NUMPY, f"pandas=={pd.__version__}", "six"} <= set(environment.packages)
    assert "ps_helpers.py" in files


def test_in_a_sticky_session_environments_only_grow_and_settle_on_one_id(script, monkeypatch):
    """In a notebook session a function that uses less than an earlier one still gets what was synced before, so
    the session's functions share one environment instead of one build each; off, each gets only its own."""
    monkeypatch.setattr(envmod, "STICKY", True)
    monkeypatch.setattr(envmod, "_SYNCED_MODULES", set())

    def plain():
        return 1

    first = nanogrid.RemoteFunction(script["import_a"]).package().manifest["environment_id"]
    assert nanogrid.RemoteFunction(plain).package().manifest["environment_id"] == first
    monkeypatch.setattr(envmod, "STICKY", False)
    assert "environment" not in nanogrid.RemoteFunction(plain).package().manifest


# ---- end to end on the Docker sandbox ----------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_import_form_runs_in_a_docker_sandbox(docker_grid, script, name):
    """Each form's function runs in a Docker sandbox (numpy from its synced environment, the user's modules from
    the package) and returns what it returns here: no ModuleNotFoundError."""
    nanogrid.connect(docker_grid.url, api_key=docker_grid.api_key)
    fn = script[name]
    assert nanogrid.RemoteFunction(fn, timeout=300).remote() == fn() == EXPECTED[name]


@pytest.mark.integration
def test_arguments_and_missing_modules_in_a_docker_sandbox(docker_grid):
    """A DataFrame of strings (pyarrow) runs as an argument of .remote() and .map(); a Ref made on the grid by a
    function whose environment has pandas, given to one that names nothing, works after one more try with pandas
    added; an explicit environment is never changed, and its error names the package and version to add, whether
    the arguments or the function itself could not be loaded."""
    nanogrid.connect(docker_grid.url, api_key=docker_grid.api_key)

    @nanogrid.remote(timeout=300)
    def dtypes(frame):
        return [str(frame[column].dtype) for column in frame.columns], frame["name"].tolist()

    frame = pd.DataFrame({"name": ["a", "b"]})
    assert dtypes.remote(frame) == dtypes(frame)
    assert list(dtypes.map([frame, pd.DataFrame({"name": ["c"]})], progress=False))[1][1] == ["c"]

    @nanogrid.remote(timeout=300)
    def make():
        import pandas

        return pandas.DataFrame({"n": [1, 2, 3]})

    @nanogrid.remote(timeout=300)
    def count(table):
        return len(table)

    with pytest.warns(UserWarning, match="could not import 'pandas'"):
        assert count.remote(make.spawn().ref()) == 3

    @nanogrid.remote(environment=Environment(packages=[SIX]), timeout=300)
    def exact(table):
        return len(table)

    with pytest.raises(MissingModule, match=r"add packages=\['(pandas|numpy|pyarrow)==") as missing:
        exact.remote(frame)
    assert missing.value.requirement in {f"pandas=={pd.__version__}", NUMPY, PYARROW}

    @nanogrid.remote(environment=Environment(packages=[SIX]), timeout=300)
    def exact_numpy():  # the function itself cannot load there (its pickle imports numpy)
        return int(numpy.arange(3).sum())

    with pytest.raises(MissingModule, match=re.escape(f"add packages=['{NUMPY}']")):
        exact_numpy.remote()


def test_a_notebook_sessions_environment_starts_with_what_its_own_names_refer_to(monkeypatch):
    """In a kernel, the first environment already holds what the notebook imported (its header cell's pandas,
    matplotlib, scikit-learn), so a later cell touching one of them builds nothing new. Never: a package installed
    from a local path, or the grid's own, pulled in from the namespace (a call would fail for an unused import)."""
    from IPython.testing.globalipapp import get_ipython
    from sklearn.linear_model import LinearRegression

    shell = get_ipython()  # the process's test shell (started here, or by an earlier test)
    monkeypatch.setattr(envmod, "STICKY", True)
    monkeypatch.setattr(envmod, "_SYNCED_MODULES", set())
    for name, value in {
        "pd": pd,
        "LinearRegression": LinearRegression,
        "nanogrid": nanogrid,
    }.items():
        monkeypatch.setitem(shell.user_ns, name, value)
    pins = envmod.requirements_of_modules({"numpy"}).packages
    names = {envmod.distribution_name(pin) for pin in pins}
    assert {"pandas", "scikit-learn", "numpy"} <= names, names
    assert "nanogrid" not in names and all("==" in pin for pin in pins)


def test_the_grids_own_packages_are_never_shipped_or_synced_as_the_users_modules():
    """Never: nanogrid (a checkout installed editable, outside site-packages) taken for the user's own module, its
    files shipped in the package and its client dependencies (httpx, IPython, ...) built into the environment."""
    ref_holder = [nanogrid.Ref] if hasattr(nanogrid, "Ref") else [nanogrid.remote]
    found = envmod.requirements_of_modules({"nanogrid", "nanogrid_backend", "cloudpickle"})
    assert found.packages == () and found.local_files == {}, (found, ref_holder)
