"""`%%nanogrid`'s analysis and state round trip, in-process: no grid, no sandbox (the fast tier).

`plan_cell` decides what a cell needs from the notebook; `run_cell` (which the sandbox runs) and `load_state` (which
the notebook runs) carry what the cell changed. Never: a name the cell reads left out, a name it only writes sent,
a magic that would act on the sandbox instead of the notebook accepted, a failed cell reported as a success, or
the names bound before an error lost.
"""

from __future__ import annotations

import io

import pytest

from nanogrid.cell_state import CellFailed, CellRefused, load_state, pack_state, plan_cell, run_cell


def reads(source: str) -> set[str]:
    return set(plan_cell(source).reads)


@pytest.mark.parametrize(
    ("source", "needed", "not_needed"),
    [
        ("y = x + 1", {"x"}, {"y"}),
        ("def f():\n    return scale * 2\n", {"scale"}, {"f"}),
        ("class C:\n    size = base\n", {"base"}, {"C"}),
        ("total += 1", {"total"}, set()),  # an augmented assignment reads the old value
        ("del frame", {"frame"}, set()),
        ("import math\nr = math.pi * radius", {"radius"}, {"r"}),
        ("[v for v in values]", {"values"}, {"v"}),
        ("lambda: offset", {"offset"}, set()),
    ],
)
def test_the_names_a_cell_reads_are_exactly_those_it_needs(source, needed, not_needed):
    found = reads(source)
    assert needed <= found and not (not_needed & found), found


def test_a_cell_ending_in_an_expression_has_a_value():
    assert plan_cell("x = 1\nx + 1").has_value
    assert not plan_cell("x = 1").has_value
    assert not plan_cell("").has_value


@pytest.mark.parametrize(
    "source",
    [
        "get_ipython().run_line_magic('cd', '/tmp')",  # %cd would move the sandbox, not the notebook
        "get_ipython().user_ns['x'] = 1",
    ],
)
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
    outcome, back = run_here(
        "numbers.append(4)\nmean = sum(numbers) / len(numbers)\nmean * 2", namespace
    )
    assert outcome["error"] is None
    assert (
        back["name:mean"] == 2.5 and back["name:numbers"] == [1, 2, 3, 4] and back["value"] == 5.0
    )
    assert "name:untouched" not in back
    assert outcome["mutated"] == ["numbers"]


def test_a_cell_that_raises_fails_its_job_and_keeps_the_names_bound_before_the_error():
    namespace = {"x": 10}
    with pytest.raises(CellFailed) as failed:
        run_cell(
            "y = x * 2\nz = y // 0\n",
            "<cell>",
            "y = x * 2\nz = y // 0\n",
            pack_state([("x", 10)], namespace).data,
            ["x"],
            False,
        )
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


# -- the analysis against the truth: the cell run here, with and without each of the notebook's names -------------


def run_locally(source: str, notebook: dict) -> dict:
    """What the cell leaves in a notebook holding ``notebook``, run here with exec (plain Python cells only)."""
    namespace = dict(notebook)
    exec(compile(source, "<cell>", "exec"), namespace)
    namespace.pop("__builtins__")
    return namespace


def comparable(namespace: dict) -> dict:
    """Plain values as they are; others (functions, files, objects) by their type: each run makes new ones."""
    plain = (int, float, str, bytes, bool, list, dict, tuple, set, type(None))
    return {k: v if isinstance(v, plain) else type(v) for k, v in namespace.items()}


def truly_needed(source: str, notebook: dict) -> set[str]:
    """The notebook names the cell cannot do without: without one it raises, or leaves something else behind."""
    with_all = comparable(run_locally(source, notebook))
    needed = set()
    for name in notebook:
        try:
            without = comparable(
                run_locally(source, {k: v for k, v in notebook.items() if k != name})
            )
        except NameError:  # UnboundLocalError too
            needed.add(name)
            continue
        if without != {
            k: v for k, v in with_all.items() if k != name or name in without
        }:  # a name the cell binds
            needed.add(name)
    return needed


