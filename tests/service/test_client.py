"""The client and its CLI: offline parts (body framing, case folders, input errors), then a real server."""

from __future__ import annotations

import email.parser
import gzip
import json
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from service.client import SegmentationClient, SegmentResult, ServiceError, _MultipartBody, _problem
from service.client_cli import format_summary, main
from service.core.case_folder import find_case_files
from service.core.labels import MODALITIES

from tests.service.support import expected_labels, tumour_scan, write_image4d, write_nifti

ROOT = Path(__file__).resolve().parents[2]
AFFINE = np.array(
    [[0.0, -1.2, 0.0, 30.0], [1.1, 0.0, 0.0, -12.5], [0.0, 0.0, 2.5, 7.0], [0.0, 0.0, 0.0, 1.0]]
)  # axes swapped, anisotropic voxels, an offset: a mask on another geometry would show
CASE = "BraTS20_Training_901"


def make_case(root: Path, name: str = CASE, *, gz: bool = True, seg: bool = True) -> Path:
    """A BraTS-style case folder ``root/name/name_{flair,t1,t1ce,t2,seg}.nii[.gz]`` of the tiny test scan."""
    folder = root / name
    folder.mkdir(parents=True)
    image = tumour_scan()
    ext = ".nii.gz" if gz else ".nii"
    for channel, modality in enumerate(MODALITIES):
        write_nifti(folder / f"{name}_{modality}{ext}", image[channel], AFFINE)
    if seg:
        write_nifti(folder / f"{name}_seg{ext}", expected_labels(), AFFINE, dtype=np.uint8)
    return folder


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m service.client ARGS`` in a fresh process (what a user runs)."""
    import os

    full_env = {k: v for k, v in os.environ.items() if k != "BRATS_API_KEY"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "service.client", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def cli_status(argv: list[str]) -> int:
    """``main(argv)`` in this process; argparse's own errors exit through SystemExit."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


# ---------------------------------------------------------------------------------------------- offline


class TestMultipartBody:
    def test_length_is_exact_and_parts_parse_back_with_neutral_names(self, tmp_path):
        secret = tmp_path / "Jane_Doe_1970-01-01.nii.gz"
        secret.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 5000)  # over one read chunk
        plain = tmp_path / "other.nii"
        plain.write_bytes(b"n+1\x00" * 10)
        body = _MultipartBody((("image", secret), ("label", plain)))
        seen: list[int] = []
        payload = b"".join(body.stream(seen.append))
        assert len(payload) == len(body)
        assert sum(seen) == body.file_bytes == secret.stat().st_size + plain.stat().st_size

        message = email.parser.BytesParser().parsebytes(
            f"Content-Type: {body.content_type}\r\n\r\n".encode() + payload
        )
        parts = message.get_payload()
        assert [p.get_param("name", header="content-disposition") for p in parts] == ["image", "label"]
        assert [p.get_filename() for p in parts] == ["image.nii.gz", "label.nii"]
        assert parts[0].get_payload(decode=True) == secret.read_bytes()
        assert parts[1].get_payload(decode=True) == plain.read_bytes()
        assert b"Jane_Doe" not in payload

    def test_boundaries_differ_between_bodies(self, tmp_path):
        f = tmp_path / "a.nii"
        f.write_bytes(b"x")
        assert _MultipartBody((("image", f),)).boundary != _MultipartBody((("image", f),)).boundary


