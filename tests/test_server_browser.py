"""The catalog browser in a real headless Chromium (Debian's), driven by Playwright."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from playwright.sync_api import expect

from machinable import get

from catalogserver import launch_tracks, running_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def tiny_png() -> bytes:
    """A real 2x2 red PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + b"\xff\x00\x00" * 2 for _ in range(2))
    header = struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


def test_browse_search_open_a_run_and_chart_its_log(project: Path, browser) -> None:
    uuids = launch_tracks(project, [0.1, 0.2, 0.3, 0.4])
    get("track", {"lr": 0.1}).save_file("plot.png", tiny_png())
    with running_server("--project", str(project)) as server:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))

        page.goto(server.url("/"))
        page.wait_for_selector("#runs tbody tr")
        assert page.locator("#runs tbody tr").count() == 4
        assert "project=study" in page.url

        page.fill("input[name=where]", "config.lr >= 0.3")
        page.click("form.search button")
        expect(page.locator("#runs tbody tr")).to_have_count(2)
        assert "where=config.lr" in page.url
        expect(page.locator("#range")).to_have_text("1–2 of 2")

        page.click("#runs th a[data-field='config.lr']")
        page.wait_for_url("**order_by=config.lr**")
        expect(page.locator("#runs th a.sorted")).to_have_text("lr ▲")
        expect(page.locator("#runs tbody tr td:nth-child(6)")).to_have_text(["0.3", "0.4"])
        page.click("#runs th a[data-field='config.lr']")
        expect(page.locator("#runs tbody tr td:nth-child(6)")).to_have_text(["0.4", "0.3"])

        page.fill("input[name=where]", "config.lr >")
        page.click("form.search button")
        page.wait_for_selector("#search-error")
        assert "expected a value at the end" in page.inner_text("#search-error")

        # A run's page: config, copies, files, and its .jsonl log charted point by point.
        page.goto(server.url(f"/?project=study&run={uuids[0]}"))
        page.wait_for_selector("#chart circle.point")
        assert page.locator("#chart circle.point").count() == 20
        ys = [float(y) for y in page.locator("#chart circle.point").evaluate_all("ns => ns.map(n => n.dataset.y)")]
        assert ys[0] == 1.0 and ys[-1] == pytest.approx(1 / (1 + 0.1 * 19))
        assert '"lr": 0.1' in page.inner_text("#config")
        assert "present" in page.inner_text("#copies")
        assert "log.jsonl" in page.inner_text("#files")

        page.click("#files a:text('result.json')")
        page.wait_for_selector("#file-text")
        assert '"loss"' in page.inner_text("#file-text")
        assert "file=result.json" in page.url

        page.click("#files a:text('plot.png')")
        page.wait_for_selector("img.preview")
        expect(page.locator("img.preview")).to_have_js_property("naturalWidth", 2)

        # Choose runs in the table and overlay their logs.
        page.goto(server.url("/?project=study&order_by=config.lr"))
        page.wait_for_selector("#runs tbody tr")
        boxes = page.locator("#runs tbody input[type=checkbox]")
        boxes.nth(0).check()
        boxes.nth(2).check()
        assert "selected=" in page.url
        page.click("#compare")
        page.wait_for_selector("#chart g.series")
        assert page.locator("#chart g.series").count() == 2
        assert page.locator("#chart circle.point").count() == 40
        # The legend names each run by the config values that differ between them.
        expect(page.locator(".legend")).to_contain_text("lr=0.1")
        expect(page.locator(".legend")).to_contain_text("lr=0.3")
        shared = page.url
        assert "compare=" in shared

        # The view is its URL: a fresh tab opening it draws the same chart.
        other = browser.new_page()
        other.goto(shared)
        other.wait_for_selector("#chart g.series")
        assert other.locator("#chart circle.point").count() == 40

        assert not errors
        assert all(url.startswith(server.base) or url.startswith("data:") for url in requested)
