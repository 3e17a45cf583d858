"""The page of ``vmad serve`` in a real browser, end to end.

The real server (``vmad serve --model small``, the packaged model) runs in a subprocess on a free port;
Playwright drives Debian's headless Chromium (``executable_path``, never a downloaded browser). The image
test uploads an example and waits for the overlay (it fails if the overlay never appears), the score and the
answer, asks a follow-up, gets a text file named ``.png`` and a file over the size limit refused with a
message, and checks that the next upload works. The batch test runs a zip and checks the gallery, the table
and the CSV. No request may leave 127.0.0.1: the browser's requests are recorded, and the server runs with
an audit hook that logs every non-local connect or name lookup.

Skipped, with the reason, when Gradio, Playwright or Chromium is not installed.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vmad_testing import save_random_image

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "images"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FIRST_ANSWER_S = 300.0  # generous: the CPU may be shared; the model answers in seconds when it is not
STEP_S = 180.0


def _skip_reason() -> str | None:
    if importlib.util.find_spec("gradio") is None:
        return "Gradio is not installed (pip install -e '.[web]')"
    if importlib.util.find_spec("playwright") is None:
        return "Playwright is not installed (pip install -e '.[test]')"
    if CHROMIUM is None:
        return "Chromium is not installed (Debian: apt-get install chromium)"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]

# Runs `vmad ...` with an audit hook that logs any connection or name lookup that is not this machine.
LAUNCHER = """
import os, sys
LOG = os.environ["VMAD_TEST_OUTBOUND_LOG"]
LOCAL = {"127.0.0.1", "::1", "localhost", "0.0.0.0", "", "None"}
def hook(event, args):
    if event == "socket.connect" and isinstance(args[1], tuple):
        host = str(args[1][0])
    elif event == "socket.getaddrinfo":
        host = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
    else:
        return
    if host not in LOCAL and not host.startswith("127."):
        with open(LOG, "a") as fh:
            fh.write(f"{event} {host}\\n")
sys.addaudithook(hook)
from vmad.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vmad serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"vmad serve did not answer at {url} within {timeout:.0f} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def server(smol_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """``vmad serve --model small`` on a free port (1 MB image limit so the size refusal is cheap)."""
    tmp = tmp_path_factory.mktemp("serve")
    port = _free_port()
    outbound, log = tmp / "outbound.log", tmp / "server.log"
    env = {**os.environ, "VMAD_CACHE": str(smol_cache), "GRADIO_TEMP_DIR": str(tmp / "gradio"),
           "VMAD_TEST_OUTBOUND_LOG": str(outbound)}
    cmd = [sys.executable, "-c", LAUNCHER, "serve", "--model", "small", "--port", str(port),
           "--device", "cpu", "--work-dir", str(tmp / "work"), "--examples", str(EXAMPLES),
           "--max-file-mb", "1", "--max-new-tokens", "48"]
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_up(url, proc, log, timeout=180)
        yield SimpleNamespace(url=url, outbound=outbound, log=log, tmp=tmp)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, server: SimpleNamespace) -> Iterator[Any]:
    """A fresh page on the server; ``page.external`` collects every request that leaves the server."""
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    page.external = []
    local = server.url.rstrip("/")
    page.on("request", lambda r: r.url.startswith((local, "data:", "blob:")) or page.external.append(r.url))
    page.set_default_timeout(60_000)
    page.goto(server.url)
    page.wait_for_selector("#vmad-upload")
    yield page
    context.close()


def _status(page: Any, selector: str, text: str, timeout_s: float) -> str:
    """Wait until the element's text contains ``text``; return the text."""
    page.wait_for_function(
        "([sel, text]) => { const el = document.querySelector(sel);"
        " return el && el.innerText.includes(text); }",
        arg=[selector, text], timeout=timeout_s * 1000)
    return page.locator(selector).inner_text()


def _upload(page: Any, path: Path) -> None:
    """Clear the image input when it holds a file, then choose ``path``."""
    clear = page.locator("#vmad-upload button[aria-label=Clear]")
    if clear.count():
        clear.click()
    page.locator("#vmad-upload input[type=file]").set_input_files(str(path))


