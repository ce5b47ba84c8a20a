"""The pipeline without HTTP: files or a scan in, labels, scores, volumes, timings and the encoded mask out."""

from __future__ import annotations

import gzip
import io
import threading

import nibabel as nib
import numpy as np
import pytest

from service.core.labels import REGION_NAMES
from service.core.scan import IMAGE_PART, ScanError, load_scan
from service.core.scoring import volumes_ml
from service.inference.backends import BackendOptions
from service.inference.engine import Engine, InferenceCancelled
from service.inference.model import OnnxModel
from service.inference.pipeline import segment_files, segment_scan
from tests.service.support import SPACING, affine_for, write_case, write_image4d
from tests.tiny_models import build_model, expected_labels, pointwise_weights

TIMINGS = ["decode", "preprocess", "inference", "postprocess"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    path = build_model(tmp_path_factory.mktemp("models"), "unet", *pointwise_weights(), patch_size=(8, 8, 8))
    return Engine([OnnxModel(path, BackendOptions(backend="onnxruntime", providers=("CPUExecutionProvider",),
                                                  threads=1))])


def test_files_with_a_label(tmp_path, engine):
    outcome = segment_files(write_case(tmp_path, label=expected_labels()), engine)
    np.testing.assert_array_equal(outcome.labels, expected_labels())
    assert outcome.metrics["dice"] == {r: 1.0 for r in REGION_NAMES}
    assert outcome.metrics["hd95_mm"] == {r: 0.0 for r in REGION_NAMES}
    assert outcome.volumes_ml == volumes_ml(expected_labels(), SPACING) and outcome.volumes_ml["WT"] > 0
    assert list(outcome.timings_ms) == TIMINGS and all(v >= 0 for v in outcome.timings_ms.values())
    assert outcome.timings_ms["decode"] > 0
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(outcome.mask))
    np.testing.assert_array_equal(np.asarray(mask.dataobj), expected_labels())
    np.testing.assert_allclose(mask.affine, affine_for())
    assert mask.get_data_dtype() == np.uint8


def test_without_a_label_no_scores_and_encoding_optional(tmp_path, engine):
    outcome = segment_files({IMAGE_PART: write_image4d(tmp_path / "image.nii.gz")}, engine, encode=False)
    assert outcome.metrics is None and outcome.mask is None
    np.testing.assert_array_equal(outcome.labels, expected_labels())


def test_scan_in_memory_equals_files(tmp_path, engine):
    parts = write_case(tmp_path, label=expected_labels())
    from_files = segment_files(parts, engine)
    from_scan = segment_scan(load_scan(parts), engine, encode=True)
    np.testing.assert_array_equal(from_scan.labels, from_files.labels)
    assert from_scan.metrics == from_files.metrics and from_scan.volumes_ml == from_files.volumes_ml
    assert gzip.decompress(from_scan.mask) == gzip.decompress(from_files.mask)
    assert from_scan.timings_ms["decode"] == 0.0


def test_a_bad_part_is_a_scan_error_not_an_http_problem(tmp_path, engine):
    parts = write_case(tmp_path)
    parts["t1"].write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ScanError) as err:
        segment_files(parts, engine)
    assert err.value.part == "t1" and type(err.value).__module__ == "service.core.scan"


def test_cancelled_before_the_first_network_call(tmp_path, engine):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(InferenceCancelled):
        segment_files(write_case(tmp_path), engine, cancel=cancel)


def test_postprocess_flag_reaches_the_engine(tmp_path, engine):
    outcome = segment_files(write_case(tmp_path), engine, postprocess=False)
    assert outcome.postprocessed is False  # the tiny model's card has no rules either way
    assert io.BytesIO(outcome.mask).read(2) == b"\x1f\x8b"
