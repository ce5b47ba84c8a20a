"""Tests for service.inference.card: validation, the reserved name, metadata round trip, atomic writes."""

from __future__ import annotations

import json

import pytest

from service.inference.card import ModelCard, PostprocessingSpec, read_card, write_card


def card_fields(**updates) -> dict:
    fields = {
        "name": "tiny",
        "architecture": "unet",
        "spatial_dims": 3,
        "patch_size": [8, 8, 8],
        "opset": 17,
        "parameters": 39,
        "training": {"data": "none: a hand-made test card"},
        "created": "2024-01-01T00:00:00Z",
    }
    return {**fields, **updates}


class TestValidation:
    def test_valid_card(self):
        card = ModelCard.model_validate(card_fields())
        assert card.patch_size == (8, 8, 8) and card.in_channels == 4 and card.sha256 is None

    def test_patch_size_must_have_spatial_dims_sizes(self):
        with pytest.raises(ValueError, match=r"patch_size \[8, 8, 8\] has 3 sizes, expected 2 \(spatial_dims\)"):
            ModelCard.model_validate(card_fields(spatial_dims=2))

    def test_in_channels_must_match_the_modalities(self):
        with pytest.raises(ValueError, match="in_channels 3 does not match 4 modalities"):
            ModelCard.model_validate(card_fields(in_channels=3))

    def test_patch_size_must_be_positive(self):
        with pytest.raises(ValueError, match=r"patch_size must be positive, got \[8, 0, 8\]"):
            ModelCard.model_validate(card_fields(patch_size=[8, 0, 8]))

    def test_unknown_field_is_refused(self):
        with pytest.raises(ValueError, match="pacth_size"):
            ModelCard.model_validate(card_fields(pacth_size=[8, 8, 8]))

    @pytest.mark.parametrize("name", ["ensemble", "Ensemble"])
    def test_ensemble_is_a_reserved_name(self, name):
        with pytest.raises(ValueError, match=rf"model name '{name}' is reserved: model=ensemble means the average"):
            ModelCard.model_validate(card_fields(name=name))

    def test_reserved_name_in_a_json_card_names_the_file(self, tmp_path):
        path = tmp_path / "ensemble.json"
        path.write_text(json.dumps(card_fields(name="ensemble")))
        with pytest.raises(ValueError, match=r"(?s)ensemble\.json: invalid model card.*is reserved"):
            read_card(path)

    def test_names_like_ensemble_are_allowed(self):
        assert ModelCard.model_validate(card_fields(name="ensemble_unet")).name == "ensemble_unet"


class TestMetadata:
    def test_round_trip_leaves_out_sha256(self):
        card = ModelCard.model_validate(card_fields(sha256="ab" * 32))
        props = card.to_metadata()
        assert "sha256" not in props and json.loads(props["patch_size"]) == [8, 8, 8]
        assert ModelCard.from_metadata(props) == card.model_copy(update={"sha256": None})

    def test_unknown_key_is_refused(self):
        props = {**ModelCard.model_validate(card_fields()).to_metadata(), "pacth_size": "[8, 8, 8]", "zz": "1"}
        with pytest.raises(ValueError, match=r"unknown model card fields \['pacth_size', 'zz'\]; expected only"):
            ModelCard.from_metadata(props)

    def test_value_that_is_not_json_is_refused(self):
        props = {**ModelCard.model_validate(card_fields()).to_metadata(), "name": "tiny"}  # not JSON-encoded
        with pytest.raises(ValueError, match="model card field 'name' is not valid JSON"):
            ModelCard.from_metadata(props)

    def test_reserved_name_is_refused(self):
        props = {**ModelCard.model_validate(card_fields()).to_metadata(), "name": json.dumps("ensemble")}
        with pytest.raises(ValueError, match="is reserved"):
            ModelCard.from_metadata(props)


class TestWriteCard:
    def test_round_trip_and_nothing_left_beside_it(self, tmp_path):
        card = ModelCard.model_validate(card_fields(sha256="cd" * 32))
        path = tmp_path / "tiny.json"
        write_card(card, path)
        write_card(card.model_copy(update={"parameters": 40}), path)
        assert read_card(path).parameters == 40
        assert [p.name for p in tmp_path.iterdir()] == ["tiny.json"]

    def test_another_writers_tmp_file_is_left_alone(self, tmp_path):
        path = tmp_path / "tiny.json"
        other = tmp_path / "tiny.json.tmp"  # the name a fixed temporary name would have taken
        other.write_text("another writer's half-written card")
        write_card(ModelCard.model_validate(card_fields()), path)
        assert other.read_text() == "another writer's half-written card"
        assert read_card(path).name == "tiny"


class TestPostprocessing:
    RULES = {
        "WT": {"action": "largest_component"},
        "TC": {"action": "none"},
        "ET": {"action": "remove_small", "min_size_ml": 0.1},
        "et_to_ncr_below_ml": 0.5,
        "learned_on": {"cases": 3, "data": "BraTS2020", "dice_before": {"WT": 0.8}, "dice_after": {"WT": 0.85}},
    }

    def test_older_cards_without_it_load(self, tmp_path):
        path = tmp_path / "tiny.json"
        path.write_text(json.dumps(card_fields()))
        assert read_card(path).postprocessing is None

    def test_rules_round_trip_through_the_json_card(self, tmp_path):
        card = ModelCard.model_validate(card_fields(postprocessing=self.RULES))
        path = tmp_path / "tiny.json"
        write_card(card, path)
        again = read_card(path)
        assert again == card
        rules = again.postprocessing.rules()
        assert rules.WT.action == "largest_component" and rules.ET.min_size_ml == 0.1
        assert rules.et_to_ncr_below_ml == 0.5
        assert json.loads(path.read_text())["postprocessing"]["ET"] == {"action": "remove_small", "min_size_ml": 0.1}

    def test_from_rules_is_the_inverse_of_rules(self):
        spec = ModelCard.model_validate(card_fields(postprocessing=self.RULES)).postprocessing
        assert PostprocessingSpec.from_rules(spec.rules(), learned_on=spec.learned_on) == spec

    @pytest.mark.parametrize(
        "change, message",
        [
            ({"WT": {"action": "remove_small"}}, "rule remove_small needs min_size_ml, a finite volume > 0 in ml"),
            ({"TC": {"action": "largest_component", "min_size_ml": 1.0}}, "belongs to the rule remove_small only"),
            ({"ET": {"action": "biggest"}}, "largest_component"),
            ({"et_to_ncr_below_ml": -1.0}, "greater than or equal to 0"),
            ({"NCR": {"action": "none"}}, "NCR"),  # unknown fields are refused, like the rest of the card
            ({"ET": {"action": "none", "size": 1}}, "size"),
        ],
    )
    def test_invalid_rules_are_refused(self, change, message):
        with pytest.raises(ValueError, match=message):
            ModelCard.model_validate(card_fields(postprocessing={**self.RULES, **change}))
