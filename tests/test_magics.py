"""%%nanogrid and %nanogrid in a real IPython shell against a live grid."""

from __future__ import annotations

import threading
import time

import pytest
from IPython.core.error import UsageError
from IPython.testing.globalipapp import start_ipython

from nanogrid.cells import plan_cell

pytestmark = pytest.mark.integration


def test_plan_finds_what_a_cell_reads_and_assigns():
    source = "import math as m\nfrom os import path\ny = m.sqrt(x) + offset\ndef f(a):\n    b = a\n    return b\ny\n"
    plan = plan_cell(source)
    assert {"x", "offset", "m"} <= set(plan.reads)
    assert set(plan.assigns) == {"m", "path", "y", "f"}  # not the function's local b
    assert plan.has_value


@pytest.fixture(scope="module")
def ip():
    shell = start_ipython()
    shell.run_line_magic("load_ext", "nanogrid")
    return shell


@pytest.fixture()
def connected(ip, grid):
    ip.run_line_magic("nanogrid", f"connect {grid.url} {grid.api_key}")
    return ip


def test_cell_reads_notebook_names_and_assigns_back(connected, capsys):
    ip = connected
    ip.user_ns.update(x=16, offset=1)
    value = ip.run_cell_magic("nanogrid", "--memory 256 --timeout 30",
                              "import math\nprint('computing')\ny = math.sqrt(x) + offset\ny * 10\n")
    assert value == 50.0
    assert ip.user_ns["y"] == 5.0
    assert "computing" in capsys.readouterr().out


def test_cell_without_final_expression_returns_nothing(connected):
    assert connected.run_cell_magic("nanogrid", "", "z = 3\n") is None
    assert connected.user_ns["z"] == 3


def test_remote_error_is_raised_as_itself(connected):
    with pytest.raises(ZeroDivisionError):
        connected.run_cell_magic("nanogrid", "", "1 / 0\n")


def test_unpicklable_input_names_the_variable(connected):
    connected.user_ns["lock"] = threading.Lock()
    with pytest.raises(UsageError, match="the cell uses 'lock'"):
        connected.run_cell_magic("nanogrid", "", "with lock:\n    pass\n")


def test_unpicklable_output_is_reported_not_fatal(connected, capsys):
    connected.run_cell_magic("nanogrid", "", "import threading\nkeep = 1\nmutex = threading.Lock()\n")
    assert connected.user_ns["keep"] == 1
    assert "mutex was not brought back" in capsys.readouterr().err


def test_async_cell_returns_a_job_and_names_arrive_later(connected):
    job = connected.run_cell_magic("nanogrid", "--async", "import time\ntime.sleep(0.3)\nlate = 'here'\n")
    assert job.result(timeout=30)["names"]["late"] == "here"
    deadline = time.monotonic() + 5
    while "late" not in connected.user_ns and time.monotonic() < deadline:
        time.sleep(0.05)
    assert connected.user_ns["late"] == "here"


def test_bad_options_say_what_is_accepted(connected):
    with pytest.raises(UsageError, match="--memory"):
        connected.run_cell_magic("nanogrid", "--memroy 5", "1\n")


def test_line_magic_status_and_config(connected, capsys):
    connected.run_line_magic("nanogrid", "status")
    connected.run_line_magic("nanogrid", "config")
    out = capsys.readouterr().out
    assert "warm" in out and "stem cells" in out and "runtimes" in out