class Unpicklable:
    """A notebook value that cannot travel (a lock, a connection): sending it would refuse the cell."""

    def __reduce__(self):
        raise TypeError("cannot pickle an Unpicklable")


CELLS = [  # (cell, the notebook's names it needs, names the notebook also has that the cell must not send)
    ("y = x + 1", {"x": 2}, {"y": 0}),
    ("total += step", {"total": 10, "step": 5}, {}),
    ("del frame", {"frame": [1]}, {"other": 1}),
    ("del (a, b)", {"a": 1, "b": 2}, {"c": 3}),
    ("import math\nr = round(math.pi * radius ** 2, 3)", {"radius": 2.0}, {"r": 0.0}),
    (
        "doubled = [v * k for v in values]",
        {"values": [1, 2], "k": 3},
        {"v": Unpicklable(), "doubled": None},
    ),
    ("squares = {v: v * v for v in values}", {"values": [1, 2]}, {"v": Unpicklable()}),
    ("firsts = [last := v for v in values]", {"values": [4, 5]}, {"firsts": Unpicklable()}),
    ("x = 1\ny = x * 2", {}, {"y": Unpicklable()}),
    ("if flag:\n    x = 1\nelse:\n    x = 2\ny = x", {"flag": True}, {"y": Unpicklable()}),
    (
        "pairs = [(i, j) for i in range(rows) for j in range(i)]",
        {"rows": 3},
        {"i": Unpicklable(), "j": 0},
    ),
    ("def bump():\n    global counter\n    counter += 1\nbump()", {"counter": 1}, {}),
    ("def reset():\n    global cache\n    del cache\nreset()", {"cache": {"k": 1}}, {}),
    ("def set_flag():\n    global flag\n    flag = True\nset_flag()", {}, {"flag": Unpicklable()}),
    (
        "def count(items):\n    n = 0\n    for _ in items:\n        n += 1\n    return n\nsize = count(rows)",
        {"rows": [1, 2, 3]},
        {"n": Unpicklable()},
    ),
    (
        "def dropped(d):\n    tmp = dict(d)\n    del tmp\n    return len(d)\nkept = dropped(source)",
        {"source": {"a": 1}},
        {"tmp": Unpicklable()},
    ),
    (
        "def outer():\n    total = 0\n    def inner():\n        nonlocal total\n        total += step\n"
        "    inner()\n    return total\nresult = outer()",
        {"step": 4},
        {"total": Unpicklable()},
    ),
    (
        "class Config:\n    size = base\n    seen = [size for _ in range(2)]\nseen = Config.seen",
        {"base": 1, "size": 7},
        {},
    ),  # a comprehension in a class body sees the module's size, not the class's
    ("class Counter:\n    hits += 1\nhits_seen = Counter.hits", {"hits": 1}, {}),
    ("class Local:\n    hits = 0\n    hits *= 2\nseen = Local.hits", {}, {"seen": Unpicklable()}),
    (
        "try:\n    1 / zero\nexcept ZeroDivisionError as error:\n    caught = str(error)",
        {"zero": 0},
        {"caught": Unpicklable()},
    ),
    ("with open(path) as f:\n    data = f.read(9)", {"path": __file__}, {"data": None}),
    (
        "try:\n    x = int(text)\nexcept ValueError:\n    x = 0\ny = x",
        {"text": "1"},
        {"y": Unpicklable()},
    ),
    (
        "with context as handle:\n    got = handle",
        {"context": __import__("contextlib").nullcontext(3)},
        {"got": Unpicklable()},
    ),
    ("for item in items:\n    acc = acc + [item]", {"items": [1, 2], "acc": []}, {}),
    (
        "def scaled(v, by=factor):\n    return v * by\nout = scaled(2)",
        {"factor": 3},
        {"by": Unpicklable()},
    ),
    (
        "match point:\n    case (px, py):\n        norm = px + py",
        {"point": (1, 2)},
        {"norm": Unpicklable()},
    ),
    ("label = f'{name!r}: {count:>3}'", {"name": "a", "count": 2}, {"label": None}),
    ("width: int = height * 2", {"height": 2}, {"width": Unpicklable()}),
    (
        "fn = lambda x, *, scale=unit: x * scale + offset\nout = fn(1)",
        {"unit": 2, "offset": 1},
        {"x": Unpicklable(), "scale": Unpicklable()},
    ),
]


