"""Faults around a real ``python -m service``: clients that leave mid-request, clients that trickle bytes,
corrupt models at start-up, upload folders left by a killed process, and SIGTERM during an inference.

The slow requests use a model with a 4^3 patch, so that a volume of a few dozen voxels per axis with TTA
takes seconds of CPU (thousands of network calls); each call is a point where an inference can stop.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.support import (
    PROJECT_ROOT,
    base_env,
    build_model,
    build_models,
    expected_labels,
    settings_env,
    write_case,
)
from tests.service.test_segment import assert_problem, decode_mask, metric


def slow_case(folder: Path, size: int) -> dict[str, bytes]:
    """The four modalities of a ``size``^3 scan with a bright cube, as .nii.gz bytes by part name."""
    image = np.ones((4, size, size, size), dtype=np.float32)
    image[0, size // 4 : size // 2, size // 4 : size // 2, size // 4 : size // 2] = 10.0
    return {name: path.read_bytes() for name, path in write_case(folder, image).items()}


def raw_request(url: str, path: str, files: dict[str, bytes]) -> tuple[bytes, bytes]:
    """The head and body of a multipart ``POST`` as a client would send them, for a raw socket."""
    request = httpx.Request("POST", url + path, files=files)
    body = request.read()
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in request.headers.items() if k.lower() != "host")
    return (head + "\r\n").encode("latin-1"), body


def read_to_end(sock: socket.socket, reply: bytes = b"", timeout: float = 10) -> bytes:
    """``reply`` plus everything the server sends until it closes the connection."""
    sock.settimeout(timeout)
    while chunk := sock.recv(65536):
        reply += chunk
    return reply


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def labels_of(response: httpx.Response) -> np.ndarray:
    """The mask of a ``format=json`` reply, as an array."""
    return np.asarray(decode_mask(base64.b64decode(response.json()["mask"])).dataobj)


def post_in_background(url: str, files: dict[str, bytes], params: dict) -> tuple[threading.Thread, list]:
    """A started thread that posts ``files`` to ``url/segment`` and appends the response to the returned list."""
    results: list[httpx.Response] = []
    thread = threading.Thread(
        target=lambda: results.append(httpx.post(url + "/segment", params=params, files=files, timeout=120))
    )
    thread.start()
    return thread, results


def wait_for(predicate, timeout: float, what: str) -> float:
    """Poll ``predicate`` until true; returns the seconds it took; fails the test after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"{what} did not happen within {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def slow_models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slow-models")
    build_model(folder, "unet", patch_size=(4, 4, 4))
    return folder


@pytest.fixture(scope="module")
def uploads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("uploads")


@pytest.fixture(scope="module")
def one_slot(server_factory, slow_models, uploads):
    """One inference at a time, one waiting, the slow model, uploads spooled to ``uploads``."""
    return server_factory(slow_models, settings={"max_concurrent": 1, "max_queue": 1, "tmp_dir": uploads})


class TestClientLeaves:
    """A client that disconnects while its request waits or runs frees its place at once."""

    def test_disconnect_mid_inference_stops_it_and_frees_the_slot(self, one_slot, uploads, tmp_path):
        # 96^3 with TTA: about 50k network calls, over ten seconds of CPU if it ran to the end.
        head, body = raw_request(one_slot.url, "/segment?tta=true", slow_case(tmp_path, 96))
        with one_slot.client(timeout=5) as client:
            sock = connect(one_slot.url)
            sock.sendall(head + body)
            wait_for(lambda: metric(client, "brats_inferences_running") == 1, 30, "the inference start")
            time.sleep(0.3)
            sock.close()
            freed = wait_for(lambda: metric(client, "brats_inferences_running") == 0, 3, "freeing the slot")
            assert list(uploads.iterdir()) == []
            small = write_case(tmp_path / "small", None)
            ok = client.post("/segment", files={k: p.read_bytes() for k, p in small.items()}, timeout=30)
        assert ok.status_code == 200, ok.text
        np.testing.assert_array_equal(labels_of(ok), expected_labels())
        assert freed < 3
        logs = one_slot.logs()
        assert "client disconnected before the answer; its inference was stopped" in logs
        assert re.search(r"POST /segment model=unet 499", logs)

    def test_disconnect_while_queued_leaves_the_queue(self, one_slot, uploads, tmp_path):
        files = slow_case(tmp_path, 64)
        head, body = raw_request(one_slot.url, "/segment?tta=true", files)
        with one_slot.client(timeout=5) as client:
            running, results = post_in_background(one_slot.url, files, {"tta": "true"})
            wait_for(lambda: metric(client, "brats_inferences_running") == 1, 30, "the first inference start")
            sock = connect(one_slot.url)
            sock.sendall(head + body)
            wait_for(lambda: metric(client, "brats_inference_queue_depth") == 1, 30, "the second request queueing")
            sock.close()
            wait_for(lambda: metric(client, "brats_inference_queue_depth") == 0, 3, "the queue emptying")
            assert metric(client, "brats_inferences_running") == 1  # the first one goes on
        running.join(120)
        assert [r.status_code for r in results] == [200]
        wait_for(lambda: list(uploads.iterdir()) == [], 5, "removing the upload folders")


