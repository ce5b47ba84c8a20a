"""``python -m benchmarks.soak``: a short real run on tiny models, SIGTERM handling, and the criteria.

The run starts its own service, so these tests need no server fixture; the tiny models (one pointwise
convolution each) keep an inference to a few milliseconds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks import soak
from tests.service.support import build_models

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def soak_command(models_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "benchmarks.soak", "--models-dir", str(models_dir), "--out", str(out),
        "--shape", "24,24,16", "--clients", "4", "--max-queue", "1", "--threads", "1", "--warmup", "2", *extra,
    ]


def soak_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    return build_models(tmp_path_factory.mktemp("soak-models"))


def test_a_short_soak_passes_and_records_its_figures(tiny_models, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        soak_command(tiny_models, out, "--duration", "12"),
        cwd=PROJECT_ROOT, env=soak_env(), capture_output=True, text=True, timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\[\s+10 s\] \d+ requests", result.stdout), "no progress line after 10 s"
    assert "Overall: PASS" in result.stdout

    report = json.loads((out / "soak.json").read_text())
    assert report["passed"] is True
    assert [c["result"] for c in report["criteria"]] == ["PASS"] * 7
    answers = report["answers"]
    total = {}
    for counts in answers.values():
        for answer, n in counts.items():
            total[answer] = total.get(answer, 0) + n
    valid_200 = sum(answers[k].get("200", 0) for k in ("valid_3d_json", "valid_4d_json", "valid_3d_nifti",
                                                         "valid_4d_nifti"))
    assert valid_200 > 20
    assert report["correct_200"] == valid_200 and report["incorrect_200"] == 0
    assert report["final_request"] == "200, identical"
    assert answers["unknown_model"].get("422", 0) > 0 and answers["not_multipart"].get("415", 0) > 0
    assert answers["bad_checksum"].get("400", 0) > 0 and answers["oversized_header"].get("413", 0) > 0
    assert sum(answers[k].get("closed", 0) for k in ("abandon_upload", "abandon_after_upload")) > 0
    assert set(total) <= {"200", "400", "413", "415", "422", "503", "closed", "reset"}
    assert report["unexpected"] == 0 and report["server_errors"] == 0 and report["failures"] == []
    assert report["latency_s"]["all valid"]["n"] == valid_200
    assert report["leftovers"] == []
    warm, end = report["resources"]["warm_up"], report["resources"]["end"]
    assert end["fds"] <= warm["fds"] and end["rss"] <= 1.1 * warm["rss"]
    assert report["drain"]["drained"] is True
    assert report["server_stop"]["killed"] is False  # stopped by SIGTERM, not killed
    assert report["settings"]["max_queue"] == 1 and report["settings"]["clients"] == 4
    assert report["machine"]["cores"] == os.cpu_count()
    assert set(report["libraries"]) >= {"onnxruntime", "numpy", "fastapi", "uvicorn"}
    assert report["command"].startswith("python -m benchmarks.soak --models-dir")
    markdown = (out / "soak.md").read_text()
    assert "| criterion | measured | result |" in markdown and "Overall: PASS" in markdown
    assert "segmented with" in (out / "server.log").read_text()


def test_sigterm_stops_the_run_and_the_service(tiny_models, tmp_path):
    process = subprocess.Popen(
        soak_command(tiny_models, tmp_path / "out", "--duration", "600"),
        cwd=PROJECT_ROOT, env=soak_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        url = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            found = re.search(r"starting the service on (http://\S+)", line)
            url = found.group(1) if found else url
            if line.startswith("warm-up done") or not line:
                break
        assert url is not None and line.startswith("warm-up done"), process.stderr.read()
        time.sleep(1.0)  # under load
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/healthz", timeout=2.0)
    assert "interrupted: the service was stopped" in process.stderr.read()
    assert (tmp_path / "out" / "server.log").exists() and not (tmp_path / "out" / "soak.json").exists()


def test_a_service_that_cannot_get_ready_is_exit_status_2(tmp_path):
    empty = tmp_path / "no-models"
    empty.mkdir()
    result = subprocess.run(
        soak_command(empty, tmp_path / "out", "--duration", "5"),
        cwd=PROJECT_ROOT, env=soak_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "the service is not ready" in result.stderr and "no models" in result.stderr
    assert not (tmp_path / "out" / "soak.json").exists()


class TestCriteria:
    """:func:`benchmarks.soak.judge` on hand-made figures."""

    @staticmethod
    def report(**changes) -> soak.Report:
        report = soak.Report(command="", started="", settings={}, machine={}, libraries={})
        report.answers = {"valid_3d_json": {"200": 10}}
        report.correct_200 = 10
        report.final_request = "200, identical"
        report.drain = {"drained": True, "seconds": 0.1}
        report.resources = {"warm_up": {"rss": 100 << 20, "peak_rss": 110 << 20, "fds": 10},
                            "end": {"rss": 105 << 20, "peak_rss": 120 << 20, "fds": 10}}
        for key, value in changes.items():
            setattr(report, key, value)
        soak.judge(report)
        return report

    @staticmethod
    def failed(report: soak.Report) -> list[str]:
        return [c["criterion"] for c in report.criteria if c["result"] == "FAIL"]

    def test_all_pass(self):
        report = self.report()
        assert report.passed and self.failed(report) == []

    @pytest.mark.parametrize(
        ("changes", "criterion"),
        [
            ({"unexpected": 1}, "every answer is the expected one"),
            ({"server_errors": 1}, "no 5xx other than 503"),
            ({"incorrect_200": 1}, "every 200 carries the reference mask"),
            ({"correct_200": 0}, "every 200 carries the reference mask"),
            ({"final_request": "503"}, "every 200 carries the reference mask"),
            ({"drain": {"drained": False, "seconds": 60.0, "running": 1.0, "waiting": 0.0}}, "the service drains"),
            ({"leftovers": ["3f2a/flair"]}, "nothing left in BRATS_TMP_DIR"),
        ],
    )
    def test_each_criterion_fails_on_its_own(self, changes, criterion):
        report = self.report(**changes)
        assert not report.passed
        assert len(self.failed(report)) == 1 and self.failed(report)[0].startswith(criterion)

    def test_rss_may_grow_by_ten_percent_at_most(self):
        warm = {"rss": 100 << 20, "peak_rss": 100 << 20, "fds": 10}
        at_limit = self.report(resources={"warm_up": warm, "end": {**warm, "rss": 110 << 20}})
        above = self.report(resources={"warm_up": warm, "end": {**warm, "rss": (110 << 20) + (1 << 20)}})
        assert at_limit.passed
        assert self.failed(above) == ["RSS at the end at most 10% above warm-up"]

    def test_one_more_open_fd_fails(self):
        warm = {"rss": 100 << 20, "peak_rss": 100 << 20, "fds": 10}
        report = self.report(resources={"warm_up": warm, "end": {**warm, "fds": 11}})
        assert self.failed(report) == ["open FDs at the end not above warm-up"]


def test_the_scan_is_deterministic_and_has_a_lesion():
    first, second = soak.synthetic_scan((24, 24, 16), seed=3), soak.synthetic_scan((24, 24, 16), seed=3)
    assert first.shape == (4, 24, 24, 16) and first.dtype == np.int16
    np.testing.assert_array_equal(first, second)
    flair, t1ce = first[0], first[2]
    assert flair.max() > 1.8 * np.median(flair[flair > 0]) and t1ce.max() > 1.8 * np.median(t1ce[t1ce > 0])


def test_labels_problem_counts_the_differing_voxels():
    reference = np.zeros((4, 4, 4), dtype=np.uint8)
    other = reference.copy()
    other[0, 0, :2] = 4
    assert soak.labels_problem(reference.copy(), reference) is None
    assert soak.labels_problem(other, reference) == "2 voxels differ from the reference mask"
    assert "shape" in soak.labels_problem(reference[:2], reference)
