"""The quickstart tutorial in JupyterLab, and the dashboard's page widths, in a real browser (Debian's chromium,
driven by Playwright).

Runs every cell and checks what a user sees: the job widget says "succeeded" with a duration and
a peak memory. Saves a screenshot; with NANOGRID_UPDATE_SCREENSHOT=1 it also replaces the one in
docs/ that the README shows.

The notebook is opened without its stored outputs, so everything checked comes from this run. Cells are run
only once the kernel is connected: JupyterLab's execution indicator says "idle" as soon as a notebook opens,
before its kernel has started, and "Run All Cells" without a kernel opens a "Select Kernel" dialog instead of
running anything (what happened on a loaded machine, where the kernel takes seconds to start).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from nanogrid_backend.keys import create_key
from tests.conftest import require

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
TOKEN = "nanogrid-browser-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def jupyter_lab(grid, tmp_path):
    import nbformat  # its JSON schema checks take seconds to import: paid by this test, not by every collection

    notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    for cell in notebook.cells:  # nothing shown may come from the stored run
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    notebook.metadata.pop("widgets", None)
    nbformat.write(notebook, tmp_path / "quickstart.ipynb")
    port = free_port()
    env = {
        **os.environ,
        "NANOGRID_URL": grid.url,
        "NANOGRID_API_KEY": grid.api_key,
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
    }
    lab = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--allow-root",
            f"--port={port}",
            "--ip=127.0.0.1",
            f"--IdentityProvider.token={TOKEN}",
            f"--ServerApp.root_dir={tmp_path}",
            "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "lab.log", "w"),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/status", params={"token": TOKEN}).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    else:
        lab.kill()
        pytest.fail("JupyterLab did not start: " + (tmp_path / "lab.log").read_text()[-2000:])
    yield url
    lab.terminate()
    lab.wait(15)


def test_quickstart_renders_a_succeeded_job_widget(jupyter_lab, tmp_path):
    require(Path(CHROMIUM).exists(), "chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(f"{jupyter_lab}/lab/tree/quickstart.ipynb?token={TOKEN}")
        page.wait_for_selector(".jp-Notebook", timeout=60_000)
        # the status bar reads the session's own kernel status: "Idle" only once a kernel is connected and idle
        kernel_idle = page.get_by_role(
            "button", name=re.compile(r"^Python 3 \(ipykernel\) \| Idle$")
        )
        expect(kernel_idle).to_be_visible(timeout=120_000)
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_text("Run All Cells", exact=True).click()

        widget = page.locator(".widget-html-content", has_text="succeeded").first
        expect(widget).to_be_visible(timeout=120_000)
        # the widget keeps re-rendering while it follows the job: assert with retries, not on one snapshot
        expect(widget).to_contain_text(re.compile(r"duration [\d.]+ ms"))
        expect(widget).to_contain_text(re.compile(r"peak memory [\d.]+ MiB"))
        expect(page.locator(".jupyter-widgets", has_text="of 256 MiB").first).to_be_visible()
        # %%nanogrid's `mean` came back: the `mean` cell's value itself (a widget's "14.5 MiB" would not do)
        cell_value = page.locator(
            ".jp-OutputArea-executeResult .jp-OutputArea-output",
            has_text=re.compile(r"^\s*4\.5\s*$"),
        )
        expect(cell_value.first).to_be_visible(timeout=60_000)

        no_news = page.get_by_role("button", name="No", exact=True)
        if no_news.count():
            no_news.first.click()  # JupyterLab's "get notified about news?" toast
            expect(page.get_by_text("get notified about official Jupyter news")).to_be_hidden(
                timeout=10_000
            )
        widget.scroll_into_view_if_needed()
        shot = tmp_path / "quickstart.png"
        page.screenshot(path=str(shot))
        browser.close()
    if os.environ.get("NANOGRID_UPDATE_SCREENSHOT"):
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, ROOT / "docs" / "quickstart-widget.png")


def test_every_dashboard_page_fits_a_1366_pixel_wide_window(grid, tmp_path):
    """No page of /ui is wider than a 1,366 px laptop screen (the workers page was 2,033 px): long function names,
    descriptions, job ids, worker ids and error messages wrap instead of widening the page."""
    require(Path(CHROMIUM).exists(), "chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    key, _ = create_key(grid.grid.registry, f"wide-{os.getpid()}-{time.time_ns() % 10**6}")
    name = "a-rather-long-function-name-" + "x" * 36
    code = "def handler(event, context):\n    raise RuntimeError('E' * 300 + ' ' + 'word ' * 60)\n"
    with httpx.Client(base_url=f"{grid.url}/v1", headers={"x-api-key": key}, timeout=60) as http:
        function_id = http.post(
            "/upload",
            files={"file": ("wide.py", code.encode())},
            data={"handler": "wide.handler", "function_name": name},
        ).json()["function_id"]
        job_id = http.post("/run", json={"function_id": function_id, "payload": {}}).json()[
            "job_id"
        ]
    widths = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1366, "height": 800})
        page.goto(f"{grid.url}/ui/login")
        widths["/ui/login"] = page.evaluate("document.documentElement.scrollWidth")
        page.fill("input[name=api_key]", key)
        page.click("button[type=submit]")
        page.wait_for_url(f"{grid.url}/ui")
        for path in (
            "/ui",
            "/ui/deploy",
            f"/ui/functions/{function_id}",
            "/ui/jobs",
            f"/ui/jobs/{job_id}",
            "/ui/environments",
            "/ui/workers",
            "/ui/loadtests",
            "/ui/no-such-page",
        ):
            page.goto(grid.url + path)
            widths[path] = page.evaluate("document.documentElement.scrollWidth")
        page.goto(f"{grid.url}/ui/workers")
        page.screenshot(path=str(tmp_path / "workers.png"), full_page=True)
        browser.close()
    assert {path: width for path, width in widths.items() if width > 1366} == {}
