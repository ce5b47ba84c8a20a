"""The trainer end to end on tiny synthetic data: training, resume, DDP, export, evaluate, CLI errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from service.inference.card import file_sha256, read_card
from service.inference.model import OnnxModel
from training.cli import main
from training.train import TrainConfig, load_checkpoint, train

ROOT = Path(__file__).resolve().parents[2]
TINY_3D = ["--channels", "4,8,16", "--patch-size", "16,16,16", "--batch-size", "2", "--val-interval", "1",
           "--val-max-cases", "1", "--lr", "1e-2", "--seed", "3"]


def _log(run: Path) -> list[dict]:
    with (run / "log.csv").open() as fh:
        return list(csv.DictReader(fh))


def _run_cli(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained_run(tiny_cache, tmp_path_factory):
    """A 3D U-Net trained for a few short epochs through the CLI."""
    run = tmp_path_factory.mktemp("run") / "unet"
    code = main(["train", "--cache", str(tiny_cache), "--out", str(run), "--arch", "unet", "--epochs", "4",
                 "--iterations", "30", *TINY_3D])
    assert code == 0
    return run


class TestTraining:
    def test_loss_goes_down_and_validation_is_logged(self, trained_run):
        rows = _log(trained_run)
        assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
        losses = [float(r["train_loss"]) for r in rows]
        assert losses[-1] < losses[0] * 0.9, losses
        for row in rows:
            for region in ("WT", "TC", "ET"):
                assert 0.0 <= float(row[f"val_dice_{region}"]) <= 1.0

    def test_checkpoints_hold_what_export_needs(self, trained_run):
        state = load_checkpoint(trained_run / "checkpoint_last.pt")
        assert state["epoch"] == 4
        assert state["network"]["architecture"] == "unet"
        assert state["config"]["synthetic"] is True
        assert (trained_run / "checkpoint_best.pt").is_file()
        split = json.loads((trained_run / "split.json").read_text())
        assert split["validation"] and not set(split["validation"]) & set(split["train"])

    def test_resume_continues_exactly_where_the_run_stopped(self, tiny_cache, tmp_path):
        base = ["train", "--cache", str(tiny_cache), "--channels", "4,8", "--patch-size", "8,8,8", "--epochs", "4",
                "--iterations", "3", "--val-interval", "1", "--amp", "off", "--seed", "5"]
        assert main([*base, "--out", str(tmp_path / "straight")]) == 0
        pieces = ["--out", str(tmp_path / "pieces")]
        assert main([*base, *pieces, "--stop-after", "2"]) == 0
        assert load_checkpoint(tmp_path / "pieces" / "checkpoint_last.pt")["epoch"] == 2
        assert main([*base, *pieces]) == 2  # an existing run without --resume is refused
        assert main([*base, *pieces, "--resume", "--lr", "0.5"]) == 2  # so is a resume with other settings
        assert main([*base, *pieces, "--resume"]) == 0

        assert [int(r["epoch"]) for r in _log(tmp_path / "pieces")] == [1, 2, 3, 4]
        straight = load_checkpoint(tmp_path / "straight" / "checkpoint_last.pt")
        resumed = load_checkpoint(tmp_path / "pieces" / "checkpoint_last.pt")
        assert resumed["epoch"] == 4
        for key in straight["model"]:
            torch.testing.assert_close(resumed["model"][key], straight["model"][key], rtol=0, atol=0)

    def test_seeded_runs_repeat(self, tiny_cache, tmp_path):
        def run(name):
            config = TrainConfig(cache=str(tiny_cache), out=str(tmp_path / name), channels=(4, 8), patch_size=(8, 8, 8),
                                 epochs=1, iterations=3, val_fraction=0.0, amp="off", seed=5)
            train(config)
            return load_checkpoint(tmp_path / name / "checkpoint_last.pt")["model"]

        first, second = run("a"), run("b")
        for key in first:
            torch.testing.assert_close(first[key], second[key])

    def test_2d_training(self, tiny_cache, tmp_path):
        run = tmp_path / "unet2d"
        assert main(["train", "--cache", str(tiny_cache), "--out", str(run), "--spatial-dims", "2",
                     "--channels", "4,8,16", "--patch-size", "32,32", "--epochs", "1", "--iterations", "3",
                     "--val-max-cases", "1"]) == 0
        assert load_checkpoint(run / "checkpoint_last.pt")["config"]["spatial_dims"] == 2


class TestDistributed:
    def test_two_cpu_processes_with_gloo(self, tiny_cache, tmp_path):
        run = tmp_path / "ddp"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "-m", "training", "train", "--cache", str(tiny_cache), "--out", str(run), "--epochs", "2",
             "--iterations", "3", *TINY_3D],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        state = load_checkpoint(run / "checkpoint_last.pt")
        assert state["world_size"] == 2 and state["epoch"] == 2
        assert [int(r["epoch"]) for r in _log(run)] == [1, 2]  # one process writes the log


class TestExportEvaluate:
    def test_export_then_evaluate_fills_the_card(self, trained_run, tiny_dataset, tmp_path):
        models = tmp_path / "models"
        assert main(["export", "--checkpoint", str(trained_run / "checkpoint_best.pt"), "--name", "tiny",
                     "--models-dir", str(models)]) == 0
        card = read_card(models / "tiny.json")
        assert card.architecture == "unet" and card.patch_size == (16, 16, 16)
        assert card.training["synthetic"] is True and "not for clinical use" in card.training["note"]
        assert card.validation is None

        out = tmp_path / "eval"
        assert main(["evaluate", "--model", str(models / "tiny.onnx"), "--data", str(tiny_dataset),
                     "--out", str(out), "--max-cases", "2", "--update-card"]) == 0
        with (out / "cases.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 2
        summary = json.loads((out / "summary.json").read_text())
        assert summary["cases"] == 2
        assert summary["dice"]["WT"] == pytest.approx(np.mean([float(r["dice_WT"]) for r in rows]), abs=1e-4)
        for r in ("WT", "TC", "ET"):
            lesion = np.mean([float(row[f"lesion_dice_{r}"]) for row in rows])
            assert summary["lesionwise"]["dice"][r] == pytest.approx(lesion, abs=1e-4)
        with (tiny_dataset / "MICCAI_BraTS2020_TrainingData" / "name_mapping.csv").open() as fh:
            kinds = {m["BraTS_2020_subject_ID"]: m["Kind"] for m in csv.DictReader(fh)}
        assert [row["kind"] for row in rows] == [kinds[row["case"]] for row in rows]  # from the manifest
        assert sum(k["cases"] for k in summary["by_kind"].values()) == 2
        assert set(summary["by_kind"]) == {row["kind"] for row in rows}
        free = [float(row["pred_ml_WT"]) for row in rows if float(row["truth_ml_WT"]) == 0]
        assert summary["tumour_free"]["cases"] == len(free)
        if free:
            assert summary["tumour_free"]["false_positive_ml"]["median"] == pytest.approx(np.median(free), abs=1e-3)

        card = read_card(models / "tiny.json")
        assert card.validation["cases"] == 2 and card.validation["dice"] == summary["dice"]
        assert card.sha256 == file_sha256(models / "tiny.onnx")
        model = OnnxModel(models / "tiny.onnx")  # the metadata and the JSON agree after the update
        assert model.card.validation == card.validation

    def test_update_card_refuses_an_ensemble(self, tmp_path, capsys):
        code = main(["evaluate", "--model", "a.onnx", "--model", "b.onnx", "--data", str(tmp_path),
                     "--out", str(tmp_path / "o"), "--update-card"])
        assert code == 2
        assert "exactly one --model" in capsys.readouterr().err


class TestBadInput:
    """Each stops with one line naming the problem: no traceback, nothing half written."""

    def _one_line_error(self, result: subprocess.CompletedProcess) -> str:
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], result.stderr  # log and progress lines may precede it
        return errors[0]

    def test_empty_folder(self, tmp_path):
        (tmp_path / "empty").mkdir()
        line = self._one_line_error(_run_cli("preprocess", str(tmp_path / "empty"), str(tmp_path / "cache")))
        assert "empty" in line
        assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())

    def test_missing_modality_names_the_case(self, tiny_dataset, tmp_path):
        data = tmp_path / "data"
        shutil.copytree(tiny_dataset, data)
        case = sorted((data / "MICCAI_BraTS2020_TrainingData").iterdir())[1]
        next(case.glob("*_t1ce.nii*")).unlink()
        line = self._one_line_error(_run_cli("preprocess", str(data), str(tmp_path / "cache")))
        assert case.name in line and "t1ce" in line

    def test_label_3_stops_evaluate_without_output(self, tiny_dataset, trained_run, tmp_path):
        data = tmp_path / "data"
        shutil.copytree(tiny_dataset, data)
        cases = [p for p in sorted((data / "MICCAI_BraTS2020_TrainingData").iterdir()) if p.is_dir()]
        case = next(c for c in cases if (np.asarray(nib.load(next(c.glob("*_seg.nii*"))).dataobj) == 4).any())
        seg_path = next(case.glob("*_seg.nii*"))
        seg = nib.load(seg_path)
        values = np.asarray(seg.dataobj).copy()
        values[values == 4] = 3
        nib.save(nib.Nifti1Image(values, seg.affine), seg_path)
        assert main(["export", "--checkpoint", str(trained_run / "checkpoint_last.pt"), "--name", "m",
                     "--models-dir", str(tmp_path / "models")]) == 0
        result = _run_cli("evaluate", "--model", str(tmp_path / "models" / "m.onnx"), "--data", str(data),
                          "--out", str(tmp_path / "eval"))
        line = self._one_line_error(result)
        assert case.name in line and "3" in line
        assert not (tmp_path / "eval" / "summary.json").exists()

    def test_mismatched_shapes_names_the_case(self, tiny_dataset, tmp_path):
        data = tmp_path / "data"
        shutil.copytree(tiny_dataset, data)
        case = sorted((data / "MICCAI_BraTS2020_TrainingData").iterdir())[2]
        flair = next(case.glob("*_flair.nii*"))
        img = nib.load(flair)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-1], img.affine), flair)
        line = self._one_line_error(_run_cli("preprocess", str(data), str(tmp_path / "cache")))
        assert case.name in line and "shape" in line

    def test_corrupt_file_names_the_case(self, tiny_dataset, tmp_path):
        data = tmp_path / "data"
        shutil.copytree(tiny_dataset, data)
        case = sorted((data / "MICCAI_BraTS2020_TrainingData").iterdir())[3]
        t2 = next(case.glob("*_t2.nii*"))
        t2.write_bytes(t2.read_bytes()[:200])
        line = self._one_line_error(_run_cli("preprocess", str(data), str(tmp_path / "cache")))
        assert case.name in line

    def test_missing_cache_and_checkpoint(self, tmp_path):
        self._one_line_error(_run_cli("train", "--cache", str(tmp_path / "nope"), "--out", str(tmp_path / "r")))
        self._one_line_error(_run_cli("export", "--checkpoint", str(tmp_path / "nope.pt"), "--name", "x",
                                      "--models-dir", str(tmp_path / "m")))
        assert not (tmp_path / "m").exists()
