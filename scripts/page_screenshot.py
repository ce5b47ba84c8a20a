"""The README's screenshot of the page: ``python scripts/page_screenshot.py [--out docs/page.png]``.

Writes one synthetic case (``python -m training synth``, seed 7), starts the service on the shipped models on a
free loopback port, opens ``/`` in Debian's Chromium (headless, through Playwright), segments the case through
the page and saves the finished view. Needs ``make setup`` (the generator) and the ``chromium`` package.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from service.core.labels import MODALITIES
from service.launcher import clean_env, start_service

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/page_screenshot.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "page.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, "-m", "training", "synth", str(data), "--cases", "1", "--seed", "7"],
                       check=True, cwd=ROOT)
        case = next(p for p in (data / "MICCAI_BraTS2020_TrainingData").iterdir() if p.is_dir())
        with start_service(Path(tmp) / "service.log", env=clean_env()) as service:
            chromium_args = ["--disable-dev-shm-usage", "--enable-unsafe-swiftshader", "--use-angle=swiftshader"]
            if os.geteuid() == 0:
                chromium_args.append("--no-sandbox")
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=chromium_args, headless=True)
                page = browser.new_page(viewport={"width": 1200, "height": 1000})
                page.goto(service.url + "/")
                page.wait_for_function("document.body.dataset.state === 'idle'")
                for part in (*MODALITIES, "seg"):
                    page.set_input_files(f"#file-{'label' if part == 'seg' else part}",
                                         str(next(case.glob(f"{case.name}_{part}.nii*"))))
                page.click("#segment")
                page.wait_for_function("['done', 'error'].includes(document.body.dataset.state)", timeout=300_000)
                if page.evaluate("document.body.dataset.state") != "done":
                    print(f"error: {page.locator('#problem').inner_text()}", file=sys.stderr)
                    return 1
                page.wait_for_timeout(1000)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), full_page=True)
                browser.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
