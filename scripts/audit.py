#!/usr/bin/env python3
"""Decide on a pip-audit JSON report: fail on a known vulnerability that has a fix, warn about the rest.

``make audit`` runs ``pip-audit --no-deps --disable-pip --format json`` over the lock files and hands the report
to this script, which

- exits 1 and lists package, version, vulnerability id (with its aliases) and the fixed versions for every
  known vulnerability that has a fix;
- prints a warning for each vulnerability without a fix (there is nothing to upgrade to; exit 0);
- says in one line when packages could not be checked at all (pip-audit lists them with a ``skip_reason``,
  for example when its vulnerability service does not know them or cannot be reached):
  ``dependency audit incomplete: N of M packages could not be checked: REASON``. That is not a pass: the
  line says so, and ``--strict`` turns it into exit 1;
- exits 2 when a report is missing or is not a pip-audit JSON report.

Standard library only, so that it runs with any Python.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_BAD_REPORT = 2

# pip-audit ends a skip reason with the package, e.g. "Dependency not found on PyPI and could not be
# audited: numpy (2.4.6)"; without it the reasons of different packages read the same and can be counted.
_PACKAGE_SUFFIX = re.compile(r":\s*[A-Za-z0-9._-]+\s*\([^()]*\)\s*$")


class ReportError(Exception):
    """A report that cannot be read as pip-audit's JSON output."""


@dataclass(frozen=True)
class Vulnerability:
    package: str
    version: str
    id: str
    fix_versions: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    description: str = ""

    def describe(self) -> str:
        ids = self.id + (f" ({', '.join(self.aliases)})" if self.aliases else "")
        text = f"{self.package} {self.version}: {ids}"
        if self.fix_versions:
            text += f"; fixed in {', '.join(self.fix_versions)}"
        if self.description:
            summary = " ".join(self.description.split())
            text += f": {summary[:157] + '...' if len(summary) > 160 else summary}"
        return text


@dataclass
class Audit:
    """What a set of pip-audit reports say, packages counted once by name (and version)."""

    audited: set[tuple[str, str]] = field(default_factory=set)
    skipped: dict[str, str] = field(default_factory=dict)  # package name -> skip reason
    vulnerabilities: list[Vulnerability] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len({name for name, _ in self.audited} | set(self.skipped))

    @property
    def unchecked(self) -> dict[str, str]:
        """Skipped packages that no report audited either (name -> skip reason)."""
        names = {name for name, _ in self.audited}
        return {name: reason for name, reason in self.skipped.items() if name not in names}

    @property
    def fixable(self) -> list[Vulnerability]:
        return [v for v in self.vulnerabilities if v.fix_versions]

    @property
    def unfixable(self) -> list[Vulnerability]:
        return [v for v in self.vulnerabilities if not v.fix_versions]

    def skip_summary(self) -> str:
        """The skip reasons without package names, most common first, each with its count when they differ."""
        reasons = Counter(
            _PACKAGE_SUFFIX.sub("", reason).strip() or "no reason given" for reason in self.unchecked.values()
        )
        if len(reasons) == 1:
            return next(iter(reasons))
        return "; ".join(f"{reason} ({count})" for reason, count in reasons.most_common())


def _strings(value: object, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ReportError(f"{what} should be a list of strings, got {value!r}")
    return tuple(value)


def read_report(path: Path, audit: Audit) -> None:
    """Add the dependencies of one pip-audit JSON report (``-`` reads standard input) to ``audit``."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except OSError as err:
        raise ReportError(f"cannot read {path}: {err.strerror or err} (did pip-audit run and finish?)") from None
    if not text.strip():
        raise ReportError(f"{path} is empty (did pip-audit run and finish?)")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise ReportError(f"{path} is not JSON ({err})") from None
    dependencies = document.get("dependencies") if isinstance(document, dict) else None
    if not isinstance(dependencies, list):
        raise ReportError(f"{path} is not a pip-audit JSON report (no \"dependencies\" list)")
    for index, dep in enumerate(dependencies):
        if not isinstance(dep, dict) or not isinstance(dep.get("name"), str):
            raise ReportError(f"{path}: dependency #{index} has no name")
        name = dep["name"]
        if "skip_reason" in dep:
            audit.skipped.setdefault(name, str(dep["skip_reason"]))
            continue
        version, vulns = dep.get("version"), dep.get("vulns")
        if not isinstance(version, str) or not isinstance(vulns, list):
            raise ReportError(f"{path}: dependency {name} has neither a skip_reason nor a version and vulns")
        if (name, version) in audit.audited:
            continue
        audit.audited.add((name, version))
        for vuln in vulns:
            if not isinstance(vuln, dict) or not isinstance(vuln.get("id"), str):
                raise ReportError(f"{path}: a vulnerability of {name} {version} has no id")
            audit.vulnerabilities.append(
                Vulnerability(
                    package=name,
                    version=version,
                    id=vuln["id"],
                    fix_versions=_strings(vuln.get("fix_versions"), f"fix_versions of {vuln['id']}"),
                    aliases=_strings(vuln.get("aliases"), f"aliases of {vuln['id']}"),
                    description=str(vuln.get("description") or ""),
                )
            )


def decide(audit: Audit, *, strict: bool, out=sys.stdout, err=sys.stderr) -> int:
    """Print the verdict on ``audit`` and return the exit status."""
    for vuln in audit.unfixable:
        print(f"warning: {vuln.describe()} (no fixed version yet)", file=err)
    unchecked = len(audit.unchecked)
    if unchecked:
        line = (
            f"dependency audit incomplete: {unchecked} of {audit.total} packages could not be checked: "
            f"{audit.skip_summary()}"
        )
        if unchecked == audit.total:
            line += " (nothing was checked: can the vulnerability service be reached from here?)"
        print(line, file=err)
    if audit.fixable:
        print(f"{len(audit.fixable)} known vulnerabilities with a fix; upgrade (make lock) past them:", file=err)
        for vuln in audit.fixable:
            print(f"  {vuln.describe()}", file=err)
        return EXIT_FAIL
    checked = audit.total - unchecked
    without_fix = f" ({len(audit.unfixable)} without a fix, listed above)" if audit.unfixable else ""
    if unchecked:
        if checked:
            print(f"the {checked} packages that were checked have no known vulnerability with a fix{without_fix}",
                  file=out)
        if strict:
            print("failing: --strict needs every package checked", file=err)
            return EXIT_FAIL
        return EXIT_OK
    print(f"dependency audit passed: {checked} packages checked, no known vulnerability with a fix{without_fix}",
          file=out)
    return EXIT_OK


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/audit.py",
        description="Read pip-audit JSON reports (pip-audit --format json) and decide: exit 1 on a known "
        "vulnerability that has a fix, warn about vulnerabilities without one, and say in one line when "
        "packages could not be checked at all.",
        epilog="Exit status: 0 no fixable vulnerability (the audit may be incomplete: see the output); "
        "1 a fixable vulnerability, or an incomplete audit with --strict; 2 a missing or unreadable report.",
    )
    parser.add_argument("reports", nargs="+", type=Path, metavar="REPORT",
                        help="pip-audit JSON report ('-' for standard input); several are merged")
    parser.add_argument("--strict", action="store_true",
                        help="fail (exit 1) when any package could not be checked")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    audit = Audit()
    try:
        for path in args.reports:
            read_report(path, audit)
    except ReportError as error:
        print(f"dependency audit failed: {error}", file=sys.stderr)
        return EXIT_BAD_REPORT
    return decide(audit, strict=args.strict)


if __name__ == "__main__":
    sys.exit(main())
