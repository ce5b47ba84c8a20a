"""ONNX export: parity with PyTorch, dynamic axes, the model card in both places, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from service.core.postprocess import PostprocessingRules
from service.inference.card import ModelCard, PostprocessingSpec, card_path, file_sha256, read_card, write_card
from training.export import ExportError, card_for, default_check_shape, export_onnx, update_card
from training.networks import build_network, count_parameters

CHANNELS = (4, 8, 16, 32)  # sizes must be multiples of 8
# The networks need every size divisible by 2 ** (depth - 1) = 8, so the parity sizes cannot be odd: they are
# non-cubic and differ from the patch the graph was traced with.
CASES = {  # name: (architecture, spatial_dims, patch, another valid non-cubic size)
    "unet3d": ("unet", 3, (32, 32, 32), (24, 16, 40)),
    "resunet3d": ("resunet", 3, (32, 32, 32), (16, 40, 24)),
    "unet2d": ("unet", 2, (48, 48), (40, 24)),
}


def make(key: str, seed: int = 0):
    arch, dims, patch, _ = CASES[key]
    torch.manual_seed(seed)
    model = build_network(arch, spatial_dims=dims, channels=CHANNELS)
    with torch.no_grad():  # move the norms away from their (deduplicable) initial values, like a trained net
        for module in model.modules():
            if isinstance(module, (nn.InstanceNorm2d, nn.InstanceNorm3d)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    card = card_for(key, arch, model.config(), dims, patch, count_parameters(model), {"data": "synthetic test"})
    return model, card


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each case exported once: key -> (model, returned card, onnx path)."""
    out = {}
    for key in CASES:
        folder = tmp_path_factory.mktemp(key)
        model, card = make(key)
        path = folder / f"{key}.onnx"
        out[key] = (model, export_onnx(model, path, card=card), path)
    return out


def run_ort(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"image": x})
    return logits


