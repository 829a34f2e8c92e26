"""Deploying and changing functions from the dashboard (/ui), in Debian's chromium and with plain HTTP.

What must never happen: a deploy from the page that the API would refuse (or one the API takes that the page
refuses); a form that changes something without the session's CSRF token; another owner's function run, changed or
deleted from a page; an update or an AutoTuner Apply showing up as another function; a failed call whose history
says only "exception"; an error on /ui answered as raw JSON; an environment shown to an owner none of whose
functions use it.
"""

from __future__ import annotations

import io
import json
import re
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from html import unescape
from pathlib import Path

import httpx
import pytest

from nanogrid.environment import Environment
from nanogrid_backend.keys import create_key
from nanogrid_backend.models import COMPLETED, FAILED, JobRecord
from nanogrid_backend.registry.sqlite import SQLiteRegistry
from tests.conftest import require
from tests.test_registry import dynamodb_table  # noqa: F401  (the moto server's table, a fixture)

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
WRITES_AND_FAILS = """import os

def handler(event, context):
    print(os.environ.get("GREETING", "no greeting"), event.get("name"))
    with open(os.path.join(os.environ["OUTPUT_DIR"], "note.txt"), "w") as out:
        out.write("written by " + str(event.get("name")))
    if event.get("fail"):
        raise ValueError("the event asked to fail")
    return {"hello": event.get("name")}
"""


def new_key(grid, prefix: str) -> tuple[str, str]:
    """A new owner's API key, and the owner's name."""
    key, record = create_key(grid.grid.registry, f"{prefix}-{uuid.uuid4().hex[:6]}")
    return key, record.name


@contextmanager
def signed_in(grid, key: str) -> Iterator[tuple[httpx.Client, str]]:
    """An HTTP client with a dashboard session, and the session's CSRF token."""
    with httpx.Client(base_url=grid.url, timeout=60) as http:
        assert http.post("/ui/login", data={"api_key": key}).status_code == 303
        page = http.get("/ui/deploy")
        yield http, re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)


def deploy(
    http: httpx.Client, csrf: str, name: str, code: str = WRITES_AND_FAILS, **fields: str
) -> httpx.Response:
    data = {
        "csrf": csrf,
        "name": name,
        "runtime": "",
        "memory": "128",
        "timeout": "30",
        "code": code,
        **fields,
    }
    return http.post("/ui/deploy", data=data, files={"file": ("", b"")})


def functions_of(grid, owner: str) -> list:
    return grid.grid.registry.list_functions(owner=owner)


