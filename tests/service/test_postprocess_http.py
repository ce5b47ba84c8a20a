"""``POST /segment?postprocess=`` against a real ``python -m service`` whose model card holds postprocessing rules.

The model is a pointwise Conv (:mod:`tests.tiny_models`); the scan has one more bright FLAIR voxel far from
the tumour, so the raw mask is the known tumour plus a one-voxel edema blob, which the card's rule (remove
WT components under 0.005 ml; a voxel of the test files' 1 x 1.5 x 2 mm grid is 0.003 ml) removes.
"""

from __future__ import annotations

import base64
import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from service.core.postprocess import PostprocessingRules, RegionRule, apply_postprocessing
from service.inference.card import PostprocessingSpec
from tests import tiny_models
from tests.service.support import SPACING, pointwise_weights, write_case
from tests.tiny_models import FLAIR, expected_labels, scan

BLOB = (9, 8, 7)
RULES = PostprocessingRules(WT=RegionRule("remove_small", 0.005))
SPEC = PostprocessingSpec.from_rules(RULES, learned_on={"cases": 2, "data": "hand-made test cases"})


def raw_labels() -> np.ndarray:
    labels = expected_labels()
    labels[BLOB] = 2
    return labels


@pytest.fixture(scope="module")
def service(server_factory, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pp-models")
    tiny_models.build_model(folder, "pp", *pointwise_weights(), patch_size=(8, 8, 8),
                            card_updates={"postprocessing": SPEC})
    return server_factory(folder)


@pytest.fixture(scope="module")
def upload(tmp_path_factory):
    image = scan()
    image[(FLAIR, *BLOB)] = 10.0
    parts = write_case(tmp_path_factory.mktemp("case"), image)
    return [(name, ("x.nii.gz", path.read_bytes(), "application/octet-stream")) for name, path in parts.items()]


def mask_of(content: bytes) -> np.ndarray:
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(content)).dataobj)


def test_models_shows_the_rules(service):
    with service.client() as client:
        models = client.get("/models").json()["models"]
    assert [m["name"] for m in models] == ["pp"]
    assert models[0]["postprocessing"] == SPEC.model_dump(mode="json")


@pytest.mark.parametrize("model", ["pp", "ensemble"])
def test_default_applies_the_rules_and_false_returns_the_raw_mask(service, upload, model):
    expected = apply_postprocessing(raw_labels(), SPACING, RULES)
    assert expected[BLOB] == 0 and (expected != 0).sum() == (raw_labels() != 0).sum() - 1
    with service.client() as client:
        default = client.post("/segment", params={"model": model}, files=upload)
        raw = client.post("/segment", params={"model": model, "postprocess": "false"}, files=upload)
        explicit = client.post("/segment", params={"model": model, "postprocess": "true"}, files=upload)
    for response in (default, raw, explicit):
        assert response.status_code == 200, response.text
    np.testing.assert_array_equal(mask_of(base64.b64decode(default.json()["mask"])), expected)
    np.testing.assert_array_equal(mask_of(base64.b64decode(raw.json()["mask"])), raw_labels())
    assert default.json()["mask"] == explicit.json()["mask"]
    assert default.json()["postprocessed"] is True and explicit.json()["postprocessed"] is True
    assert raw.json()["postprocessed"] is False
    assert default.json()["volumes_ml"]["WT"] == pytest.approx(raw.json()["volumes_ml"]["WT"] - 0.003)


def test_nifti_summary_header_says_whether_it_was_postprocessed(service, upload):
    with service.client() as client:
        for value, expected in (("true", True), ("false", False)):
            response = client.post("/segment", params={"format": "nifti", "postprocess": value}, files=upload)
            assert response.status_code == 200, response.text
            assert json.loads(response.headers["x-segment-summary"])["postprocessed"] is expected
            assert bool(mask_of(response.content)[BLOB] == 0) is expected


def test_an_invalid_value_is_422(service, upload):
    with service.client() as client:
        response = client.post("/segment", params={"postprocess": "maybe"}, files=upload)
    assert response.status_code == 422
    assert "postprocess" in response.json()["detail"]


def test_client_library_and_cli_pass_the_flag(service, tmp_path):
    from service.client import SegmentationClient
    from service.client_cli import main
    from tests.service.support import write_image4d

    image = scan()
    image[(FLAIR, *BLOB)] = 10.0
    parts = write_case(tmp_path / "case", image)
    with SegmentationClient(service.url, progress=False) as client:
        default = client.segment(parts)
        raw = client.segment(parts, postprocess=False)
    assert default.summary["postprocessed"] is True and raw.summary["postprocessed"] is False
    np.testing.assert_array_equal(mask_of(default.mask), apply_postprocessing(raw_labels(), SPACING, RULES))
    np.testing.assert_array_equal(mask_of(raw.mask), raw_labels())
    image4d = write_image4d(tmp_path / "case_4d.nii.gz", image)
    for flags, expected in (([], apply_postprocessing(raw_labels(), SPACING, RULES)),
                            (["--no-postprocess"], raw_labels())):
        out = tmp_path / f"mask{len(flags)}.nii.gz"
        assert main([str(image4d), "--url", service.url, *flags, "--out", str(out), "--no-progress"]) == 0
        np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), expected)
