"""Tests of the synthetic BraTS-like case generator (small grids: 60 x 60 x 39 voxels of 4 mm)."""

from __future__ import annotations

import json
import socket

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from service.core.labels import MODALITIES
from training.data import synthetic
from training.data.synthetic import anatomy, dataset
from training.data.provenance import MARKER, carry_marker, find_marker, is_synthetic_cache, mark_synthetic
from training.data.synthetic import (
    BRATS_DIR,
    MSD_DIR,
    NAME_MAPPING,
    case_seed,
    generate_dataset,
    grid_affine,
    make_case,
    synthesize,
)

SIZE = (60, 60, 39)
SPACING = (4.0, 4.0, 4.0)
FLAIR, T1, T1CE, T2 = (MODALITIES.index(m) for m in ("flair", "t1", "t1ce", "t2"))
CSF, GM, WM = 1, 2, 3  # synthetic.TISSUE_CLASSES
TUMOUR_KINDS = tuple(k for k in synthetic.KINDS if k != "tumour_free")


@pytest.fixture(scope="module")
def cases() -> list[synthetic.SyntheticCase]:
    """Cases of every kind that has a tumour, in turn."""
    return [synthesize(seed, size=SIZE, spacing=SPACING, kind=TUMOUR_KINDS[seed % len(TUMOUR_KINDS)])
            for seed in range(20)]


@pytest.fixture(scope="module")
def fine_cases() -> list[synthetic.SyntheticCase]:
    """2 mm cases: at 4 mm a 2-5 mm enhancing rim is mostly partial volume."""
    return [synthesize(seed, size=(120, 120, 78), spacing=(2.0, 2.0, 2.0), kind=("hgg_necrotic", "large")[seed % 2])
            for seed in range(100, 108)]


class TestTemplate:
    def test_templates_load_without_network(self, monkeypatch):
        def refuse(*args, **kwargs):
            raise OSError("network access attempted")

        monkeypatch.setattr(socket.socket, "connect", refuse)
        monkeypatch.setattr(socket, "create_connection", refuse)
        anatomy.mni152.cache_clear()
        t1, gm, wm, affine = anatomy.mni152()
        assert t1.shape == gm.shape == wm.shape == (197, 233, 189)
        assert np.allclose(np.diag(affine), [1, 1, 1, 1])

    def test_default_grid_is_brats_and_holds_the_brain(self):
        affine = grid_affine((240, 240, 155), (1.0, 1.0, 1.0))
        assert np.allclose(affine[:3, :3], np.diag([-1.0, -1.0, 1.0]))
        assert nib.aff2axcodes(affine) == ("L", "P", "S")
        centre, corners = anatomy.brain_extent()
        centre_voxel = np.linalg.inv(affine) @ np.append(centre, 1.0)
        assert np.allclose(centre_voxel[:3], [119.5, 119.5, 77.0])
        corners = (np.linalg.inv(affine) @ np.c_[corners, np.ones(8)].T)[:3].T
        assert corners.min() >= -0.5 and np.all(corners.max(axis=0) <= [239.5, 239.5, 154.5])


