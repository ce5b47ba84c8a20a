"""The engine applies the postprocessing rules of model cards, on real ONNX Runtime sessions of tiny models.

The scan of :mod:`tests.tiny_models` gets one more bright FLAIR voxel far from the tumour, so the raw labels
are the known tumour boxes plus a one-voxel edema blob that the rules can remove.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from service.core.postprocess import PostprocessingRules, RegionRule, apply_postprocessing
from service.core.labels import MODALITIES
from service.inference.card import OutputSpec, PostprocessingSpec, card_path, read_card
from service.inference.engine import Engine
from service.inference.backends import BackendOptions
from service.inference.model import OnnxModel
from tests.tiny_models import FLAIR, build_model, expected_labels, pointwise_weights, scan

BLOB = (9, 8, 7)  # inside the brain box, two voxels from the WT box: its own component
ISO = (1.0, 1.0, 1.0)
LARGEST_WT = PostprocessingRules(WT=RegionRule("largest_component"))
SMALL_WT = PostprocessingRules(WT=RegionRule("remove_small", 0.002))  # 2 voxels of 1 mm^3
ET_TO_NCR = PostprocessingRules(et_to_ncr_below_ml=0.005)  # the ET box has 4 voxels

CPU_ONE_THREAD = BackendOptions(backend="onnxruntime", providers=("CPUExecutionProvider",), threads=1)


def blob_scan() -> np.ndarray:
    image = scan()
    image[(FLAIR, *BLOB)] = 10.0
    return image


def raw_labels() -> np.ndarray:
    labels = expected_labels()
    labels[BLOB] = 2
    return labels


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """``build(name, rules)``: a pointwise 3D model whose JSON card holds ``rules`` (``None``: no field)."""
    folder = tmp_path_factory.mktemp("models")

    def make(name: str, rules: PostprocessingRules | None) -> OnnxModel:
        updates = {} if rules is None else {"postprocessing": PostprocessingSpec.from_rules(rules)}
        path = build_model(folder, name, *pointwise_weights(), patch_size=(8, 8, 8), card_updates=updates)
        return OnnxModel(path, CPU_ONE_THREAD)

    return make


class TestSingleModel:
    def test_a_card_without_rules_returns_the_raw_labels(self, build):
        model = build("plain", None)
        assert read_card(card_path(model.path)).postprocessing is None
        engine = Engine([model])
        assert engine.postprocessing is None
        for result in (engine.segment(blob_scan()), engine.segment(blob_scan(), spacing=ISO),
                       engine.segment(blob_scan(), spacing=ISO, postprocess=False)):
            np.testing.assert_array_equal(result.labels, raw_labels())
            assert result.postprocessed is False

    @pytest.mark.parametrize(
        "name, rules", [("largest", LARGEST_WT), ("min_size", SMALL_WT), ("et_to_ncr", ET_TO_NCR)]
    )
    def test_rules_change_the_mask_as_the_numpy_function_says(self, build, name, rules):
        model = build(name, rules)
        engine = Engine([model])
        assert engine.postprocessing == rules
        result = engine.segment(blob_scan(), spacing=ISO)
        expected = apply_postprocessing(raw_labels(), ISO, rules)
        assert not np.array_equal(expected, raw_labels())  # the rule does something here
        np.testing.assert_array_equal(result.labels, expected)
        assert result.postprocessed is True
        assert set(result.timings_ms) == {"preprocess", "inference", "postprocess"}

        raw = engine.segment(blob_scan(), spacing=ISO, postprocess=False)
        np.testing.assert_array_equal(raw.labels, raw_labels())
        assert raw.postprocessed is False

    def test_the_spacing_reaches_the_rules(self, build):
        engine = Engine([build("small_wt", SMALL_WT)])
        assert engine.segment(blob_scan(), spacing=ISO).labels[BLOB] == 0  # 0.001 ml < 0.002 ml
        coarse = engine.segment(blob_scan(), spacing=(2.0, 2.0, 2.0))  # 0.008 ml: stays
        np.testing.assert_array_equal(coarse.labels, raw_labels())
        assert coarse.postprocessed is True

    def test_rules_need_a_spacing(self, build):
        engine = Engine([build("needs_spacing", LARGEST_WT)])
        with pytest.raises(ValueError, match=r"has postprocessing rules, which need the scan's voxel sizes"):
            engine.segment(blob_scan())
        with pytest.raises(ValueError, match="expected three finite voxel sizes > 0 in mm"):
            engine.segment(blob_scan(), spacing=(1.0, 1.0))
        np.testing.assert_array_equal(engine.segment(blob_scan(), postprocess=False).labels, raw_labels())

    def test_rules_that_change_nothing_are_not_applied(self, build):
        engine = Engine([build("identity", PostprocessingRules())])
        assert engine.postprocessing is None
        assert engine.segment(blob_scan(), spacing=ISO).postprocessed is False

    def test_probabilities_are_never_postprocessed(self, build):
        engine = Engine([build("probs_largest", LARGEST_WT)])
        result = engine.segment(blob_scan(), spacing=ISO, probabilities=True)
        plain = engine.segment(blob_scan(), spacing=ISO, probabilities=True, postprocess=False)
        np.testing.assert_array_equal(result.probabilities, plain.probabilities)
        assert result.probabilities[(0, *BLOB)] > 0.5


class TestEnsemble:
    def test_identical_rules_are_applied(self, build):
        engine = Engine([build("ens_a", LARGEST_WT), build("ens_b", LARGEST_WT)])
        result = engine.segment(blob_scan(), spacing=ISO)
        assert result.postprocessed is True
        np.testing.assert_array_equal(result.labels, apply_postprocessing(raw_labels(), ISO, LARGEST_WT))

    @pytest.mark.parametrize("other", [SMALL_WT, None], ids=["different rules", "no rules"])
    def test_otherwise_no_rules(self, build, other):
        engine = Engine([build("mix_a", LARGEST_WT), build(f"mix_{'none' if other is None else 'small'}", other)])
        assert engine.postprocessing is None
        result = engine.segment(blob_scan(), spacing=ISO)
        np.testing.assert_array_equal(result.labels, raw_labels())
        assert result.postprocessed is False


class TestModelsWithoutTheField:
    def test_a_card_without_the_attribute_counts_as_no_rules(self, build):
        """The trainer validates through the engine with a network whose card is a plain namespace."""
        onnx_model = build("wrapped", None)

        class Wrapped:
            card = SimpleNamespace(name="wrapped", in_channels=4, modalities=MODALITIES, output=OutputSpec(),
                                   patch_size=(8, 8, 8))
            spatial_dims, sha256 = 3, ""

            def __call__(self, batch):
                return onnx_model(batch)

        engine = Engine([Wrapped()])
        assert engine.postprocessing is None
        np.testing.assert_array_equal(engine.segment(blob_scan()).labels, raw_labels())


def test_a_2d_model_with_anisotropic_spacing(tmp_path):
    """A 2D (slice-wise) model's labels are a 3D volume like any other; the rule's ml threshold sees the spacing."""
    rules = PostprocessingRules(WT=RegionRule("remove_small", 0.01))  # the blob: 1 voxel
    path = build_model(tmp_path, "flat", *pointwise_weights(spatial_dims=2), patch_size=(8, 8),
                       card_updates={"postprocessing": PostprocessingSpec.from_rules(rules)})
    engine = Engine([OnnxModel(path, CPU_ONE_THREAD)])
    coarse, fine = (1.0, 1.0, 12.0), (1.0, 1.0, 2.0)  # one voxel: 0.012 ml (kept), 0.002 ml (removed)
    np.testing.assert_array_equal(engine.segment(blob_scan(), spacing=coarse).labels, raw_labels())
    result = engine.segment(blob_scan(), spacing=fine)
    np.testing.assert_array_equal(result.labels, apply_postprocessing(raw_labels(), fine, rules))
    assert result.labels[BLOB] == 0 and result.postprocessed is True
