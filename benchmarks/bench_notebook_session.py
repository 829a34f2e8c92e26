"""A data scientist's notebook session on the Docker sandbox: how many environment builds, and what each first call
waits.

    python -m benchmarks.bench_notebook_session [--out benchmarks/results/notebook_session.json]

Ten ordinary steps in one IPython shell with the extension loaded, after a header cell of imports run locally,
as a notebook runs them (package sync sticky, as in a Jupyter kernel): `%%nanogrid` cells over a pandas 3
DataFrame, a plot, `@remote` functions with numpy, scikit-learn and scipy, a `.map()` over DataFrames.
Counts the environments the grid built (its environment cache) and times each step.
Targets (issue): at most 2 environment builds for the session; a new function in a built environment <= 50 ms.
Needs the Docker engine and the runtime image (python nanogrid_runtimes/build.py); the uv cache warm for the
figures to mean what they say.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS = [
    (
        "cell: groupby over a DataFrame",
        "cell",
        "totals = sales.groupby('region')['units'].sum()\norder = totals.sort_values().index.tolist()",
    ),
    ("cell: describe", "cell", "summary = sales.describe()"),
    (
        "cell: a plot",
        "cell",
        "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\n"
        "ax.bar(totals.index, totals.to_numpy())\nplt.close(fig)",
    ),
    (
        "function: numpy",
        "function",
        "def spread(frame):\n    import numpy as np\n    return float(np.std(frame['units'].to_numpy()))\n",
    ),
    (
        "function: scikit-learn",
        "function",
        "def fit(frame):\n    from sklearn.linear_model import LinearRegression\n"
        "    model = LinearRegression().fit(frame[['units']], frame['units'] * 2)\n    return float(model.coef_[0])\n",
    ),
    (
        "function: scipy",
        "function",
        "def test(frame):\n    from scipy import stats\n    return float(stats.skew(frame['units']))\n",
    ),
    (
        "map over DataFrames",
        "map",
        "def top(frame):\n    return frame.groupby('region')['units'].sum().idxmax()\n",
    ),
    (
        "cell: pivot",
        "cell",
        "pivot = sales.pivot_table(index='region', values='units', aggfunc='mean')",
    ),
    (
        "function: another in the same environment",
        "function",
        "def count(frame):\n    return int(frame['units'].count())\n",
    ),
    (
        "cell: scikit-learn in a cell",
        "cell",
        "from sklearn.preprocessing import StandardScaler\nscaled = StandardScaler().fit_transform(sales[['units']])",
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "notebook_session.json"
    )
    args = parser.parse_args()

    import numpy as np
    import pandas as pd
    from IPython.testing.globalipapp import start_ipython

    import nanogrid
    import nanogrid.environment
    from nanogrid_backend.config import GridConfig
    from nanogrid_backend.embedded import EmbeddedGrid

    nanogrid.environment.STICKY = True  # as in a Jupyter kernel
    load_before = [round(x, 2) for x in os.getloadavg()]
    steps = []
    with tempfile.TemporaryDirectory() as data_dir:
        config = GridConfig.load(
            data_dir=Path(data_dir), port=0, sandbox="docker", kill_grace_s=0.5
        )
        with EmbeddedGrid(config) as grid:
            envs = grid.grid.worker.pool.environments  # the grid's environment cache
            ip = start_ipython()
            ip.run_line_magic("load_ext", "nanogrid")
            ip.run_line_magic("nanogrid", f"connect {grid.url} {grid.api_key}")
            nanogrid.connect(grid.url, api_key=grid.api_key)
            ip.user_ns["sales"] = pd.DataFrame(
                {"region": ["north", "south", "east", "west"] * 250, "units": np.arange(1000)}
            )
            ip.user_ns["nanogrid"] = nanogrid
            ip.run_cell(
                "import numpy as np\nimport pandas as pd\nimport matplotlib.pyplot as plt\n"
                "from scipy import stats\nfrom sklearn.linear_model import LinearRegression\n"
            )  # its header

            def built() -> int:
                return len(envs.list()) if envs is not None else -1

            for title, kind, source in STEPS:
                before = built()
                started = time.perf_counter()
                if kind == "cell":
                    result = ip.run_cell_magic("nanogrid", "--memory 1024 --timeout 600", source)
                    del result
                else:
                    ip.run_cell(source)
                    name = source.split("(")[0].removeprefix("def ").strip()
                    fn = nanogrid.remote(memory=1024, timeout=600)(ip.user_ns[name])
                    ip.user_ns[name + "_remote"] = fn
                    if kind == "map":
                        parts = [ip.user_ns["sales"].iloc[i : i + 100] for i in range(0, 1000, 100)]
                        list(fn.map(parts, progress=False))
                    else:
                        fn.remote(ip.user_ns["sales"])
                seconds = time.perf_counter() - started
                steps.append(
                    {
                        "step": title,
                        "seconds": round(seconds, 3),
                        "environments_built": built() - before,
                    }
                )
                print(f"{seconds:7.2f} s  +{built() - before} env  {title}", flush=True)
            total_builds = built()
            # A new function in the session's built environment, once its stem cell is ready (the pool refills it
            # in the background after each new function takes one).
            fresh = []
            for n in range(3):
                time.sleep(10)
                ip.run_cell(f"def fresh_{n}(frame):\n    return int(frame['units'].sum()) + {n}\n")
                fn = nanogrid.remote(memory=1024, timeout=600)(ip.user_ns[f"fresh_{n}"])
                fn.deploy()  # its upload is the client's one-time cost, not the sandbox's
                started = time.perf_counter()
                fn.remote(ip.user_ns["sales"])
                fresh.append(round((time.perf_counter() - started) * 1000, 1))
            print("new function in the built environment, first call (ms):", fresh, flush=True)
    report = {
        "benchmark": "notebook_session",
        "sandbox": "docker",
        "steps": steps,
        "environment_builds": total_builds,
        "target_builds": 2,
        "new_function_first_call_ms": fresh,
        "target_new_function_ms": 50,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": load_before,
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "steps"}, indent=2))


if __name__ == "__main__":
    main()
