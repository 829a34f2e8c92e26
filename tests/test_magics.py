"""%%nanogrid and %nanogrid in a real IPython shell against a live grid.

What must never happen: a cell is sent although a line of it cannot run there; a bad option is
accepted or answered with an unreadable error; printed output is lost, doubled or reordered; a
value that cannot come back disappears without its name; ``--async`` hands out an internal dict.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import threading
import time
import types
import uuid

import httpx
import IPython
import pytest
from IPython.core.error import UsageError
from IPython.core.magic_arguments import parse_argstring
from IPython.testing.globalipapp import start_ipython
from IPython.utils.capture import capture_output

import nanogrid
from nanogrid import cli
from nanogrid.cell_state import CellRefused, plan_cell
from nanogrid.errors import FunctionTimeout
from nanogrid.magics.cell import prepare

pytestmark = pytest.mark.integration


def test_plan_reads_what_the_compiler_says_the_cell_reads():
    source = (
        "import math as m\ny = m.sqrt(x) + offset\nn += 1\ndel gone\n"
        "def f(a):\n    global g\n    b = a + h\n    g = b\n    return b\nclass C:\n    k = j\ny\n"
    )
    plan = plan_cell(source)
    assert {"x", "offset", "m", "n", "gone", "h", "j"} <= set(plan.reads)
    assert not {"a", "b", "g", "k"} & set(plan.reads)  # locals, and a global only assigned
    assert plan.has_value


def test_plan_reads_names_inside_magics_and_shell_expansions():
    plan = plan_cell(
        "get_ipython().run_line_magic('time', 'z = w + 1')\n"
        "get_ipython().system('echo $p {q * 2}')\n"
    )
    assert {"w", "p", "q"} <= set(plan.reads) and "z" not in plan.reads


@pytest.mark.parametrize(
    "source, line, why",
    [
        (
            "x = 1\nget_ipython().run_line_magic('matplotlib', 'inline')\n",
            2,
            "%matplotlib would act on the sandbox",
        ),
        ("get_ipython().run_cell_magic('time', '', 'x = 1')\n", 1, "cell magics"),
        ("get_ipython().run_line_magic('timeit', '-o x + 1')\n", 1, "-o is not supported"),
        ("shell = get_ipython()\n", 1, "supports only"),
    ],
)
def test_plan_refuses_a_line_the_sandbox_cannot_run_by_number(source, line, why):
    with pytest.raises(CellRefused, match=why) as refused:
        plan_cell(source)
    assert refused.value.line == line


@pytest.fixture(scope="module")
def ip():
    shell = (
        start_ipython() or IPython.get_ipython()
    )  # one shell per process: started by the first module
    shell.run_line_magic("load_ext", "nanogrid")
    return shell


@pytest.fixture()
def connected(ip, grid):
    ip.run_line_magic("nanogrid", f"connect {grid.url} {grid.api_key}")
    return ip


@pytest.fixture(params=["process", "docker"])
def any_grid(request):
    """The process grid and the Docker grid: cells must behave the same in both sandboxes."""
    return request.getfixturevalue("grid" if request.param == "process" else "docker_grid")


def test_cell_reads_notebook_names_and_assigns_back(connected, capsys):
    ip = connected
    ip.user_ns.update(x=16, offset=1)
    value = ip.run_cell_magic(
        "nanogrid",
        "--memory 256 --timeout 30",
        "import math\nprint('computing')\ny = math.sqrt(x) + offset\ny * 10\n",
    )
    assert value == 50.0
    assert ip.user_ns["y"] == 5.0
    assert capsys.readouterr().out == "computing\n"  # once


def test_stdout_and_stderr_arrive_once_in_the_order_printed(connected):
    both = io.StringIO()
    with contextlib.redirect_stdout(both), contextlib.redirect_stderr(both):
        connected.run_cell_magic(
            "nanogrid", "", "import sys\nprint('a')\nprint('b', file=sys.stderr)\nprint('c')\n"
        )
    assert both.getvalue() == "a\nb\nc\n"


def test_cell_without_final_expression_returns_nothing(connected):
    assert connected.run_cell_magic("nanogrid", "", "z = 3\n") is None
    assert connected.user_ns["z"] == 3


def test_remote_error_is_raised_as_itself_with_only_the_cells_frames(connected):
    with capture_output() as captured:
        result = connected.run_cell("%%nanogrid\nfirst = 1\n1 / 0\n")
    assert isinstance(result.error_in_exec, ZeroDivisionError)
    assert connected.user_ns["first"] == 1
    assert "----> 2 1 / 0" in captured.stdout
    assert (
        "cell_state.py" not in captured.stdout
        and "magics" not in captured.stdout
        and "bootstrap" not in captured.stdout
    )


def test_unpicklable_input_names_the_variable(connected):
    connected.user_ns["lock"] = threading.Lock()
    with pytest.raises(UsageError, match="the cell uses 'lock'"):
        connected.run_cell_magic("nanogrid", "", "with lock:\n    pass\n")


def test_unpicklable_output_is_named_not_dropped(connected, capsys):
    connected.run_cell_magic(
        "nanogrid", "", "import threading\nkeep = 1\nmutex = threading.Lock()\n"
    )
    assert connected.user_ns["keep"] == 1
    assert "mutex was not brought back into the notebook" in capsys.readouterr().err


def test_an_unpicklable_value_is_shown_by_its_own_repr(connected):
    value = connected.run_cell_magic("nanogrid", "", "import threading\nthreading.Lock()\n")
    assert repr(value).startswith("<unlocked _thread.lock object")


def test_a_refused_line_is_named_and_nothing_is_sent(connected, grid):
    client = nanogrid.get_client()
    before = len(client.jobs(1000))
    with pytest.raises(UsageError, match=r"line 2: %matplotlib"):
        connected.run_cell_magic("nanogrid", "", "x = 1\n%matplotlib inline\n")
    assert len(client.jobs(1000)) == before


def test_a_syntax_error_surfaces_before_sending(connected):
    with pytest.raises(SyntaxError):
        connected.run_cell_magic("nanogrid", "", "x = (\n")


def test_async_cell_result_is_the_cells_value_and_names_arrive(connected):
    job = connected.run_cell_magic(
        "nanogrid", "--async", "import time\ntime.sleep(0.3)\nlate = 'here'\nlate * 2\n"
    )
    assert job.result(timeout=30) == "herehere"
    deadline = time.monotonic() + 5
    while "late" not in connected.user_ns and time.monotonic() < deadline:
        time.sleep(0.05)
    assert connected.user_ns["late"] == "here"


def test_async_widget_shows_the_outcome_and_the_names(connected):
    from nanogrid.widgets import CellWidget

    connected.user_ns["numbers"] = list(range(100))
    job = connected.run_cell_magic(
        "nanogrid", "--async", "print('hi')\ntotal = sum(numbers)\ntotal\n"
    )
    job.wait(30)
    widget = CellWidget(job, echo=True)
    widget.update()
    assert (
        "1 in (" in widget.names.value
        and "numbers (" in widget.names.value
        and "total (" in widget.names.value
    )
    outputs = widget.output.outputs
    assert outputs[0] == {"output_type": "stream", "name": "stdout", "text": "hi\n"}
    assert outputs[1]["data"]["text/plain"] == "4950"
    assert "succeeded" in widget.header.value


def test_bad_options_give_a_usage_error_with_the_usage(connected):
    with pytest.raises(UsageError, match=r"unrecognized arguments: --memroy[\s\S]*--memory"):
        connected.run_cell_magic("nanogrid", "--memroy 5", "1\n")
    with pytest.raises(UsageError, match="invalid int value"):
        connected.run_cell_magic("nanogrid", "--memory lots", "1\n")


def test_help_lists_every_option(ip):
    doc = ip.find_cell_magic("nanogrid").__doc__
    for option in (
        "--memory",
        "--timeout",
        "--runtime",
        "--name",
        "--ai",
        "--model",
        "--async",
        "--packages",
        "--env",
    ):
        assert option in doc


def test_line_magic_status_and_config(connected, capsys):
    connected.run_line_magic("nanogrid", "status")
    connected.run_line_magic("nanogrid", "config")
    out = capsys.readouterr().out
    assert "warm" in out and "stem cells" in out and "runtimes" in out


def test_jobs_show_function_status_duration_memory_and_why_it_failed(
    connected, grid, capsys, monkeypatch
):
    with capsys.disabled(), pytest.raises(FunctionTimeout):
        connected.run_cell_magic(
            "nanogrid", "--timeout 1 --name sleeper", "import time\ntime.sleep(30)\n"
        )
    with capture_output() as captured:
        connected.run_line_magic("nanogrid", "jobs 5")
    table = captured.outputs[0].data["text/html"]
    for column in ("function", "status", "duration", "peak memory", "failure"):
        assert f">{column}</th>" in table
    assert (
        ">sleeper</td><td style='text-align:left'>failed</td>" in table
        and "timeout" in table.lower()
    )
    monkeypatch.setenv("NANOGRID_API_KEY", grid.api_key)
    assert cli.main(["jobs", "--url", grid.url, "--limit", "5"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split()[:5] == [
        "function",
        "status",
        "duration",
        "peak",
        "memory",
    ]
    assert any(
        line.startswith("sleeper") and " failed " in line and "timeout" in line.lower()
        for line in printed.splitlines()
    )


def test_a_long_cell_prints_as_it_runs_and_nothing_twice(connected):
    """What must never happen: a training loop's progress shows only when the cell ends, or twice."""
    client = nanogrid.get_client()

    class Watched(io.StringIO):
        status_when_first_shown = ""

        def write(self, text: str) -> int:
            if (
                "first" in text and not self.status_when_first_shown
            ):  # ask the grid how the cell stands now
                self.status_when_first_shown = client.request(
                    "GET", "/jobs", params={"limit": 1}
                ).json()[0]["status"]
            return super().write(text)

    out = Watched()
    with contextlib.redirect_stdout(out):
        connected.run_cell_magic(
            "nanogrid",
            "--timeout 60",
            "import time\nprint('first')\ntime.sleep(3)\nprint('second')\nresult = 1\n",
        )
    assert out.getvalue() == "first\nsecond\n"
    assert out.status_when_first_shown == "running"
    assert connected.user_ns["result"] == 1


