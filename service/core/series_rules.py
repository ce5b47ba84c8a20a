"""Which MR series of a study is FLAIR, T1, T1ce and T2: rules on ``SeriesDescription`` and ``ProtocolName``.

A rule is a list of regular expressions per modality (case-insensitive, searched in the description, then in
the protocol name), tried in the order FLAIR, T1ce, T2, T1 (so that "T2 FLAIR" is FLAIR and "T1 POST GD" is
T1ce), and a list of patterns that exclude a series altogether (localisers, diffusion, perfusion, derived
maps). The defaults work on common names out of the box; ``BRATS_SERIES_RULES`` can point at a JSON file
``{"flair": [...], "t1ce": [...], "t2": [...], "t1": [...], "exclude": [...]}`` that replaces them (keys left
out keep their defaults).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from service.core.dicom_series import DicomInputError, Series
from service.core.labels import MODALITIES

__all__ = ["DEFAULT_RULES", "SeriesRules", "load_rules", "select_series"]

ORDER = ("flair", "t1ce", "t2", "t1")
"""The order rules are tried in: the more specific names first."""

_S, _E = r"(?<![a-z0-9])", r"(?![a-z0-9])"  # word edges where "_" separates words too (Siemens names)

DEFAULT_RULES: dict[str, list[str]] = {
    "flair": ["flair", "dark[ _-]?fluid", _S + "t2[ _-]?fl" + _E],
    "t1ce": [_S + "t1[ _-]?ce?" + _E, "post", r"\+ ?c" + _E, _S + "gd" + _E, "gado", _S + "gad" + _E, "contrast",
             _S + "ce" + _E, _S + "enh"],
    "t2": [_S + "t2"],
    "t1": [_S + "t1", "mprage", _S + "spgr" + _E, _S + "bravo" + _E],
    "exclude": ["locali[sz]er", _S + "scout" + _E, "survey", _S + "dwi" + _E, "diffusion", _S + "adc" + _E,
                _S + "trace" + _E, "perfusion", _S + "dsc" + _E, _S + "dce" + _E, _S + "swi" + _E, "subtract",
                _S + "mip" + _E, "calibration", _S + "map" + _E],
}


@dataclass(frozen=True)
class SeriesRules:
    """Compiled rules: patterns per modality and the exclusions."""

    patterns: dict[str, tuple[re.Pattern, ...]]
    exclude: tuple[re.Pattern, ...]

    @classmethod
    def from_dict(cls, rules: dict[str, list[str]]) -> SeriesRules:
        unknown = set(rules) - {*ORDER, "exclude"}
        if unknown:
            raise ValueError(f"series rules: unknown keys {sorted(unknown)}; expected {', '.join((*ORDER, 'exclude'))}")
        merged = {**DEFAULT_RULES, **rules}
        try:
            compiled = {key: tuple(re.compile(p, re.IGNORECASE) for p in merged[key]) for key in (*ORDER, "exclude")}
        except (re.error, TypeError) as err:
            raise ValueError(f"series rules: a pattern is not a valid regular expression ({err})") from None
        return cls({key: compiled[key] for key in ORDER}, compiled["exclude"])

    def modality_of(self, series: Series) -> str | None:
        """The modality the series is, or ``None`` (excluded, not MR, or no rule matches)."""
        if series.modality and series.modality != "MR":
            return None
        texts = [t for t in (series.description, series.protocol) if t]
        if any(p.search(t) for p in self.exclude for t in texts):
            return None
        for text in texts:
            for modality in ORDER:
                if any(p.search(text) for p in self.patterns[modality]):
                    return modality
        return None


def load_rules(path: str | Path | None) -> SeriesRules:
    """The rules of the JSON file ``path``, or the defaults when ``None``.

    Raises:
        ValueError: the file cannot be read, is not a JSON object of lists of strings, or holds a bad pattern.
    """
    if path is None:
        return SeriesRules.from_dict({})
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"series rules {path}: cannot be read as JSON ({err})") from None
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and all(isinstance(p, str) for p in v) for v in data.values()
    ):
        raise ValueError(f"series rules {path}: expected a JSON object of lists of patterns, e.g. "
                         '{"t1ce": ["post", "gd"]}')
    return SeriesRules.from_dict(data)


def select_series(series: list[Series], rules: SeriesRules) -> dict[str, Series]:
    """One series per modality (in ``MODALITIES`` order).

    Raises:
        DicomInputError: 422 when a modality has no series or several, naming the series found and what each
            was taken for; 400 when no series is MR.
    """
    if not any(s.modality in ("MR", "") for s in series):
        found = ", ".join(sorted({s.modality or "?" for s in series}))
        raise DicomInputError(f"no MR series was sent (modalities found: {found}); send the study's MR series")
    matched: dict[str, list[Series]] = {m: [] for m in MODALITIES}
    taken: list[str] = []
    for s in series:
        modality = rules.modality_of(s)
        taken.append(f"{s.label} -> {modality or 'not used'}")
        if modality is not None:
            matched[modality].append(s)
    missing = [m for m in MODALITIES if not matched[m]]
    ambiguous = [m for m in MODALITIES if len(matched[m]) > 1]
    if missing or ambiguous:
        problems = ([f"no series for {', '.join(missing)}"] if missing else []) + [
            f"{len(matched[m])} series for {m} ({', '.join(s.label for s in matched[m])})" for m in ambiguous]
        raise DicomInputError(
            f"{'; '.join(problems)}. Series found: {'; '.join(taken)}. Send one series per modality, or set "
            "BRATS_SERIES_RULES to a JSON file of rules that tells them apart",
            422,
        )
    return {m: matched[m][0] for m in MODALITIES}
