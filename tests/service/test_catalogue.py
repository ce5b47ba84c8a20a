"""ModelCatalogue: loading, readiness and reasons, engines by name."""

from __future__ import annotations

import pytest

from service.catalogue import ENSEMBLE, ModelCatalogue
from service.settings import Settings
from tests.service.support import build_model, expected_labels, tumour_scan


def catalogue_for(models_dir, **settings) -> ModelCatalogue:
    settings.setdefault("providers", ["CPUExecutionProvider"])
    settings.setdefault("threads", 1)
    return ModelCatalogue(Settings(models_dir=models_dir, **settings))


class TestLoad:
    def test_ready_with_default_resunet(self, models_dir):
        catalogue = catalogue_for(models_dir)
        assert (catalogue.ready, catalogue.reason) == (False, "the models are still loading")
        catalogue.load()
        assert catalogue.ready and catalogue.reason is None
        assert catalogue.names == ["resunet", "unet"]
        assert catalogue.default == "resunet"
        assert catalogue.choices == ["resunet", "unet", ENSEMBLE]
        assert catalogue.metrics.ready._value.get() == 1
        assert catalogue.metrics.models_loaded._value.get() == 2

    def test_configured_default(self, models_dir):
        catalogue = catalogue_for(models_dir, default_model="unet")
        catalogue.load()
        assert catalogue.ready and catalogue.default == "unet"

    def test_first_name_without_resunet(self, tmp_path):
        build_model(tmp_path, "zeta")
        build_model(tmp_path, "alpha")
        catalogue = catalogue_for(tmp_path)
        catalogue.load()
        assert catalogue.default == "alpha"

    def test_unknown_default_is_not_ready(self, models_dir):
        catalogue = catalogue_for(models_dir, default_model="vnet")
        catalogue.load()
        assert not catalogue.ready
        assert "'vnet'" in catalogue.reason and "resunet" in catalogue.reason and "unet" in catalogue.reason

    @pytest.mark.parametrize("folder, reason", [("missing", "does not exist"), ("empty", "holds no NAME.onnx")])
    def test_no_models_is_not_ready(self, tmp_path, folder, reason, caplog):
        (tmp_path / "empty").mkdir()
        catalogue = catalogue_for(tmp_path / folder)
        catalogue.load()  # never raises
        assert not catalogue.ready and reason in catalogue.reason
        assert catalogue.models == {} and catalogue.default is None and catalogue.choices == []
        assert any("NOT READY" in r.getMessage() and reason in r.getMessage() for r in caplog.records)

    def test_corrupt_model_is_not_ready(self, tmp_path):
        build_model(tmp_path, "unet")
        (tmp_path / "unet.onnx").write_bytes(b"not onnx")
        catalogue = catalogue_for(tmp_path)
        catalogue.load()
        assert not catalogue.ready and "sha256" in catalogue.reason


class TestEngines:
    def test_engine_per_name_and_ensemble(self, models_dir):
        catalogue = catalogue_for(models_dir)
        catalogue.load()
        unet = catalogue.engine("unet")
        assert unet is catalogue.engine("unet")  # cached
        assert [m.name for m in unet.models] == ["unet"]
        ensemble = catalogue.engine(ENSEMBLE)
        assert sorted(m.name for m in ensemble.models) == ["resunet", "unet"]
        assert ensemble.model_sha256.count("+") == 1
        assert (ensemble.segment(tumour_scan()).labels == expected_labels()).all()

    def test_ensemble_of_3d_and_2d(self, models_dir_2d):
        catalogue = catalogue_for(models_dir_2d)
        catalogue.load()
        assert len(catalogue.engine(ENSEMBLE).models) == 3
        assert (catalogue.engine("unet2d").segment(tumour_scan()).labels == expected_labels()).all()

    def test_unknown_name_lists_valid_ones(self, models_dir):
        catalogue = catalogue_for(models_dir)
        catalogue.load()
        with pytest.raises(KeyError, match="unknown model 'vnet'; valid names: resunet, unet, ensemble"):
            catalogue.engine("vnet")