@pytest.mark.parametrize("key", list(CASES))
class TestExportedModel:
    def test_parity_on_a_non_cubic_size_other_than_the_traced_patch(self, exported, key):
        model, _, path = exported[key]
        x = torch.randn(1, 4, *CASES[key][3], generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            expected = model.eval()(x).numpy()
        got = run_ort(path, x.numpy())
        assert got.shape == expected.shape == (1, 3, *CASES[key][3])
        assert np.max(np.abs(got - expected)) <= 1e-4  # random weights: logits of order 1, an absolute 1e-4

    def test_card_records_the_parity_check(self, exported, key):
        _, card, _ = exported[key]
        parity = card.training["onnx_parity"]
        assert parity["max_abs_logit_difference"] <= 1e-4 and parity["atol"] == 1e-4 and parity["input"][0] == 2

    def test_axes_are_dynamic(self, exported, key):
        _, card, path = exported[key]
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["image"]
        assert [o.name for o in session.get_outputs()] == ["logits"]
        assert all(isinstance(d, str) for d in session.get_inputs()[0].shape[2:])
        for batch, size in [(1, card.patch_size), (3, CASES[key][3])]:
            x = np.random.default_rng(0).standard_normal((batch, 4, *size), dtype=np.float32)
            assert run_ort(path, x).shape == (batch, 3, *size)

    def test_metadata_round_trips_to_the_card(self, exported, key):
        model, card, path = exported[key]
        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert "sha256" not in props
        from_onnx = ModelCard.from_metadata(props)
        assert from_onnx == card.model_copy(update={"sha256": None})
        assert from_onnx.network == model.config()
        assert build_network(from_onnx.architecture, **from_onnx.network).config() == model.config()

    def test_json_card_beside_with_file_hash(self, exported, key):
        _, card, path = exported[key]
        on_disk = read_card(card_path(path))
        assert on_disk == card
        assert card.sha256 == file_sha256(path) and len(card.sha256) == 64
        assert sorted(p.name for p in path.parent.iterdir()) == [f"{key}.json", f"{key}.onnx"]

    def test_fp32_weights_without_duplicates(self, exported, key):
        _, card, path = exported[key]
        inits = onnx.load(str(path)).graph.initializer
        names = [i.name for i in inits]
        assert len(names) == len(set(names))
        assert {i.data_type for i in inits} == {onnx.TensorProto.FLOAT}
        assert sum(int(np.prod(i.dims)) for i in inits) == card.parameters
        assert path.stat().st_size < 4 * card.parameters + 64_000


class TestExportBehaviour:
    def test_default_check_shape_is_non_cubic_and_valid(self):
        assert default_check_shape((128, 128, 128), 16) == (128, 128, 112)
        assert default_check_shape((16, 16, 16), 16) == (16, 16, 32)
        assert default_check_shape((160, 192), 8) == (160, 184)

    def test_training_mode_is_restored(self, tmp_path):
        model, card = make("unet2d")
        model.train()
        export_onnx(model, tmp_path / "m.onnx", card=card)
        assert model.training

    def test_update_card_changes_both_copies(self, tmp_path):
        model, card = make("unet3d")
        path = tmp_path / "m.onnx"
        before = export_onnx(model, path, card=card)
        validation = {"cases": 2, "dice": {"WT": 0.5, "TC": 0.25, "ET": 0.125}}
        after = update_card(path, validation=validation)
        assert after.validation == validation and before.validation is None
        assert after.sha256 == file_sha256(path) != before.sha256
        assert read_card(card_path(path)) == after
        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert json.loads(props["validation"]) == validation
        assert ModelCard.from_metadata(props) == after.model_copy(update={"sha256": None})
        assert after.created == before.created
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.onnx"]  # no temporary left
        x = np.zeros((1, 4, 16, 16, 24), dtype=np.float32)
        assert run_ort(path, x).shape == (1, 3, 16, 16, 24)  # graph untouched

    def test_update_card_refuses_sha256_and_unknown_fields(self, tmp_path):
        model, card = make("unet2d")
        path = tmp_path / "m.onnx"
        export_onnx(model, path, card=card)
        with pytest.raises(ValueError, match="sha256 is computed"):
            update_card(path, sha256="0" * 64)
        with pytest.raises(ValueError, match="validaton"):
            update_card(path, validaton={})
        assert read_card(card_path(path)).sha256 == file_sha256(path)

    def test_update_card_keeps_the_postprocessing_learned_into_the_json_card(self, tmp_path):
        model, card = make("unet2d")
        path = tmp_path / "m.onnx"
        exported = export_onnx(model, path, card=card)
        spec = PostprocessingSpec.from_rules(PostprocessingRules(et_to_ncr_below_ml=0.5), learned_on={"cases": 2})
        write_card(exported.model_copy(update={"postprocessing": spec}), card_path(path))  # as learn-postprocessing
        after = update_card(path, validation={"cases": 2})
        assert after.postprocessing == spec and read_card(card_path(path)).postprocessing == spec
        assert after.validation == {"cases": 2} and after.sha256 == file_sha256(path)

    def test_update_card_on_a_foreign_onnx_file_says_to_export_again(self, tmp_path):
        model, card = make("unet2d")
        path = tmp_path / "m.onnx"
        export_onnx(model, path, card=card)
        proto = onnx.load(str(path))
        del proto.metadata_props[:]
        onnx.save(proto, str(path))
        with pytest.raises(ValueError, match=r"no valid model card .*python -m training export"):
            update_card(path, validation={})

    def test_missing_folder_leaves_nothing(self, tmp_path):
        model, card = make("unet2d")
        with pytest.raises(ValueError, match="does not exist"):
            export_onnx(model, tmp_path / "nope" / "m.onnx", card=card)
        assert list(tmp_path.iterdir()) == []

    def test_parity_failure_leaves_no_partial_file(self, tmp_path):
        class Drifting(nn.Module):
            """Its eager output changes on every call, so the traced graph cannot match it."""

            def __init__(self):
                super().__init__()
                self.head = nn.Conv3d(4, 3, 1)
                self.calls = 0

            def forward(self, x):
                self.calls += 1
                return self.head(x) + float(self.calls)

        card = card_for("drift", "unet", {}, 3, (8, 8, 8), 15, {})
        expected = r"differs from PyTorch by 1 \(> atol 0.0001 \+ rtol 1e-05 x max\|logit\|.*eval mode.*report it.*nothing was written"
        with pytest.raises(ExportError, match=expected):
            export_onnx(Drifting(), tmp_path / "drift.onnx", card=card, check_shape=(8, 8, 16))
        assert list(tmp_path.iterdir()) == []

    @pytest.mark.parametrize(
        "change, message",
        [
            ({"spatial_dims": 2, "patch_size": (32, 32)}, "card says spatial_dims=2, the model has 3"),
            ({"architecture": "resunet"}, "card architecture 'resunet' but the model is 'unet'"),
            ({"network": {"channels": [8, 16, 32, 64]}}, "does not describe the model"),
        ],
    )
    def test_card_must_describe_the_model(self, tmp_path, change, message):
        model, card = make("unet3d")
        with pytest.raises(ValueError, match=message):
            export_onnx(model, tmp_path / "m.onnx", card=card.model_copy(update=change))
        assert list(tmp_path.iterdir()) == []

    def test_bad_arguments(self, tmp_path):
        model, card = make("unet2d")
        with pytest.raises(ValueError, match="opset must be >= 17, got 13"):
            export_onnx(model, tmp_path / "m.onnx", card=card, opset=13)
        with pytest.raises(ValueError, match=r"must end with \.onnx"):
            export_onnx(model, tmp_path / "m.pt", card=card)
        with pytest.raises(ValueError, match="float32 weights"):
            export_onnx(model.double(), tmp_path / "m.onnx", card=card)
        assert list(tmp_path.iterdir()) == []

    def test_card_for_fills_created_in_utc(self):
        _, card = make("unet2d")
        assert card.created.endswith("+00:00") and card.sha256 is None and card.opset == 17
        assert card.network["channels"] == list(CHANNELS)
