"""Render the dashboard of run directories to a PNG with headless Chromium.

    .venv/bin/python tools/screenshot_dashboard.py RUN_DIR [RUN_DIR ...] -o stages.png
        [--section overview|stages|traces|diagnostics|settings|page] [--width 1280]

``--section overview`` (the default) captures the loss / λ̂ / stages figure, the picture for a
README; ``page`` captures the whole page. Uses Debian's chromium (/usr/bin/chromium); it never
downloads a browser and the page makes no network request.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from devinterp.dashboard import build_html
from devinterp.run.store import atomic_write_bytes

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SECTIONS = ("overview", "stages", "traces", "diagnostics", "settings", "page")


def screenshot(run_dirs: list[Path], out: Path, *, section: str = "overview",
               width: int = 1280, scale: float = 2.0) -> Path:
    """Write a PNG of the dashboard (or of one of its sections) of ``run_dirs``."""
    from playwright.sync_api import sync_playwright

    if section not in SECTIONS:
        raise ValueError(f"unknown section {section!r}; choose one of {', '.join(SECTIONS)}")
    with tempfile.TemporaryDirectory() as tmp:
        html_path = Path(tmp) / "dashboard.html"
        html_path.write_text(build_html(run_dirs), encoding="utf-8")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": width, "height": 900},
                                    device_scale_factor=scale)
            page.route("**/*", lambda route: route.continue_()
                       if route.request.url.startswith("file://") else route.abort())
            page.goto(html_path.as_uri())
            page.wait_for_function("window.__dashboard && window.__dashboard.ready",
                                   timeout=60_000)
            if section == "page":
                png = page.screenshot(full_page=True)
            else:
                png = page.locator(f"#{section}").screenshot()
            browser.close()
    # Temp file + rename: a README picture is replaced whole or left as it was.
    atomic_write_bytes(out, png)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    ap.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.png")
    ap.add_argument("--section", default="overview", choices=SECTIONS)
    ap.add_argument("--width", type=int, default=1280, help="viewport width in CSS pixels")
    ap.add_argument("--scale", type=float, default=2.0, help="device pixel ratio")
    args = ap.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} not found: apt-get install chromium", file=sys.stderr)
        return 2
    if args.output.is_dir():
        print(f"error: -o {args.output} is a directory; name the PNG file to write",
              file=sys.stderr)
        return 2
    try:
        out = screenshot(args.run_dirs, args.output, section=args.section, width=args.width,
                         scale=args.scale)
    except (ValueError, OSError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
