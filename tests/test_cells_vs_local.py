"""A ``%%nanogrid`` cell must leave the notebook exactly as the same cell run locally leaves it.

Each case runs the same setup, cell and follow-up twice in one IPython shell (namespace reset in
between): once plainly, once with ``%%nanogrid``, in both sandboxes. What must never happen: a name
the cell touched differs afterwards (value, type, identity with other names, the globals of a
function it defined), or the cell's printed output, displayed value or exception differs.
"""

from __future__ import annotations

import re
import types
from typing import Any

import IPython
import pytest
from IPython.testing.globalipapp import start_ipython
from IPython.utils.capture import capture_output

pytestmark = pytest.mark.integration

HISTORY = re.compile(r"^_(i+|i?\d+|ih|oh|dh)$")  # IPython's own input/output history names
TIMING = re.compile(r"[\d.]+(e[+-]\d+)? (ns|\xb5s|us|ms|s)\b")

CASES: dict[str, tuple[str, str, str]] = {  # setup, cell, follow-up (run locally in both runs)
    "in-place mutations": (
        "items = [1, 2, 3]\ncfg = {'a': 1}\nbuf = bytearray(b'abc')",
        "items.append(4)\ncfg['b'] = 2\nbuf[0] = 120",
        "",
    ),
    "mutating a method on an object of a notebook class": (
        "class Bag:\n    def __init__(self):\n        self.items = set()\n"
        "    def add(self, x):\n        self.items.add(x)\n"
        "obj = Bag()",
        "obj.add(4)",
        "same_class = type(obj) is Bag",
    ),
    "augmented assignment": ("n = 1\ncounter = 10", "n += 2\ncounter -= n", ""),
    "global in a function defined in the cell": (
        "n = 1",
        "def bump():\n    global n\n    n += 1\nbump()\nbump()",
        "bump()",
    ),
    "del removes the name": ("y = 1\nkeep = 2", "del y", ""),
    "names bound before an exception": ("", "before = 42\nraise ValueError('boom')\nafter = 1", ""),
    "star import and underscore names": (
        "_hidden = 5",
        "from math import *\n_hidden += 1\n_new = _hidden",
        "",
    ),
    "two names for one changed object": ("a = [1]\nb = a", "a.append(2)", "same = a is b"),
    "new names for unchanged objects": (
        "a = [1]",
        "c = a\nd = [a, a]",
        "same = c is a and d[0] is a and d[1] is a",
    ),
    "a rebound name leaves its aliases alone": ("a = [1]\nb = a", "a = [2]", "same = a is b"),
    "functions and classes live in the notebook": (
        "n = 1",
        "def f():\n    return n * 10\nclass C:\n    def m(self):\n        return n",
        "n = 5\nresults = (f(), C().m(), f.__globals__ is globals(), C.m.__globals__ is globals())",
    ),
    "a notebook function sees what the cell binds": (
        "def helper():\n    return n\nn = 1",
        "n = 2\nseen = helper()",
        "later = helper()",
    ),
    "the last expression is the cell's value": ("x = 3", "x * 2", ""),
    "a trailing semicolon hides the value": ("x = 3", "x * 2;", ""),
    "stdout and stderr": (
        "",
        "import sys\nprint('one')\nprint('two', file=sys.stderr)\nprint('three')",
        "",
    ),
    "IPython syntax": (
        "t = 20",
        "%time t2 = t + 1\n%timeit -n 2 -r 1 t + 1\nout = !echo hello $t\n!echo shell {t + 2}\nout",
        "lines = (out.n, out.s)",
    ),
    "%time of an expression is the cell's value": ("t = 4", "%time t * 2", ""),
    "a file closed by `with` stays behind without a warning": (  # the follow-up sets f in both runs
        "",
        "import os\nwith open(os.devnull, 'w') as f:\n    f.write('note')\nwritten = True",
        "f = None",
    ),
    "a failed cell's exception from inside a function": (
        "values = [0]",
        "def normalise(values):\n    return [v / sum(values) for v in values]\nok = 1\nnormalise(values)",
        "",
    ),
}


@pytest.fixture(scope="module")
def shell():
    ip = (
        start_ipython() or IPython.get_ipython()
    )  # one shell per process: started by the first module
    ip.run_line_magic("load_ext", "nanogrid")
    ip.system = ip.system_piped  # as in a Jupyter kernel: `!cmd` output goes to the cell's stdout
    return ip


def describe(value: Any, ns: dict[str, Any]) -> Any:
    if isinstance(value, types.FunctionType):
        return ("function", value.__qualname__, value.__globals__ is ns)
    if isinstance(value, type):
        methods = {
            k: v.__globals__ is ns
            for k, v in vars(value).items()
            if isinstance(v, types.FunctionType)
        }
        return ("class", value.__qualname__, methods)
    if isinstance(value, types.ModuleType):
        return ("module", value.__name__)
    if type(value).__repr__ is object.__repr__:  # the address would differ: compare the attributes
        return (
            type(value).__qualname__,
            {k: describe(v, ns) for k, v in sorted(vars(value).items())},
        )
    return (type(value).__qualname__, repr(value))


def state(ns: dict[str, Any], hidden: dict[str, Any]) -> dict[str, Any]:
    """Every user name: what it is, and which earlier name (if any) is the same object."""
    names = sorted(
        k for k in ns if not k.startswith("__") and not HISTORY.match(k) and k not in hidden
    )
    first: dict[int, str] = {}
    described = {}
    for name in names:
        same = first.setdefault(id(ns[name]), name)
        described[name] = (describe(ns[name], ns), same if same != name else None)
    return described


def run(
    ip: Any, setup: str, cell: str, after: str, remote: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    ip.reset()
    ip.system = ip.system_piped
    if setup:
        assert ip.run_cell(setup).success
    with capture_output() as captured:
        result = ip.run_cell(("%%nanogrid --timeout 60\n" if remote else "") + cell)
    if after:
        assert ip.run_cell(after).success
    error = result.error_in_exec or result.error_before_exec
    outputs = {
        "stdout": _comparable(captured.stdout),
        "stderr": captured.stderr,
        "value": None if result.result is None else describe(result.result, ip.user_ns),
        "error": None if error is None else (type(error).__name__, str(error)),
    }
    return state(ip.user_ns, ip.user_ns_hidden), outputs


def _comparable(stdout: str) -> str:
    """Without what differs between any two runs: timings, the Out[N] prompt, and the symbols and line ends
    that IPython picks for the terminal it prints to (µ or u, ± or +-, a pty's \\r\\n)."""
    stdout = (
        re.sub(r"(?m)^Out\[\d+\]: .*\n?", "", stdout).replace("\r\n", "\n").replace("+-", "\xb1")
    )
    return TIMING.sub("T", stdout)


@pytest.mark.parametrize("case", list(CASES))
def test_remote_cell_leaves_the_notebook_as_a_local_run(shell, client, case):
    setup, cell, after = CASES[case]
    local_state, local_outputs = run(shell, setup, cell, after, remote=False)
    remote_state, remote_outputs = run(shell, setup, cell, after, remote=True)
    assert remote_outputs == local_outputs
    assert remote_state == local_state


def test_the_comparison_sees_a_lost_mutation(shell, client):
    """The harness itself: a cell whose mutation is undone afterwards must not compare equal to a local run."""
    setup, cell, _ = CASES["in-place mutations"]
    local_state, _ = run(shell, setup, cell, "", remote=False)
    remote_state, _ = run(shell, setup, cell, "items.pop()", remote=True)
    assert remote_state != local_state
