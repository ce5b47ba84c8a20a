"""The one scan loader: both input forms, the label, one ScanError per problem naming the part."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.labels import MODALITIES
from service.core.scan import IMAGE_PART, LABEL_PART, ScanError, image_parts, load_scan
from tests.service.support import affine_for, write_case, write_image4d, write_nifti
from tests.tiny_models import expected_labels, scan as tumour_scan


class TestForms:
    def test_four_modalities_into_their_channels(self, tmp_path):
        parts = write_case(tmp_path, label=expected_labels())
        scan = load_scan(parts)
        np.testing.assert_array_equal(scan.image, tumour_scan().astype(np.float32))
        assert scan.image.dtype == np.float32 and scan.image.flags.c_contiguous
        np.testing.assert_array_equal(scan.label, expected_labels())
        assert scan.geometry.shape == tumour_scan().shape[1:] and scan.image_part == MODALITIES[0]
        np.testing.assert_allclose(scan.geometry.affine, affine_for())

    def test_one_4d_image_equals_the_four_parts(self, tmp_path):
        four = load_scan(write_case(tmp_path / "four"))
        one = load_scan({IMAGE_PART: write_image4d(tmp_path / "image.nii.gz")})
        np.testing.assert_array_equal(one.image, four.image)
        assert one.geometry == four.geometry and one.label is None and one.image_part == IMAGE_PART

    def test_msd_label_is_mapped_to_brats(self, tmp_path):
        parts = write_case(tmp_path)
        msd = np.zeros(tumour_scan().shape[1:], np.uint8)
        msd[1, 1, 1], msd[2, 2, 2], msd[3, 3, 3] = 1, 2, 3  # edema, non-enhancing, enhancing
        parts[LABEL_PART] = write_nifti(tmp_path / "msd.nii.gz", msd, dtype=np.uint8)
        label = load_scan(parts, label_format="msd").label
        assert (label[1, 1, 1], label[2, 2, 2], label[3, 3, 3]) == (2, 1, 4)

    def test_brats2023_label_is_mapped_to_brats(self, tmp_path):
        parts = write_case(tmp_path)
        seg = np.zeros(tumour_scan().shape[1:], np.uint8)
        seg[1, 1, 1], seg[2, 2, 2], seg[3, 3, 3] = 1, 2, 3  # NCR, edema, enhancing
        parts[LABEL_PART] = write_nifti(tmp_path / "seg.nii.gz", seg, dtype=np.uint8)
        label = load_scan(parts, label_format="brats2023").label
        assert (label[1, 1, 1], label[2, 2, 2], label[3, 3, 3]) == (1, 2, 4)
        assert int(np.count_nonzero(label)) == 3

    def test_brats2023_label_4_is_refused_as_post_treatment(self, tmp_path):
        parts = write_case(tmp_path)
        seg = np.zeros(tumour_scan().shape[1:], np.uint8)
        seg[1, 1, 1], seg[2, 2, 2] = 3, 4
        parts[LABEL_PART] = write_nifti(tmp_path / "seg.nii.gz", seg, dtype=np.uint8)
        with pytest.raises(ScanError, match=r"part label: the ground truth holds label 4 \(resection cavity") as err:
            load_scan(parts, label_format="brats2023")
        assert err.value.part == LABEL_PART and "pre-operative" in err.value.reason

    @pytest.mark.parametrize("names, expected", [
        (set(MODALITIES), MODALITIES),
        ({*MODALITIES, LABEL_PART}, MODALITIES),
        ({IMAGE_PART, LABEL_PART}, (IMAGE_PART,)),
    ])
    def test_image_parts(self, names, expected):
        assert image_parts(names) == expected

    @pytest.mark.parametrize("names", [set(), {LABEL_PART}, {"flair", "t1"}, {*MODALITIES, IMAGE_PART}])
    def test_neither_form_is_refused(self, names, tmp_path):
        with pytest.raises(ValueError, match="expected either the four parts"):
            image_parts(names)
        with pytest.raises(ValueError, match="expected either the four parts"):
            load_scan({name: tmp_path / name for name in names})

    def test_unknown_part_is_refused(self, tmp_path):
        parts = write_case(tmp_path)
        with pytest.raises(ValueError, match=r"unknown parts \['seg'\]"):
            load_scan({**parts, "seg": parts["flair"]})


class TestProblems:
    def test_first_bad_part_in_channel_order_is_named(self, tmp_path):
        parts = write_case(tmp_path)
        parts["t1ce"].write_bytes(b"not a nifti file at all")
        parts["t2"].write_bytes(b"")
        with pytest.raises(ScanError) as err:
            load_scan(parts)
        assert err.value.part == "t1ce" and "not a NIfTI file" in err.value.reason
        assert not err.value.too_large and not err.value.mismatched
        assert str(err.value).startswith("part t1ce: ") and str(tmp_path) not in str(err.value)

    def test_shape_mismatch(self, tmp_path):
        parts = write_case(tmp_path)
        write_nifti(parts["t2"], np.zeros((5, 5, 5), np.float32))
        with pytest.raises(ScanError, match=r"part t2: shape \(5, 5, 5\) differs .*compared with part flair") as err:
            load_scan(parts)
        assert err.value.mismatched

    def test_label_on_another_grid(self, tmp_path):
        parts = write_case(tmp_path)
        moved = affine_for(origin=(0.0, 0.0, 0.0))
        parts[LABEL_PART] = write_nifti(tmp_path / "label.nii.gz", expected_labels(), moved, dtype=np.uint8)
        with pytest.raises(ScanError, match=r"part label: affine differs") as err:
            load_scan(parts)
        assert err.value.part == LABEL_PART and err.value.mismatched

    def test_label_with_value_3_is_refused(self, tmp_path):
        label = expected_labels().copy()
        label[0, 0, 0] = 3
        with pytest.raises(ScanError, match=r"part label: .*\{3\}") as err:
            load_scan(write_case(tmp_path, label=label))
        assert err.value.part == LABEL_PART

    @pytest.mark.parametrize("form", ["four", "4d"])
    def test_too_many_voxels_is_refused_before_reading(self, tmp_path, form):
        parts = write_case(tmp_path) if form == "four" else {IMAGE_PART: write_image4d(tmp_path / "i.nii.gz")}
        with pytest.raises(ScanError, match="more than the limit of 10") as err:
            load_scan(parts, max_voxels=10)
        assert err.value.too_large and err.value.part in (MODALITIES[0], IMAGE_PART)

    def test_4d_image_with_three_channels(self, tmp_path):
        path = write_nifti(tmp_path / "image.nii.gz", np.zeros((6, 5, 4, 3), np.float32))
        with pytest.raises(ScanError, match=r"part image: expected a 4D volume .* got shape \(6, 5, 4, 3\)"):
            load_scan({IMAGE_PART: path})
