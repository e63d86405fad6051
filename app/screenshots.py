"""Screenshots of the real app for the README (headless Chromium via Playwright).

    python -m vqa_align_app.screenshots [--checkpoint RUN] [--compare RUN] [--out docs/images]

Serves the app in this process on a free 127.0.0.1 port, picks an example image, asks its
question and saves: ``app_overview.png`` (the whole page), ``app_alignment.png`` (the alignment
section with guided-attention shading) and, with ``--compare``, ``app_compare.png``.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redraw_and_wait(page, action, timeout_ms: int = 60_000) -> None:
    """Run ``action`` (a click) and wait until the projection shows a new picture and nothing is pending."""
    before = page.locator("#projection img").get_attribute("src")
    action()
    page.wait_for_function(
        "src => { const i = document.querySelector('#projection img'); return i && i.src !== src; }",
        arg=before, timeout=timeout_ms)
    page.wait_for_function("!document.querySelector('.progress-text, .eta-bar')", timeout=timeout_ms)
    page.wait_for_timeout(800)  # let the images finish painting


def take_screenshots(url: str, out: Path, example: int = 2, question: str | None = None,
                     compare: bool = False, upload: Path | None = None, name: str = "app_overview.png") -> list[Path]:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000}, device_scale_factor=1)
            page.goto(url, wait_until="load")
            page.locator("#projection img").wait_for(timeout=60_000)  # the page answers on load
            before = page.locator("#preview img").get_attribute("src") if page.locator("#preview img").count() else None
            if upload is not None:  # a photo of the user's, through the upload box
                page.locator("#upload input[type=file]").set_input_files(str(upload))
            else:
                page.locator("#gallery button.thumbnail-item").nth(example).click()
            page.wait_for_function(  # the selection has reached the page (new preview)
                "src => { const i = document.querySelector('#preview img'); return i && i.src !== src; }",
                arg=before, timeout=15_000)
            if question:
                page.locator("#question textarea").fill(question)
            _redraw_and_wait(page, lambda: page.locator("#ask").click())
            saved.append(out / name)
            page.screenshot(path=str(saved[-1]), full_page=True)
            if upload is not None:
                return saved

            page.get_by_label("guided attention of the selected layer & head").check()
            page.wait_for_timeout(500)
            _redraw_and_wait(page, lambda: page.locator("#head").get_by_text("head 1").click())
            saved.append(out / "app_alignment.png")
            page.locator("#alignment").screenshot(path=str(saved[-1]))
            if compare:
                page.locator("#cmp-projection img").wait_for(timeout=30_000)
                saved.append(out / "app_compare.png")
                page.screenshot(path=str(saved[-1]), full_page=True)
        finally:
            browser.close()
    return saved


def main(argv: list[str] | None = None) -> int:
    from vqa_align.serve.startup import configure_threads, load_predictor
    from vqa_align_app.main import build_app, launch_kwargs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="default: the quickstart's run")
    parser.add_argument("--compare", help="second checkpoint shown side by side")
    parser.add_argument("--out", default="docs/images")
    parser.add_argument("--example", type=int, default=2, help="index of the gallery example to click")
    parser.add_argument("--question", help="question to type (default: the example's)")
    parser.add_argument("--upload", type=Path, help="upload this picture instead of clicking an example")
    parser.add_argument("--name", default="app_overview.png", help="file name of the whole-page screenshot")
    parser.add_argument("--images", help="folder of the store's pictures, for the gallery")
    args = parser.parse_args(argv)
    predictor = load_predictor(args.checkpoint, args.images)
    compare = load_predictor(args.compare) if args.compare else None
    configure_threads(predictor)
    demo = build_app(predictor, compare)
    demo.queue(default_concurrency_limit=2)
    port = _free_port()
    demo.launch(**launch_kwargs("127.0.0.1", port), prevent_thread_lock=True)
    try:
        for path in take_screenshots(f"http://127.0.0.1:{port}/", Path(args.out), args.example, args.question,
                                     compare is not None, args.upload, args.name):
            print(path)
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
