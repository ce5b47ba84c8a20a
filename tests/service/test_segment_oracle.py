"""``tta`` and ``ensemble`` over HTTP give exactly what the engine computes in process, and change the mask.

The models here are not mirror-symmetric (a 1x1x3 kernel that looks one voxel along Z) and two of them only
agree with the expected segmentation once averaged, so a service that ignored ``tta`` or served one member
as the ensemble would fail these tests (the pointwise test models of the other modules cannot tell).
"""

from __future__ import annotations

import base64
import gzip

import nibabel as nib
import numpy as np
import pytest

from service.core.labels import MODALITIES
from service.core.nifti import load_volume
from service.inference.engine import Engine
from service.inference.backends import BackendOptions
from service.inference.model import OnnxModel
from tests.service.support import write_case
from tests.tiny_models import FLAIR, T1CE, T2, build_model
from tests.tiny_models import scan as tumour_scan


def build_shift_model(folder, name: str, *, tap: int, gain: float, bias: float):
    """WT/TC/ET logits = gain * z(channel) at Z offset ``tap - 1`` + bias (a 1x1x3 kernel, zero padded)."""
    weight = np.zeros((3, 4, 1, 1, 3), dtype=np.float32)
    for region, channel in enumerate((FLAIR, T1CE, T2)):
        weight[region, channel, 0, 0, tap] = gain
    return build_model(folder, name, weight, np.full(3, bias, dtype=np.float32), patch_size=(8, 8, 8))


@pytest.fixture(scope="module")
def shift_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shift-models")
    build_shift_model(folder, "unet", tap=0, gain=10.0, bias=-1.0)  # looks one voxel down
    build_shift_model(folder, "resunet", tap=2, gain=10.0, bias=-1.0)  # looks one voxel up
    return folder


@pytest.fixture(scope="module")
def shift_server(server_factory, shift_models):
    return server_factory(shift_models)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    parts = write_case(tmp_path_factory.mktemp("case"), tumour_scan())
    image = np.stack([load_volume(parts[m])[0] for m in MODALITIES])
    return {name: path.read_bytes() for name, path in parts.items()}, image


def _mask(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    img = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(response.json()["mask"])))
    return np.asarray(img.dataobj)


def _engine(folder, *names) -> Engine:
    return Engine([OnnxModel(folder / f"{n}.onnx", BackendOptions(providers=("CPUExecutionProvider",))) for n in names])


class TestAgainstTheEngine:
    def test_tta_is_applied(self, shift_server, shift_models, case):
        files, image = case
        with shift_server.client() as client:
            plain = _mask(client.post("/segment", params={"model": "unet"}, files=files))
            mirrored = _mask(client.post("/segment", params={"model": "unet", "tta": "true"}, files=files))
        engine = _engine(shift_models, "unet")
        np.testing.assert_array_equal(plain, engine.segment(image).labels)
        np.testing.assert_array_equal(mirrored, engine.segment(image, tta=True).labels)
        assert not np.array_equal(plain, mirrored)  # the model is not mirror-symmetric: TTA must show

    def test_ensemble_averages_both_members(self, shift_server, shift_models, case):
        files, image = case
        with shift_server.client() as client:
            members = [_mask(client.post("/segment", params={"model": m}, files=files)) for m in ("unet", "resunet")]
            ensemble = _mask(client.post("/segment", params={"model": "ensemble"}, files=files))
        np.testing.assert_array_equal(ensemble, _engine(shift_models, "resunet", "unet").segment(image).labels)
        assert not np.array_equal(ensemble, members[0]) and not np.array_equal(ensemble, members[1])