class TestMakeCase:
    def test_shapes_dtypes_and_affine(self):
        image, label, affine = make_case(5, size=SIZE, spacing=SPACING)
        assert image.shape == (4, *SIZE) and image.dtype == np.float32
        assert label.shape == SIZE and label.dtype == np.uint8
        assert np.allclose(affine[:3, :3], np.diag([-4.0, -4.0, 4.0]))
        assert np.array_equal(image, np.rint(image)) and image.max() <= 32767

    def test_same_seed_gives_identical_case(self):
        a = make_case(11, size=SIZE, spacing=SPACING)
        b = make_case(11, size=SIZE, spacing=SPACING)
        for x, y in zip(a, b):
            assert np.array_equal(x, y)

    def test_different_seeds_differ(self, cases):
        assert not np.array_equal(cases[0].image, cases[1].image)
        assert not np.array_equal(cases[0].label, cases[1].label)
        assert not np.array_equal(cases[0].tissue, cases[1].tissue)  # the anatomy is deformed per case

    def test_labels_are_brats_values_and_each_appears(self, cases):
        present = {1: 0, 2: 0, 4: 0}
        for case in cases:
            values = set(np.unique(case.label).tolist())
            assert values <= {0, 1, 2, 4}
            assert values & {1, 4}, "every case has a tumour core"
            for v in present:
                present[v] += v in values
        assert present[2] >= 0.9 * len(cases)
        assert present[1] >= 0.8 * len(cases) and present[4] >= 0.6 * len(cases), present

    def test_core_is_surrounded_by_edema(self, cases):
        for case in cases:
            if case.kind in ("small", "lgg"):  # edema of 1-10 mm: at 4 mm voxels often partial volume
                continue
            core = np.isin(case.label, (1, 4))
            shell = ndi.binary_dilation(core) & ~core & (case.tissue != CSF) & (case.tissue > 0)
            assert shell.sum() > 0
            assert np.mean(case.label[shell] == 2) > 0.6
            edema = case.label == 2
            distance = ndi.distance_transform_edt(~core, sampling=SPACING)[edema]
            assert np.median(distance) <= 20.0

    def test_zero_outside_the_brain_positive_inside(self, cases):
        for case in cases:
            brain = case.tissue > 0
            assert 0.05 < brain.mean() < 0.5
            assert np.all(case.image[:, ~brain] == 0)
            assert np.all(case.image[:, brain] >= 1)
            assert np.all(case.label[~brain] == 0)

    def test_relative_contrasts(self, fine_cases):
        checked_et = checked_ncr = 0
        for case in fine_cases:  # per case: each case has its own intensity scale per modality
            # Voxels whose neighbours are of the same tissue: less partial volume (ventricles, deep white matter).
            healthy = {t: ndi.binary_erosion(case.tissue == t) & (case.label == 0) & (case.findings == 0) for t in (CSF, GM, WM)}
            flair, t1, t1ce, t2 = (
                {t: case.image[m][healthy[t]].mean() for t in healthy} for m in (FLAIR, T1, T1CE, T2)
            )
            assert t1[CSF] < t1[GM] < t1[WM]
            assert t2[CSF] > t2[GM] > t2[WM]
            assert flair[CSF] < min(flair[WM], flair[GM])  # GM vs WM on FLAIR is subtle: the bias field can flip it
            edema, et, ncr = (case.label == v for v in (2, 4, 1))
            assert case.image[FLAIR][edema].mean() > 1.4 * flair[WM]
            assert case.image[FLAIR][edema].mean() > 3.0 * flair[CSF]
            assert case.image[T2][edema].mean() > 1.15 * t2[WM]  # contrast varies per case (gamma, bias)
            near = ndi.distance_transform_edt(~edema, sampling=(2.0, 2.0, 2.0)) <= 20.0  # the same bias field
            assert case.image[T1][edema].mean() < case.image[T1][healthy[WM] & near].mean()
            if et.sum() >= 5:
                checked_et += 1
                healthy_t1ce = case.image[T1CE][(case.label == 0) & (case.tissue > 0) & (case.findings == 0)]
                assert case.image[T1CE][et].mean() > 1.4 * t1ce[WM]
                assert case.image[T1CE][et].mean() > 1.2 * np.percentile(healthy_t1ce, 99)
                if ncr.sum() >= 5:  # necrosis inside an enhancing rim
                    checked_ncr += 1
                    assert case.image[T1CE][ncr].mean() < t1ce[WM]
                    assert case.image[T2][ncr].mean() > 1.3 * t2[WM]
        assert checked_et >= 4 and checked_ncr >= 3

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"seed": -1}, "seed must be a non-negative integer"),
            ({"seed": 1.5}, "seed must be a non-negative integer"),
            ({"seed": 0, "size": (60, 60)}, "size must be 3 integers"),
            ({"seed": 0, "spacing": (4.0, 0.0, 4.0)}, "spacing must be 3 finite positive"),
        ],
    )
    def test_bad_arguments(self, kwargs, match):
        kwargs = {"size": SIZE, "spacing": SPACING, **kwargs}
        with pytest.raises(ValueError, match=match):
            make_case(**kwargs)