def _value(page: Any, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first.input_value()


def test_upload_overlay_answer_follow_up_refusals_and_next_upload(page: Any, server: SimpleNamespace) -> None:
    _upload(page, EXAMPLES / "brick_crack.png")
    # the overlay must appear, decoded, at the image's size (256 x 256)
    page.wait_for_function(
        "() => { const img = document.querySelector('#vmad-overlay img');"
        " return img && img.complete && img.naturalWidth === 256 && img.naturalHeight === 256; }",
        timeout=FIRST_ANSWER_S * 1000)
    assert page.locator("#vmad-mask img").count() == 1
    assert _status(page, "#vmad-status", "Done", STEP_S).startswith("Done: brick_crack.png, score")
    assert 0.0 <= float(_value(page, "vmad-score")) <= 1.0
    assert _value(page, "vmad-answer").strip()
    assert _value(page, "vmad-description").startswith("The mask")
    downloads = page.locator("#vmad-downloads").inner_text()
    for name in ("brick_crack.png_mask", "brick_crack.png_overlay", "brick_crack.png\n.json"):
        assert name in downloads
    mask_href = page.locator("#vmad-downloads a").first.get_attribute("href")
    with urllib.request.urlopen(urllib.request.urljoin(server.url, mask_href), timeout=30) as response:
        assert response.read(8) == b"\x89PNG\r\n\x1a\n"

    page.locator("#vmad-question textarea, #vmad-question input").first.fill("Where exactly is the defect?")
    page.locator("#vmad-ask").click()
    page.wait_for_function("() => document.querySelectorAll('#vmad-chat [data-testid=bot]').length === 2",
                           timeout=STEP_S * 1000)
    users = page.locator("#vmad-chat [data-testid=user]").all_inner_texts()
    assert users[-1].strip() == "Where exactly is the defect?"
    assert all(t.strip() for t in page.locator("#vmad-chat [data-testid=bot]").all_inner_texts())
    assert _status(page, "#vmad-status", "Answered", STEP_S) == "Answered (2 turns)."

    fake = server.tmp / "notes.png"
    fake.write_text("a text file with an image name\n")
    _upload(page, fake)
    assert _status(page, "#vmad-status", "Refused", STEP_S) == "Refused. notes.png: not a readable image file"
    assert page.locator("#vmad-overlay img").count() == 0  # the previous result is cleared
    big = save_random_image(server.tmp / "big.png", (700, 700, 3))  # ~1.4 MB of noise, limit 1 MB
    _upload(page, big)
    message = _status(page, "#vmad-status", "Refused. big.png", STEP_S)
    assert message.endswith("is over the 1 MB limit per image")

    page.get_by_role("button", name="coins_scratch.png").click()  # a bundled example; the server still serves
    done = _status(page, "#vmad-status", "coins_scratch", FIRST_ANSWER_S)
    assert done.startswith("Done: coins_scratch.png")
    page.wait_for_function("() => { const img = document.querySelector('#vmad-overlay img');"
                           " return img && img.complete && img.naturalWidth === 384; }",
                           timeout=STEP_S * 1000)
    assert page.locator("#vmad-chat [data-testid=bot]").count() == 1  # a new conversation
    assert page.external == []


def test_batch_of_a_zip_gives_gallery_table_and_csv(page: Any, server: SimpleNamespace) -> None:
    archive = server.tmp / "parts.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("brick_crack.png", "grass_spot.png", "coffee_good.jpg"):
            zf.write(EXAMPLES / name, f"parts/{name}")
        zf.writestr("parts/notes.png", "not an image")
    page.get_by_role("tab", name="Batch").click()
    page.locator("#vmad-batch-files input[type=file]").set_input_files(str(archive))
    _status(page, "#vmad-batch-files", "parts.zip", STEP_S)
    page.locator("#vmad-batch-answers input[type=checkbox]").uncheck()  # segmentation only: fast
    page.locator("#vmad-batch-run").click()
    status = _status(page, "#vmad-batch-status", "Done", FIRST_ANSWER_S)
    assert status == "Done: 3 of 4 file(s) processed; 1 refused or unreadable (see the error column)."
    page.wait_for_function("() => document.querySelectorAll('#vmad-gallery img').length === 3")
    table = page.locator("#vmad-table").inner_text()
    assert "parts.zip/parts/coffee_good.jpg" in table and "not a readable image file" in table
    href = page.locator("#vmad-csv a").first.get_attribute("href")
    with urllib.request.urlopen(urllib.request.urljoin(server.url, href), timeout=30) as response:
        rows = list(csv.DictReader(io.StringIO(response.read().decode("utf-8"))))
    names = ("brick_crack.png", "grass_spot.png", "coffee_good.jpg", "notes.png")
    assert [r["file"] for r in rows] == [f"parts.zip/parts/{n}" for n in names]
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in rows[:3]) and rows[3]["score"] == ""
    assert page.external == []


def test_the_server_made_no_outbound_connection(server: SimpleNamespace) -> None:
    outbound = server.outbound.read_text() if server.outbound.exists() else ""
    assert outbound == "", f"the server tried to reach other machines:\n{outbound}"
