"""Telling FLAIR, T1, T1ce and T2 series apart by their descriptions, and replacing the rules."""

from __future__ import annotations

import json

import pytest

from service.core.dicom_series import DicomInputError, Series
from service.core.series_rules import SeriesRules, load_rules, select_series

RULES = load_rules(None)


def series(description: str, modality: str = "MR", protocol: str = "", number: int = 1) -> Series:
    return Series(uid=f"uid-{description}", description=description, protocol=protocol, modality=modality,
                  study_uid="s", frame_of_reference_uid="f", number=number)


@pytest.mark.parametrize("description, modality", [
    ("AX FLAIR", "flair"), ("T2 FLAIR AXIAL", "flair"), ("t2_tirm_tra_dark-fluid", "flair"), ("Ax T2 FL", "flair"),
    ("AX T1 POST GD", "t1ce"), ("T1C", "t1ce"), ("T1CE", "t1ce"), ("t1_mprage_post", "t1ce"), ("AX T1 +C", "t1ce"),
    ("T1 GAD", "t1ce"), ("T1 contrast", "t1ce"), ("T1-CE", "t1ce"),
    ("AX T2 FSE", "t2"), ("t2_tse_tra", "t2"), ("T2W", "t2"),
    ("AX T1 SE", "t1"), ("t1_mprage_sag", "t1"), ("T1W", "t1"), ("SAG SPGR", "t1"),
    ("3-plane localizer", None), ("DWI b1000", None), ("ADC", None), ("Perfusion DSC", None), ("", None),
    ("MPRAGE", "t1"), ("T2 map", None),
])
def test_common_names(description, modality):
    assert RULES.modality_of(series(description)) == modality


def test_protocol_name_when_the_description_says_nothing():
    assert RULES.modality_of(series("Series 5", protocol="AX T2 FSE")) == "t2"


def test_non_mr_series_are_never_used():
    assert RULES.modality_of(series("AX FLAIR", modality="SEG")) is None


def test_rules_file_replaces_the_keys_it_holds(tmp_path):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"t1ce": [r"^VIBE$"]}))
    rules = load_rules(path)
    assert rules.modality_of(series("VIBE")) == "t1ce"
    assert rules.modality_of(series("AX T1 POST GD")) == "t1"  # "post" is no longer a T1ce pattern here
    assert rules.modality_of(series("AX FLAIR")) == "flair"  # other keys keep their defaults


@pytest.mark.parametrize("content, says", [
    ("not json", "cannot be read as JSON"), ('{"t1ce": "post"}', "lists of patterns"),
    ('{"t3": ["x"]}', "unknown keys"), ('{"t2": ["("]}', "not a valid regular expression"),
])
def test_bad_rules_files(tmp_path, content, says):
    path = tmp_path / "rules.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=says):
        load_rules(path)


def test_a_bad_rules_file_stops_the_settings(tmp_path):
    from pydantic import ValidationError

    from service.settings import Settings

    path = tmp_path / "rules.json"
    path.write_text('{"t2": ["("]}')
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        Settings(series_rules=path)


def test_select_one_per_modality():
    found = [series("AX T1 SE"), series("AX FLAIR"), series("localizer"), series("AX T2 FSE"), series("T1 POST GD")]
    chosen = select_series(found, RULES)
    assert {m: s.description for m, s in chosen.items()} == {
        "flair": "AX FLAIR", "t1": "AX T1 SE", "t1ce": "T1 POST GD", "t2": "AX T2 FSE"}


def test_missing_and_ambiguous_are_422_naming_the_series():
    found = [series("AX T1 SE", number=1), series("AX FLAIR", number=2), series("AX T2", number=3),
             series("T2 COR", number=4)]
    with pytest.raises(DicomInputError) as err:
        select_series(found, RULES)
    assert err.value.status == 422
    assert "no series for t1ce" in err.value.reason and "2 series for t2" in err.value.reason
    assert "'AX T2' (series 3)" in err.value.reason and "'localizer'" not in err.value.reason


def test_only_non_mr_series_is_400():
    with pytest.raises(DicomInputError, match="no MR series") as err:
        select_series([series("CT HEAD", modality="CT")], RULES)
    assert err.value.status == 400
