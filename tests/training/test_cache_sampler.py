"""Preprocessing cache (crop + z-score to .npy, atomic, skip when unchanged) and the patch sampler."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from service.core.datasets import DataError, find_cases, load_case
from service.core.preprocess import Preprocessed, preprocess
from tests.core.test_datasets import make_brats_case
from training.data import cache as cache_module
from training.data.cache import CachedCase, load_cached, preprocess_dataset
from training.data.sampler import PatchSampler

FULL = (10, 9, 8)
BOX = (slice(2, 8), slice(1, 7), slice(3, 8))  # the brain block inside FULL


def brain_image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.zeros((4, *FULL), dtype=np.float32)
    image[(slice(None), *BOX)] = rng.uniform(50, 150, size=(4, 6, 6, 5))
    return image


def tumour_label() -> np.ndarray:
    seg = np.zeros(FULL, dtype=np.uint8)
    seg[3:6, 2:5, 4:7] = 2
    seg[4, 3, 5] = 4
    seg[4, 3, 4] = 1
    return seg


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "MICCAI_BraTS2020_TrainingData"
    make_brats_case(root, "BraTS20_Training_001", image=brain_image(1), seg=tumour_label())
    make_brats_case(root, "BraTS20_Training_002", image=brain_image(2), seg=tumour_label(), ext=".nii")
    make_brats_case(tmp_path / "MICCAI_BraTS2020_ValidationData", "BraTS20_Validation_001",
                    image=brain_image(3), seg_name=None)
    return tmp_path


class TestPreprocessDataset:
    def test_writes_cropped_zscored_arrays_and_metadata(self, dataset: Path, tmp_path: Path):
        cases = find_cases(dataset)
        cache = tmp_path / "cache"
        paths = preprocess_dataset(cases, cache, progress=False)
        assert [p.name for p in paths] == [f"{c.case_id}.json" for c in cases]

        image, label, _ = load_case(cases[0])
        expected = preprocess(image)
        cached = np.load(cache / "BraTS20_Training_001_image.npy")
        assert cached.dtype == np.float16 and cached.shape == (4, 6, 6, 5)
        np.testing.assert_allclose(cached.astype(np.float32), expected.data, atol=2e-3)
        cached_label = np.load(cache / "BraTS20_Training_001_label.npy")
        assert cached_label.dtype == np.uint8
        np.testing.assert_array_equal(cached_label, label[BOX])

        meta = json.loads(paths[0].read_text())
        assert meta["case_id"] == "BraTS20_Training_001"
        assert meta["bbox"] == [[2, 8], [1, 7], [3, 8]]
        assert meta["full_shape"] == list(FULL) and meta["cropped_shape"] == [6, 6, 5]
        assert meta["spacing"] == [1.0, 1.0, 1.0]
        assert meta["label_counts"] == {"0": 180 - 27, "1": 1, "2": 25, "4": 1}
        assert [s["name"] for s in meta["source"]][-1] == "BraTS20_Training_001_seg.nii.gz"
        assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary files left

    def test_validation_case_is_cached_without_label(self, dataset: Path, tmp_path: Path):
        preprocess_dataset(find_cases(dataset), tmp_path / "cache", progress=False)
        (case,) = load_cached(tmp_path / "cache", ["BraTS20_Validation_001"])
        assert case.label is None and case.locations == {}
        assert not (tmp_path / "cache" / "BraTS20_Validation_001_label.npy").exists()

    def test_locations_point_at_their_labels_and_are_capped(self, dataset: Path, tmp_path: Path):
        cases = find_cases(dataset)[:1]
        preprocess_dataset(cases, tmp_path / "cache", progress=False, max_locations=4)
        (case,) = load_cached(tmp_path / "cache")
        assert sorted(case.locations) == [1, 2, 4]
        assert len(case.locations[2]) == 4 and len(case.locations[1]) == 1
        for value, coords in case.locations.items():
            assert coords.dtype == np.int32 and coords.shape[1] == 3
            assert np.all(case.label[tuple(coords.T)] == value)
        np.testing.assert_array_equal(case.locations[4], [[4 - 2, 3 - 1, 5 - 3]])

    def test_unchanged_cases_are_skipped_and_changed_ones_redone(self, dataset: Path, tmp_path: Path):
        cases = find_cases(dataset)[:2]
        cache = tmp_path / "cache"
        preprocess_dataset(cases, cache, progress=False)
        first = cache / "BraTS20_Training_001_image.npy"
        second = cache / "BraTS20_Training_002_image.npy"
        os.utime(first, ns=(1, 1))  # mark the outputs, to see which get rewritten
        os.utime(second, ns=(1, 1))
        preprocess_dataset(cases, cache, progress=False)
        assert first.stat().st_mtime_ns == 1 and second.stat().st_mtime_ns == 1

        src = cases[1].images["t2"]
        st = src.stat()
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        preprocess_dataset(cases, cache, progress=False)
        assert first.stat().st_mtime_ns == 1
        assert second.stat().st_mtime_ns != 1

    def test_changing_dtype_redoes_the_case(self, dataset: Path, tmp_path: Path):
        cases = find_cases(dataset)[:1]
        preprocess_dataset(cases, tmp_path / "cache", progress=False)
        preprocess_dataset(cases, tmp_path / "cache", progress=False, dtype="float32")
        assert np.load(tmp_path / "cache" / "BraTS20_Training_001_image.npy").dtype == np.float32

    def test_two_workers_give_the_same_files(self, dataset: Path, tmp_path: Path):
        cases = find_cases(dataset)
        preprocess_dataset(cases, tmp_path / "one", progress=False)
        preprocess_dataset(cases, tmp_path / "two", progress=False, workers=2)
        for case in cases:
            for suffix in ("_image.npy", "_locations.npz"):
                a = (tmp_path / "one" / f"{case.case_id}{suffix}").read_bytes()
                b = (tmp_path / "two" / f"{case.case_id}{suffix}").read_bytes()
                assert a == b

    def test_bad_case_names_case_and_file(self, dataset: Path, tmp_path: Path):
        cases = find_cases(dataset)
        cases[0].images["t1"].write_bytes(b"garbage")
        with pytest.raises(DataError, match=r"BraTS20_Training_001: not a NIfTI.*_t1\.nii\.gz"):
            preprocess_dataset(cases, tmp_path / "cache", progress=False)

    def test_failed_run_leaves_a_cache_that_asks_for_preprocess(self, dataset: Path, tmp_path: Path):
        cases = find_cases(dataset)
        preprocess_dataset(cases, tmp_path / "cache", progress=False)
        cases[1].images["t1"].write_bytes(b"garbage")
        with pytest.raises(DataError, match="BraTS20_Training_002: not a NIfTI"):
            preprocess_dataset(cases, tmp_path / "cache", progress=False)
        with pytest.raises(DataError, match=r"no cached cases .*did not finish.*python -m training preprocess DATA"):
            load_cached(tmp_path / "cache")

    def test_float16_overflow_tells_what_to_do(self, dataset: Path, tmp_path: Path, monkeypatch):
        def huge(image):
            box = (slice(0, 2),) * 3
            return Preprocessed(data=np.full((4, 2, 2, 2), 1e6, np.float32), bbox=box, full_shape=image.shape[1:])

        monkeypatch.setattr(cache_module, "preprocess", huge)
        with pytest.raises(DataError, match=r"BraTS20_Training_001: .*float16.*python -m training preprocess DATA"):
            preprocess_dataset(find_cases(dataset)[:1], tmp_path / "cache", progress=False)

    def test_reused_cache_holds_only_the_last_dataset(self, dataset: Path, tmp_path: Path):
        cache = tmp_path / "cache"
        preprocess_dataset(find_cases(dataset), cache, progress=False)
        other = tmp_path / "other" / "MICCAI_BraTS2020_TrainingData"
        make_brats_case(other, "BraTS20_Training_001", image=brain_image(7), seg=tumour_label())
        make_brats_case(other, "BraTS20_Training_003", image=brain_image(8), seg=tumour_label())
        b_cases = find_cases(other)
        preprocess_dataset(b_cases, cache, progress=False)
        loaded = load_cached(cache)
        assert [c.case_id for c in loaded] == ["BraTS20_Training_001", "BraTS20_Training_003"]
        np.testing.assert_allclose(loaded[0].image, preprocess(load_case(b_cases[0])[0]).data, atol=2e-3)
        assert json.loads((cache / "cases.json").read_text())["cases"] == [c.case_id for c in b_cases]
        with pytest.raises(DataError, match=r"not cached .*BraTS20_Training_002"):
            load_cached(cache, ["BraTS20_Training_002"])  # its files are still there, but from an earlier run

    def test_case_id_that_would_overwrite_the_index(self, dataset: Path, tmp_path: Path):
        case = find_cases(dataset)[0]
        clash = type(case)(case_id="cases", images=case.images, label=case.label)
        with pytest.raises(DataError, match="clash with the cache's own files"):
            preprocess_dataset([clash], tmp_path / "cache", progress=False)

    def test_repeated_case_ids(self, dataset: Path, tmp_path: Path):
        case = find_cases(dataset)[0]
        with pytest.raises(DataError, match="repeated"):
            preprocess_dataset([case, case], tmp_path / "cache", progress=False)


class TestLoadCached:
    def test_memory_mapped_and_selected(self, dataset: Path, tmp_path: Path):
        preprocess_dataset(find_cases(dataset), tmp_path / "cache", progress=False)
        (tmp_path / "cache" / "SYNTHETIC.json").write_text('{"synthetic": true}')  # a provenance marker
        cases = load_cached(tmp_path / "cache")
        assert [c.case_id for c in cases] == ["BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Validation_001"]
        assert isinstance(cases[0].image, np.memmap) and isinstance(cases[0].label, np.memmap)
        assert not cases[0].image.flags.writeable
        assert cases[0].shape == (6, 6, 5) and cases[0].bbox == BOX and cases[0].spacing == (1.0, 1.0, 1.0)
        chosen = load_cached(tmp_path / "cache", ["BraTS20_Training_002"])
        assert [c.case_id for c in chosen] == ["BraTS20_Training_002"]

    def test_errors(self, dataset: Path, tmp_path: Path):
        with pytest.raises(DataError, match="does not exist"):
            load_cached(tmp_path / "missing")
        (tmp_path / "empty").mkdir()
        with pytest.raises(DataError, match=r"no cached cases .*python -m training preprocess DATA CACHE"):
            load_cached(tmp_path / "empty")
        preprocess_dataset(find_cases(dataset)[:1], tmp_path / "cache", progress=False)
        with pytest.raises(DataError, match=r"not cached .*BraTS20_Training_002"):
            load_cached(tmp_path / "cache", ["BraTS20_Training_002"])
        (tmp_path / "cache" / "BraTS20_Training_001_label.npy").unlink()
        with pytest.raises(DataError, match="BraTS20_Training_001: incomplete cache.*python -m training preprocess"):
            load_cached(tmp_path / "cache")
        (tmp_path / "cache" / "cases.json").write_text('{"format": 0, "cases": []}')
        with pytest.raises(DataError, match=r"not a cache index of format 1; run `python -m training preprocess"):
            load_cached(tmp_path / "cache")


def synthetic_case(shape=(20, 20, 20), tumour=((10, 10, 10),), case_id="c") -> CachedCase:
    """A case whose image channel 0 equals its label, so image/label alignment is checkable everywhere."""
    label = np.zeros(shape, dtype=np.uint8)
    for i, voxel in enumerate(tumour):
        label[voxel] = (4, 1, 2)[i % 3]
    image = np.stack([label.astype(np.float16), np.ones(shape, np.float16), -np.ones(shape, np.float16),
                      np.full(shape, 2, np.float16)])
    locations = {}
    for value in (1, 2, 4):
        coords = np.argwhere(label == value).astype(np.int32)
        if len(coords):
            locations[value] = coords
    return CachedCase(case_id=case_id, image=image, label=label, locations=locations, meta={})


class TestPatchSampler:
    def test_shapes_dtypes_and_alignment_3d(self):
        sampler = PatchSampler([synthetic_case()], patch_size=(8, 6, 4), seed=0)
        for _ in range(20):
            image, label = sampler.sample()
            assert image.shape == (4, 8, 6, 4) and image.dtype == np.float32
            assert label.shape == (8, 6, 4) and label.dtype == np.uint8
            np.testing.assert_array_equal(image[0], label)
            assert np.all(image[1] == 1)  # inside the case, no padding

    def test_foreground_patch_is_centred_on_the_tumour_voxel(self):
        sampler = PatchSampler([synthetic_case()], patch_size=(8, 8, 8), foreground_fraction=1.0, seed=1)
        for _ in range(5):
            _, label = sampler.sample()
            assert label[4, 4, 4] == 4 and np.count_nonzero(label) == 1

    def test_foreground_fraction(self):
        case = synthetic_case(shape=(40, 40, 40), tumour=((20, 20, 20),))
        never = PatchSampler([case], patch_size=(8, 8, 8), foreground_fraction=0.0, seed=2)
        hits_never = sum(bool(never.sample()[1].any()) for _ in range(200))
        third = PatchSampler([case], patch_size=(8, 8, 8), seed=2)
        hits_third = sum(bool(third.sample()[1].any()) for _ in range(300))
        assert hits_never < 10  # uniform patches rarely cover the single voxel (8^3 / 33^3 of starts)
        assert 70 <= hits_third <= 140  # about 1/3 of 300, plus the few uniform hits

    def test_every_present_label_gets_picked(self):
        case = synthetic_case(tumour=((5, 5, 5), (10, 10, 10), (15, 15, 15)))  # labels 4, 1, 2
        sampler = PatchSampler([case], patch_size=(4, 4, 4), foreground_fraction=1.0, seed=3)
        centres = {int(sampler.sample()[1][2, 2, 2]) for _ in range(30)}
        assert centres == {1, 2, 4}

    def test_small_case_is_padded_with_zeros(self):
        case = synthetic_case(shape=(5, 6, 3), tumour=((2, 3, 1),))
        sampler = PatchSampler([case], patch_size=(8, 8, 8), seed=4)
        offsets = set()
        for _ in range(10):
            image, label = sampler.sample()
            offsets.add(tuple(np.argwhere(image[1])[0]))
            assert image.shape == (4, 8, 8, 8)
            assert int(image[1].sum()) == 5 * 6 * 3  # the whole case, once, padding 0
            assert image[3].sum() == 2 * 5 * 6 * 3
            assert np.count_nonzero(label) == 1
            np.testing.assert_array_equal(image[0], label)
        assert len(offsets) > 1  # placed at a random offset inside the patch

    def test_2d_patches_are_axial_slices(self):
        sampler = PatchSampler([synthetic_case()], patch_size=(8, 6), foreground_fraction=1.0, seed=5)
        image, label = sampler.sample()
        assert image.shape == (4, 8, 6) and label.shape == (8, 6)
        assert label[4, 3] == 4
        np.testing.assert_array_equal(image[0], label)

    def test_deterministic_with_seed(self):
        cases = [synthetic_case(case_id="a"), synthetic_case(tumour=((3, 4, 5),), case_id="b")]

        def draw(seed):
            sampler = PatchSampler(cases, patch_size=(6, 6, 6), seed=seed)
            pairs = [sampler.sample() for _ in range(6)]
            return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

        a, b, c = draw(7), draw(7), draw(8)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert not np.array_equal(a[0], c[0])

    def test_from_the_real_cache(self, dataset: Path, tmp_path: Path):
        preprocess_dataset(find_cases(dataset), tmp_path / "cache", progress=False)
        cases = [c for c in load_cached(tmp_path / "cache") if c.label is not None]
        sampler = PatchSampler(cases, patch_size=(4, 4, 4), foreground_fraction=1.0, seed=0)
        image, label = next(iter(sampler))
        assert image.dtype == np.float32 and label[2, 2, 2] in (1, 2, 4)

    def test_bad_arguments(self):
        case = synthetic_case()
        with pytest.raises(ValueError, match="at least one case"):
            PatchSampler([], patch_size=(4, 4, 4))
        with pytest.raises(ValueError, match="2 or 3 positive sizes"):
            PatchSampler([case], patch_size=(4,))
        with pytest.raises(ValueError, match=r"foreground_fraction must be in \[0, 1\]"):
            PatchSampler([case], patch_size=(4, 4, 4), foreground_fraction=1.5)
        unlabelled = CachedCase(case_id="u", image=case.image, label=None, locations={}, meta={})
        with pytest.raises(ValueError, match=r"no label: \['u'\]"):
            PatchSampler([unlabelled], patch_size=(4, 4, 4))