class TestCliInput:
    """Bad command-line input: one line starting with ``error:`` and exit status 2, before any upload."""

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["no/such/path"], "does not exist"),
            (["{tmp}/notes.txt"], "neither a case folder nor a .nii/.nii.gz file"),
            (["{case}", "--out", "{tmp}/missing/dir/mask.nii.gz"], "does not exist"),
            (["{tmp}/scan.nii.gz", "--score"], "--score needs a case folder"),
            (["{case}", "--label", "{tmp}/none.nii.gz"], "the label file"),
            (["{case}", "--out", "{case}/BraTS20_Training_901_flair.nii.gz"], "is one of the inputs"),
            (["{case}", "--label", "x", "--score"], "not allowed with argument"),
            (["{case}", "--bogus"], "unrecognized arguments"),
        ],
    )
    def test_bad_input_exits_2_with_one_line(self, tmp_path, capsys, args, message):
        case = make_case(tmp_path)
        (tmp_path / "notes.txt").write_text("hi")
        write_image4d(tmp_path / "scan.nii.gz", affine=AFFINE)
        argv = [a.format(tmp=tmp_path, case=case) for a in args] + ["--url", "http://127.0.0.1:9"]
        assert cli_status(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err

    def test_score_without_seg(self, tmp_path, capsys):
        case = make_case(tmp_path, seg=False)
        assert cli_status([str(case), "--score"]) == 2
        assert "--score needs BraTS20_Training_901_seg.nii[.gz]" in capsys.readouterr().err

    def test_unreachable_service_exits_1(self, tmp_path):
        case = make_case(tmp_path)
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        result = run_cli(str(case), "--url", f"http://127.0.0.1:{port}")
        assert result.returncode == 1
        assert result.stderr.startswith("error: cannot reach the service at http://127.0.0.1:")
        assert result.stderr.count("\n") == 1
        assert not (case / "BraTS20_Training_901_pred.nii.gz").exists()

    def test_client_does_not_import_torch_or_training(self):
        code = (
            "import sys, service.client; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'training', 'monai')); "
            "print(bad); sys.exit(bool(bad))"
        )
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_format_summary_is_compact_and_complete():
    summary = {
        "model": "unet",
        "model_sha256": "0123456789ab",
        "provider": "CPUExecutionProvider",
        "shape": [240, 240, 155],
        "spacing_mm": [1.0, 1.0, 1.5],
        "labels": {"0": "background", "1": "NCR/NET", "2": "ED", "4": "ET"},
        "volumes_ml": {"WT": 12.345, "TC": 3.5, "ET": 1.0, "NCR": 2.5, "ED": 8.845},
        "dice": {"WT": 0.91234, "TC": 0.8, "ET": None},
        "hd95_mm": {"WT": 2.0, "TC": 3.25, "ET": None},
        "timing_ms": {"decode": 10.4, "preprocess": 20, "inference": 900, "postprocess": 30, "total": 960.6},
    }
    text = format_summary(summary, tta=True)
    assert text.splitlines() == [
        "model     unet (0123456789ab) on CPUExecutionProvider, TTA",
        "volume    240x240x155 voxels of 1x1x1.5 mm",
        "ml        WT 12.35  TC 3.50  ET 1.00  NCR 2.50  ED 8.85",
        "dice      WT 0.912  TC 0.800  ET -",
        "hd95 mm   WT 2.00  TC 3.25  ET -",
        "time ms   961 (decode 10, preprocess 20, inference 900, postprocess 30)",
    ]
    assert "dice" not in format_summary({**summary, "dice": None, "hd95_mm": None})


def test_result_save_is_atomic_and_exact(tmp_path):
    result = SegmentResult(mask=b"\x1f\x8bmask", summary={})
    out = result.save(tmp_path / "m.nii.gz")
    assert out.read_bytes() == b"\x1f\x8bmask"
    assert [p.name for p in tmp_path.iterdir()] == ["m.nii.gz"]


def test_segment_argument_errors(tmp_path):
    with SegmentationClient("http://127.0.0.1:9") as c:
        with pytest.raises(ValueError, match="either the four modality paths or one 4D image"):
            c.segment()
        with pytest.raises(ValueError, match="expected the parts flair, t1, t1ce, t2"):
            c.segment({"flair": tmp_path})
        with pytest.raises(ValueError, match="format must be"):
            c.segment(image=tmp_path / "x.nii", format="png")
        with pytest.raises(FileNotFoundError):
            c.segment(image=tmp_path / "x.nii")


# ------------------------------------------------------------------------------------------ live server


def load_mask(path: Path) -> nib.Nifti1Image:
    assert path.read_bytes()[:2] == b"\x1f\x8b", "the mask should be gzip-compressed"
    return nib.load(path)


def assert_mask_on_input_geometry(mask_path: Path, input_path: Path) -> None:
    mask, source = load_mask(mask_path), nib.load(input_path)
    assert mask.shape == source.shape[:3]
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
    np.testing.assert_allclose(mask.header.get_zooms()[:3], source.header.get_zooms()[:3], atol=1e-6)
    assert mask.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(mask.dataobj), expected_labels())


