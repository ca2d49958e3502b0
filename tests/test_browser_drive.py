"""The drive in a real browser (headless Chromium through Playwright): create a
folder, upload files through the real page and watch every progress bar
finish, rename, move with the folder picker, preview, download (bytes
compared) and delete. Screenshots go to docs/screenshots/drive-*.png."""

from __future__ import annotations

import os
import struct
import zlib

import pytest

from src.config import parse_config
from src.kv import MemoryKV
from tests.browser import SHOTS, launch_browser

pytestmark = pytest.mark.browser



@pytest.fixture
def site(tmp_path):
    from httpserver.frontend import Frontend
    cfg = parse_config({"drive": {"chunk_bytes": "256KiB", "quota_bytes": "1GiB"},
                        "frontend": [{"id": "fe1", "host": "127.0.0.1", "port": 0}]}, data_dir=str(tmp_path))
    fe = Frontend(cfg, cfg.node("fe1"), MemoryKV(), port=0)
    fe.start()
    try:
        yield f"http://127.0.0.1:{fe.port}"
    finally:
        fe.stop()


def shot(page, name):
    os.makedirs(SHOTS, exist_ok=True)
    page.screenshot(path=os.path.join(SHOTS, name), full_page=True)


def png(width=96, height=64) -> bytes:
    """A small valid PNG (a colour gradient), so the preview shows a real image."""
    rows = b"".join(b"\0" + bytes(c for x in range(width) for c in (x * 255 // width, y * 255 // height, 180))
                    for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def row(page, name):
    return page.locator("table.items tr", has=page.locator("a.item span", has_text=name))


def test_drive_in_the_browser(site, tmp_path):
    big = os.urandom(3 * 1024 * 1024 + 12345)  # 13 chunks of 256 KiB
    (tmp_path / "dataset.bin").write_bytes(big)
    (tmp_path / "notes.txt").write_text("Meeting notes\n- ship the drive\n- écrire la doc ✓\n", encoding="utf-8")
    (tmp_path / "photo.png").write_bytes(png())
    with launch_browser() as browser:
        ctx = browser.new_context(base_url=site, viewport={"width": 1200, "height": 800}, accept_downloads=True)
        r = ctx.request.post("/signup", form={"username": "alice", "password": "correct horse"}, max_redirects=0)
        assert r.status == 303, r.text()
        page = ctx.new_page()
        page.goto("/drive")
        assert "This folder is empty" in page.content()

        # A new folder, with a plain form.
        page.fill("#folder-name", "Projects 2024")
        page.click("form.mkdir button")
        page.wait_for_selector(".notice.ok")
        assert "Created the folder" in page.inner_text(".notice.ok")
        assert row(page, "Projects 2024").count() == 1

        # Upload three files at once through the page: one progress bar each, all finish.
        page.set_input_files("#file-input", [str(tmp_path / "dataset.bin"), str(tmp_path / "notes.txt"),
                                             str(tmp_path / "photo.png")])
        page.wait_for_selector("#uploads li.upload")
        page.wait_for_function("document.body.dataset.uploadsDone !== undefined", timeout=30_000)
        bars = page.eval_on_selector_all("#uploads li", "lis => lis.map(li => [li.className, "
                                         "li.querySelector('progress').value, li.textContent])")
        assert len(bars) == 3, bars
        assert all("done" in cls and value == 100 for cls, value, _ in bars), bars
        shot(page, "drive-upload.png")
        # The page reloads to show them.
        page.wait_for_selector("table.items a.item span:text-is('dataset.bin')", timeout=10_000)
        for name in ("dataset.bin", "notes.txt", "photo.png"):
            assert row(page, name).count() == 1, name
        assert "3 MiB" in row(page, "dataset.bin").inner_text()
        shot(page, "drive-folder.png")

        # Rename (the page's prompt).
        page.once("dialog", lambda d: d.accept("big data ✓.bin"))
        row(page, "dataset.bin").locator("a[data-action=rename]").click()
        page.wait_for_selector(".notice.ok")
        assert "Renamed" in page.inner_text(".notice.ok")
        assert row(page, "big data ✓.bin").count() == 1 and row(page, "dataset.bin").count() == 0

        # Move it into the folder with the folder picker.
        row(page, "big data ✓.bin").get_by_role("link", name="Move").click()
        page.wait_for_selector("#dest")
        page.select_option("#dest", label="\u00a0\u00a0\u00a0Projects 2024")
        page.click("form.focus button[type=submit]")
        page.wait_for_selector(".notice.ok")
        assert "Moved" in page.inner_text(".notice.ok")
        assert row(page, "big data ✓.bin").count() == 0

        # Previews: the text file shows its text, the image is an image.
        row(page, "notes.txt").get_by_role("link", name="Preview").click()
        assert "écrire la doc ✓" in page.inner_text(".preview pre")
        page.go_back()
        row(page, "photo.png").get_by_role("link", name="Preview").click()
        page.wait_for_function("document.querySelector('.preview img') && "
                               "document.querySelector('.preview img').naturalWidth === 96")
        shot(page, "drive-preview.png")
        page.go_back()

        # Into the folder (breadcrumbs show the way), and download: the very same bytes.
        row(page, "Projects 2024").locator("a.item").click()
        page.wait_for_selector("ol.crumbs")
        assert page.inner_text("ol.crumbs").split() == ["My", "Drive", "›", "Projects", "2024"] or \
            "Projects 2024" in page.inner_text("ol.crumbs")
        with page.expect_download() as dl:
            row(page, "big data ✓.bin").locator("a.item").click()
        path = dl.value.path()
        assert dl.value.suggested_filename == "big data ✓.bin"
        with open(path, "rb") as f:
            assert f.read() == big

        # Delete it (the page asks first).
        page.once("dialog", lambda d: d.accept())
        row(page, "big data ✓.bin").locator("a[data-action=delete]").click()
        page.wait_for_selector(".notice.ok")
        assert "Deleted" in page.inner_text(".notice.ok")
        assert "This folder is empty" in page.content()

        # Drag and drop: a file dropped anywhere on the page is uploaded, with its own bar.
        page.evaluate("""() => {
            const dt = new DataTransfer();
            dt.items.add(new File(["dropped bytes \u2713"], "dropped.txt", {type: "text/plain"}));
            for (const type of ["dragenter", "dragover", "drop"]) {
                document.querySelector("table, .empty").dispatchEvent(
                    new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: dt}));
            }
        }""")
        page.wait_for_selector("#uploads li.done")
        page.wait_for_selector("table.items a.item span:text-is('dropped.txt')", timeout=10_000)
        with page.expect_download() as dl:
            row(page, "dropped.txt").locator("a.item").click()
        with open(dl.value.path(), "rb") as f:
            assert f.read() == "dropped bytes ✓".encode()

        # Back at the root, on a phone-sized screen.
        page.set_viewport_size({"width": 390, "height": 800})
        page.click("ol.crumbs a")
        page.wait_for_selector("table.items")
        shot(page, "drive-phone.png")
        ctx.close()


def drop(page, files):
    """Drop files ({name: text}) on the page, as a user dragging them from the desktop."""
    page.evaluate("""(files) => {
        const dt = new DataTransfer();
        for (const [name, text] of Object.entries(files)) dt.items.add(new File([text], name, {type: "text/plain"}));
        for (const type of ["dragenter", "dragover", "drop"]) {
            document.querySelector("table, .empty").dispatchEvent(
                new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: dt}));
        }
    }""", files)


def signed_up(browser, site, user="alice", width=1200, javascript=True):
    ctx = browser.new_context(base_url=site, viewport={"width": width, "height": 800},
                              java_script_enabled=javascript)
    r = ctx.request.post("/signup", form={"username": user, "password": "correct horse"}, max_redirects=0)
    assert r.status == 303, r.text()
    page = ctx.new_page()
    page.goto("/drive")
    return page


def test_spaces_in_names_are_visible(site):
    """A name keeps its spaces, and the page shows them: "  leading.txt" does
    not look like "leading.txt", nor "a  b.txt" like "a b.txt"."""
    names = ["  leading.txt", "a  b.txt", "a b.txt", "trailing .txt"]
    with launch_browser() as browser:
        page = signed_up(browser, site)
        drop(page, {n: n for n in names})
        # The page reloads once all four are in.
        page.wait_for_function("document.querySelectorAll('table.items a.item').length === 4", timeout=10_000)
        shown = page.eval_on_selector_all("table.items a.item span", "spans => spans.map(s => s.innerText)")
        assert sorted(shown) == sorted(names)
        # Its item page (the row's "more" link; hidden on a wide screen).
        page.goto(page.get_attribute("table.items tbody tr:first-child a.more", "href"))
        assert page.inner_text("h1") == "  leading.txt"
        assert page.inner_text("ol.crumbs li:last-child") == "  leading.txt"
        assert "\u201c  leading.txt\u201d" in page.inner_text(".item-forms")


@pytest.mark.parametrize("width", [1200, 390])
def test_a_long_upload_error_stays_on_its_row(site, width):
    """A refused 304-byte name comes back inside the error message, one long
    word: the message wraps inside its row instead of running off the page."""
    with launch_browser() as browser:
        page = signed_up(browser, site, width=width)
        drop(page, {"x" * 300 + ".txt": "x"})
        page.wait_for_selector("#uploads li.failed")
        assert "at most 255 bytes" in page.inner_text("#uploads li.failed .upload-status")
        row_box = page.locator("#uploads li.failed").bounding_box()
        status_box = page.locator("#uploads li.failed .upload-status").bounding_box()
        assert status_box["x"] + status_box["width"] <= row_box["x"] + row_box["width"]
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        # Without the script the same message comes back in the page's notice.
        page = signed_up(browser, site, "bob", width=width, javascript=False)
        page.set_input_files("#file-input", {"name": "y" * 300 + ".txt", "mimeType": "text/plain", "buffer": b"y"})
        page.click("#upload-form button")
        assert "at most 255 bytes" in page.inner_text(".notice.error")
        assert page.evaluate("document.documentElement.scrollWidth") <= width


def test_the_notice_after_the_reload_says_which_upload_got_a_new_name(site):
    """UX QA: "saved as notes (2).txt" was shown for 0.4 s before the page
    reloaded; after it, only "1 file uploaded"."""
    with launch_browser() as browser:
        page = signed_up(browser, site)
        drop(page, {"notes.txt": "one"})
        page.wait_for_function("document.querySelectorAll('table.items a.item').length === 1", timeout=10_000)
        drop(page, {"notes.txt": "two"})
        page.wait_for_function("document.querySelectorAll('table.items a.item').length === 2", timeout=10_000)
        assert "notes.txt saved as notes (2).txt" in page.inner_text("body")


def test_a_download_of_a_file_another_tab_deleted_says_so(site):
    """The file links carry no `download` attribute (the server's
    Content-Disposition makes them downloads): with one, Chromium swallowed
    the 404 of a file deleted in another tab and nothing at all happened."""
    with launch_browser() as browser:
        ctx = browser.new_context(base_url=site, accept_downloads=True)
        r = ctx.request.post("/signup", form={"username": "alice", "password": "correct horse"}, max_redirects=0)
        assert r.status == 303, r.text()
        page = ctx.new_page()
        page.goto("/drive")
        page.set_input_files("#file-input", files=[{"name": "report.txt", "mimeType": "text/plain",
                                                     "buffer": b"quarterly numbers\n"}])
        page.wait_for_selector("table.items a.item span:text-is('report.txt')", timeout=10_000)
        with page.expect_download() as dl:
            row(page, "report.txt").locator("a.item").click()
        with open(dl.value.path(), "rb") as f:
            assert f.read() == b"quarterly numbers\n"

        other = ctx.new_page()                      # a second tab deletes it
        other.goto("/drive")
        other.once("dialog", lambda d: d.accept())
        row(other, "report.txt").locator("a[data-action=delete]").click()
        other.wait_for_selector(".notice.ok")

        row(page, "report.txt").locator("a.item").click()   # the first tab's list is old
        page.wait_for_load_state()
        assert "/drive/file/" in page.url
        assert 'There is no item named "report.txt" here.' in page.inner_text("body")
        assert page.get_by_role("link", name="Back to My Drive").get_attribute("href") == "/drive"
        shot(page, "drive-download-gone.png")
        ctx.close()
