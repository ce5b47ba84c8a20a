"""A PACS over DICOMweb: list the series of a study (QIDO-RS), fetch a series (WADO-RS), store instances (STOW-RS).

A thin layer over :class:`dicomweb_client.api.DICOMwebClient` that turns every way a PACS can fail into one
:class:`PacsError` carrying the HTTP status the service should answer (502: the PACS is unreachable or failing;
404: the study or series is not there) and a ``detail`` safe to show a user or write to a log: it names the PACS
by host and port, never a patient attribute, and a study or series only as "the study" with a short hash
(:func:`uid_ref`), never its UID in clear.

    pacs = Pacs("http://orthanc:8042/dicom-web", username="u", password="p", timeout_s=30)
    for series in pacs.series_of_study(study_uid):          # [{"SeriesInstanceUID": ..., "Modality": "MR", ...}]
        datasets = pacs.fetch_series(study_uid, series["SeriesInstanceUID"])
    pacs.store([segmentation_dataset])
"""

from __future__ import annotations

import hashlib
import logging
from io import BytesIO
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.errors import InvalidDicomError

__all__ = ["SERIES_FIELDS", "Pacs", "PacsError", "uid_ref"]

# dicomweb_client logs each request's URL (study and series UIDs in its path) at INFO and DEBUG; the service
# logs at INFO, so the library is held to warnings.
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)

SERIES_FIELDS = (
    "SeriesInstanceUID",
    "SeriesDescription",
    "Modality",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
)
"""The attributes :meth:`Pacs.series_of_study` returns for each series (those the PACS gives)."""

T = TypeVar("T")


def uid_ref(uid: str) -> str:
    """A short, stable reference to a UID that does not disclose it: the first 8 hex digits of its SHA-256."""
    return hashlib.sha256(uid.encode()).hexdigest()[:8]