def test_a_failed_cell_is_a_failed_job_everywhere_and_keeps_what_it_bound(
    ip, any_grid, monkeypatch, capsys
):
    """What must never happen: a cell that raised is recorded as a success (history, the dashboard's failed filter,
    error rate, `nanogrid jobs`), or the names it bound before the error are lost, however large they are."""
    grid = any_grid
    ip.run_line_magic("nanogrid", f"connect {grid.url} {grid.api_key}")
    name = "failing-" + uuid.uuid4().hex[:8]
    ip.user_ns.pop("after", None)
    with pytest.raises(ZeroDivisionError, match="division by zero"):
        ip.run_cell_magic(
            "nanogrid",
            f"--name {name} --timeout 60",
            "big = b'x' * (3 << 20)\ndef normalise(values):\n    return [v / sum(values) for v in values]\n"
            "normalise([0])\nafter = 1\n",
        )
    assert (
        len(ip.user_ns["big"]) == 3 << 20 and "after" not in ip.user_ns
    )  # 3 MiB: the state went as a blob

    client = nanogrid.get_client()
    call = client.request("GET", f"{grid.url}/v1/history", params={"limit": 1}).json()["items"][0]
    assert call["status"] == "failed" and call["exit_reason"] == "exception"
    assert (
        call["error"]["type"] == "ZeroDivisionError"
        and call["error"]["message"] == "division by zero"
    )
    assert (
        "in normalise" in call["error"]["traceback"]
        and "cell_state.py" not in call["error"]["traceback"]
    )
    windows = client.request(
        "GET", f"{grid.url}/v1/functions/{call['function_id']}/windows"
    ).json()["windows"]
    assert windows["1h"]["count"] == 1 and windows["1h"]["errors"] == 1
    with httpx.Client(base_url=grid.url, timeout=30) as dashboard:
        assert dashboard.post("/ui/login", data={"api_key": grid.api_key}).status_code == 303
        assert call["job_id"] in dashboard.get("/ui/jobs", params={"status": "failed"}).text
        assert call["job_id"] not in dashboard.get("/ui/jobs", params={"status": "completed"}).text
    monkeypatch.setenv("NANOGRID_API_KEY", grid.api_key)
    capsys.readouterr()
    assert cli.main(["jobs", "--url", grid.url, "--limit", "1"]) == 0
    (row,) = capsys.readouterr().out.splitlines()[1:]
    assert row.startswith(name) and " failed " in row and "ZeroDivisionError" in row


