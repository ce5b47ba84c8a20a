"""Models exported by the trainer (2D and 3D, untrained weights) are served like the hand-built ones."""

from __future__ import annotations

import base64
import gzip

import nibabel as nib
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training.export import card_for, export_onnx  # noqa: E402
from training.networks import build_network, count_parameters  # noqa: E402

from tests.service.support import write_case  # noqa: E402


@pytest.fixture(scope="module")
def trainer_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trainer-models")
    for name, arch, dims, patch in (("unet3d", "unet", 3, (16, 16, 16)), ("resunet2d", "resunet", 2, (32, 32))):
        torch.manual_seed(0)
        kwargs = {"spatial_dims": dims, "in_channels": 4, "out_channels": 3, "channels": [4, 8, 16]}
        model = build_network(arch, **kwargs)
        card = card_for(name, arch, kwargs, dims, patch, count_parameters(model), {"data": "none (test)"})
        export_onnx(model, folder / f"{name}.onnx", card=card)
    return folder


@pytest.fixture(scope="module")
def trainer_server(server_factory, trainer_models):
    return server_factory(trainer_models)


class TestTrainerExports:
    @pytest.mark.parametrize("model", ["unet3d", "resunet2d", "ensemble"])
    def test_served(self, trainer_server, tmp_path, model):
        server = trainer_server
        scan = np.random.default_rng(1).normal(100.0, 20.0, size=(4, 30, 34, 21)).astype(np.float32)
        parts = write_case(tmp_path, scan)
        files = {name: path.read_bytes() for name, path in parts.items()}
        with server.client(timeout=120) as client:
            listed = {m["name"]: m for m in client.get("/models").json()["models"]}
            assert listed["resunet2d"]["spatial_dims"] == 2 and listed["unet3d"]["spatial_dims"] == 3
            response = client.post("/segment", params={"model": model}, files=files)
        assert response.status_code == 200, response.text
        summary = response.json()
        assert summary["model"] == model and summary["shape"] == [30, 34, 21]
        mask = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(summary["mask"])))
        reference = nib.load(parts["flair"])
        assert mask.shape == reference.shape and np.allclose(mask.affine, reference.affine)
        assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1, 2, 4}
