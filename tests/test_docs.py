"""The pages people read say what the code does: the settings reference, the model tables, the links."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def _documented_variables() -> set[str]:
    table = (ROOT / "docs" / "service.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| `BRATS_")]
    return {name for row in rows for name in re.findall(r"`(BRATS_[A-Z0-9_]+)`", row.split("|")[1])}


def test_every_setting_is_documented_and_nothing_else():
    fields = {f"BRATS_{name.upper()}" for name in Settings.model_fields}
    assert _documented_variables() == fields


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_documented_default_is_the_code_default(name):
    """Each row of a plain default (a number, true/false, a word) shows the value the code starts with."""
    default = Settings.model_fields[name].default
    if default is None or not isinstance(default, (bool, int, float, str)):
        pytest.skip(f"{name}: its default is described in words")
    rows = [r for r in (ROOT / "docs" / "service.md").read_text().splitlines() if f"`BRATS_{name.upper()}`" in r]
    shown = rows[0].split("|")[2]
    text = str(default).lower() if isinstance(default, bool) else f"{default:g}" if isinstance(default, float) else str(default)
    assert f"`{text}`" in shown, (name, default, shown)


def test_model_tables_match_the_shipped_cards():
    out = subprocess.run(
        [sys.executable, "scripts/models_table.py", "unet=models/unet.json", "resunet=models/resunet.json"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    page = (ROOT / "docs" / "models.md").read_text().splitlines()
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert rows and all(row in page for row in rows), [row for row in rows if row not in page]


@pytest.mark.parametrize("page", ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_resolve(page):
    path = ROOT / page
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
        assert (path.parent / target).exists(), f"{page} links to {target}, which does not exist"