def test_a_cell_that_cannot_load_its_names_is_a_failed_job(connected):
    """A notebook name whose module the sandbox lacks: the cell fails, and so does its job."""
    module = types.ModuleType("nanogrid_missing_module")
    exec("class Thing:\n    pass\n", module.__dict__)
    module.Thing.__module__ = "nanogrid_missing_module"
    sys.modules["nanogrid_missing_module"] = module  # importable here only: pickled by reference
    try:
        connected.user_ns["thing"] = module.Thing()
        job = connected.run_cell_magic("nanogrid", "--async", "seen = thing\n")
        with pytest.raises(Exception, match="could not be loaded in the sandbox"):
            job.result(timeout=30)
        assert job.status == "failed"
    finally:
        del sys.modules["nanogrid_missing_module"]


def test_a_remote_traceback_reads_as_a_local_one(ip, any_grid):
    """What must never happen: a remote traceback names another cell, or loses a function's name and parameters."""
    connected = ip
    connected.run_line_magic("nanogrid", f"connect {any_grid.url} {any_grid.api_key}")
    body = (
        "def normalise(values, *rest, scale=1):\n    total = sum(values)\n"
        "    return values[0] / total\nnormalise([0])\n"
    )
    shown = {}
    for remote in (False, True):
        number = connected.execution_count
        with capture_output() as captured:
            connected.run_cell(("%%nanogrid\n" if remote else "") + body)
        text = re.sub(r"\x1b\[[0-9;]*m", "", captured.stdout)
        assert f"Cell In[{number}], line 3, in normalise(values, scale, *rest)" in text
        shown[remote] = text.replace(f"In[{number}]", "In[N]")
    assert shown[True] == shown[False]


