"""Problem details, request ids and API key checks in process (an app with extra test routes, no server)."""

from __future__ import annotations

import asyncio
import logging
import re

from typing import Annotated

import httpx
import pytest
from fastapi import Query

from service.api.deps import ApiKeyDep, RequestIdDep, key_is_valid
from service.api.errors import ProblemError, validation_detail
from service.main import create_app
from service.api.request_context import request_id_from
from service.observability import Metrics
from service.settings import Settings


def make_app(**settings):
    app = create_app(Settings(models_dir="/nonexistent", **settings))

    @app.get("/test/problem")
    async def problem():
        raise ProblemError(503, "Service Unavailable", "the queue is full; retry", headers={"Retry-After": "1"})

    @app.get("/test/crash")
    async def crash():
        raise RuntimeError("secret /tmp/upload-Doe_John.nii.gz")

    @app.get("/test/params")
    async def params(n: Annotated[int, Query(ge=1)], mode: Annotated[str, Query(pattern="^(a|b)$")] = "a"):
        return {"n": n}

    @app.get("/test/id")
    async def request_id(rid: RequestIdDep):
        return {"id": rid}

    @app.get("/test/keyed", dependencies=[ApiKeyDep])
    async def keyed():
        return {"ok": True}

    return app


def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


class TestProblemError:
    def test_body_headers_and_media_type(self):
        response = call(make_app(), "GET", "/test/problem")
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["retry-after"] == "1"
        assert response.json() == {
            "type": "about:blank", "title": "Service Unavailable", "status": 503, "detail": "the queue is full; retry",
        }

    def test_default_title_is_the_status_phrase(self):
        error = ProblemError(404, "", "no such case", type="https://example.org/problems/no-case")
        assert (error.title, error.status, error.type, error.headers) == (
            "Not Found", 404, "https://example.org/problems/no-case", {},
        )


class TestUnexpected:
    def test_500_is_generic_has_request_id_and_is_logged(self, caplog):
        with caplog.at_level(logging.ERROR):
            response = call(make_app(), "GET", "/test/crash", headers={"X-Request-ID": "crash-1"})
        assert response.status_code == 500
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["x-request-id"] == "crash-1"
        body = response.json()
        assert body["status"] == 500 and "X-Request-ID" in body["detail"]
        assert "secret" not in response.text and "RuntimeError" not in response.text
        assert any("unhandled RuntimeError" in r.getMessage() for r in caplog.records)

    def test_500_is_counted(self):
        app = make_app()
        call(app, "GET", "/test/crash")
        metrics: Metrics = app.state.metrics
        assert metrics.requests.labels("/test/crash", "GET", "", "500")._value.get() == 1


class TestValidation:
    def test_missing_and_bad_parameters_are_named(self):
        body = call(make_app(), "GET", "/test/params", params={"mode": "c"}).json()
        assert body["status"] == 422 and body["title"] == "Invalid request parameters"
        assert "query parameter 'n': Field required" in body["detail"]
        assert "query parameter 'mode'" in body["detail"]

    def test_detail_formatting(self):
        errors = [
            {"loc": ("query", "tta"), "msg": "Input should be a valid boolean"},
            {"loc": ("body", "file", 0), "msg": "bad"},
            {"loc": ("header", "x-api-key"), "msg": "missing"},
        ]
        assert validation_detail(errors) == (
            "query parameter 'tta': Input should be a valid boolean; body field 'file.0': bad; header 'x-api-key': missing"
        )


class TestRequestId:
    def test_dependency_sees_the_id(self):
        response = call(make_app(), "GET", "/test/id", headers={"X-Request-ID": "abc-1"})
        assert response.json() == {"id": "abc-1"} and response.headers["x-request-id"] == "abc-1"

    @pytest.mark.parametrize("value", [None, "", "a b", "x" * 129, "../etc"])
    def test_request_id_from_rejects_odd_values(self, value):
        assert re.fullmatch(r"[0-9a-f]{32}", request_id_from(value))

    @pytest.mark.parametrize("value", ["a", "trace-1.2:3_4", "x" * 128])
    def test_request_id_from_keeps_tokens(self, value):
        assert request_id_from(value) == value


class TestApiKey:
    def test_constant_time_over_all_keys(self):
        assert key_is_valid("b", ["a", "b"]) and key_is_valid("a", ["a", "b"])
        assert not key_is_valid("c", ["a", "b"]) and not key_is_valid(None, ["a"]) and not key_is_valid("", ["a"])
        assert not key_is_valid("é", ["e"])
        # a non-ASCII key travels as UTF-8 bytes, which the server decodes as latin-1
        assert key_is_valid("clé".encode("utf-8").decode("latin-1"), ["clé"]) and not key_is_valid("clé", ["clé"])

    def test_keys_off(self):
        assert call(make_app(), "GET", "/test/keyed").json() == {"ok": True}

    def test_keys_on(self):
        app = make_app(api_keys=["k1", "k2"])
        missing = call(app, "GET", "/test/keyed")
        wrong = call(app, "GET", "/test/keyed", headers={"X-API-Key": "k3"})
        for response, title in ((missing, "API key required"), (wrong, "Invalid API key")):
            assert response.status_code == 401 and response.json()["title"] == title
            assert response.headers["www-authenticate"] == "ApiKey"
        assert call(app, "GET", "/test/keyed", headers={"X-API-Key": "k2"}).status_code == 200


class TestSettings:
    def test_environment(self, monkeypatch, tmp_path):
        monkeypatch.setenv("BRATS_API_KEYS", " a, b ,,")
        monkeypatch.setenv("BRATS_PROVIDERS", "CPUExecutionProvider")
        monkeypatch.setenv("BRATS_MODELS_DIR", str(tmp_path))
        monkeypatch.setenv("BRATS_LOG_LEVEL", "debug")
        monkeypatch.setenv("BRATS_PROTECT_METADATA", "true")
        monkeypatch.setenv("BRATS_DEFAULT_MODEL", "")
        settings = Settings()
        assert settings.api_keys == ["a", "b"] and settings.providers == ["CPUExecutionProvider"]
        assert settings.models_dir == tmp_path and settings.log_level == "DEBUG" and settings.protect_metadata
        assert settings.default_model is None

    def test_defaults_start_on_the_shipped_models(self, monkeypatch):
        for name in list(__import__("os").environ):
            if name.startswith("BRATS_"):
                monkeypatch.delenv(name)
        settings = Settings()
        assert settings.models_dir.name == "models" and (settings.models_dir.parent / "service").is_dir()
        assert (settings.host, settings.port, settings.max_concurrent, settings.max_queue) == ("127.0.0.1", 8000, 1, 4)
        assert settings.max_upload_bytes == 2**30 and settings.max_voxels == 64 * 2**20 and settings.api_keys == []

    def test_tmp_dir_must_be_a_writable_folder(self, monkeypatch, tmp_path):
        monkeypatch.setenv("BRATS_TMP_DIR", str(tmp_path / "missing"))
        with pytest.raises(ValueError, match="not a writable folder; create it"):
            Settings()
        monkeypatch.setenv("BRATS_TMP_DIR", str(tmp_path))
        assert Settings().tmp_dir == tmp_path

    def test_get_settings_is_cached(self):
        from service.settings import get_settings

        get_settings.cache_clear()
        assert get_settings() is get_settings()
        get_settings.cache_clear()
