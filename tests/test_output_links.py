"""Output files open in a browser through short-lived signed links, with no API key in them.

What must never happen: a link opening another file or another job's file, a link that works
after it expired, or the API key itself ending up in a URL.
"""

from __future__ import annotations

import re
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

import nanogrid
from nanogrid_backend.controller.links import LinkSigner

pytestmark = pytest.mark.integration


def test_a_signed_link_opens_its_file_and_nothing_else(grid):
    nanogrid.connect(grid.url, api_key=grid.api_key)

    @nanogrid.remote(timeout=30)
    def report():
        for name, text in (("a.csv", "n,1\n"), ("b.csv", "n,2\n")):
            with open(nanogrid.output_dir() / name, "w") as f:
                f.write(text)

    job = report.spawn()
    job.result(timeout=30)
    urls = {f.name: f.url for f in job.outputs}
    assert grid.api_key not in urls["a.csv"]
    assert httpx.get(urls["a.csv"]).text == "n,1\n"  # no key: the link is the proof
    split = urlsplit(urls["a.csv"])
    query = parse_qs(split.query)
    base = f"{split.scheme}://{split.netloc}"
    other_file = f"{base}/v1/jobs/{job.job_id}/outputs/b.csv?{split.query}"
    assert httpx.get(other_file).status_code == 403
    later = f"{base}{split.path}?expires={int(query['expires'][0]) + 3600}&sig={query['sig'][0]}"
    assert httpx.get(later).status_code == 403
    assert (
        httpx.get(f"{base}{split.path}").status_code == 401
    )  # without the link, the key is needed


def test_an_expired_link_is_refused():
    signer = LinkSigner(b"k" * 32, ttl_s=60)
    query = parse_qs(signer.query("job-1", "a.csv", "alice", now=time.time() - 120))
    assert "expired" in signer.check(
        "job-1", "a.csv", "alice", int(query["expires"][0]), query["sig"][0]
    )
    fresh = parse_qs(signer.query("job-1", "a.csv", "alice"))
    assert (
        signer.check("job-1", "a.csv", "alice", int(fresh["expires"][0]), fresh["sig"][0]) is None
    )
    assert (
        signer.check("job-1", "a.csv", "bob", int(fresh["expires"][0]), fresh["sig"][0]) is not None
    )


SHOWN = {
    "plot.png": "image/png",
    "photo.JPG": "image/jpeg",
    "report.pdf": "application/pdf",
    "run.log": "text/plain; charset=utf-8",
    "table.csv": "text/plain; charset=utf-8",
}
DOWNLOADED = ["page.html", "drawing.svg", "model.bin", "no_suffix"]


def test_images_pdfs_and_text_open_in_the_browser_and_anything_else_downloads(grid):
    """A person clicks a plot, a PDF or a log and sees it; never does a file run script with the grid's origin:
    HTML and SVG (script-capable) download, a type is never guessed from the bytes, and even a file shown in
    place is sandboxed. Through the widget's links and the dashboard's, with a real HTTP client."""
    nanogrid.connect(grid.url, api_key=grid.api_key)

    @nanogrid.remote(timeout=30)
    def files(names):
        for name in names:  # every file is HTML: only its name may decide how it is shown
            (nanogrid.output_dir() / name).write_text(
                "<html><script>alert(document.cookie)</script></html>"
            )

    job = files.spawn([*SHOWN, *DOWNLOADED])
    job.result(timeout=30)
    with httpx.Client(base_url=grid.url, timeout=30) as dashboard:
        assert dashboard.post("/ui/login", data={"api_key": grid.api_key}).status_code == 303
        page = dashboard.get(f"/ui/jobs/{job.job_id}").text
    from_dashboard = {
        name: url.replace("&amp;", "&")
        for url, name in re.findall(r'<a href="(/v1/jobs/[^"]+)"[^>]*>([^<]+)</a>', page)
    }
    assert set(from_dashboard) == {*SHOWN, *DOWNLOADED}
    for output in job.outputs:
        for url in (output.url, grid.url + from_dashboard[output.name]):
            answer = httpx.get(url)  # no key: the signed link alone
            assert answer.status_code == 200 and "<script>" in answer.text
            headers = answer.headers
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["content-security-policy"] == "sandbox"
            if output.name in SHOWN:
                assert headers["content-type"] == SHOWN[output.name]
                assert headers["content-disposition"].startswith("inline;")
            else:
                assert headers["content-type"] == "application/octet-stream"
                assert headers["content-disposition"].startswith("attachment;")
            assert output.name in headers["content-disposition"]