def test_packages_and_env_options_choose_what_the_cell_runs_with(connected):
    """--packages adds to what the cell is found to use; --env replaces it; a bad one is named before sending."""
    import pandas as pd

    from nanogrid.magics import NanoGridMagics

    def environment(line: str, body: str) -> list[str]:
        args = parse_argstring(NanoGridMagics.nanogrid, line)
        function = prepare(connected, body, args)[0]
        return function.package().manifest.get("environment", {}).get("packages", [])

    connected.user_ns["frame"] = pd.DataFrame({"name": ["a", "b"]})
    found = environment("--packages humanize==4.9.0,six", "frame.shape\n")
    assert f"pandas=={pd.__version__}" in found and {"humanize==4.9.0", "six"} <= set(found)
    connected.user_ns["slim"] = nanogrid.Environment(packages=["humanize==4.9.0"])
    assert environment("--env slim --packages six", "frame.shape\n") == ["humanize==4.9.0", "six"]
    with pytest.raises(UsageError, match="--env nothing_here needs a nanogrid.Environment"):
        environment("--env nothing_here", "1\n")
    with pytest.raises(UsageError, match="is not a requirement NanoGrid can install"):
        environment("--packages https://evil.example/x.whl", "1\n")


def test_a_cell_over_a_pandas_frame_runs_in_the_docker_sandbox(ip, docker_grid, capsys):
    """What must never happen: a notebook's DataFrame (pandas 3: its string columns live in pyarrow) or the numpy and
    matplotlib a cell imports are missing in the sandbox, because package sync left out what the cell needs."""
    import pandas as pd

    ip.run_line_magic("nanogrid", f"connect {docker_grid.url} {docker_grid.api_key}")
    ip.user_ns["sales"] = pd.DataFrame(
        {"region": ["north", "south", "north"], "amount": [10, 20, 5]}
    )
    value = ip.run_cell_magic(
        "nanogrid",
        "--timeout 600 --memory 1024",
        "import numpy as np\nimport matplotlib.pyplot as plt\n"
        "totals = sales.groupby('region')['amount'].sum()\n"
        "sales['loud'] = sales['region'].str.upper()\n"
        "plt.plot(totals.values)\nfloat(np.mean(sales['amount']))\n",
    )
    assert value == pytest.approx(35 / 3)
    assert ip.user_ns["totals"].to_dict() == {"north": 15, "south": 20}
    assert ip.user_ns["sales"]["loud"].tolist() == [
        "NORTH",
        "SOUTH",
        "NORTH",
    ]  # the mutation came back
    assert "could not be loaded" not in capsys.readouterr().err


def test_packages_option_installs_what_the_kernel_lacks(ip, any_grid):
    """--packages brings a package this kernel does not have to the cell, in both sandboxes; what must never happen:
    the module the cell imported stops every other name coming back because the notebook cannot import it."""
    with pytest.raises(ImportError):
        import humanize  # noqa: F401  (the kernel lacks it; the cell gets it)
    ip.run_line_magic("nanogrid", f"connect {any_grid.url} {any_grid.api_key}")
    value = ip.run_cell_magic(
        "nanogrid",
        "--packages humanize==4.9.0 --timeout 300",
        "import humanize\nhumanize.intcomma(1234567)\n",
    )
    assert value == "1,234,567"
    with pytest.raises(ModuleNotFoundError, match="installed where the cell ran, not here"):
        ip.user_ns["humanize"].intword(1)  # the name came back; the module is on the grid only
    assert (
        ip.run_cell_magic("nanogrid", "--packages humanize==4.9.0", "humanize.intword(2_000_000)\n")
        == "2.0 million"
    )
