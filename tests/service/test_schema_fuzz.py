"""Schemathesis over the service's own ``/openapi.json``, against real servers.

Every operation of the document gets generated requests, positive (as the document describes them) and
negative (query parameters, headers and multipart bodies that break it); every answer must be no server
error and must match what the document promises: a documented status code and content type, documented
headers, and a body valid against the documented schema. One server runs without API keys; another has keys
(with ``BRATS_PROTECT_METADATA``), and its operations are called with a valid key and without one (then a
documented 401 is the right answer).

The schema is loaded from each server's ``/openapi.json`` (``schemathesis.openapi.from_url``) inside the test,
and each operation's cases come from its Hypothesis strategy. With ``CI=true`` the examples are derandomized
(the same on every run).
"""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation.modes import GenerationMode

from service.core.labels import MODALITIES
from service.main import create_app
from service.settings import Settings
from tests.hostile import nifti_bytes
from tests.service.support import affine_for, expected_labels, tumour_scan

settings.register_profile("ci", deadline=None, derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI", "").lower() == "true" else "dev")

API_KEY = "schema-fuzz-key-1"
EXAMPLES = 25
TIMEOUT_S = 10
PACS_OPERATION = ("POST", "/dicomweb/studies/{study_uid}/segment")
PROBES = {"/healthz", "/readyz"}
"""Operations that never need an API key."""


def _operations() -> list[tuple[str, str, GenerationMode]]:
    """``(METHOD, path, mode)`` for every operation in the application's OpenAPI document: positive cases for
    all, negative ones for those with parameters or a body to break."""
    document = create_app(Settings(models_dir="/nonexistent")).openapi()
    out = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            out.append((method.upper(), path, GenerationMode.POSITIVE))
            if operation.get("parameters") or operation.get("requestBody"):
                out.append((method.upper(), path, GenerationMode.NEGATIVE))
    return out


CASES = _operations()
OPERATIONS = sorted({(method, path) for method, path, _ in CASES})


@pytest.fixture(scope="module")
def open_schema(server_factory, tmp_path_factory):
    """The schema served by a server without API keys."""
    server = server_factory(settings={"tmp_dir": tmp_path_factory.mktemp("schema-spool"), "max_queue": 16})
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


@pytest.fixture(scope="module")
def keyed_schema(server_factory, tmp_path_factory):
    """The schema served by a server whose every operation but the probes needs an API key."""
    server = server_factory(settings={
        "tmp_dir": tmp_path_factory.mktemp("schema-spool-keyed"),
        "api_keys": [API_KEY],
        "protect_metadata": True,
        "max_queue": 16,
    })
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


def fuzz(schema, method: str, path: str, mode: GenerationMode, *, headers=None, expect=None) -> None:
    """Run ``EXAMPLES`` generated cases of one operation through ``call_and_validate``.

    Args:
        headers: Sent with every case (over the generated ones).
        expect: Called with each case and its response for checks of the test's own.
    """
    operation = schema[path][method]
    # A part's schema says "binary"; that it must be a NIfTI volume no JSON schema can say, so schema-valid
    # bodies of random bytes are rightly refused (400) and positive data need not be accepted there.
    excluded = [schemathesis.checks.positive_data_acceptance] if (method, path) == ("POST", "/segment") else []
    if (method, path) == PACS_OPERATION:  # these servers have no PACS: its documented 503 is the right answer
        excluded += [schemathesis.checks.positive_data_acceptance, schemathesis.checks.not_a_server_error]

    @settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(case=operation.as_strategy(mode))
    def check(case):
        response = case.call_and_validate(headers=headers, excluded_checks=excluded, timeout=TIMEOUT_S)
        if expect is not None:
            expect(case, response)

    check()


def _decoded(data: bytes) -> np.ndarray:
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(data)).dataobj)


def _valid_upload() -> dict[str, bytes]:
    image = tumour_scan()
    parts = {m: nifti_bytes(image[i], affine_for()) for i, m in enumerate(MODALITIES)}
    parts["label"] = nifti_bytes(expected_labels(), affine_for(), dtype=np.uint8)
    return parts


class TestDocument:
    def test_every_operation_is_fuzzed(self, open_schema):
        served = {(result.ok().method.upper(), result.ok().path) for result in open_schema.get_all_operations()}
        assert sorted(served) == OPERATIONS
        assert ("POST", "/segment") in served

    @pytest.mark.parametrize("form", ["four modalities", "one 4D image"])
    @pytest.mark.parametrize("output", ["json", "nifti"])
    def test_a_real_segmentation_conforms(self, open_schema, form, output):
        """A valid upload is accepted, and its 200 (JSON summary or .nii.gz) matches the document."""
        parts = _valid_upload()
        if form == "one 4D image":
            image = np.stack([_decoded(parts.pop(m)) for m in MODALITIES])
            parts["image"] = nifti_bytes(np.moveaxis(image, 0, -1), affine_for())
        case = open_schema["/segment"]["POST"].Case(
            body=parts, media_type="multipart/form-data", query={"format": output}
        )
        response = case.call_and_validate(timeout=TIMEOUT_S)
        assert response.status_code == 200, response.text
        if output == "json":
            assert response.json()["dice"]["WT"] == 1.0
        else:
            assert response.headers["content-type"] == ["application/gzip"]
            assert response.content[:2] == b"\x1f\x8b"


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {mode.value}" for m, p, mode in CASES])
class TestConformance:
    def test_without_api_keys(self, open_schema, method, path, mode):
        fuzz(open_schema, method, path, mode)

    def test_with_a_valid_api_key(self, keyed_schema, method, path, mode):
        def not_refused(case, response):
            assert response.status_code != 401, response.text

        fuzz(keyed_schema, method, path, mode, headers={"X-API-Key": API_KEY}, expect=not_refused)

    def test_without_the_api_key_that_is_required(self, keyed_schema, method, path, mode):
        def refused_unless_probe(case, response):
            """No generated header can hold the one valid key: every operation but the probes says 401."""
            if path in PROBES:
                assert response.status_code != 401, response.text
            else:
                assert response.status_code == 401, response.text

        fuzz(keyed_schema, method, path, mode, expect=refused_unless_probe)