@pytest.mark.parametrize(("source", "needed", "not_needed"), CELLS)
def test_the_analysis_reads_what_the_cell_truly_needs_and_nothing_it_only_writes(
    source, needed, not_needed
):
    notebook = {**needed, **not_needed}
    assert truly_needed(source, notebook) == set(
        needed
    )  # the labels are the truth, found by running the cell here
    found = reads(source)
    assert set(needed) <= found, f"a name the cell needs is not sent: {set(needed) - found}"
    assert not set(not_needed) & found, (
        f"sent, though the cell does not need it: {set(not_needed) & found}"
    )


@pytest.mark.parametrize(
    ("source", "needed", "not_needed"), [c for c in CELLS if "class " not in c[0]]
)
def test_a_cell_run_as_the_sandbox_runs_it_leaves_what_it_leaves_run_here(
    source, needed, not_needed
):
    """run_cell and load_state against exec: the same names bound, rebound and deleted, with the same values."""
    notebook = {**needed, **{k: v for k, v in not_needed.items() if not isinstance(v, Unpicklable)}}
    local = run_locally(source, notebook)
    outcome, back = run_here(source, dict(notebook))
    assert outcome["error"] is None and back["error"] is None
    came_back = {
        name.removeprefix("name:"): value
        for name, value in back.items()
        if name.startswith("name:")
    }
    changed = {
        k: v
        for k, v in local.items()
        if (k not in notebook or v is not notebook[k] or k in outcome["mutated"])
        and not (isinstance(v, io.IOBase) and v.closed)
    }  # a closed file stays behind, as run_cell says
    assert came_back.keys() == changed.keys()
    assert {k: v for k, v in came_back.items() if not callable(v)} == {
        k: v for k, v in changed.items() if not callable(v)
    }
    assert set(outcome["deleted"]) == notebook.keys() - local.keys()


@pytest.mark.parametrize(
    ("source", "notebook", "name"),
    [
        ("firsts = [last := v for v in values]\nkept = last", {"values": [], "last": 9}, "last"),
        ("for item in items:\n    pass\nfinal = item", {"items": [], "item": 1}, "item"),
        ("if flag:\n    x = 1\ny = x", {"flag": False, "x": 2}, "x"),
        ("while more:\n    x = 1\ny = x", {"more": False, "x": 2}, "x"),
        (
            "try:\n    value = int(text)\nexcept ValueError:\n    pass\nshown = value",
            {"text": "?", "value": 3},
            "value",
        ),
        (
            "from contextlib import suppress\nwith suppress(KeyError):\n    got = table['k']\nshown = got",
            {"table": {}, "got": 4},
            "got",
        ),
        (
            "match point:\n    case (px, py):\n        norm = px\nfinal = norm",
            {"point": 0, "norm": 5},
            "norm",
        ),
        ("x: int\ny = x", {"x": 6}, "x"),
        (
            "try:\n    x = int(text)\nfinally:\n    shown = x",
            {},
            "x",
        ),  # the finally runs after int() raised too
        (
            "def show():\n    return shown\nshown = 1\nout = show()",
            {},
            "shown",
        ),  # a function reads when called
    ],
)
def test_a_name_bound_on_only_some_paths_is_read_from_the_notebook(source, notebook, name):
    """Where the cell may skip its own binding, the notebook's value is what a local run would use: it is sent."""
    if name in notebook:
        assert name in truly_needed(source, notebook)
    assert name in reads(source)
