"""The dashboard at /ui, driven in Debian's chromium with Playwright and probed with plain HTTP: sign-in, navigation,
charts drawn, a log opened, the AutoTuner applied, a load test run; and from an attacker's side: another owner's
functions and jobs never appear, the API key never travels in a URL or a page, a form without the session's CSRF
token is refused, and a revoked key's session ends. Screenshots are saved under the test's tmp dir."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from nanogrid_backend.keys import create_key
from nanogrid_backend.models import COMPLETED, JobRecord
from tests.conftest import require

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
MiB = 1 << 20
HANDLER = b"""def handler(event, context):
    print(event.get("say", "hello from the dashboard test"))
    if event.get("fail"):
        raise RuntimeError("asked to fail")
    return event
"""


def new_owner(grid, prefix: str, function_name: str, say: str) -> tuple[str, str, list[str]]:
    """An owner with one function and three calls (one failed); returns (key, function id, job ids)."""
    key, _ = create_key(grid.grid.registry, f"{prefix}-{uuid.uuid4().hex[:6]}")
    with httpx.Client(base_url=f"{grid.url}/v1", headers={"x-api-key": key}, timeout=60) as http:
        function_id = http.post(
            "/upload",
            files={"file": ("dash.py", HANDLER)},
            data={"handler": "dash.handler", "function_name": function_name, "memory": "2048"},
        ).json()["function_id"]
        job_ids = [
            http.post("/run", json={"function_id": function_id, "payload": payload}).json()[
                "job_id"
            ]
            for payload in ({"say": say}, {"say": say + " again"}, {"say": say, "fail": True})
        ]
    return key, function_id, job_ids


def add_measured_calls(grid, function_id: str, owner: str) -> None:
    """Thirty calls with measured peaks of 30..59 MiB, recorded through the registry's write path."""
    registry = grid.grid.registry
    for peak in range(30, 60):
        job = JobRecord("job-" + uuid.uuid4().hex, function_id, owner=owner)
        registry.create_jobs([job])
        job.status, job.execution_time_ms, job.peak_memory_bytes, job.finished_at = (
            COMPLETED,
            50.0,
            peak * MiB,
            time.time(),
        )
        registry.finish_job(job)


@pytest.fixture()
def owners(grid):
    alice = new_owner(grid, "alice", "dashfn", "alice says hi")
    mallory = new_owner(grid, "mallory", "mallorysecretfn", "MALLORY-SECRET-OUTPUT")
    owner = grid.grid.registry.get_function(alice[1]).owner
    add_measured_calls(grid, alice[1], owner)
    return alice, mallory


@contextmanager
def signed_in(grid, key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=grid.url, timeout=30) as http:
        answer = http.post("/ui/login", data={"api_key": key})
        assert answer.status_code == 303 and answer.headers["location"] == "/ui"
        yield http


