"""The data-science stack a notebook user has, on the Docker sandbox, with nothing declared by hand.

The client venv has the locked current releases (pandas 3 with pyarrow, numpy, matplotlib, scikit-learn, scipy,
polars: requirements-test.txt). Each value below pickles to a stream that names more than its own type's package
(pandas 3 keeps string columns, even the column index, as pyarrow-backed ``str``; a polars frame needs polars'
runtime; a fitted estimator names scikit-learn, numpy and scipy). Never: a ``ModuleNotFoundError`` on the grid for
a module the client has installed, or a value that comes back different from what was sent.
"""

from __future__ import annotations

import pytest

import nanogrid
from tests.conftest import require_docker

pd = pytest.importorskip("pandas")
np = pytest.importorskip("numpy")


def stack_values() -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import polars as pl
    import pyarrow as pa
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression

    frame = pd.DataFrame({"city": ["Oslo", "Lima", "Pune"], "temp": [3.5, 19.0, 27.25]})
    assert str(frame["city"].dtype) == "str", "pandas 3 keeps strings as pyarrow-backed str"
    arrow = pd.DataFrame({"n": pd.array([1, 2, None], dtype=pd.ArrowDtype(pa.int64()))})
    figure, axes = plt.subplots()
    axes.plot([1, 2, 3], [3, 1, 2])
    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    model = LogisticRegression().fit(x, [0, 0, 1, 1])
    return {
        "frame": frame,
        "arrow": arrow,
        "polars": pl.DataFrame({"a": [1, 2], "b": ["x", "y"]}),
        "sparse": sparse.csr_matrix(np.eye(3)),
        "figure": figure,
        "model": model,
        "x": x,
    }


@pytest.fixture(scope="module")
def docker_client(docker_grid) -> nanogrid.Client:
    require_docker()
    return nanogrid.connect(docker_grid.url, api_key=docker_grid.api_key)


@pytest.mark.integration
def test_every_stack_value_round_trips_with_nothing_declared(docker_client):
    values = stack_values()

    @nanogrid.remote(timeout=120, memory=1024)
    def inspect(values):
        summary = {
            "frame": float(values["frame"]["temp"].sum()),
            "arrow": int(values["arrow"]["n"].sum()),
            "polars": values["polars"].height,
            "sparse": int(values["sparse"].sum()),
            "figure": len(values["figure"].axes),
            "model": [int(p) for p in values["model"].predict(values["x"])],
        }
        return summary, values

    summary, back = inspect.remote(values)
    assert summary == {
        "frame": 49.75,
        "arrow": 3,
        "polars": 2,
        "sparse": 3,
        "figure": 1,
        "model": [0, 0, 1, 1],
    }
    pd.testing.assert_frame_equal(back["frame"], values["frame"])
    pd.testing.assert_frame_equal(back["arrow"], values["arrow"])
    assert back["polars"].equals(values["polars"])
    assert (back["sparse"] != values["sparse"]).nnz == 0
    assert list(back["model"].predict(values["x"])) == [0, 0, 1, 1]


@pytest.mark.integration
def test_a_map_over_dataframes_matches_the_same_map_run_locally(docker_client):
    frames = [pd.DataFrame({"name": [f"n{i}", f"m{i}"], "value": [i, i * 2]}) for i in range(20)]

    @nanogrid.remote(timeout=120, memory=1024)
    def describe(frame):
        return frame.assign(upper=frame["name"].str.upper()).groupby("upper")["value"].sum()

    remote = list(describe.map(frames, progress=False))
    for got, frame in zip(remote, frames, strict=True):
        pd.testing.assert_series_equal(got, describe.local(frame))
