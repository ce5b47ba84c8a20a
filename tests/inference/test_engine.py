"""The engine on real ONNX Runtime sessions of tiny convolutions built with ``onnx.helper``.

Each test model is one Conv whose logits are fixed functions of the (z-scored) input, so expected labels and
probabilities are known exactly.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import onnxruntime as ort
import pytest
from scipy import ndimage, special

from service.core.labels import regions_to_labels
from service.core.preprocess import preprocess, uncrop
from service.inference.card import ModelCard, card_path, file_sha256, write_card
from service.inference.backends import DEFAULT_PROVIDERS, BackendOptions, provider_list
from service.inference.engine import FLIPS, FLIPS_2D, Engine, InferenceCancelled, Segmentation, sigmoid
from service.inference.model import OnnxModel, load_models
from tests.tiny_models import (
    BRAIN,
    FLAIR,
    SHAPE,
    build_model,
    expected_labels,
    pointwise_weights,
    random_weights,
    scan,
)

FULL = SHAPE


def open_model(path, **kwargs) -> OnnxModel:
    """ONNX Runtime on the CPU unless told otherwise (on a GPU host too), one thread: the same numbers everywhere.
    The OpenVINO backend has its own tests (test_backends.py)."""
    kwargs.setdefault("providers", ("CPUExecutionProvider",))
    kwargs.setdefault("backend", "onnxruntime")
    return OnnxModel(path, BackendOptions(threads=1, **kwargs))


def numpy_conv(data: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Reference: ONNX Conv (cross-correlation, "same" zero padding) of ``(C, *spatial)`` -> ``(K, *spatial)``."""
    out = np.empty((weight.shape[0], *data.shape[1:]), dtype=np.float64)
    for k in range(weight.shape[0]):
        out[k] = bias[k] + sum(
            ndimage.correlate(data[c].astype(np.float64), weight[k, c].astype(np.float64), mode="constant")
            for c in range(data.shape[0])
        )
    return out


def reference_probabilities(image, weight, bias, *, slice_wise=False) -> np.ndarray:
    """Full-grid probabilities from a direct convolution of the whole crop (3D) or of each axial slice (2D)."""
    pre = preprocess(image)
    if slice_wise:
        logits = np.stack(
            [numpy_conv(pre.data[..., z], weight, bias) for z in range(pre.data.shape[-1])], axis=-1
        )
    else:
        logits = numpy_conv(pre.data, weight, bias)
    return uncrop(1 / (1 + np.exp(-logits)), pre.bbox, pre.full_shape)


class Recorder:
    """Stands in for an OnnxModel, forwarding to one and recording the batches (and their shapes) it is given."""

    def __init__(self, model: OnnxModel):
        self.model, self.card, self.spatial_dims, self.sha256 = model, model.card, model.spatial_dims, model.sha256
        self.shapes: list[tuple[int, ...]] = []
        self.batches: list[np.ndarray] = []

    def __call__(self, batch):
        self.shapes.append(batch.shape)
        self.batches.append(np.array(batch))
        return self.model(batch)