class TestCohort:
    """Kinds in their shares, findings that are not tumour, and the manifest that records each case."""

    def test_every_twenty_cases_hold_the_deck(self):
        for seed in (0, 3):
            for block in (0, 1, 7):
                kinds = [synthetic.kind_of_case(seed, i) for i in range(20 * block, 20 * block + 20)]
                assert sorted(kinds) == sorted(synthetic.KIND_DECK)
        assert synthetic.KIND_DECK.count("lgg") == 4  # a fifth of the cases are low-grade
        orders = {tuple(synthetic.kind_of_case(1, i) for i in range(20 * b, 20 * b + 20)) for b in range(5)}
        assert len(orders) > 1  # shuffled per block

    @pytest.mark.parametrize("kind", synthetic.KINDS)
    def test_each_kind_looks_as_named(self, kind):
        case = synthesize(3, size=(120, 120, 78), spacing=(2.0, 2.0, 2.0), kind=kind)
        assert case.kind == kind
        volumes = {v: np.count_nonzero(case.label == v) * 8 / 1000 for v in (1, 2, 4)}  # ml at 2 mm
        wt = sum(volumes.values())
        if kind == "tumour_free":
            assert wt == 0 and case.grade == "none"
            return
        assert wt > 0
        if kind == "lgg":
            assert volumes[4] == 0 and volumes[1] > 0 and case.grade == "LGG"
        if kind in ("hgg_necrotic", "large"):
            assert volumes[4] > 0 and volumes[1] > 0 and case.grade == "HGG"
        if kind == "small":
            assert wt < 3.5
        if kind == "large":
            assert wt > 80
        if kind == "multifocal":
            parts, n = ndi.label(np.isin(case.label, (1, 4)), structure=np.ones((3, 3, 3)))
            assert n >= 2

    def test_findings_are_unlabelled_and_mimic_tumour(self):
        seen = {name: 0 for name in synthetic.FINDING_NAMES}
        for seed in range(6):
            case = synthesize(seed, size=(120, 120, 78), spacing=(2.0, 2.0, 2.0), kind="tumour_free")
            assert not case.label.any()
            wm = ndi.binary_erosion(case.tissue == WM) & (case.findings == 0)
            for i, name in enumerate(synthetic.FINDING_NAMES):
                where = (case.findings & (1 << i)) > 0
                if where.sum() < 5:
                    continue
                seen[name] += 1
                if name in ("wmh", "caps"):  # bright on FLAIR like edema
                    assert case.image[FLAIR][where].mean() > 1.2 * case.image[FLAIR][wm].mean(), name
                else:  # bright on T1ce like enhancing tumour
                    assert case.image[T1CE][where].mean() > 1.2 * case.image[T1CE][wm].mean(), name
        assert all(seen.values()), seen

    def test_manifest_records_grade_kind_and_volumes(self, tmp_path):
        generate_dataset(tmp_path, 3, seed=2, size=SIZE, spacing=SPACING, start_index=4, progress=False)
        generate_dataset(tmp_path, 1, seed=2, size=SIZE, spacing=SPACING, start_index=5, progress=False)  # rewrite
        import csv

        with (tmp_path / BRATS_DIR / NAME_MAPPING).open() as fh:
            rows = list(csv.DictReader(fh))
        assert [r["BraTS_2020_subject_ID"] for r in rows] == [f"BraTS20_Training_00{i}" for i in (4, 5, 6)]
        for row, index in zip(rows, (4, 5, 6)):
            assert row["Kind"] == synthetic.kind_of_case(2, index) or row["Kind"] == "tumour_free"
            label = nib.load(tmp_path / BRATS_DIR / row["BraTS_2020_subject_ID"] /
                             f"{row['BraTS_2020_subject_ID']}_seg.nii.gz").get_fdata()
            wt_ml = np.count_nonzero(label) * 64 / 1000
            assert float(row["WT_ml"]) == pytest.approx(wt_ml, abs=1e-3)
            assert row["Grade"] in ("HGG", "LGG", "none")


def _check_header(img: nib.Nifti1Image, affine: np.ndarray) -> None:
    assert np.allclose(img.affine, affine)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    assert np.allclose(img.header.get_zooms()[:3], SPACING)
    for field in ("descrip", "aux_file", "intent_name", "db_name"):
        assert img.header[field].item() == b""
    assert len(img.header.extensions) == 0


