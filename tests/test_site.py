"""The documentation site as a reader's browser shows it: headless Chromium at a desktop and a
phone width, every page of a fresh `mkdocs build --strict`.

Fails on a page wider than its window, and at 1280 px on a table or code block that hides
columns behind a sideways scroll, on a table column without a header, and on any request to
another host (the site works offline) or console error. Needs Chromium (Debian's `chromium`;
`.ci/run` installs it) and the `playwright` package (`.[dev]`), which drives that browser and
downloads none of its own. `DEEPSUP_SCREENSHOTS=DIR` also saves a screenshot of every page.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
VIEWPORTS = {"desktop": (1280, 900), "phone": (390, 844)}
# Flags for a closed network: without the background ones Chromium keeps trying to reach
# Google's services; --no-sandbox because CI runs as root.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# What the browser measures on a page: the page's width, and the boxes that scroll sideways.
MEASURE = """() => {
  const boxes = [];
  for (const el of document.querySelectorAll(".md-typeset__scrollwrap, pre > code")) {
    const over = el.scrollWidth - el.clientWidth;
    if (over > 1) {
      const kind = el.tagName === "CODE" ? "code block" : "table";
      boxes.push(`${kind} ${over}px too wide: ${el.innerText.trim().slice(0, 70)}`);
    }
  }
  const headless = [];
  for (const th of document.querySelectorAll(".md-typeset table th")) {
    if (!th.innerText.trim()) {
      headless.push(th.closest("table").innerText.trim().slice(0, 70));
    }
  }
  return {
    width: document.documentElement.scrollWidth,
    window: window.innerWidth,
    boxes: boxes,
    headless: headless,
  };
}"""


def _chromium() -> str:
    found = os.environ.get("DEEPSUP_CHROMIUM") or shutil.which("chromium")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the site test: .ci/run installs Debian's chromium")
        pytest.skip("no chromium on PATH (apt-get install chromium; or DEEPSUP_CHROMIUM=PATH)")
    return found


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[str]]]:
    """The site built from this tree, served on localhost: (base URL, page paths)."""
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    pages = sorted(
        "" if page.parent == out else f"{page.parent.relative_to(out).as_posix()}/"
        for page in out.rglob("index.html")
        if "search" not in page.relative_to(out).parts
    )
    handler = functools.partial(_Quiet, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", pages
    finally:
        server.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("viewport", list(VIEWPORTS))
def test_every_page_fits_its_window_and_stays_local(
    site: tuple[str, list[str]], viewport: str
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = _chromium()
    base, pages = site
    assert {"", "api/", "benchmarks/", "quickstart/"} <= set(pages)
    width, height = VIEWPORTS[viewport]
    shots = os.environ.get("DEEPSUP_SCREENSHOTS")
    problems: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        remote: list[str] = []
        errors: list[str] = []
        local = (base, "data:", "blob:")
        page.on("request", lambda r: remote.append(r.url) if not r.url.startswith(local) else 0)
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else 0)
        for path in pages:
            remote.clear()
            errors.clear()
            page.goto(base + path, wait_until="networkidle")
            found = page.evaluate(MEASURE)
            name = path or "home"
            if found["width"] > found["window"]:
                problems.append(f"{name}: the page is {found['width']} px wide in {width} px")
            if viewport == "desktop":
                problems += [f"{name}: {box}" for box in found["boxes"]]
                problems += [f"{name}: an unheaded column in {t!r}" for t in found["headless"]]
            problems += [f"{name}: a request to another host, {url}" for url in remote]
            problems += [f"{name}: console error {text!r}" for text in errors]
            if shots:
                folder = Path(shots) / viewport
                folder.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(folder / f"{name.strip('/').replace('/', '_')}.png"))
        browser.close()
    assert not problems, f"at {width}x{height}:\n" + "\n".join(problems)