def test_in_chromium_an_owner_signs_in_navigates_and_sees_only_their_own(
    grid, owners, tmp_path: Path
):
    require(Path(CHROMIUM).exists(), "chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    (key, function_id, job_ids), (_, mallory_function, mallory_jobs) = owners
    shots = tmp_path / "screenshots"
    shots.mkdir()
    visited: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("request", lambda r: visited.append(r.url))
        page.goto(f"{grid.url}/ui")
        expect(page).to_have_url(re.compile(r"/ui/login$"))  # no session: the sign-in form
        page.fill("input[name=api_key]", "ng_wrong_key")
        page.click("button[type=submit]")
        expect(page.locator("#login-error")).to_be_visible()
        page.fill("input[name=api_key]", key)
        page.click("button[type=submit]")
        expect(page.locator("#functions")).to_contain_text("dashfn")
        expect(page.locator("body")).not_to_contain_text("mallorysecretfn")
        page.screenshot(path=str(shots / "functions.png"), full_page=True)

        cookie = next(c for c in page.context.cookies() if c["name"] == "nanogrid_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"

        page.click("text=dashfn")
        expect(page.locator("#windows")).to_contain_text("24h")
        assert page.locator("#chart-calls svg rect.bar").count() == 4  # 1h, 24h, 7d, 30d
        assert page.locator("#chart-memory svg rect.bar").count() > 0
        expect(page.locator("#autotune")).to_contain_text("128 MiB")
        page.screenshot(path=str(shots / "function.png"), full_page=True)

        page.click(f"a[href='/ui/jobs/{job_ids[0]}']")
        expect(page.locator("#stdout")).to_have_text("alice says hi\n")
        page.screenshot(path=str(shots / "log.png"), full_page=True)

        page.click("text=Jobs")
        expect(page.locator("table.history")).to_contain_text("dashfn")
        expect(page.locator("body")).not_to_contain_text("mallory")
        page.goto(f"{grid.url}/ui/jobs/{mallory_jobs[0]}")
        expect(page.locator("body")).not_to_contain_text("MALLORY-SECRET-OUTPUT")
        page.goto(f"{grid.url}/ui/functions/{mallory_function}")
        expect(page.locator("body")).to_contain_text("no function")

        page.goto(f"{grid.url}/ui/workers")
        expect(page.locator("#workers")).to_contain_text("slots")
        page.screenshot(path=str(shots / "workers.png"), full_page=True)

        page.goto(f"{grid.url}/ui/functions/{function_id}")
        page.click("#apply")
        expect(page.locator("h1")).to_contain_text("128 MiB")
        page.click("header >> text=Functions")  # the Apply made a version, not another function
        expect(page.locator("#functions tr.function", has_text="dashfn")).to_have_count(1)

        page.click("text=Load tests")
        page.fill("input[name=rps]", "10")
        page.fill("input[name=duration_s]", "1")
        page.fill("input[name=input]", '{"say": "load"}')
        page.click("#start-loadtest button")
        expect(page.locator("#loadtests")).to_contain_text(
            "done", timeout=30_000
        )  # the page refreshes itself
        expect(page.locator("#loadtests")).to_contain_text("10/10")
        page.screenshot(path=str(shots / "loadtests.png"), full_page=True)
        browser.close()
    assert all(key not in url for url in visited)
    assert {p.name for p in shots.iterdir()} == {
        "functions.png",
        "function.png",
        "log.png",
        "workers.png",
        "loadtests.png",
    }


def test_the_key_never_appears_in_a_page_and_pages_answer_quickly(grid, owners, tmp_path: Path):
    """Also measures each page's load time (written next to the screenshots; the benchmark reports them)."""
    (key, function_id, job_ids), _ = owners
    timings = []
    with signed_in(grid, key) as http:
        for path in (
            "/ui",
            f"/ui/functions/{function_id}",
            "/ui/jobs",
            f"/ui/jobs/{job_ids[0]}",
            "/ui/workers",
            "/ui/loadtests",
        ):
            start = time.perf_counter()
            answer = http.get(path)
            timings.append(f"{path}\t{(time.perf_counter() - start) * 1000:.1f} ms")
            assert answer.status_code == 200 and key not in answer.text
            assert "default-src 'none'" in answer.headers["content-security-policy"]
    (tmp_path / "page-times.txt").write_text("\n".join(timings) + "\n")


def test_a_form_without_the_sessions_csrf_token_is_refused(grid, owners):
    (key, function_id, _), _ = owners
    with signed_in(grid, key) as http:
        answer = http.post(
            f"/ui/functions/{function_id}/autotune", data={"memory_mib": "256", "csrf": "forged"}
        )
        assert answer.status_code == 403
        assert grid.grid.registry.get_function(function_id).memory_mib == 2048


def test_a_revoked_keys_session_ends(grid):
    key, record = create_key(grid.grid.registry, "revoked-" + uuid.uuid4().hex[:6])
    with signed_in(grid, key) as http:
        assert http.get("/ui").status_code == 200
        record.revoked_at = time.time()
        grid.grid.registry.put_key(record)
        answer = http.get("/ui")
        assert answer.status_code == 303 and answer.headers["location"] == "/ui/login"


def test_a_stolen_cookie_value_from_another_path_or_no_cookie_gets_nothing(grid, owners):
    (_, function_id, job_ids), _ = owners
    with httpx.Client(base_url=grid.url) as anonymous:
        for path in (
            "/ui",
            f"/ui/functions/{function_id}",
            f"/ui/jobs/{job_ids[0]}",
            "/ui/workers",
        ):
            assert anonymous.get(path).status_code == 303, path
        anonymous.cookies.set("nanogrid_session", "guessed-" + uuid.uuid4().hex, path="/ui")
        assert anonymous.get("/ui/jobs").status_code == 303
