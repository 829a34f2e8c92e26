"""Writes the tutorial notebooks from their cell lists and executes them to store checked outputs.

    python notebooks/build.py                                    # all: starts the grids, like the nbval run does
    python notebooks/build.py packages-and-environments.ipynb    # one (this one needs Docker)

Cells whose output nbval checks carry the ``nbval-check-output`` tag (a ``CHECK +`` prefix in the
lists below); the rest only have to run.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).parent
CHECK = "\x00check\x00"  # stripped from the source; becomes the cell's nbval-check-output tag
RAISES = "\x00raises\x00"  # stripped from the source; becomes the cell's raises-exception tag (a cell that fails)

QUICKSTART = [
    (
        "md",
        "# NanoGrid quickstart\n\nRun Python functions and whole notebook cells on a grid. "
        "`nanogrid.connect()` finds the grid from `NANOGRID_URL`, or the one `nanogrid up` started.",
    ),
    ("code", "import nanogrid\n\nclient = nanogrid.connect()"),
    (
        "md",
        "## A function on the grid\n\n`@nanogrid.remote` sends the function (with what it uses) to the grid. "
        "`.remote()` waits for the value; a remote exception is raised here as itself.",
    ),
    (
        "code",
        "@nanogrid.remote(memory=256, timeout=30)\ndef square(x):\n    print('working on', x)\n    return x * x",
    ),
    ("code", CHECK + "square.remote(7)"),
    (
        "md",
        "`.spawn()` returns a `Job` at once. Displayed in a notebook it is a live widget: status, duration, "
        "peak memory against the limit, cold or warm, stdout and stderr.",
    ),
    ("code", "job = square.spawn(8)\njob"),
    ("code", CHECK + "job.result(), job.stdout"),
    (
        "md",
        "## Map\n\n`.map()` fans calls out over the warm pool and yields results in order, "
        "with one progress bar that counts calls.",
    ),
    ("code", "results = list(square.map(range(100)))"),
    ("code", CHECK + "results[:5], len(results)"),
    (
        "md",
        "## A whole cell on the grid\n\n`%%nanogrid` runs the cell remotely: the names it reads come from "
        "this notebook, the names it assigns come back, and its last expression is the cell's value.",
    ),
    ("code", "numbers = list(range(10))"),
    (
        "code",
        "%%nanogrid --memory 256 --timeout 60\nimport statistics\nmean = statistics.mean(numbers)\n"
        "print('mean computed remotely')\nmean * 2",
    ),
    ("md", "The cell's widget shows where it ran; `mean` is now a name in this notebook:"),
    ("code", CHECK + "mean"),
    (
        "md",
        "The notebook ends as a local run would leave it: objects the cell changes come back changed, "
        "functions it defines use this notebook's names, and `%time`, `!cmd` work inside it.",
    ),
    (
        "code",
        "%%nanogrid\nnumbers.append(10)\ndef scaled(k):\n    return [n * k for n in numbers]\n"
        "%time total = sum(numbers)\nfiles = !echo remote",
    ),
    ("code", CHECK + "numbers[-1], scaled(2)[-1], total, files"),
]

ERRORS = [
    (
        "md",
        "# Errors and limits\n\nEvery failure comes back as a clear Python exception, "
        "and the grid carries on serving the next call.",
    ),
    ("code", "import nanogrid\n\nnanogrid.connect();"),
    (
        "md",
        "## A remote exception keeps its type\n\nThe remote traceback is attached as the exception's cause.",
    ),
    ("code", "@nanogrid.remote\ndef divide(a, b):\n    return a / b"),
    (
        "code",
        CHECK
        + "try:\n    divide.remote(1, 0)\nexcept ZeroDivisionError as exc:\n    print('caught:', exc)\n"
        "    print('remote traceback mentions divide:', 'divide' in str(exc.__cause__))",
    ),
    (
        "md",
        "## A timeout\n\nPast its timeout a call is stopped (SIGTERM, then SIGKILL) and its sandbox replaced.",
    ),
    ("code", "@nanogrid.remote(timeout=1)\ndef forever():\n    while True:\n        pass"),
    (
        "code",
        CHECK
        + "try:\n    forever.remote()\nexcept nanogrid.FunctionTimeout as exc:\n    print(exc)",
    ),
    (
        "md",
        "## Out of memory\n\nA call that allocates past its memory limit fails with `OutOfMemory`.",
    ),
    (
        "code",
        "@nanogrid.remote(memory=64)\ndef hog():\n    return len([bytearray(16 << 20) for _ in range(16)])",
    ),
    (
        "code",
        CHECK
        + "try:\n    hog.remote()\nexcept nanogrid.OutOfMemory as exc:\n    print('OutOfMemory:', "
        "'out of memory' in str(exc))",
    ),
    ("md", "## And the grid carries on"),
    ("code", CHECK + "divide.remote(10, 4)"),
]

FILES_AND_JOBS = [
    (
        "md",
        "# Output files, map and async jobs\n\nA function returns files by writing them to "
        "`nanogrid.output_dir()`; they are kept by the grid, listed on the job, shown as thumbnails "
        "in its widget and downloadable.",
    ),
    ("code", "import io\n\nimport nanogrid\nfrom PIL import Image\n\nnanogrid.connect();"),
    (
        "code",
        "@nanogrid.remote(memory=256, timeout=60)\ndef thumbnail(png: bytes, width: int) -> str:\n"
        "    from PIL import Image\n    image = Image.open(io.BytesIO(png))\n"
        "    image.thumbnail((width, width))\n    path = nanogrid.output_dir() / f'thumb-{width}.png'\n"
        "    image.save(path)\n    return f'{image.size[0]}x{image.size[1]}'",
    ),
    (
        "code",
        "buffer = io.BytesIO()\nImage.new('RGB', (640, 480), (30, 120, 200)).save(buffer, 'PNG')\n"
        "picture = buffer.getvalue()",
    ),
    (
        "code",
        CHECK + "job = thumbnail.spawn(picture, 160)\n"
        "job.result(timeout=60), [(f.name, f.size > 0) for f in job.outputs]",
    ),
    ("code", CHECK + "Image.open(io.BytesIO(job.outputs[0].read())).size"),
    ("md", "Displayed, the job is a widget with the thumbnail inline:"),
    ("code", "job"),
    ("md", "## Map with progress\n\nOne progress bar for the whole map, counting calls."),
    ("code", "sizes = list(thumbnail.map([picture] * 8, [16, 32, 48, 64, 80, 96, 112, 128]))"),
    ("code", CHECK + "sizes"),
    (
        "md",
        "## Async jobs and status\n\n`.spawn()` returns at once; `job.status` asks the grid, "
        "`job.result()` waits, `job.cancel()` stops it.",
    ),
    (
        "code",
        "@nanogrid.remote(timeout=60)\ndef slow(seconds):\n    import time\n    time.sleep(seconds)\n"
        "    return seconds",
    ),
    (
        "code",
        CHECK + "quick, stuck = slow.spawn(0.2), slow.spawn(30)\n"
        "quick.result(timeout=30), stuck.cancel().wait(10).status",
    ),
    ("code", "%nanogrid status"),
]

SUMMARIZER = [
    (
        "md",
        "# A summarizer on the AI node\n\nThe seed platform's demo: a function that asks the grid's private "
        "AI node (an Ollama server) to summarise text. Inside a function, `nanogrid.ai` talks to it; the tokens "
        "each call uses are counted on its job.",
    ),
    ("code", "import nanogrid\n\nclient = nanogrid.connect()\nclient.models()['default']"),
    (
        "code",
        "@nanogrid.remote(ai=True, timeout=120)\ndef summarise(text: str) -> str:\n    import nanogrid.ai\n"
        "    reply = nanogrid.ai.generate(f'Summarise in one sentence: {text}')\n    return reply.response",
    ),
    (
        "code",
        "article = ('NanoGrid runs notebook cells and Python functions on a self-hosted grid of warm sandboxes, '\n"
        "           'with results, logs, files and memory use coming back to the notebook.')",
    ),
    (
        "code",
        CHECK + "job = summarise.spawn(article)\nsummary = job.result()\n"
        "len(summary) > 0, job.ai_usage['calls']",
    ),
    ("md", "The job widget shows the tokens next to duration and memory:"),
    ("code", "job"),
    ("md", "A call may pick another of the node's models:"),
    ("code", "client.models()['models']"),
    (
        "code",
        CHECK
        + "summaries = list(summarise.map([article, 'A second, shorter text.']))\nlen(summaries)",
    ),
]

PACKAGES = [
    (
        "md",
        "# Packages and environments\n\nA function gets the packages it uses at **your installed versions**, "
        "with no argument: NanoGrid pins what the function refers to, what it imports and the types of its "
        "arguments, and the grid builds that environment once (wheels only, with `uv`). This notebook runs in "
        "the Docker sandbox, the one for code you do not trust: no network, read-only, not root.",
    ),
    (
        "code",
        CHECK
        + "import pandas as pd\nfrom sklearn.linear_model import LinearRegression\n\nimport nanogrid\n\n"
        "client = nanogrid.connect()\nclient.health()['sandbox'].split(' (')[0]",
    ),
    (
        "md",
        "## pandas and scikit-learn on the grid\n\nThe DataFrame argument brings pandas, `LinearRegression` "
        "brings scikit-learn, and with them numpy and SciPy, each at the version installed here.",
    ),
    (
        "code",
        "@nanogrid.remote(memory=1024, timeout=300)\ndef fit(df):\n"
        "    model = LinearRegression().fit(df[['x']], df['y'])\n"
        "    return round(float(model.coef_[0]), 3), pd.__version__",
    ),
    (
        "code",
        "df = pd.DataFrame({'x': range(10), 'y': [2 * x + 1 for x in range(10)]})\n"
        "job = fit.spawn(df)\njob",
    ),
    (
        "md",
        "The first call waits while the grid builds the environment (the widget says so); the grid keeps "
        "it, so a later call, or a notebook run tomorrow, does not build again.",
    ),
    ("code", CHECK + "slope, remote_pandas = job.result()\nslope, remote_pandas == pd.__version__"),
    (
        "md",
        "## A new function in the same environment\n\nThe environment's sandboxes import its packages while "
        "they wait, so a new function that uses them starts at once.",
    ),
    (
        "code",
        "@nanogrid.remote(memory=1024, timeout=300)\ndef score(df):\n"
        "    model = LinearRegression().fit(df[['x']], df['y'])\n"
        "    return round(float(model.score(df[['x']], df['y'])), 3), isinstance(df, pd.DataFrame)",
    ),
    ("code", CHECK + "score.remote(df)"),
    (
        "md",
        "## Explicit packages\n\n`packages=[...]` adds what this notebook does not have; "
        "`nanogrid.Environment(...)` names an environment exactly (pins, Debian packages, Python version, "
        "variables). A package the index does not have fails the call at once with `EnvironmentBuildFailed`, "
        "carrying the installer's words:",
    ),
    (
        "code",
        CHECK
        + "@nanogrid.remote(packages=['pandaz-no-such-package'])\ndef typo():\n    return 1\n\n"
        "try:\n    typo.remote()\nexcept nanogrid.EnvironmentBuildFailed as exc:\n"
        "    print('EnvironmentBuildFailed:', 'pandaz-no-such-package' in str(exc))",
    ),
]

DATA_SCIENCE = [
    (
        "md",
        "# A data scientist's notebook on the grid\n\npandas, matplotlib and scikit-learn as they are installed "
        "here (pandas 3 keeps strings as pyarrow-backed `str` columns), in the Docker sandbox, with nothing "
        "declared by hand: each cell and function gets the packages its names and values need, at this "
        "notebook's versions.",
    ),
    (
        "code",
        "import numpy as np\nimport pandas as pd\n\nimport nanogrid\n\nclient = nanogrid.connect()\n"
        "sales = pd.DataFrame({'region': ['north', 'south', 'east', 'west'] * 25, 'units': np.arange(100)})",
    ),
    (
        "md",
        "## A cell over a DataFrame\n\nThe cell reads `sales` from this notebook; `totals` comes back.",
    ),
    (
        "code",
        "%%nanogrid --memory 1024 --timeout 300\ntotals = sales.groupby('region')['units'].sum()\n"
        "order = totals.sort_values().index.tolist()",
    ),
    ("md", "The same as a local run would give:"),
    (
        "code",
        CHECK
        + "order, totals.equals(sales.groupby('region')['units'].sum()), str(sales['region'].dtype)",
    ),
    ("md", "## A plot\n\nFigures a cell draws come back as images under the cell."),
    (
        "code",
        "%%nanogrid --memory 1024 --timeout 300\nimport matplotlib.pyplot as plt\n\n"
        "fig, ax = plt.subplots()\nax.bar(totals.index, totals.to_numpy())\nax.set_title('units by region')\n"
        "plt.show()",
    ),
    (
        "md",
        "## `.map()` over DataFrames\n\nEach part goes to its own call; the results match a local run.",
    ),
    (
        "code",
        "@nanogrid.remote(memory=1024, timeout=300)\ndef top_region(frame):\n"
        "    return frame.groupby('region')['units'].sum().idxmax()\n\n"
        "parts = [sales.iloc[start:start + 20] for start in range(0, 100, 20)]",
    ),
    (
        "code",
        CHECK + "remote = list(top_region.map(parts, progress=False))\n"
        "remote, remote == [top_region.local(part) for part in parts]",
    ),
    (
        "md",
        "## A cell that fails\n\nIts exception is raised here as itself, and the grid records the job as "
        "failed: in `nanogrid jobs`, the history, the dashboard's error rate and failed filter.",
    ),
    ("code", RAISES + "%%nanogrid --name failing-cell\nper_region = int(totals['north']) // 0"),
    (
        "code",
        CHECK + "[(job['function_name'], job['status']) for job in client.jobs(limit=50)\n"
        " if job['function_name'] == 'failing-cell']",
    ),
]

VOLUMES_AND_SCHEDULES = [
    (
        "md",
        "# Volumes and schedules\n\nA volume is a filesystem of yours on the grid that outlives calls: load a "
        "dataset once, read it from every call. A schedule runs a function on its own, as an ordinary job in "
        "history.",
    ),
    (
        "code",
        "import csv\nimport tempfile\nimport time\nfrom pathlib import Path\n\nimport nanogrid\n\n"
        "client = nanogrid.connect()",
    ),
    (
        "md",
        "## A dataset loaded once\n\n`put` copies a file from here onto the volume (made on first use).",
    ),
    (
        "code",
        "local = Path(tempfile.mkdtemp()) / 'cities.csv'\nwith open(local, 'w', newline='') as f:\n"
        "    csv.writer(f).writerows([('city', 'temp')] + [(f'city-{n}', n % 30) for n in range(1000)])\n\n"
        "data = nanogrid.Volume('tutorial-data', size_mib=64)\ndata.put(local, 'raw/cities.csv')",
    ),
    ("code", CHECK + "[(entry['name'], entry['kind']) for entry in data.listdir('raw')]"),
    (
        "md",
        "## Every call reads it\n\n`volumes={'/data': data}` mounts it in the sandbox; each call of a "
        "`.map()` reads the same file, nothing is sent with the calls.",
    ),
    (
        "code",
        "@nanogrid.remote(volumes={'/data': data})\ndef warmer_than(threshold):\n"
        "    import csv\n    with open('/data/raw/cities.csv') as f:\n"
        "        return sum(1 for row in csv.DictReader(f) if int(row['temp']) > threshold)",
    ),
    ("code", CHECK + "list(warmer_than.map([0, 10, 20, 28], progress=False))"),
    (
        "md",
        "## A function that runs on its own\n\n`schedule=` takes a cron string (with a time zone through "
        "`nanogrid.Cron`) or a `nanogrid.Period`; `deploy()` registers it. Each run appends a line to the "
        "volume.",
    ),
    (
        "code",
        "@nanogrid.remote(schedule=nanogrid.Period(seconds=2), volumes={'/data': data})\ndef tick():\n"
        "    import time\n    with open('/data/ticks.txt', 'a') as f:\n        f.write(f'{time.time()}\\n')\n\n"
        "tick.deploy()\ntime.sleep(7)\nschedule = tick.schedule_info().pause()",
    ),
    (
        "code",
        CHECK + "ticks = data.read('ticks.txt').decode().split()\n"
        "len(ticks) >= 2, schedule.paused, [f['outcome'] for f in schedule.refresh().firings][:1]",
    ),
    (
        "md",
        "Removing the schedule keeps its runs in history; deleting the volume removes its files.",
    ),
    ("code", "schedule.remove()\ndata.delete();"),
]

NOTEBOOKS = {
    "quickstart.ipynb": QUICKSTART,
    "ai-summarizer.ipynb": SUMMARIZER,
    "errors-and-limits.ipynb": ERRORS,
    "files-map-async.ipynb": FILES_AND_JOBS,
    "packages-and-environments.ipynb": PACKAGES,
    "data-science.ipynb": DATA_SCIENCE,
    "volumes-and-schedules.ipynb": VOLUMES_AND_SCHEDULES,
}
DOCKER_NOTEBOOKS = {
    "packages-and-environments.ipynb",
    "data-science.ipynb",
}  # run against Docker sandboxes


def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = []
    for kind, src in cells:
        if kind == "md":
            nb.cells.append(nbformat.v4.new_markdown_cell(src))
        else:
            tags = ["nbval-check-output"] if src.startswith(CHECK) else []
            tags += ["raises-exception"] if src.startswith(RAISES) else []
            nb.cells.append(
                nbformat.v4.new_code_cell(
                    src.removeprefix(CHECK).removeprefix(RAISES), metadata={"tags": tags}
                )
            )
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    ).execute()
    for cell in nb.cells:  # keep only what nbval checks; widgets and timings would only add noise
        if cell.cell_type == "code" and "nbval-check-output" not in cell.metadata.get("tags", []):
            cell.outputs = []
            cell.execution_count = None
    return nb


def main() -> None:
    sys.path.insert(0, str(HERE.parent))
    from nanogrid_backend.config import GridConfig
    from nanogrid_backend.embedded import EmbeddedGrid
    from tests.fake_ollama import FakeOllama

    wanted = set(sys.argv[1:])  # notebook names; none: all of them
    for sandbox in ("process", "docker"):
        with tempfile.TemporaryDirectory() as data_dir, FakeOllama() as ollama:
            config = GridConfig.load(
                data_dir=Path(data_dir),
                port=0,
                sandbox=sandbox,
                ai_endpoint=ollama.url,
                ai_model="summarizer",
            )
            with EmbeddedGrid(config) as grid:
                os.environ["NANOGRID_URL"] = grid.url
                os.environ["NANOGRID_API_KEY"] = grid.api_key
                for name, cells in NOTEBOOKS.items():
                    if (name in DOCKER_NOTEBOOKS) == (sandbox == "docker") and (
                        name in wanted or not wanted
                    ):
                        nbformat.write(build(name, cells), HERE / name)
                        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
