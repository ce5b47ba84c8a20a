"""The application skeleton against real ``python -m service`` processes: health and readiness, /models,
/metrics, API keys, request ids, problem details for FastAPI's own errors, the docs, start-up and logging.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from service.inference.card import file_sha256
from tests.service.support import PROJECT_ROOT, base_env, build_model, write_case

PROBLEM_JSON = "application/problem+json"
KEYS = ["key-one", "key-two"]


def assert_problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert set(body) == {"type", "title", "status", "detail"}
    assert body["status"] == status and body["type"] == "about:blank"
    assert body["title"] and body["detail"]
    return body


def counter(metrics_text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text, 0 if absent."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{re.escape(name)}{{{re.escape(wanted)}}} (\S+)$", metrics_text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def empty_server(server_factory, empty_models_dir):
    return server_factory(empty_models_dir)


@pytest.fixture(scope="module")
def keyed_server(server_factory):
    """API keys on, metadata open, default model ``unet``; BRATS_PORT/HOST in the environment are overridden
    by the command line flags the fixture passes."""
    return server_factory(
        settings={"api_keys": KEYS, "default_model": "unet"}, env={"BRATS_PORT": "1", "BRATS_HOST": "192.0.2.1"}
    )


@pytest.fixture(scope="module")
def protected_server(server_factory):
    """API keys on and BRATS_PROTECT_METADATA=true."""
    return server_factory(settings={"api_keys": KEYS, "protect_metadata": True})


class TestHealth:
    def test_healthz(self, server):
        response = httpx.get(server.url + "/healthz")
        assert response.status_code == 200 and response.json() == {"status": "ok"}

    def test_readyz_when_ready(self, server):
        response = httpx.get(server.url + "/readyz")
        assert response.status_code == 200
        assert response.json() == {"status": "ready", "models": ["resunet", "unet"], "default": "resunet"}

    def test_empty_models_folder_starts_but_is_not_ready(self, empty_server):
        assert httpx.get(empty_server.url + "/healthz").status_code == 200
        body = assert_problem(httpx.get(empty_server.url + "/readyz"), 503)
        assert "not ready" in body["detail"] and "holds no NAME.onnx models" in body["detail"]
        assert httpx.get(empty_server.url + "/models").json() == {"default": None, "models": [], "failed": {}}
        warning = [line for line in empty_server.logs().splitlines() if "NOT READY" in line]
        assert len(warning) == 1 and " WARNING " in warning[0] and "holds no NAME.onnx models" in warning[0]

    def test_require_models_refuses_to_start_with_one_line(self, tmp_path):
        env = base_env({"BRATS_MODELS_DIR": str(tmp_path / "missing"), "BRATS_REQUIRE_MODELS": "true"})
        done = subprocess.run(
            [sys.executable, "-m", "service", "--port", "1"], env=env, cwd=PROJECT_ROOT,
            capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 2
        error = [line for line in done.stderr.splitlines() if line.startswith("python -m service:")]
        assert len(error) == 1 and "BRATS_REQUIRE_MODELS" in error[0] and "does not exist" in error[0]
        assert "Traceback" not in done.stderr

    def test_invalid_configuration_is_one_line(self, tmp_path):
        env = base_env({"BRATS_MAX_QUEUE": "-1"})
        done = subprocess.run(
            [sys.executable, "-m", "service"], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2
        assert done.stderr.startswith("python -m service: invalid configuration: BRATS_MAX_QUEUE")
        assert "Traceback" not in done.stderr


class TestModels:
    def test_default_cards_and_provider(self, server, models_dir):
        body = httpx.get(server.url + "/models").json()
        assert body["default"] == "resunet"
        assert [m["name"] for m in body["models"]] == ["resunet", "unet"]
        for card in body["models"]:
            assert card["provider"] == "CPUExecutionProvider"
            assert card["architecture"] == card["name"]
            assert card["spatial_dims"] == 3 and card["patch_size"] == [8, 8, 8]
            assert card["modalities"] == ["flair", "t1", "t1ce", "t2"]
            assert card["sha256"] == file_sha256(models_dir / f"{card['name']}.onnx")
            assert card["output"]["channels"] == ["WT", "TC", "ET"]
            assert "not trained" in card["training"]["data"]

    def test_configured_default(self, keyed_server):
        assert httpx.get(keyed_server.url + "/models").json()["default"] == "unet"


class TestMetrics:
    def test_request_counters(self, server):
        with server.client() as client:
            for _ in range(3):
                client.get("/healthz")
            client.get("/no/such/path")
            client.post("/segment", params={"tta": "maybe"})
            response = client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = response.text
        assert counter(text, "brats_http_requests_total", endpoint="/healthz", method="GET", model="", status="200") >= 3
        assert counter(text, "brats_http_requests_total", endpoint="unmatched", method="GET", model="", status="404") >= 1
        assert counter(text, "brats_http_requests_total", endpoint="/segment", method="POST", model="", status="422") >= 1
        assert "/no/such/path" not in text  # unmatched paths do not become labels
        assert counter(
            text, "brats_http_request_duration_seconds_count", endpoint="/healthz", method="GET", model="", status="200"
        ) >= 3
        assert re.search(r"^brats_inference_queue_depth 0\.0$", text, re.M)
        assert re.search(r"^brats_ready 1\.0$", text, re.M)

    def test_inference_is_counted_by_model(self, server, tmp_path):
        parts = write_case(tmp_path)
        with server.client() as client:
            files = {name: path.read_bytes() for name, path in parts.items()}
            assert client.post("/segment", params={"model": "unet"}, files=files).status_code == 200
            text = client.get("/metrics").text
        assert counter(text, "brats_http_requests_total", endpoint="/segment", method="POST", model="unet", status="200") >= 1
        assert counter(text, "brats_inference_duration_seconds_count", model="unet") >= 1

    def test_not_ready_gauge(self, empty_server):
        assert re.search(r"^brats_ready 0\.0$", httpx.get(empty_server.url + "/metrics").text, re.M)


class TestApiKeys:
    def test_missing_key_refused(self, keyed_server):
        response = httpx.post(keyed_server.url + "/segment")
        body = assert_problem(response, 401)
        assert response.headers["www-authenticate"] == "ApiKey"
        assert "X-API-Key" in body["detail"]

    @pytest.mark.parametrize("key", ["wrong", "key-one2", "key-on", "KEY-ONE", "key-one,key-two"])
    def test_wrong_key_refused(self, keyed_server, key):
        response = httpx.post(keyed_server.url + "/segment", headers={"X-API-Key": key})
        assert_problem(response, 401)
        assert response.headers["www-authenticate"] == "ApiKey"

    @pytest.mark.parametrize("key", KEYS)
    def test_every_configured_key_passes(self, keyed_server, key):
        # past the key check, an empty body is refused for what it is, not for the key
        response = httpx.post(keyed_server.url + "/segment", headers={"X-API-Key": key})
        assert response.status_code not in (401, 500)
        assert "www-authenticate" not in response.headers

    def test_metadata_open_unless_protected(self, keyed_server):
        for path in ("/models", "/metrics", "/healthz", "/readyz", "/docs", "/openapi.json"):
            assert httpx.get(keyed_server.url + path).status_code == 200, path

    def test_protected_metadata(self, protected_server):
        for path in ("/models", "/metrics"):
            response = httpx.get(protected_server.url + path)
            assert_problem(response, 401)
            assert response.headers["www-authenticate"] == "ApiKey"
            assert httpx.get(protected_server.url + path, headers={"X-API-Key": "nope"}).status_code == 401
            for key in KEYS:
                assert httpx.get(protected_server.url + path, headers={"X-API-Key": key}).status_code == 200
        for path in ("/healthz", "/readyz", "/docs", "/openapi.json"):
            assert httpx.get(protected_server.url + path).status_code == 200, path

    def test_no_keys_configured_means_open(self, server):
        assert httpx.post(server.url + "/segment").status_code != 401


class TestRequestId:
    @pytest.mark.parametrize("path, method", [("/healthz", "GET"), ("/nope", "GET"), ("/healthz", "DELETE"),
                                              ("/segment?tta=x", "POST"), ("/readyz", "GET")])
    def test_generated_on_every_response(self, server, path, method):
        response = httpx.request(method, server.url + path)
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])

    def test_on_401(self, keyed_server):
        assert re.fullmatch(r"[0-9a-f]{32}", httpx.post(keyed_server.url + "/segment").headers["x-request-id"])

    def test_client_id_kept_and_logged(self, server):
        response = httpx.get(server.url + "/healthz", headers={"X-Request-ID": "trace-42.a:b"})
        assert response.headers["x-request-id"] == "trace-42.a:b"
        time.sleep(0.1)
        assert re.search(r"\[trace-42\.a:b\] GET /healthz 200", server.logs())

    @pytest.mark.parametrize("bad", ["has space", "x" * 200, "semi;colon", "-leading-dash", "é"])
    def test_insane_client_id_replaced(self, server, bad):
        response = httpx.get(server.url + "/healthz", headers={"X-Request-ID": bad.encode("utf-8")})
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


class TestProblems:
    def test_404(self, server):
        body = assert_problem(httpx.get(server.url + "/no/such/thing"), 404)
        assert body["title"] == "Not Found" and "/docs" in body["detail"]

    def test_405(self, server):
        response = httpx.delete(server.url + "/models")
        body = assert_problem(response, 405)
        assert body["title"] == "Method Not Allowed"
        assert "DELETE" in body["detail"] and "GET" in body["detail"]
        assert "GET" in response.headers["allow"]

    def test_422_names_the_parameter(self, server):
        body = assert_problem(httpx.post(server.url + "/segment", params={"tta": "perhaps"}), 422)
        assert "'tta'" in body["detail"] and "boolean" in body["detail"]


class TestDocs:
    def test_docs_and_openapi(self, server):
        docs = httpx.get(server.url + "/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        spec = httpx.get(server.url + "/openapi.json").json()
        assert {"/segment", "/models", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
        schemes = spec["components"]["securitySchemes"]
        assert any(s.get("in") == "header" and s.get("name") == "X-API-Key" for s in schemes.values())


class TestLogging:
    def test_file_names_and_header_text_never_logged(self, server, tmp_path):
        parts = write_case(tmp_path)
        files = {name: (f"Doe_John_1970-{name}.nii.gz", path.read_bytes()) for name, path in parts.items()}
        response = httpx.post(
            server.url + "/segment", files=files,
            headers={"User-Agent": "agent-secret-text", "X-Request-ID": "log-check-1"},
        )
        assert response.status_code == 200
        time.sleep(0.1)
        logs = server.logs()
        lines = [line for line in logs.splitlines() if "[log-check-1]" in line]
        assert any("POST /segment model=resunet 200" in line for line in lines)
        assert "Doe_John" not in logs and "agent-secret-text" not in logs


@pytest.fixture(scope="module")
def busy_server(server_factory, tmp_path_factory):
    """Two inferences at a time, no queue, and a model with a tiny patch so that a 40^3 volume with TTA takes
    seconds of CPU (thousands of tiles)."""
    folder = tmp_path_factory.mktemp("slow-models")
    build_model(folder, "unet", patch_size=(4, 4, 4))
    return server_factory(folder, settings={"max_concurrent": 2, "max_queue": 0})


class TestUnderLoad:
    def test_healthz_prompt_and_full_queue_503_while_two_inferences_run(self, busy_server, tmp_path):
        image = np.ones((4, 40, 40, 40), dtype=np.float32)
        image[0, 10:30, 10:30, 10:30] = 10.0
        files = {name: path.read_bytes() for name, path in write_case(tmp_path, image).items()}
        results: list = []

        def slow_request():
            results.append(httpx.post(busy_server.url + "/segment", params={"tta": "true"}, files=files, timeout=300))

        threads = [threading.Thread(target=slow_request) for _ in range(2)]
        for thread in threads:
            thread.start()
        with busy_server.client(timeout=5) as client:
            deadline = time.monotonic() + 60
            while not re.search(r"^brats_inferences_running 2\.0$", client.get("/metrics").text, re.M):
                assert time.monotonic() < deadline and all(t.is_alive() for t in threads), "inferences never started"
                time.sleep(0.01)
            full = client.post("/segment", files=files)
            latencies = []
            while all(t.is_alive() for t in threads) and len(latencies) < 20:
                start = time.perf_counter()
                assert client.get("/healthz").status_code == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.02)
        for thread in threads:
            thread.join()
        body = assert_problem(full, 503)
        assert full.headers["retry-after"] == "1" and "busy" in body["detail"]
        assert [r.status_code for r in results] == [200, 200]
        assert latencies and max(latencies) < 1.0, latencies


class TestStartup:
    def test_healthz_answers_while_the_models_load_and_readyz_waits_for_them(self, models_dir):
        from fastapi.testclient import TestClient

        from service.main import create_app
        from service.catalogue import ModelCatalogue
        from service.settings import Settings

        release = threading.Event()

        class SlowCatalogue(ModelCatalogue):
            def load(self) -> None:  # the real load, once the test lets it go
                release.wait(30)
                super().load()

        settings = Settings(models_dir=models_dir, providers=["CPUExecutionProvider"], threads=1)
        app = create_app(settings, catalogue=SlowCatalogue(settings))
        with TestClient(app) as client:  # runs the real lifespan
            assert client.get("/healthz").status_code == 200
            loading = client.get("/readyz")
            assert loading.status_code == 503 and "still loading" in loading.json()["detail"]
            refused = client.post("/segment", files={"flair": b"x"})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            release.set()
            deadline = time.monotonic() + 30
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the models never finished loading"
                time.sleep(0.02)
            assert client.get("/models").json()["default"] == "resunet"