def flip(data: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """``data (C, *spatial)`` mirrored along the spatial ``axes`` (0 = X)."""
    return np.flip(data, [a + 1 for a in axes])


def mean_over_flips(model, data: np.ndarray, flips) -> np.ndarray:
    """Reference TTA: the model's probabilities on each mirrored input, mirrored back and averaged."""
    total = np.zeros((3, *data.shape[1:]))
    for axes in flips:
        probs = Engine([model]).probabilities(np.ascontiguousarray(flip(data, axes)))
        total += flip(probs, axes)
    return total / len(flips)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Test models, built once: name -> (OnnxModel, weight, bias)."""
    folder = tmp_path_factory.mktemp("models")
    specs = {
        "point3d": (pointwise_weights(), (8, 8, 8)),
        "point3d_b": (pointwise_weights(gain=4.0, bias=-0.5), (4, 4, 4)),
        "point2d": (pointwise_weights(spatial_dims=2), (8, 8)),
        "point2d_small": (pointwise_weights(spatial_dims=2), (4, 4)),
        "point2d_large": (pointwise_weights(spatial_dims=2), (16, 16)),
        "conv3d": (random_weights(3), (8, 8, 7)),
        "conv3d_tiled": (random_weights(3, seed=1), (4, 4, 4)),
        "conv2d": (random_weights(2, seed=2), (8, 8)),
    }
    out = {}
    for name, ((weight, bias), patch) in specs.items():
        path = build_model(folder, name, weight, bias, patch_size=patch)
        out[name] = (open_model(path), weight, bias)
    return out


class TestSigmoid:
    def test_extremes_do_not_overflow(self):
        x = np.array([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4], dtype=np.float32)
        with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
            p = sigmoid(x)
        assert p.dtype == np.float32
        np.testing.assert_allclose(p, special.expit(x.astype(np.float64)), rtol=1e-6, atol=1e-43)
        assert p[0] == 0.0 and p[3] == 0.5 and p[-1] == 1.0
        assert 0 < p[1] < 1e-43  # e^-100 kept (subnormal), not rounded to 0 by 1 - 1/(1+e)

    def test_in_place_and_pure(self):
        x = np.random.default_rng(0).normal(scale=5, size=(3, 4, 5)).astype(np.float32)
        before = x.copy()
        p = sigmoid(x)
        np.testing.assert_array_equal(x, before)
        np.testing.assert_allclose(p + sigmoid(-x), 1.0, rtol=1e-6)
        q = sigmoid(x, out=x)
        assert q is x
        np.testing.assert_array_equal(q, p)


class TestProviders:
    def test_cuda_first_with_its_options_when_available(self):
        got = provider_list(
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
            cudnn_conv_algo_search="HEURISTIC",
        )
        assert got == [
            (
                "CUDAExecutionProvider",
                {"cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested"},
            ),
            "CPUExecutionProvider",
        ]

    def test_cuda_arena_cap(self):
        got = provider_list(["CUDAExecutionProvider"], ["CUDAExecutionProvider"], gpu_mem_limit_bytes=2 << 30)
        assert got[0][1]["gpu_mem_limit"] == str(2 << 30)

    def test_unavailable_ones_are_left_out(self):
        got = provider_list(["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"])
        assert got == ["CPUExecutionProvider"]

    def test_unknown_algo_search_is_refused(self):
        with pytest.raises(ValueError, match="cudnn_conv_algo_search must be one of"):
            provider_list(["CUDAExecutionProvider"], ["CUDAExecutionProvider"], cudnn_conv_algo_search="FAST")


class TestOnnxModel:
    def test_session_and_card(self, models):
        model, weight, bias = models["point3d"]
        assert model.provider == "CPUExecutionProvider"  # asked for by open_model, whatever the host has
        assert model.name == "point3d" and model.spatial_dims == 3 and model.card.patch_size == (8, 8, 8)
        assert model.sha256 == file_sha256(model.path)
        assert (model.backend, model.device, model.precision) == ("onnxruntime", "CPU", "fp32")
        options = model.runtime.session.get_session_options()
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
        assert options.intra_op_num_threads == 1

    def test_call_gives_the_convolution(self, models):
        model, weight, bias = models["conv3d"]
        batch = np.random.default_rng(0).normal(size=(2, 4, 5, 6, 7)).astype(np.float32)
        logits = model(batch)
        assert logits.dtype == np.float32 and logits.shape == (2, 3, 5, 6, 7)
        for b in range(2):
            np.testing.assert_allclose(logits[b], numpy_conv(batch[b], weight, bias), rtol=1e-4, atol=1e-4)

    def test_call_with_wrong_channels_is_refused(self, models):
        model = models["point3d"][0]
        with pytest.raises(ValueError, match=r"expects a batch \(B, 4, X, Y, Z\)"):
            model(np.zeros((1, 3, 4, 4, 4), np.float32))

    def test_default_providers_take_the_best_available(self, models):
        model = OnnxModel(models["point3d"][0].path, BackendOptions(backend="onnxruntime", threads=1))
        available = ort.get_available_providers()
        assert model.provider in [p for p in DEFAULT_PROVIDERS if p in available]  # CUDA may fall back to CPU

    def test_unavailable_provider_is_refused(self, models):
        with pytest.raises(ValueError, match="not available"):
            open_model(models["point3d"][0].path, providers=["NoSuchExecutionProvider"])

    def test_model_without_metadata_is_loaded_with_a_warning(self, tmp_path, caplog):
        path = build_model(tmp_path, "bare", *pointwise_weights(), patch_size=(8, 8, 8), metadata=False)
        with caplog.at_level(logging.WARNING, logger="service.inference.model"):
            model = open_model(path)
        assert model.name == "bare"
        assert "no model card in the ONNX metadata" in caplog.text


class TestLoadModels:
    def test_loads_every_model_sorted_by_name(self, tmp_path):
        build_model(tmp_path, "zeta", *pointwise_weights(), patch_size=(8, 8, 8))
        build_model(tmp_path, "alpha", *pointwise_weights(spatial_dims=2), patch_size=(8, 8))
        (tmp_path / "notes.txt").write_text("not a model")
        models = load_models(tmp_path, BackendOptions(backend="onnxruntime", providers=("CPUExecutionProvider",), threads=1))
        assert list(models) == ["alpha", "zeta"]
        assert [m.spatial_dims for m in models.values()] == [2, 3]
        assert {m.provider for m in models.values()} == {"CPUExecutionProvider"}

    def test_missing_folder(self, tmp_path):
        with pytest.raises(ValueError, match=r"models folder .*nowhere does not exist"):
            load_models(tmp_path / "nowhere")

    def test_empty_folder(self, tmp_path):
        with pytest.raises(ValueError, match=r"holds no NAME.onnx models"):
            load_models(tmp_path)

    def test_missing_card_names_the_file(self, tmp_path):
        path = build_model(tmp_path, "lonely", *pointwise_weights(), patch_size=(8, 8, 8))
        card_path(path).unlink()
        with pytest.raises(ValueError, match=r"lonely\.json: model card not found"):
            load_models(tmp_path)

    def test_invalid_card_names_the_file(self, tmp_path):
        path = build_model(tmp_path, "typo", *pointwise_weights(), patch_size=(8, 8, 8))
        text = card_path(path).read_text().replace('"in_channels": 4', '"in_channels": 3')
        card_path(path).write_text(text)
        with pytest.raises(ValueError, match=r"(?s)typo\.json: invalid model card.*in_channels 3"):
            load_models(tmp_path)

    def test_network_input_channels_differ_from_the_card(self, tmp_path):
        weight = np.zeros((3, 3, 1, 1, 1), np.float32)
        build_model(tmp_path, "three", weight, np.zeros(3, np.float32), patch_size=(8, 8, 8), input_channels=3)
        with pytest.raises(ValueError, match=r"three\.onnx: input 'image' has 3 channels, the card says 4"):
            load_models(tmp_path)

    def test_network_dimensions_differ_from_the_card(self, tmp_path):
        path = build_model(tmp_path, "flat", *pointwise_weights(spatial_dims=2), patch_size=(8, 8), metadata=False)
        card = ModelCard.model_validate_json(card_path(path).read_text())
        write_card(card.model_copy(update={"spatial_dims": 3, "patch_size": (8, 8, 8)}), card_path(path))
        with pytest.raises(ValueError, match=r"flat\.onnx: input 'image' has shape .* the card says spatial_dims 3"):
            load_models(tmp_path)

    def test_card_disagreeing_with_the_onnx_metadata(self, tmp_path):
        build_model(
            tmp_path, "edited", *pointwise_weights(), patch_size=(8, 8, 8), metadata_updates={"patch_size": (4, 4, 4)}
        )
        with pytest.raises(ValueError, match=r"edited\.onnx: edited\.json disagrees .*\['patch_size'\]"):
            load_models(tmp_path)

    def test_file_changed_after_export(self, tmp_path):
        build_model(tmp_path, "stale", *pointwise_weights(), patch_size=(8, 8, 8), card_updates={"sha256": "0" * 64})
        with pytest.raises(ValueError, match=r"stale\.onnx: sha256 .* does not match stale\.json"):
            load_models(tmp_path)

    def test_card_without_sha256_is_refused(self, tmp_path):
        build_model(tmp_path, "unhashed", *pointwise_weights(), patch_size=(8, 8, 8), card_updates={"sha256": None})
        with pytest.raises(ValueError, match=r"unhashed\.onnx: unhashed\.json has no sha256.*export the model again"):
            load_models(tmp_path)

    def test_unknown_field_in_the_onnx_metadata_is_refused(self, tmp_path):
        build_model(
            tmp_path, "extra", *pointwise_weights(), patch_size=(8, 8, 8), metadata_extra={"pacth_size": "[8, 8, 8]"}
        )
        with pytest.raises(
            ValueError, match=r"extra\.onnx: invalid model card in the ONNX metadata: unknown model card fields "
            r"\['pacth_size'\]"
        ):
            load_models(tmp_path)

    def test_card_name_must_be_the_file_name(self, tmp_path):
        path = build_model(tmp_path, "right", *pointwise_weights(), patch_size=(8, 8, 8))
        path.rename(tmp_path / "wrong.onnx")
        card_path(path).rename(tmp_path / "wrong.json")
        with pytest.raises(ValueError, match=r"wrong\.json: card name 'right' differs from the file name 'wrong'"):
            load_models(tmp_path)

    def test_corrupt_onnx_names_the_file(self, tmp_path):
        path = build_model(tmp_path, "broken", *pointwise_weights(), patch_size=(8, 8, 8))
        path.write_bytes(b"not a protobuf at all")
        card = ModelCard.model_validate_json(card_path(path).read_text())
        write_card(card.model_copy(update={"sha256": file_sha256(path)}), card_path(path))
        with pytest.raises(ValueError, match=r"broken\.onnx: (ONNX Runtime cannot load|OpenVINO cannot read) the model"):
            load_models(tmp_path)


class TestCancel:
    def test_an_unset_event_changes_nothing(self, models):
        result = Engine([models["point3d_b"][0]]).segment(scan(), cancel=threading.Event())
        np.testing.assert_array_equal(result.labels, expected_labels())

    @pytest.mark.parametrize("name", ["point3d_b", "point2d_small"])
    def test_setting_the_event_stops_before_the_next_network_call(self, models, name):
        recorder = Recorder(models[name][0])
        cancel = threading.Event()

        class StopAfterThree(Recorder):
            def __call__(self, batch):
                out = super().__call__(batch)
                if len(self.shapes) == 3:
                    cancel.set()  # during the third call: it finishes, the fourth never starts
                return out

        stopper = StopAfterThree(models[name][0])
        Engine([recorder]).segment(scan())
        assert len(recorder.shapes) > 3  # the whole scan takes more calls than that
        with pytest.raises(InferenceCancelled):
            Engine([stopper]).segment(scan(), tta=True, cancel=cancel)
        assert len(stopper.shapes) == 3


class TestEngine:
    def test_labels_match_the_oracle_on_the_full_grid(self, models):
        image = scan()
        before = image.copy()
        result = Engine([models["point3d"][0]]).segment(image)
        assert isinstance(result, Segmentation)
        assert result.labels.dtype == np.uint8 and result.labels.shape == FULL
        np.testing.assert_array_equal(result.labels, expected_labels())
        np.testing.assert_array_equal(image, before)
        assert set(result.timings_ms) == {"preprocess", "inference", "postprocess"}
        assert all(t >= 0 for t in result.timings_ms.values())
        assert result.probabilities is None

    def test_probabilities_are_zero_outside_the_brain_box(self, models):
        result = Engine([models["point3d"][0]]).segment(scan(), probabilities=True)
        probs = result.probabilities
        assert probs.shape == (3, *FULL) and probs.dtype == np.float32
        outside = np.ones(FULL, dtype=bool)
        outside[BRAIN] = False
        assert not probs[:, outside].any()
        inside = probs[(slice(None), *BRAIN)]
        assert inside.min() > 0
        np.testing.assert_array_equal(regions_to_labels(probs), expected_labels())

    def test_3d_conv_matches_a_direct_convolution(self, models):
        model, weight, bias = models["conv3d"]  # patch == crop: one tile, so the result is the plain conv
        result = Engine([model]).segment(scan(), probabilities=True)
        np.testing.assert_allclose(result.probabilities, reference_probabilities(scan(), weight, bias), atol=1e-5)

    def test_2d_conv_is_served_slice_by_slice(self, models):
        model, weight, bias = models["conv2d"]
        recorder = Recorder(model)
        result = Engine([recorder], batch_size=3).segment(scan(), probabilities=True)
        reference = reference_probabilities(scan(), weight, bias, slice_wise=True)
        np.testing.assert_allclose(result.probabilities, reference, atol=1e-5)
        assert recorder.shapes == [(3, 4, 8, 8), (3, 4, 8, 8), (1, 4, 8, 8)]  # 7 axial slices, 3 per call

    @pytest.mark.parametrize("name", ["point2d", "point2d_small", "point2d_large"])
    def test_2d_models_of_any_patch_give_the_oracle_labels(self, models, name):
        # crop in-plane (8, 8): equal to, larger than (tiled) and smaller than (padded) the patch
        result = Engine([models[name][0]], batch_size=2).segment(scan())
        np.testing.assert_array_equal(result.labels, expected_labels())

    @pytest.mark.parametrize("name", ["conv3d_tiled", "conv2d"])
    def test_batch_size_does_not_change_the_result(self, models, name):
        model = models[name][0]
        one = Engine([model], batch_size=1).segment(scan(), probabilities=True)
        three = Engine([model], batch_size=3).segment(scan(), probabilities=True)
        np.testing.assert_allclose(one.probabilities, three.probabilities, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(one.labels, three.labels)

    @pytest.mark.parametrize(
        ("name", "batch_size", "passes", "call"),
        [
            ("point3d", 1, 8, (1, 4, 8, 8, 8)),  # crop (8, 8, 7) padded to the patch: one tile, one call a pass
            ("point2d", 7, 4, (7, 4, 8, 8)),  # the crop's 7 slices fit one patch each: one call a pass
        ],
    )
    def test_tta_with_a_flip_equivariant_model_changes_nothing(self, models, name, batch_size, passes, call):
        plain_recorder, tta_recorder = Recorder(models[name][0]), Recorder(models[name][0])
        plain = Engine([plain_recorder], batch_size=batch_size).segment(scan(), probabilities=True)
        tta = Engine([tta_recorder], batch_size=batch_size).segment(scan(), tta=True, probabilities=True)
        assert plain_recorder.shapes == [call]
        assert tta_recorder.shapes == [call] * passes  # 3D: 8 mirrorings; 2D: the 4 in-plane ones
        np.testing.assert_array_equal(tta.labels, plain.labels)
        np.testing.assert_array_equal(tta.labels, expected_labels())
        np.testing.assert_allclose(tta.probabilities, plain.probabilities, rtol=1e-6, atol=1e-7)

    def test_flip_sets(self):
        assert set(FLIPS) == {(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)} and len(FLIPS) == 8
        assert FLIPS_2D == ((), (0,), (1,), (0, 1))

    @pytest.mark.parametrize(("name", "expected"), [("conv3d", FLIPS), ("conv2d", FLIPS_2D)])
    def test_tta_feeds_each_mirrored_input_once(self, models, name, expected):
        data = preprocess(scan()).data  # (4, 8, 8, 7): no two mirrorings of it are equal
        assert len({flip(data, axes).tobytes() for axes in FLIPS}) == 8
        recorder = Recorder(models[name][0])
        Engine([recorder], batch_size=7).probabilities(data, tta=True)  # one call a pass (see above)
        seen = []
        for batch in recorder.batches:
            volume = batch[0] if batch.ndim == 5 else np.moveaxis(batch, 0, -1)  # 2D: slices back to (4, X, Y, Z)
            seen += [axes for axes in FLIPS if np.array_equal(volume, flip(data, axes))]
        assert seen == list(expected)

    def test_3d_tta_averages_the_eight_mirrored_predictions(self, models):
        model = models["conv3d"][0]
        data = preprocess(scan()).data
        expected = mean_over_flips(model, data, FLIPS)
        np.testing.assert_allclose(Engine([model]).probabilities(data, tta=True), expected, rtol=1e-5, atol=1e-6)

    def test_2d_tta_averages_the_four_in_plane_mirrored_predictions(self, models):
        model = models["conv2d"][0]
        data = preprocess(scan()).data
        tta = Engine([model]).probabilities(data, tta=True)
        np.testing.assert_allclose(tta, mean_over_flips(model, data, FLIPS_2D), rtol=1e-5, atol=1e-6)
        # flips along the slice axis would add nothing: the 8-flip average is the same
        np.testing.assert_allclose(tta, mean_over_flips(model, data, FLIPS), rtol=1e-5, atol=1e-6)

    def test_tta_ensemble_of_2d_and_3d_models_mirrors_each_its_own_way(self, models):
        data = preprocess(scan()).data
        conv3d, conv2d = models["conv3d"][0], models["conv2d"][0]
        rec3d, rec2d = Recorder(conv3d), Recorder(conv2d)
        both = Engine([rec3d, rec2d], batch_size=7).probabilities(data, tta=True)
        assert len(rec3d.shapes) == 8 and len(rec2d.shapes) == 4
        singles = [Engine([m], batch_size=7).probabilities(data, tta=True) for m in (conv3d, conv2d)]
        np.testing.assert_allclose(both, (singles[0] + singles[1]) / 2, rtol=1e-6, atol=1e-6)

    def test_ensemble_averages_probabilities(self, models):
        a, b, c = models["point3d"][0], models["point3d_b"][0], models["conv2d"][0]
        single = [Engine([m]).segment(scan(), probabilities=True).probabilities for m in (a, b, c)]
        both = Engine([a, b, c]).segment(scan(), probabilities=True)
        mean = (single[0] + single[1] + single[2]) / 3
        np.testing.assert_allclose(both.probabilities, mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(both.labels, regions_to_labels(mean))
        assert Engine([a, b]).model_sha256 == f"{a.sha256[:12]}+{b.sha256[:12]}"

    def test_image_smaller_than_every_patch(self, models):
        image = np.zeros((4, 3, 2, 1), dtype=np.float32)
        image[:, 1, 1, 0] = 1.0
        image[FLAIR, 0, 0, 0] = 5.0
        for name in ("point3d", "conv3d", "point2d", "conv2d"):
            result = Engine([models[name][0]]).segment(image, tta=True)
            assert result.labels.shape == (3, 2, 1)
            assert not result.labels[2].any()  # x = 2 lies outside the brain box

    def test_bad_input_is_refused(self, models):
        engine = Engine([models["point3d"][0]])
        with pytest.raises(ValueError, match=r"expected an image \(4, X, Y, Z\)"):
            engine.segment(np.zeros((3, *FULL), np.float32))
        with pytest.raises(ValueError, match=r"expected an image \(4, X, Y, Z\)"):
            engine.segment(np.zeros(FULL, np.float32))

    def test_bad_engine_arguments_are_refused(self, models):
        model = models["point3d"][0]
        with pytest.raises(ValueError, match="at least one model"):
            Engine([])
        with pytest.raises(ValueError, match="overlap"):
            Engine([model], overlap=1.0)
        with pytest.raises(ValueError, match="batch_size"):
            Engine([model], batch_size=0)