class TestSlowClient:
    def test_trickling_client_is_cut_off_by_the_upload_deadline(self, server_factory, models_dir, tmp_path):
        uploads = tmp_path / "uploads"
        uploads.mkdir()
        server = server_factory(
            models_dir, settings={"idle_timeout_s": 1, "upload_timeout_s": 2, "tmp_dir": uploads}
        )
        head, body = raw_request(server.url, "/segment", {"flair": b"x" * 1000, "t1": b"y"})
        sock = connect(server.url)
        sock.sendall(head + body[:200])
        start = time.monotonic()
        for byte in body[200:207]:  # one byte every 0.25 s: never idle for the 1 s limit, but far too slow
            time.sleep(0.25)
            sock.sendall(bytes([byte]))
        reply = read_to_end(sock)  # sends nothing more: the 2 s deadline comes before the idle limit
        elapsed = time.monotonic() - start
        sock.close()
        assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
        assert b"BRATS_UPLOAD_TIMEOUT_S" in reply and b"connection: close" in reply.lower()
        assert 1.5 < elapsed < 5, elapsed
        wait_for(lambda: list(uploads.iterdir()) == [], 5, "removing the upload folder")

    def test_stalled_client_gets_the_idle_timeout(self, server_factory, models_dir):
        server = server_factory(models_dir, settings={"idle_timeout_s": 0.5, "upload_timeout_s": 30})
        head, body = raw_request(server.url, "/segment", {"flair": b"x" * 1000})
        sock = connect(server.url)
        sock.sendall(head + body[:100])
        reply = read_to_end(sock)
        sock.close()
        assert reply.startswith(b"HTTP/1.1 408 ") and b"no data of the request body arrived for 0.5 s" in reply


def corrupt(folder: Path, name: str, *, keep_sha: bool) -> None:
    """Spoil ``folder/name.onnx``: truncate it (the card's sha256 no longer matches) or, with ``keep_sha``,
    replace it with garbage whose sha256 is written into the card (so ONNX Runtime itself refuses it)."""
    import json

    from service.inference.card import file_sha256

    onnx = folder / f"{name}.onnx"
    if keep_sha:
        onnx.write_bytes(b"\x08\x07garbage that is not a protobuf model" * 10)
        card = json.loads((folder / f"{name}.json").read_text())
        card["sha256"] = file_sha256(onnx)
        (folder / f"{name}.json").write_text(json.dumps(card))
    else:
        onnx.write_bytes(onnx.read_bytes()[:100])