class TestCliAgainstServer:
    def test_case_folder_with_score(self, server, tmp_path):
        case = make_case(tmp_path)
        result = run_cli(str(case), "--url", server.url, "--score")
        assert result.returncode == 0, result.stderr
        out = case / f"{CASE}_pred.nii.gz"
        assert_mask_on_input_geometry(out, case / f"{CASE}_flair.nii.gz")
        lines = result.stdout.splitlines()
        assert lines[0].startswith("model     resunet (") and "CPUExecutionProvider" in lines[0]
        assert "TTA" not in lines[0]
        assert lines[1] == "volume    12x10x9 voxels of 1.1x1.2x2.5 mm"
        assert lines[3] == "dice      WT 1.000  TC 1.000  ET 1.000"
        assert lines[4] == "hd95 mm   WT 0.00  TC 0.00  ET 0.00"
        assert lines[5].startswith("time ms   ") and "inference" in lines[5]
        assert lines[-1] == f"mask      {out}"
        assert len(lines) == 7 and result.stderr == ""

    def test_4d_file_with_model_tta_and_out_folder(self, server, tmp_path):
        image = write_image4d(tmp_path / "scan4d.nii", affine=AFFINE)  # uncompressed input, gz output
        out_dir = tmp_path / "masks"
        out_dir.mkdir()
        result = run_cli(str(image), "--url", server.url, "--model", "unet", "--tta", "--out", str(out_dir))
        assert result.returncode == 0, result.stderr
        assert_mask_on_input_geometry(out_dir / "scan4d_pred.nii.gz", image)
        assert not (tmp_path / "scan4d_pred.nii.gz").exists()
        first = result.stdout.splitlines()[0]
        assert first.startswith("model     unet (") and first.endswith(", TTA")
        assert "dice" not in result.stdout

    def test_4d_file_with_label_and_json_output(self, server, tmp_path):
        image = write_image4d(tmp_path / "scan.nii.gz", affine=AFFINE)
        label = write_nifti(tmp_path / "truth.nii.gz", expected_labels(), AFFINE, dtype=np.uint8)
        out = tmp_path / "custom.nii.gz"
        result = run_cli(str(image), "--url", server.url, "--label", str(label), "--out", str(out), "--json")
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["mask_path"] == str(out) and "mask" not in summary
        assert summary["dice"] == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
        assert summary["shape"] == [12, 10, 9]
        assert_mask_on_input_geometry(out, image)

    def test_unknown_model_exits_1_with_the_problem_detail(self, server, tmp_path):
        case = make_case(tmp_path)
        result = run_cli(str(case), "--url", server.url, "--model", "nope")
        assert result.returncode == 1
        assert result.stdout == ""
        err = result.stderr
        assert err.startswith("error: 422 ") and err.count("\n") == 1
        assert "nope" in err and "unet" in err and "resunet" in err and "ensemble" in err
        assert "(request id " in err
        assert not (case / f"{CASE}_pred.nii.gz").exists()

    def test_bad_upload_exits_1_with_the_detail(self, server, tmp_path):
        case = make_case(tmp_path, gz=False)
        (case / f"{CASE}_t2.nii").write_bytes(b"this is not a NIfTI file at all")
        result = run_cli(str(case), "--url", server.url)
        assert result.returncode == 1
        assert result.stderr.startswith("error: 400 ") and "t2" in result.stderr
        assert "not a NIfTI" in result.stderr
        assert CASE not in result.stderr  # neutral upload names: the service never sees the file's name

    def test_api_key_from_flag_or_environment(self, server_factory, tmp_path):
        keyed = server_factory(settings={"api_keys": ["k-one", "k-two"]})
        case = make_case(tmp_path)
        out = case / f"{CASE}_pred.nii.gz"

        missing = run_cli(str(case), "--url", keyed.url)
        assert missing.returncode == 1 and missing.stderr.startswith("error: 401 ")
        wrong = run_cli(str(case), "--url", keyed.url, "--api-key", "k-three")
        assert wrong.returncode == 1 and wrong.stderr.startswith("error: 401 ")
        assert not out.exists()

        by_flag = run_cli(str(case), "--url", keyed.url, "--api-key", "k-two")
        assert by_flag.returncode == 0, by_flag.stderr
        out.unlink()
        by_env = run_cli(str(case), "--url", keyed.url, env={"BRATS_API_KEY": "k-one"})
        assert by_env.returncode == 0, by_env.stderr
        assert_mask_on_input_geometry(out, case / f"{CASE}_t1.nii.gz")


    def test_not_ready_exits_1_with_the_reason(self, server_factory, empty_models_dir, tmp_path):
        idle = server_factory(empty_models_dir)
        result = run_cli(str(make_case(tmp_path)), "--url", idle.url)
        assert result.returncode == 1
        assert result.stderr.startswith("error: 503 the service is not ready: ")