class PacsError(Exception):
    """The PACS could not do what was asked.

    Attributes:
        status: the HTTP status for the service to answer (502 unreachable or failing, 404 not there).
        detail: what went wrong, without patient data or UIDs in clear.
        pacs_status: the PACS's own HTTP status, when it answered one.
    """

    def __init__(self, status: int, detail: str, *, pacs_status: int | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.pacs_status = pacs_status


class Pacs:
    """A DICOMweb PACS at ``url`` (its DICOMweb root, e.g. ``http://orthanc:8042/dicom-web``).

    Args:
        url: the DICOMweb root; QIDO, WADO and STOW all live under it.
        username, password: HTTP basic authentication, when the PACS asks for it.
        timeout_s: for connecting and for each read from the PACS (one attempt per request, no retries).
    """

    def __init__(
        self, url: str, *, username: str | None = None, password: str | None = None, timeout_s: float = 30
    ) -> None:
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the DICOMweb URL must be http(s)://HOST[:PORT]/PATH")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.where = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        self.session = requests.Session()
        if username is not None:
            self.session.auth = (username, password)
        self.client = DICOMwebClient(self.url, session=self.session, timeout=timeout_s)
        # The library retries 5 times with exponential back-off by default, on any exception too: a PACS that is
        # down would take ~30 s to report. One attempt, bounded by timeout_s; the caller decides about retrying.
        self.client.set_http_retry_params(retry=False)

    # ------------------------------------------------------------------------------------------- operations

    def series_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        """The series of a study (QIDO-RS), by SeriesNumber: for each, the :data:`SERIES_FIELDS` the PACS
        gave, keyed by keyword (``{"SeriesInstanceUID": "1.2...", "SeriesDescription": "T1", "Modality": "MR",
        "SeriesNumber": 3, "NumberOfSeriesRelatedInstances": 155}``).

        Raises:
            PacsError: 404 if the PACS knows no series of that study, 502 if it cannot be asked.
        """
        found = self._call(
            "search the series of the study",
            lambda: self.client.search_for_series(study_uid, fields=list(SERIES_FIELDS)),
        )
        if not isinstance(found, list):
            raise PacsError(502, f"the PACS at {self.where} answered the search with something other than a list")
        series = [self._series_attributes(item) for item in found]
        if not series:
            raise PacsError(404, f"the PACS has no series of the study (ref {uid_ref(study_uid)})")
        return sorted(series, key=lambda s: (s.get("SeriesNumber") is None, s.get("SeriesNumber") or 0,
                                             s.get("SeriesInstanceUID", "")))

    def fetch_series(self, study_uid: str, series_uid: str) -> list[pydicom.Dataset]:
        """Every instance of a series (WADO-RS), as the PACS sends them (explicit VR little endian by default).

        Raises:
            PacsError: 404 if the PACS has no such series, 502 if it cannot be asked.
        """
        ref = f"(study ref {uid_ref(study_uid)}, series ref {uid_ref(series_uid)})"
        datasets = self._call("retrieve the series", lambda: self._retrieve(study_uid, series_uid), not_found=ref)
        if not datasets:
            raise PacsError(404, f"the PACS has no instances of the series {ref}")
        if not all("SOPInstanceUID" in ds for ds in datasets):
            raise PacsError(502, f"the PACS at {self.where} sent an instance without its SOPInstanceUID")
        return list(datasets)

    def store(self, datasets: Sequence[pydicom.Dataset]) -> None:
        """Store instances (STOW-RS), each with its file meta information.

        Raises:
            PacsError: 502 if the PACS cannot be reached or refuses any of them.
        """
        if not datasets:
            return
        files = [self._as_file(ds) for ds in datasets]
        answer = self._call("store instances", lambda: self.client.store_instances(files))
        failed = getattr(answer, "FailedSOPSequence", None) or []
        if failed:
            reasons = sorted({str(getattr(item, "FailureReason", "?")) for item in failed})
            raise PacsError(
                502, f"the PACS at {self.where} refused {len(failed)} of {len(datasets)} instances "
                     f"(failure reason {', '.join(reasons)})",
            )

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Pacs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------- helpers

    def _retrieve(self, study_uid: str, series_uid: str) -> list[pydicom.Dataset]:
        try:
            return self.client.retrieve_series(study_uid, series_uid)
        except InvalidDicomError:
            # A part without the 128-byte preamble and "DICM": Orthanc sends instances back as they were stored,
            # and pydicom 3 writes a dataset without them unless told to; read the parts again, leniently.
            response = self.session.get(
                f"{self.url}/studies/{study_uid}/series/{series_uid}", timeout=self.timeout_s,
                headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'},
            )
            response.raise_for_status()
            parts = self.client._decode_multipart_message(response, stream=False)  # noqa: SLF001
            return [pydicom.dcmread(BytesIO(part), force=True) for part in parts]

    @staticmethod
    def _as_file(ds: pydicom.Dataset) -> pydicom.Dataset:
        """``ds`` ready to be written as a DICOM file (preamble, "DICM", file meta); a shallow copy if it lacked
        the preamble, which pydicom 3 writes only when the dataset has one."""
        meta = getattr(ds, "file_meta", None)
        if meta is None or "TransferSyntaxUID" not in meta:
            raise ValueError("each dataset to store needs its file meta information with a TransferSyntaxUID")
        if getattr(ds, "preamble", None) is None:
            ds = ds.copy()
            ds.preamble = b"\0" * 128
        return ds

    @staticmethod
    def _series_attributes(item: object) -> dict[str, Any]:
        if not isinstance(item, dict):
            raise PacsError(502, "the PACS answered the search with something other than DICOM JSON")
        try:
            dataset = pydicom.Dataset.from_json(item)
        except Exception as exc:  # noqa: BLE001 - any malformed attribute: the PACS's fault, not the caller's
            raise PacsError(502, f"the PACS answered the search with malformed DICOM JSON ({type(exc).__name__})")
        attributes: dict[str, Any] = {}
        for keyword in SERIES_FIELDS:
            value = dataset.get(keyword)
            if value is None or value == "":
                continue
            attributes[keyword] = int(value) if keyword in ("SeriesNumber", "NumberOfSeriesRelatedInstances") \
                else str(value)
        if "SeriesInstanceUID" not in attributes:
            raise PacsError(502, "the PACS listed a series without its SeriesInstanceUID")
        return attributes

    def _call(self, what: str, call: Callable[[], T], *, not_found: str | None = None) -> T:
        """``call()``, every failure turned into a :class:`PacsError` (the library's messages hold the URL,
        hence the UIDs: only their type and the PACS's status code are kept)."""
        try:
            return call()
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status == 404 and not_found is not None:
                raise PacsError(404, f"the PACS has no such series {not_found}", pacs_status=404) from None
            reason = {401: "it asks for valid credentials", 403: "it refuses access"}.get(status, "it failed")
            raise PacsError(
                502, f"the PACS at {self.where} answered {status} to the request to {what}: {reason}",
                pacs_status=status,
            ) from None
        except requests.Timeout:
            raise PacsError(502, f"the PACS at {self.where} did not answer in time ({what})") from None
        except requests.ConnectionError:
            raise PacsError(502, f"the PACS at {self.where} cannot be reached ({what})") from None
        except requests.RequestException as exc:
            raise PacsError(502, f"the request to the PACS at {self.where} failed ({what}: "
                                 f"{type(exc).__name__})") from None
        except (ValueError, KeyError, TypeError, AttributeError, InvalidDicomError) as exc:
            raise PacsError(502, f"the PACS at {self.where} sent an answer that cannot be read ({what}: "
                                 f"{type(exc).__name__})") from None
