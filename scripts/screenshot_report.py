"""Render a report page (``compress report``'s ``report.html``) in headless Chromium and save a PNG screenshot.

Why: the report is meant to be looked at, so it is checked the way a person sees it, in a real browser, not only
by parsing its HTML. Uses Debian's Chromium (``apt-get install -y chromium``, which gives ``/usr/bin/chromium``);
no network is needed, since the page is one self-contained file.

    python scripts/screenshot_report.py runs/demo/report.html report.png [--width 1400] [--height 4000]

The screenshot is the top ``--height`` pixels of the page at a ``--width``-pixel-wide window. It prints the PNG's
size and how many distinct colours it has, and exits 1 when the picture is blank (a single colour), so a page
that failed to render does not pass for one that did.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
# Headless, no sandbox (root in a container), and nothing that reaches the network or a GPU.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--disable-extensions", "--mute-audio")


def find_chromium() -> str | None:
    """The path of a Chromium binary on PATH (``/usr/bin/chromium`` on Debian), or None."""
    for name in CHROMIUM_NAMES:
        if path := shutil.which(name):
            return path
    return None


def screenshot(html: Path, png: Path, *, width: int = 1400, height: int = 4000, timeout: float = 120.0,
               chromium: str | None = None) -> Path:
    """Render ``html`` at a ``width`` x ``height`` window and write the screenshot to ``png``."""
    binary = chromium or find_chromium()
    if binary is None:
        raise FileNotFoundError("no Chromium found; install it with `apt-get install -y chromium`")
    png = png.resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="report-chromium-") as profile:
        command = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
                   f"--window-size={width},{height}", html.resolve().as_uri()]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if not png.exists():
        raise RuntimeError(f"Chromium wrote no screenshot (exit {done.returncode}): {done.stderr.strip()[-600:]}")
    return png


def describe(png: Path) -> dict[str, int]:
    """Width, height and the number of distinct colours (capped at 4096) of a PNG, to tell blank from drawn."""
    from PIL import Image

    with Image.open(png) as image:
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=4096)
        return {"width": rgb.width, "height": rgb.height, "colours": 4096 if colours is None else len(colours)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html", type=Path, help="the report.html to render")
    parser.add_argument("png", type=Path, help="where to write the screenshot")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=4000)
    args = parser.parse_args(argv)
    if not args.html.is_file():
        print(f"error: {args.html} is not a file; pass the report.html written by `compress report`",
              file=sys.stderr)
        return 1
    png = screenshot(args.html, args.png, width=args.width, height=args.height)
    info = describe(png)
    print(f"{png}: {info['width']}x{info['height']} px, {info['colours']} colours")
    if info["colours"] < 2:
        print("error: the screenshot is blank (one colour); the page did not render", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