class TestCorruptModel:
    @pytest.mark.parametrize("keep_sha", [False, True], ids=["changed-after-export", "unreadable-onnx"])
    def test_the_other_models_serve(self, server_factory, tmp_path, keep_sha):
        folder = build_models(tmp_path / "models")
        corrupt(folder, "resunet", keep_sha=keep_sha)
        server = server_factory(folder)
        ready = assert_problem(httpx.get(server.url + "/readyz"), 503)
        assert "model resunet could not be loaded" in ready["detail"] and "serving unet" in ready["detail"]
        assert ("export it again" if not keep_sha else "ONNX Runtime cannot load the model") in ready["detail"]
        listed = httpx.get(server.url + "/models").json()
        assert [m["name"] for m in listed["models"]] == ["unet"] and listed["default"] == "unet"
        assert list(listed["failed"]) == ["resunet"]
        case = write_case(tmp_path / "case", None)
        files = {k: p.read_bytes() for k, p in case.items()}
        for params in ({}, {"model": "unet"}, {"model": "ensemble"}):
            response = httpx.post(server.url + "/segment", params=params, files=files, timeout=30)
            assert response.status_code == 200, response.text
            np.testing.assert_array_equal(labels_of(response), expected_labels())
        gone = assert_problem(httpx.post(server.url + "/segment", params={"model": "resunet"}, files=files), 422)
        assert "choose one of unet, ensemble" in gone["detail"]
        assert re.search(r"ERROR .*model resunet cannot be loaded and is not served", server.logs())

    def test_configured_default_that_fails_is_not_replaced(self, server_factory, tmp_path):
        folder = build_models(tmp_path / "models")
        corrupt(folder, "resunet", keep_sha=True)
        server = server_factory(folder, settings={"default_model": "resunet"})
        case = write_case(tmp_path / "case", None)
        files = {k: p.read_bytes() for k, p in case.items()}
        body = assert_problem(httpx.post(server.url + "/segment", files=files), 503)
        assert "no default model" in body["detail"] and "name one of unet, ensemble" in body["detail"]
        assert httpx.post(server.url + "/segment", params={"model": "unet"}, files=files).status_code == 200

    def test_require_models_refuses_to_start(self, tmp_path):
        folder = build_models(tmp_path / "models")
        corrupt(folder, "unet", keep_sha=False)
        env = base_env({"BRATS_MODELS_DIR": str(folder), **settings_env({"require_models": True})})
        result = subprocess.run(
            [sys.executable, "-m", "service", "--port", "0"],
            env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 2
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("python -m service: BRATS_REQUIRE_MODELS is set and model unet could not be loaded")


class TestKilledProcess:
    def test_folders_of_dead_processes_are_removed_at_start(self, server_factory, models_dir, tmp_path):
        uploads = tmp_path / "uploads"
        uploads.mkdir()
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        stale = uploads / f"segment-{dead.pid}-abc123"
        alive = uploads / f"segment-{os.getpid()}-def456"  # another running service's folder
        other = uploads / "unrelated"
        for folder in (stale, alive, other):
            folder.mkdir()
            (folder / "part").write_bytes(b"scan")
        server = server_factory(models_dir, settings={"tmp_dir": uploads})
        assert not stale.exists() and alive.exists() and other.exists()
        assert "removed 1 upload folder(s) left behind" in server.logs()
        shutil.rmtree(alive)


class TestGracefulShutdown:
    def test_sigterm_finishes_the_inference_in_flight(self, server_factory, slow_models, tmp_path):
        server = server_factory(slow_models, settings={"max_concurrent": 1, "max_queue": 2})
        image = np.ones((4, 64, 64, 64), dtype=np.float32)
        image[0, 16:32, 16:32, 16:32] = 10.0
        files = {name: path.read_bytes() for name, path in write_case(tmp_path, image).items()}
        with server.client(timeout=5) as client:
            request, results = post_in_background(server.url, files, {"tta": "true"})
            wait_for(lambda: metric(client, "brats_inferences_running") == 1, 30, "the inference start")
        server.process.send_signal(signal.SIGTERM)
        request.join(120)
        # uvicorn shuts down gracefully, then re-raises the signal so that a supervisor sees why it ended
        assert server.process.wait(60) in (0, -signal.SIGTERM)
        logs = server.logs()
        assert len(results) == 1 and results[0].status_code == 200, logs
        assert logs.index("POST /segment model=unet 200") < logs.index("Finished server process"), logs
        labels = labels_of(results[0])
        assert labels.shape == (64, 64, 64) and set(np.unique(labels)) <= {0, 1, 2, 4}
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/healthz", timeout=2)
