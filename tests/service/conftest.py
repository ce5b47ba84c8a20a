"""Fixtures for the service tests: tiny real models, and real ``python -m service`` processes.

- ``models_dir``: ``unet`` and ``resunet`` (3D); ``models_dir_2d``: the same plus ``unet2d``;
  ``empty_models_dir``: no model at all. Session-scoped, read-only: copy before changing.
- ``server_factory(models_dir=None, *, settings=None, env=None, args=None)``: starts a server (default on
  ``models_dir``), waits for ``/healthz`` and returns a :class:`tests.service.support.Server`
  (``.url``, ``.client()``, ``.logs()``, ``.stop()``); every server is stopped (SIGTERM, then kill) at the
  end of the session.
- ``server``: one shared server on ``models_dir`` with default settings (no API keys).

The data helpers (:func:`~tests.service.support.tumour_scan`, ``write_case``, ``write_image4d``,
``write_nifti``, ``expected_labels``) live in :mod:`tests.service.support`.
"""

from __future__ import annotations

import pytest

from tests.service.support import Server, build_models, start_server


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """``unet.onnx`` and ``resunet.onnx`` with their cards; both segment :func:`tumour_scan` exactly."""
    return build_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def models_dir_2d(tmp_path_factory):
    """``unet``, ``resunet`` and the 2D ``unet2d``."""
    return build_models(tmp_path_factory.mktemp("models2d"), with_2d=True)


@pytest.fixture(scope="session")
def empty_models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("no-models")


@pytest.fixture(scope="session")
def server_factory(models_dir, tmp_path_factory):
    servers: list[Server] = []
    log_dir = tmp_path_factory.mktemp("server-logs")

    def start(models=None, *, settings=None, env=None, args=None, timeout: float = 60.0) -> Server:
        server = start_server(
            models if models is not None else models_dir, log_dir,
            settings=settings, env=env, args=args, timeout=timeout,
        )
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(server_factory) -> Server:
    """A ready server on ``models_dir``, default settings, no API keys."""
    return server_factory()