class TestPythonClient:
    def test_json_and_nifti_formats_agree(self, server, tmp_path):
        case = make_case(tmp_path)
        _, paths, seg = find_case_files(case)
        with SegmentationClient(server.url, progress=False) as c:
            as_nifti = c.segment(paths, label=seg, model="ensemble")
            as_json = c.segment(paths, label=seg, model="ensemble", format="json")
        assert gzip.decompress(as_nifti.mask) == gzip.decompress(as_json.mask)
        for result in (as_nifti, as_json):
            assert result.request_id
            assert "+" in result.summary["model_sha256"] and result.summary["model"] == "ensemble"
            assert "mask" not in result.summary
        drop = lambda s: {k: v for k, v in s.items() if k != "timing_ms"}  # noqa: E731
        assert drop(as_nifti.summary) == drop(as_json.summary)
        mask = nib.Nifti1Image.from_bytes(gzip.decompress(as_json.mask))
        np.testing.assert_array_equal(np.asarray(mask.dataobj), expected_labels())

    def test_models_health_ready(self, server):
        with SegmentationClient(server.url) as c:
            models = c.models()
            assert models["default"] == "resunet"
            assert {m["name"] for m in models["models"]} == {"unet", "resunet"}
            assert all(m["provider"] == "CPUExecutionProvider" for m in models["models"])
            assert isinstance(c.health(), dict) and isinstance(c.ready(), dict)

    def test_not_ready_raises_503_with_the_reason(self, server_factory, empty_models_dir, tmp_path):
        idle = server_factory(empty_models_dir)
        with SegmentationClient(idle.url) as c:
            c.health()
            with pytest.raises(ServiceError) as info:
                c.ready()
        assert info.value.status == 503 and info.value.detail

    def test_service_error_carries_status_detail_and_request_id(self, server, tmp_path):
        image = write_image4d(tmp_path / "scan.nii.gz")
        with SegmentationClient(server.url, api_key="ignored-when-keys-are-off") as c:
            with pytest.raises(ServiceError) as info:
                c.segment(image=image, model="nope")
        err = info.value
        assert err.status == 422 and "resunet" in err.detail and err.request_id
        assert str(err).startswith("422")

    def test_progress_bar_for_uploads(self, server, tmp_path, capsys):
        image = write_image4d(tmp_path / "scan.nii.gz")
        with SegmentationClient(server.url, progress=True) as c:
            result = c.segment(image=image)
        err = capsys.readouterr().err
        assert "upload:" in err and f"/{image.stat().st_size} [" in err  # tqdm on stderr, total in bytes
        assert result.summary["model"] == "resunet"

    def test_upload_over_the_limit_is_refused_with_413(self, server_factory, tmp_path):
        small = server_factory(settings={"max_upload_bytes": 1 << 20})
        big = write_nifti(tmp_path / "big.nii", np.zeros((64, 64, 64, 4), dtype=np.float32))  # 4 MiB
        with SegmentationClient(small.url) as c:
            with pytest.raises(ServiceError) as info:
                c.segment(image=big)
        assert info.value.status == 413 and "BRATS_MAX_UPLOAD_BYTES" in info.value.detail


class TestProblemParsing:
    def test_problem_json_with_retry_after(self):
        response = httpx.Response(
            503,
            headers={"Retry-After": "2", "X-Request-ID": "abc"},
            json={"type": "about:blank", "title": "Service Unavailable", "status": 503, "detail": "queue full"},
        )
        err = _problem(response)
        assert (err.status, err.title, err.detail, err.retry_after, err.request_id) == (
            503, "Service Unavailable", "queue full", "2", "abc"
        )
        assert str(err) == "503 Service Unavailable: queue full"

    def test_not_json_keeps_one_line_of_text(self):
        err = _problem(httpx.Response(502, text="<html>\nBad gateway\n</html>"))
        assert err.status == 502 and err.detail == "<html> Bad gateway </html>" and err.title is None

    def test_empty_body_uses_the_reason_phrase(self):
        err = _problem(httpx.Response(500))
        assert err.detail == "Internal Server Error"

    def test_cli_prints_retry_after(self, monkeypatch, tmp_path, capsys):
        def busy(self, *args, **kwargs):
            raise ServiceError(503, "the inference queue is full", retry_after="1", request_id="r1")

        monkeypatch.setattr(SegmentationClient, "segment", busy)
        assert main([str(make_case(tmp_path))]) == 1
        assert capsys.readouterr().err == (
            "error: 503 the inference queue is full (retry after 1 s) (request id r1)\n"
        )
