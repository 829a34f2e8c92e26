"""`%%nanogrid`'s analysis and state round trip, in-process: no grid, no sandbox (the fast tier).

`plan_cell` decides what a cell needs from the notebook; `run_cell` (which the sandbox runs) and `load_state` (which
the notebook runs) carry what the cell changed. Never: a name the cell reads left out, a name it only writes sent,
a magic that would act on the sandbox instead of the notebook accepted, a failed cell reported as a success, or
the names bound before an error lost.
"""

from __future__ import annotations

import pytest

from nanogrid.cell_state import CellFailed, CellRefused, load_state, pack_state, plan_cell, run_cell


def reads(source: str) -> set[str]:
    return set(plan_cell(source).reads)


@pytest.mark.parametrize(("source", "needed", "not_needed"), [
    ("y = x + 1", {"x"}, {"y"}),
    ("def f():\n    return scale * 2\n", {"scale"}, {"f"}),
    ("class C:\n    size = base\n", {"base"}, {"C"}),
    ("total += 1", {"total"}, set()),  # an augmented assignment reads the old value
    ("del frame", {"frame"}, set()),
    ("import math\nr = math.pi * radius", {"radius"}, {"r"}),
    ("[v for v in values]", {"values"}, {"v"}),
    ("lambda: offset", {"offset"}, set()),
])
def test_the_names_a_cell_reads_are_exactly_those_it_needs(source, needed, not_needed):
    found = reads(source)
    assert needed <= found and not (not_needed & found), found


def test_a_cell_ending_in_an_expression_has_a_value():
    assert plan_cell("x = 1\nx + 1").has_value
    assert not plan_cell("x = 1").has_value
    assert not plan_cell("").has_value


@pytest.mark.parametrize("source", [
    "get_ipython().run_line_magic('cd', '/tmp')",  # %cd would move the sandbox, not the notebook
    "get_ipython().user_ns['x'] = 1",
])
def test_magics_that_would_act_on_the_sandbox_are_refused_before_sending(source):
    with pytest.raises(CellRefused) as refused:
        plan_cell(source)
    assert refused.value.line == 1


def test_the_names_inside_a_shell_line_are_read():
    assert "name" in reads("get_ipython().system('echo {name}')")


def test_a_syntax_error_surfaces_before_sending():
    with pytest.raises(SyntaxError):
        plan_cell("def broken(:\n    pass")


def run_here(source: str, namespace: dict) -> tuple[dict, dict]:
    """run_cell as the sandbox runs it, then load_state as the notebook does; (outcome, names that came back)."""
    plan = plan_cell(source)
    sent = {name: namespace[name] for name in plan.reads if name in namespace}
    packed = pack_state(list(sent.items()), namespace)
    try:
        outcome = run_cell(source, "<cell>", source, packed.data, list(sent), plan.has_value)
    except CellFailed as failed:
        outcome = failed.outcome
    return outcome, load_state(outcome["state"], namespace, sent)


def test_a_cell_sends_back_what_it_bound_and_what_it_mutated_and_its_value():
    namespace = {"numbers": [1, 2, 3], "untouched": {"a": 1}}
    outcome, back = run_here("numbers.append(4)\nmean = sum(numbers) / len(numbers)\nmean * 2", namespace)
    assert outcome["error"] is None
    assert back["name:mean"] == 2.5 and back["name:numbers"] == [1, 2, 3, 4] and back["value"] == 5.0
    assert "name:untouched" not in back
    assert outcome["mutated"] == ["numbers"]


def test_a_cell_that_raises_fails_its_job_and_keeps_the_names_bound_before_the_error():
    namespace = {"x": 10}
    with pytest.raises(CellFailed) as failed:
        run_cell("y = x * 2\nz = y // 0\n", "<cell>", "y = x * 2\nz = y // 0\n",
                 pack_state([("x", 10)], namespace).data, ["x"], False)
    assert failed.value.job_error["type"] == "ZeroDivisionError"
    outcome, back = run_here("y = x * 2\nz = y // 0\n", namespace)
    assert back["name:y"] == 20 and "name:z" not in back
    assert isinstance(back["error"], ZeroDivisionError)


def test_a_function_defined_in_a_cell_uses_the_notebooks_names_when_it_comes_back():
    namespace = {"factor": 3}
    _, back = run_here("def scaled(v):\n    return v * factor\n", namespace)
    scaled = back["name:scaled"]
    assert scaled(2) == 6
    namespace["factor"] = 10  # its globals are the notebook's: it sees the notebook's later values
    assert scaled(2) == 20
