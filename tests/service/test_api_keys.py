"""API keys on every endpoint but health, enumerated from the OpenAPI schema of a real server.

Every operation of ``/openapi.json`` except ``/healthz`` and ``/readyz`` must refuse a request without a key and
one with a wrong key (401 problem with ``WWW-Authenticate``) and let a valid key through, so a route added
later without the key dependency fails here. FastAPI's own pages (``/docs``, ``/openapi.json``, ...) are not in
the schema; a check on the app's route table makes sure nothing else hides from it.
"""

from __future__ import annotations

import re

import httpx
import pytest

from service.main import create_app
from service.settings import Settings

KEYS = ["key-alpha-1", "key-beta-2"]
HEALTH = {"/healthz", "/readyz"}
"""Never need a key (probes of orchestrators and load balancers)."""
METADATA = {"/models", "/metrics"}
"""Need a key only with ``BRATS_PROTECT_METADATA``."""
FASTAPI_PAGES = {"/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/static"}
"""Served outside the schema (``/redoc`` is off: 404); never need a key. ``/static`` is the mount of the
vendored front-end files."""
METHODS = ("get", "put", "post", "delete", "patch", "options", "head", "trace")


@pytest.fixture(scope="module")
def protected(server_factory):
    return server_factory(settings={"api_keys": KEYS, "protect_metadata": True})


@pytest.fixture(scope="module")
def keyed(server_factory):
    return server_factory(settings={"api_keys": KEYS, "protect_metadata": False})


def schema(server) -> dict:
    response = httpx.get(server.url + "/openapi.json")  # no key: the schema is public
    assert response.status_code == 200, response.text
    return response.json()


def operations(server) -> list[tuple[str, str]]:
    """``(METHOD, path)`` of every operation in the server's schema, path parameters filled in."""
    found = []
    for path, item in schema(server)["paths"].items():
        for method in METHODS:
            if method in item:
                found.append((method.upper(), re.sub(r"\{[^}]+\}", "x", path)))
    return found


def assert_refused(response: httpx.Response, what: str) -> None:
    assert response.status_code == 401, f"{what}: {response.status_code} {response.text[:200]}"
    assert response.headers["content-type"] == "application/problem+json", what
    assert response.headers.get("www-authenticate") == "ApiKey", what
    body = response.json()
    assert body["status"] == 401 and "X-API-Key" in body["detail"], what


def check_needs_key(client: httpx.Client, method: str, path: str) -> None:
    what = f"{method} {path}"
    assert_refused(client.request(method, path), f"{what} without a key")
    for wrong in ("wrong", KEYS[0] + "x", KEYS[0][:-1], KEYS[0].upper(), ",".join(KEYS)):
        assert_refused(client.request(method, path, headers={"X-API-Key": wrong}), f"{what} with key {wrong!r}")
    for key in KEYS:
        response = client.request(method, path, headers={"X-API-Key": key})
        assert response.status_code != 401 and response.status_code < 500, f"{what} with a valid key: {response.text}"
        assert "www-authenticate" not in response.headers


def check_open(client: httpx.Client, method: str, path: str) -> None:
    response = client.request(method, path)
    assert response.status_code not in (401, 403), f"{method} {path} without a key: {response.status_code}"
    assert "www-authenticate" not in response.headers


def test_schema_lists_the_endpoints(protected):
    paths = {path for _, path in operations(protected)}
    assert {"/segment", "/models", "/metrics"} <= paths and HEALTH <= paths


def test_every_operation_but_health_needs_a_key(protected):
    checked = []
    with protected.client() as client:
        for method, path in operations(protected):
            if path in HEALTH:
                check_open(client, method, path)
            else:
                check_needs_key(client, method, path)
                checked.append(path)
    assert {"/segment", "/models", "/metrics"} <= set(checked)


def test_schema_declares_the_key_on_every_protected_operation(protected):
    """Clients (and /docs) learn from the schema which operations take ``X-API-Key``."""
    doc = schema(protected)
    schemes = doc["components"]["securitySchemes"]
    wanted = ("apiKey", "header", "X-API-Key")
    [name] = [n for n, s in schemes.items() if (s.get("type"), s.get("in"), s.get("name")) == wanted]
    for path, item in doc["paths"].items():
        for method in METHODS:
            if method in item and path not in HEALTH:
                assert {name: []} in item[method].get("security", []), f"{method.upper()} {path}"


def test_fastapi_pages_stay_open(protected):
    with protected.client() as client:
        for path in FASTAPI_PAGES:
            check_open(client, "GET", path)
        assert client.get("/docs").status_code == 200 and client.get("/openapi.json").status_code == 200


def test_without_protect_metadata_only_metadata_and_health_are_open(keyed):
    with keyed.client() as client:
        for method, path in operations(keyed):
            if path in HEALTH | METADATA:
                check_open(client, method, path)
                assert client.request(method, path).status_code == 200, f"{method} {path}"
            else:
                check_needs_key(client, method, path)
        assert_refused(client.post("/segment"), "POST /segment without a key")


def _route_paths(routes, prefix: str = "", in_schema: bool = True):
    """``(path, in_schema)`` of every route of a route table, routers included by ``include_router`` opened."""
    for route in routes:
        if isinstance(getattr(route, "path", None), str):
            yield prefix + route.path, in_schema and getattr(route, "include_in_schema", True)
        elif hasattr(route, "original_router"):  # FastAPI's record of an included router
            context = route.include_context
            yield from _route_paths(route.original_router.routes, prefix + context.prefix,
                                    in_schema and context.include_in_schema)
        else:
            pytest.fail(f"unknown kind of route {route!r}: teach this test to open it")


def test_no_route_hides_from_the_schema(tmp_path):
    """A route left out of the schema would escape the checks above: only FastAPI's own pages may be."""
    app = create_app(Settings(models_dir=tmp_path, api_keys=KEYS, protect_metadata=True))
    routes = list(_route_paths(app.routes))
    in_schema = set(app.openapi()["paths"])
    hidden = {path for path, listed in routes if not listed or path not in in_schema}
    assert hidden <= FASTAPI_PAGES, f"routes outside the schema: {sorted(hidden - FASTAPI_PAGES)}"
    assert {path for path, _ in routes} >= in_schema
