"""``scripts/audit.py``: its verdict on pip-audit JSON reports (the format pip-audit 2.10 writes with
``--format json``), run as ``make audit`` runs it, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "audit.py"

UNREACHABLE = "Dependency not found on PyPI and could not be audited"


def audited(name: str, version: str, *vulns: dict) -> dict:
    return {"name": name, "version": version, "vulns": list(vulns)}


def skipped(name: str, version: str, reason: str = UNREACHABLE) -> dict:
    return {"name": name, "skip_reason": f"{reason}: {name} ({version})"}


def vuln(vid: str, fixes: list[str], *aliases: str, description: str = "A flaw.") -> dict:
    return {"id": vid, "fix_versions": fixes, "aliases": list(aliases), "description": description}


def run(tmp_path: Path, *dependencies: dict, args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"dependencies": list(dependencies), "fixes": []}))
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, str(report)], capture_output=True, text=True, timeout=60
    )


def test_fixable_vulnerability_fails_and_names_package_version_id_and_fix(tmp_path):
    done = run(
        tmp_path,
        audited("numpy", "2.4.6"),
        audited("urllib3", "1.26.0", vuln("GHSA-v845-jxx5-vc9f", ["1.26.18", "2.0.7"], "CVE-2023-43804")),
    )
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if "GHSA-v845-jxx5-vc9f" in line]
    assert len(lines) == 1
    assert "urllib3 1.26.0" in lines[0] and "CVE-2023-43804" in lines[0] and "1.26.18, 2.0.7" in lines[0]
    assert "numpy" not in done.stderr
    assert "passed" not in done.stdout + done.stderr


def test_fixable_vulnerability_fails_even_when_others_were_skipped(tmp_path):
    done = run(
        tmp_path,
        skipped("torch", "2.13.0"),
        audited("jinja2", "3.1.2", vuln("PYSEC-2024-1", ["3.1.3"])),
    )
    assert done.returncode == 1
    assert "jinja2 3.1.2: PYSEC-2024-1" in done.stderr and "fixed in 3.1.3" in done.stderr
    assert "dependency audit incomplete: 1 of 2 packages could not be checked" in done.stderr


def test_unfixable_only_passes_with_a_warning(tmp_path):
    done = run(tmp_path, audited("ecdsa", "0.19.1", vuln("GHSA-wj6h-64fc-37mp", [], "CVE-2024-23342")),
               audited("numpy", "2.4.6"))
    assert done.returncode == 0, done.stdout + done.stderr
    warning = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "ecdsa 0.19.1" in warning[0] and "GHSA-wj6h-64fc-37mp" in warning[0]
    assert "no fixed version" in warning[0]
    assert "dependency audit passed: 2 packages checked" in done.stdout


def test_clean_report_passes(tmp_path):
    done = run(tmp_path, audited("numpy", "2.4.6"), audited("scipy", "1.17.1"))
    assert done.returncode == 0
    assert done.stdout.strip() == "dependency audit passed: 2 packages checked, no known vulnerability with a fix"
    assert done.stderr == ""


def test_all_skipped_is_incomplete_not_a_pass(tmp_path):
    """What this project's network gives: the vulnerability service knows no package at all."""
    deps = [skipped("fastapi", "0.165.0"), skipped("numpy", "2.4.6"), skipped("torch", "2.13.0")]
    done = run(tmp_path, *deps)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("dependency audit incomplete:")]
    assert len(lines) == 1
    assert lines[0].startswith(f"dependency audit incomplete: 3 of 3 packages could not be checked: {UNREACHABLE}")
    assert "fastapi" not in lines[0]  # one reason for all, not one line per package
    assert "passed" not in done.stdout + done.stderr

    strict = run(tmp_path, *deps, args=("--strict",))
    assert strict.returncode == 1
    assert "dependency audit incomplete: 3 of 3 packages could not be checked" in strict.stderr


def test_partly_skipped_counts_and_groups_the_reasons(tmp_path):
    done = run(
        tmp_path,
        audited("numpy", "2.4.6"),
        skipped("torch", "2.13.0"),
        skipped("brats-tools", "0.1", reason="requirement marked as editable"),
    )
    assert done.returncode == 0
    line = next(line for line in done.stderr.splitlines() if line.startswith("dependency audit incomplete:"))
    assert line.startswith("dependency audit incomplete: 2 of 3 packages could not be checked: ")
    assert f"{UNREACHABLE} (1)" in line and "requirement marked as editable (1)" in line
    assert "the 1 packages that were checked have no known vulnerability with a fix" in done.stdout


def test_several_reports_are_merged(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"dependencies": [audited("numpy", "2.4.6")], "fixes": []}))
    second.write_text(json.dumps({"dependencies": [audited("numpy", "2.4.6"), audited("httpx", "0.28.1")],
                                  "fixes": []}))
    done = subprocess.run([sys.executable, str(SCRIPT), str(first), str(second)], capture_output=True, text=True)
    assert done.returncode == 0 and "2 packages checked" in done.stdout


@pytest.mark.parametrize(
    "content, message",
    [(None, "cannot read"), ("", "is empty"), ("{not json", "is not JSON"), ('{"vulns": []}', "not a pip-audit JSON")],
    ids=["missing", "empty", "not-json", "not-pip-audit"],
)
def test_missing_or_unreadable_report_is_an_error(tmp_path, content, message):
    report = tmp_path / "report.json"
    if content is not None:
        report.write_text(content)
    done = subprocess.run([sys.executable, str(SCRIPT), str(report)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("dependency audit failed:") and message in done.stderr


def test_help():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--strict" in done.stdout and "pip-audit" in done.stdout


def test_make_audit_runs_in_ci():
    steps = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make audit" in steps and steps.index("make audit") > steps.index("make test")