class TestGenerateDataset:
    def test_brats2020_layout(self, tmp_path):
        paths = generate_dataset(tmp_path, 2, seed=3, size=SIZE, spacing=SPACING, start_index=7, progress=False)
        root = tmp_path / BRATS_DIR
        assert paths == [root / "BraTS20_Training_007", root / "BraTS20_Training_008"]
        assert sorted(p.name for p in root.iterdir()) == ["BraTS20_Training_007", "BraTS20_Training_008", NAME_MAPPING]
        for index, folder in zip((7, 8), paths):
            name = folder.name
            expected = {f"{name}_{m}.nii.gz" for m in (*MODALITIES, "seg")}
            assert {p.name for p in folder.iterdir()} == expected
            image, label, affine = make_case(case_seed(3, index), size=SIZE, spacing=SPACING,
                                             kind=synthetic.kind_of_case(3, index))
            for m, modality in enumerate(MODALITIES):
                img = nib.load(folder / f"{name}_{modality}.nii.gz")
                assert img.shape == SIZE and img.get_data_dtype() == np.int16
                _check_header(img, affine)
                assert np.array_equal(np.asarray(img.dataobj), image[m])
            seg = nib.load(folder / f"{name}_seg.nii.gz")
            assert seg.get_data_dtype() == np.uint8
            _check_header(seg, affine)
            assert np.array_equal(np.asarray(seg.dataobj), label)

    def test_case_does_not_depend_on_start_index(self, tmp_path):
        generate_dataset(tmp_path / "a", 2, seed=4, size=SIZE, spacing=SPACING, progress=False)
        generate_dataset(tmp_path / "b", 1, seed=4, size=SIZE, spacing=SPACING, start_index=2, progress=False)
        name = "BraTS20_Training_002/BraTS20_Training_002_t2.nii.gz"
        a = nib.load(tmp_path / "a" / BRATS_DIR / name).get_fdata()
        b = nib.load(tmp_path / "b" / BRATS_DIR / name).get_fdata()
        assert np.array_equal(a, b)

    def test_msd_layout(self, tmp_path):
        paths = generate_dataset(tmp_path, 2, seed=5, layout="msd", size=SIZE, spacing=SPACING, progress=False)
        root = tmp_path / MSD_DIR
        assert paths == [root / "imagesTr" / "BRATS_001.nii.gz", root / "imagesTr" / "BRATS_002.nii.gz"]
        assert sorted(p.name for p in root.iterdir()) == ["dataset.json", "imagesTr", "labelsTr", NAME_MAPPING]
        assert sorted(p.name for p in (root / "labelsTr").iterdir()) == ["BRATS_001.nii.gz", "BRATS_002.nii.gz"]
        image, label, affine = make_case(case_seed(5, 1), size=SIZE, spacing=SPACING, kind=synthetic.kind_of_case(5, 1))
        img = nib.load(paths[0])
        assert img.shape == (*SIZE, 4) and img.get_data_dtype() == np.float32
        _check_header(img, affine)
        assert np.array_equal(np.moveaxis(np.asarray(img.dataobj), -1, 0), image)
        seg = nib.load(root / "labelsTr" / "BRATS_001.nii.gz")
        _check_header(seg, affine)
        msd = np.asarray(seg.dataobj)
        assert seg.get_data_dtype() == np.uint8 and set(np.unique(msd).tolist()) <= {0, 1, 2, 3}
        for brats_value, msd_value in ((0, 0), (2, 1), (1, 2), (4, 3)):
            assert np.all(msd[label == brats_value] == msd_value)
        meta = json.loads((root / "dataset.json").read_text())
        assert meta["numTraining"] == 2 and meta["tensorImageSize"] == "4D"
        assert meta["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
        second = {"image": "./imagesTr/BRATS_002.nii.gz", "label": "./labelsTr/BRATS_002.nii.gz"}
        assert meta["training"][1] == second

    @pytest.mark.parametrize(("layout", "fail_at"), [("brats2020", 8), ("msd", 4)])
    def test_interrupted_run_leaves_only_whole_cases(self, tmp_path, monkeypatch, layout, fail_at):
        calls = []

        def flaky(real):
            def save(data, geometry, path, **kwargs):
                calls.append(path)
                if len(calls) == fail_at:  # a file of case 2 (brats2020: 5 files a case; msd: 2)
                    raise OSError("disk full")
                real(data, geometry, path, **kwargs)

            return save

        monkeypatch.setattr(dataset, "save_image", flaky(dataset.save_image))
        monkeypatch.setattr(dataset, "save_mask", flaky(dataset.save_mask))
        with pytest.raises(OSError, match="disk full"):
            generate_dataset(tmp_path, 3, layout=layout, size=SIZE, spacing=SPACING, progress=False)
        assert (tmp_path / MARKER).is_file()  # what was written is marked synthetic
        if layout == "brats2020":
            assert sorted(p.name for p in (tmp_path / BRATS_DIR).iterdir()) == ["BraTS20_Training_001", NAME_MAPPING]
            assert len(list((tmp_path / BRATS_DIR / "BraTS20_Training_001").iterdir())) == 5
        else:
            root = tmp_path / MSD_DIR
            assert sorted(p.name for p in root.iterdir()) == ["dataset.json", "imagesTr", "labelsTr", NAME_MAPPING]
            assert [p.name for p in (root / "imagesTr").iterdir()] == ["BRATS_001.nii.gz"]
            assert [p.name for p in (root / "labelsTr").iterdir()] == ["BRATS_001.nii.gz"]
            assert json.loads((root / "dataset.json").read_text())["numTraining"] == 1

    def test_existing_case_is_replaced(self, tmp_path):
        stale = tmp_path / BRATS_DIR / "BraTS20_Training_001"
        stale.mkdir(parents=True)
        (stale / "BraTS20_Training_001_t1.nii.gz").write_bytes(b"stale")
        (stale / "leftover.txt").write_text("x")
        generate_dataset(tmp_path, 1, size=SIZE, spacing=SPACING, progress=False)
        assert len(list(stale.iterdir())) == 5 and not (stale / "leftover.txt").exists()
        assert nib.load(stale / "BraTS20_Training_001_t1.nii.gz").shape == SIZE

    def test_bad_layout(self, tmp_path):
        with pytest.raises(ValueError, match="layout must be one of brats2020, msd"):
            generate_dataset(tmp_path, 1, layout="nnunet", size=SIZE, spacing=SPACING, progress=False)
        assert not any(tmp_path.iterdir())

    @pytest.mark.parametrize("layout", ["brats2020", "msd"])
    def test_marks_the_folder_synthetic(self, tmp_path, layout):
        generate_dataset(tmp_path, 1, seed=6, layout=layout, size=SIZE, spacing=SPACING, start_index=3,
                         progress=False)
        marker = json.loads((tmp_path / MARKER).read_text())
        assert marker["synthetic"] is True
        assert {k: marker[k] for k in ("seed", "n_cases", "start_index", "size", "spacing", "layout")} == {
            "seed": 6, "n_cases": 1, "start_index": 3, "size": list(SIZE), "spacing": list(SPACING), "layout": layout,
        }
        top = tmp_path / (BRATS_DIR if layout == "brats2020" else MSD_DIR)
        assert find_marker(tmp_path) == find_marker(top) == (tmp_path / MARKER).resolve()

    def test_no_second_command_line(self):
        assert not hasattr(synthetic, "main")  # `python -m training synth` is the one command line


class TestProvenance:
    def test_marker_is_found_in_the_folder_or_its_parent_only(self, tmp_path):
        top = tmp_path / "synth"
        mark_synthetic(top, seed=1)
        deep = top / "MICCAI_BraTS2020_TrainingData" / "BraTS20_Training_001"
        deep.mkdir(parents=True)
        assert find_marker(top) == (top / MARKER).resolve()
        assert find_marker(deep.parent) == (top / MARKER).resolve()
        assert find_marker(deep) is None  # two levels up is someone else's folder
        assert find_marker(tmp_path) is None

    def test_carry_marker_copies_it_into_the_cache(self, tmp_path):
        mark_synthetic(tmp_path / "data", seed=2)
        assert carry_marker(tmp_path / "data", tmp_path / "cache") is True
        assert is_synthetic_cache(tmp_path / "cache")
        assert json.loads((tmp_path / "cache" / MARKER).read_text())["seed"] == 2
        assert [p.name for p in (tmp_path / "cache").iterdir()] == [MARKER]  # no temporary file left

    def test_carry_marker_removes_a_stale_marker_for_real_data(self, tmp_path):
        mark_synthetic(tmp_path / "synth")
        carry_marker(tmp_path / "synth", tmp_path / "cache")
        (tmp_path / "real").mkdir()
        assert carry_marker(tmp_path / "real", tmp_path / "cache") is False
        assert not is_synthetic_cache(tmp_path / "cache")
        assert carry_marker(tmp_path / "real", tmp_path / "new_cache") is False  # no cache yet: nothing to do
