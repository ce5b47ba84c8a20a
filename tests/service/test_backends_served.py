"""The service on its default backend (``auto``) and on each backend named: ``/models`` tells what really runs
the models, and the masks are the oracle's."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from service.inference.openvino_backend import cpu_supports_bf16, openvino_available
from tests.service.support import expected_labels, write_case
from tests.service.test_segment import decode_mask


def segment_labels(server, tmp_path) -> np.ndarray:
    files = {name: path.read_bytes() for name, path in write_case(tmp_path, None).items()}
    response = httpx.post(server.url + "/segment", files=files, params={"model": "ensemble", "tta": "true"}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["provider"] == httpx.get(server.url + "/models").json()["models"][0]["provider"]
    return np.asarray(decode_mask(base64.b64decode(response.json()["mask"])).dataobj)


@pytest.mark.parametrize(
    "settings",
    [
        {"backend": "auto", "providers": ""},
        {"backend": "onnxruntime"},
        pytest.param(
            {"backend": "openvino", "precision": "fp32"},
            marks=pytest.mark.skipif(not openvino_available(), reason="the openvino package is not installed"),
        ),
    ],
    ids=["auto", "onnxruntime", "openvino-fp32"],
)
def test_models_report_what_runs_them_and_masks_are_right(server_factory, models_dir, tmp_path, settings):
    server = server_factory(models_dir, settings=settings)
    listed = httpx.get(server.url + "/models").json()["models"]
    assert [m["name"] for m in listed] == ["resunet", "unet"]
    described = {(m["backend"], m["device"], m["precision"], m["provider"]) for m in listed}
    if settings["backend"] == "auto":
        if openvino_available():
            expected = ("openvino", "CPU", "bf16" if cpu_supports_bf16() else "fp32", "OpenVINO CPU")
        else:
            expected = ("onnxruntime", "CPU", "fp32", "CPUExecutionProvider")
    elif settings["backend"] == "openvino":
        expected = ("openvino", "CPU", "fp32", "OpenVINO CPU")
    else:
        expected = ("onnxruntime", "CPU", "fp32", "CPUExecutionProvider")
    assert described == {expected}
    np.testing.assert_array_equal(segment_labels(server, tmp_path), expected_labels())