def test_in_chromium_an_owner_deploys_test_runs_updates_and_deletes_a_function(
    grid, tmp_path: Path
):
    require(Path(CHROMIUM).exists(), "chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    key, owner = new_key(grid, "deployer")
    name = "hello-fn-" + uuid.uuid4().hex[:4]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        page.goto(f"{grid.url}/ui/login")
        page.fill("input[name=api_key]", key)
        page.click("button[type=submit]")
        page.click("header >> text=Deploy")
        expect(page.locator("#code")).to_contain_text(
            "def handler(event, context)"
        )  # the python template
        page.fill("input[name=name]", name)
        page.fill("input[name=description]", "greets and writes a note")
        page.fill("#code", WRITES_AND_FAILS)
        page.fill("textarea[name=env]", "GREETING=good morning")
        page.click("#deploy-button")
        expect(page.locator("h1")).to_contain_text(name)
        expect(page.locator("#description")).to_have_text("greets and writes a note")
        function_url = page.url
        page.screenshot(path=str(tmp_path / "deployed.png"), full_page=True)

        page.fill("#test-run textarea", '{"name": "ann"}')
        page.click("#test-run button")
        expect(page.locator("#result")).to_contain_text('"hello": "ann"')
        expect(page.locator("#stdout")).to_have_text("good morning ann\n")
        link = page.locator("#output-files a", has_text="note.txt")
        note = page.request.get(
            grid.url + (link.get_attribute("href") or "")
        )  # the page's signed link: no key
        assert note.ok and note.text() == "written by ann"
        assert (
            note.headers["content-type"].startswith("text/plain")
            and note.headers["x-content-type-options"] == "nosniff"
        )
        page.screenshot(path=str(tmp_path / "test-run.png"), full_page=True)

        page.goto(function_url)
        page.fill("#test-run textarea", '{"name": "bob", "fail": true}')
        page.click("#test-run button")
        expect(page.locator("#error")).to_contain_text("ValueError")
        expect(page.locator("#error")).to_contain_text("the event asked to fail")
        page.goto(function_url)
        expect(page.locator("table.history")).to_contain_text("ValueError: the event asked to fail")
        for window in (
            "1h",
            "24h",
            "7d",
            "30d",
        ):  # calls and errors over time, from the metrics counters
            expect(page.locator(f"#timeline-{window} svg")).to_contain_text(
                f"{window}: 2 calls, 1 failed"
            )
            expect(page.locator(f"#timeline-{window} svg rect.errors")).to_have_count(1)

        page.fill("#update input[name=memory]", "256")
        page.click("#update button")
        expect(page.locator("h1")).to_contain_text("256 MiB")
        expect(page.locator("#versions tr")).to_have_count(3)  # a header and two versions
        page.click("header >> text=Functions")
        row = page.locator("#functions tr.function", has_text=name)
        expect(row).to_have_count(1)  # one row, its versions folded under it
        expect(row).to_contain_text("greets and writes a note")
        row.locator("summary").click()
        expect(row.locator("ul.versions li")).to_have_count(2)
        page.screenshot(path=str(tmp_path / "functions.png"), full_page=True)

        row.locator("a", has_text=name).click()
        page.check("#delete input[name=confirm]")
        page.click("#delete button")
        expect(page.locator("#functions")).not_to_contain_text(name)
        browser.close()
    assert functions_of(grid, owner) == []  # every version went


def test_a_deploy_the_api_refuses_is_refused_on_the_page_with_the_same_words_and_nothing_is_stored(
    grid,
):
    key, owner = new_key(grid, "refused")
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("manifest.json", json.dumps({"name": "zipfn", "handler": "absent.handler"}))
        zf.writestr("main.py", "def handler(event, context):\n    return 1\n")
    with (
        signed_in(grid, key) as (http, csrf),
        httpx.Client(base_url=f"{grid.url}/v1", headers={"x-api-key": key}, timeout=30) as api,
    ):
        for form, upload in (
            ({"memory": "999999"}, {"memory": "999999"}),
            ({"timeout": "-5"}, {"timeout": "-5"}),
            ({"runtime": "cobol"}, {"runtime": "cobol"}),
        ):
            page = deploy(http, csrf, "refusedfn", **form)
            expected = api.post(
                "/upload",
                files={"file": ("main.py", WRITES_AND_FAILS.encode())},
                data={"function_name": "refusedfn", "handler": "main.handler", **upload},
            )
            assert page.status_code == expected.status_code == 422, form
            shown = unescape(re.search(r'id="deploy-error">(.*?)</p>', page.text, re.S).group(1))
            assert shown == expected.json()["detail"]
            assert 'value="refusedfn"' in page.text  # the form keeps what was typed
        answer = http.post(
            "/ui/deploy",
            data={"csrf": csrf, "name": "zipfn"},
            files={"file": ("fn.zip", zipped.getvalue(), "application/zip")},
        )
        assert answer.status_code == 422 and "absent.py" in answer.text
        answer = deploy(http, csrf, "envfn", env="not a variable line")
        assert answer.status_code == 422 and "NAME=value" in answer.text
        assert deploy(http, csrf, "emptyfn", code="  ").status_code == 422
    assert functions_of(grid, owner) == []


def test_every_form_that_changes_something_refuses_a_missing_or_forged_csrf_token(grid):
    key, owner = new_key(grid, "csrf")
    with signed_in(grid, key) as (http, csrf):
        created = deploy(http, csrf, "csrffn")
        assert created.status_code == 303
        function_id = created.headers["location"].rsplit("/", 1)[1]
        jobs_before = grid.grid.registry.count_jobs()
        for token in ("", "forged-" + csrf[:8]):
            for path, data in (
                ("/ui/deploy", {"name": "other", "code": WRITES_AND_FAILS}),
                (f"/ui/functions/{function_id}/run", {"input": "{}"}),
                (f"/ui/functions/{function_id}/update", {"memory": "512", "description": "x"}),
                (f"/ui/functions/{function_id}/autotune", {"memory_mib": "512"}),
                (f"/ui/functions/{function_id}/delete", {"confirm": "on"}),
                ("/ui/environments/env-0123/remove", {}),
                ("/ui/logout", {}),
            ):
                answer = http.post(path, data={**data, "csrf": token})
                assert answer.status_code == 403, path
                assert (
                    answer.headers["content-type"].startswith("text/html")
                    and "this form is stale" in answer.text
                )
        assert [f.function_id for f in functions_of(grid, owner)] == [function_id]
        assert grid.grid.registry.get_function(function_id).memory_mib == 128
        assert grid.grid.registry.count_jobs() == jobs_before
        assert http.get("/ui").status_code == 200  # still signed in


def test_another_owners_function_cannot_be_run_changed_or_deleted_from_a_page(grid):
    (victim, owner), (attacker, _) = new_key(grid, "victim"), new_key(grid, "attacker")
    with signed_in(grid, victim) as (http, csrf):
        function_id = deploy(http, csrf, "victimfn").headers["location"].rsplit("/", 1)[1]
    with signed_in(grid, attacker) as (http, csrf):
        for path, data in (
            (f"/ui/functions/{function_id}/run", {"input": "{}"}),
            (f"/ui/functions/{function_id}/update", {"memory": "512"}),
            (f"/ui/functions/{function_id}/delete", {"confirm": "on"}),
        ):
            answer = http.post(path, data={**data, "csrf": csrf})
            assert answer.status_code == 404 and "victimfn" not in answer.text, path
        assert "victimfn" not in http.get("/ui").text
    assert [f.function_id for f in functions_of(grid, owner)] == [function_id]
    assert grid.grid.registry.list_history(owner) == []  # nothing ran


def test_errors_and_unknown_pages_on_ui_are_html_pages_and_the_api_still_answers_json(grid):
    key, _ = new_key(grid, "pages")
    with signed_in(grid, key) as (http, _):
        for path in ("/ui/no-such-page", "/ui/jobs/job-nope", "/ui/functions/fn-nope"):
            answer = http.get(path)
            assert answer.status_code == 404 and answer.headers["content-type"].startswith(
                "text/html"
            ), path
            assert (
                'id="error-detail"' in answer.text and "Sign out" in answer.text
            )  # inside the signed-in page
            assert "default-src 'none'" in answer.headers["content-security-policy"]
        assert http.get("/v1/functions/fn-nope").json()["error"] in ("unauthorized", "not_found")
    with httpx.Client(base_url=grid.url) as anonymous:
        answer = anonymous.get("/ui/no-such-page")
        assert answer.headers["content-type"].startswith("text/html") and "Sign in" in answer.text
        assert (
            anonymous.get("/v1/no-such-route")
            .headers["content-type"]
            .startswith("application/json")
        )


def test_the_sign_in_page_says_where_the_local_key_is(grid):
    page = httpx.get(f"{grid.url}/ui/login").text
    assert f"{grid.grid.config.data_dir}/local-key" in unescape(page)
    assert grid.api_key not in page


def test_the_environments_page_shows_an_owners_environments_with_their_functions_and_removes_them(
    grid,
):
    """Built by a real test run (uv installs six); another owner sees neither it nor its packages."""
    (key, _), (other, _) = new_key(grid, "envs"), new_key(grid, "noenvs")
    spec = Environment(packages=["six==1.16.0"]).spec()
    files = io.BytesIO()
    with zipfile.ZipFile(files, "w") as zf:
        zf.writestr("manifest.json", json.dumps({"environment": spec}))
        zf.writestr(
            "sixfn.py", "def handler(event, context):\n    import six\n    return six.__version__\n"
        )
    with signed_in(grid, key) as (http, csrf):
        created = http.post(
            "/ui/deploy",
            data={"csrf": csrf, "name": "sixfn", "handler": "sixfn.handler"},
            files={"file": ("sixfn.zip", files.getvalue(), "application/zip")},
        )
        assert created.status_code == 303, created.text
        function_id = created.headers["location"].rsplit("/", 1)[1]
        ran = http.post(
            f"/ui/functions/{function_id}/run",
            data={"csrf": csrf, "input": "{}"},
            follow_redirects=True,
        )
        require(
            'id="result"' in ran.text, "the environment could not be built here (no package index?)"
        )
        assert "1.16.0" in ran.text
        env_id = re.search(r"(env-[0-9a-f]+)", http.get(f"/ui/functions/{function_id}").text).group(
            1
        )
        assert env_id in ran.text  # the job page names its environment
        listed = http.get("/ui/environments").text
        row = re.search(rf"<tr>\s*<td>{env_id}</td>.*?</tr>", listed, re.S).group(0)
        assert "six==1.16.0" in row and "sixfn" in row and "MiB" in row
        with signed_in(grid, other) as (stranger, stranger_csrf):
            assert env_id not in stranger.get("/ui/environments").text
            refused = stranger.post(
                f"/ui/environments/{env_id}/remove", data={"csrf": stranger_csrf}
            )
            assert refused.status_code == 404
        assert env_id in {e["env_id"] for e in grid.grid.environments.list()}
        assert (
            http.post(f"/ui/environments/{env_id}/remove", data={"csrf": csrf}).status_code == 303
        )
        assert env_id not in {e["env_id"] for e in grid.grid.environments.list()}
        assert env_id not in http.get("/ui/environments").text


@pytest.mark.parametrize("adapter", ["sqlite", "dynamodb"])
def test_both_registries_count_calls_and_failures_per_slot_as_their_windows_do(
    adapter, tmp_path, request
):
    """The charts' numbers: per minute (1h) and per hour (the rest), calls and failed calls, never another
    function's, and summing to the window's own count."""
    if adapter == "sqlite":
        registry = SQLiteRegistry(tmp_path / "registry.sqlite3")
    else:
        from nanogrid_backend.registry.dynamodb import DynamoDBRegistry

        registry = DynamoDBRegistry(request.getfixturevalue("dynamodb_table"))
    now = 1_800_000_000.0 - 1800  # half past an hour
    mine, other = f"fn-{uuid.uuid4().hex[:8]}", f"fn-{uuid.uuid4().hex[:8]}"
    for function_id, ago, status in (
        (mine, 60, COMPLETED),
        (mine, 70, FAILED),
        (mine, 7200, COMPLETED),
        (other, 60, FAILED),
    ):
        job = JobRecord("job-" + uuid.uuid4().hex, function_id, owner="timeline")
        registry.create_jobs([job])
        job.status, job.execution_time_ms, job.finished_at = status, 5.0, now - ago
        registry.finish_job(job)
    assert registry.function_timeline(mine, "1h", now) == [
        (int((now - 70) // 60) * 60, 1, 1),
        (int((now - 60) // 60) * 60, 1, 0),
    ]
    day = registry.function_timeline(mine, "24h", now)
    assert day == [(int((now - 7200) // 3600) * 3600, 1, 0), (int(now // 3600) * 3600, 2, 1)]
    assert (
        sum(n for _, n, _ in day)
        == registry.function_windows(mine, now, names=("24h",))["24h"]["count"]
    )
