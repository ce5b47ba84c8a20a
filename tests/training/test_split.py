"""The train/validation split: deterministic, stratified by case kind when the cache knows the kinds."""

from __future__ import annotations

from collections import Counter

import pytest

from training.data.manifest import CACHE_KINDS, read_cache_kinds, write_cache_kinds
from training.data.split import split_cases

SHARES = {"hgg_necrotic": 6, "solid_enhancing": 2, "lgg": 4, "multifocal": 2, "small": 2, "large": 2,
          "tumour_free": 2}


def cohort(blocks: int = 4) -> dict[str, str]:
    kinds, n = {}, 0
    for _ in range(blocks):
        for kind, count in SHARES.items():
            for _ in range(count):
                n += 1
                kinds[f"case{n:03d}"] = kind
    return kinds


def test_every_kind_in_validation_in_its_share():
    kinds = cohort()
    train, val = split_cases(list(kinds), 0.125, seed=0, kinds=kinds)
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == sorted(kinds)
    assert Counter(kinds[c] for c in val) == {"hgg_necrotic": 3, "lgg": 2, "solid_enhancing": 1, "multifocal": 1,
                                              "small": 1, "large": 1, "tumour_free": 1}


def test_deterministic_and_seeded():
    kinds = cohort()
    assert split_cases(list(kinds), 0.125, 3, kinds) == split_cases(list(reversed(kinds)), 0.125, 3, kinds)
    assert split_cases(list(kinds), 0.125, 3, kinds)[1] != split_cases(list(kinds), 0.125, 4, kinds)[1]


def test_remainders_go_to_the_largest_shares():
    kinds = {**{f"a{i}": "a" for i in range(5)}, **{f"b{i}": "b" for i in range(3)}, **{f"c{i}": "c" for i in range(2)}}
    _, val = split_cases(list(kinds), 0.3, seed=1, kinds=kinds)  # 3 of 10: quotas 1.5 / 0.9 / 0.6
    assert Counter(kinds[c] for c in val) == {"a": 1, "b": 1, "c": 1}


def test_without_kinds_the_split_is_the_plain_one():
    ids = [f"case{i:03d}" for i in range(40)]
    assert split_cases(ids, 0.2, 7) == split_cases(ids, 0.2, 7, kinds={}) == split_cases(ids, 0.2, 7, {"x": "y"})
    train, val = split_cases(ids, 0.2, 7)
    assert len(val) == 8 and sorted(train + val) == ids


def test_kinds_travel_into_the_cache(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "name_mapping.csv").write_text("Grade,BraTS_2020_subject_ID,Kind\nHGG,c1,large\nLGG,c2,lgg\n")
    cache = tmp_path / "cache"
    cache.mkdir()
    assert write_cache_kinds(data, cache) == {"c1": "large", "c2": "lgg"}
    assert read_cache_kinds(cache) == {"c1": "large", "c2": "lgg"}
    (data / "name_mapping.csv").unlink()
    assert write_cache_kinds(data, cache) == {} and not (cache / CACHE_KINDS).exists()
    assert read_cache_kinds(cache) == {}


def test_a_case_named_like_the_kinds_file_is_refused(tmp_path):
    from service.core.datasets import Case, DataError
    from training.data.cache import preprocess_dataset

    case = Case(case_id="kinds", image4d=tmp_path / "kinds.nii.gz")
    with pytest.raises(DataError, match="clash with the cache's own files"):
        preprocess_dataset([case], tmp_path / "cache", progress=False)
