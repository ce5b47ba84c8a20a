"""``python -m service [--host HOST] [--port PORT] [--log-level LEVEL]``: serve the API with uvicorn.

Defaults come from the settings (``BRATS_HOST``, ``BRATS_PORT``, ``BRATS_LOG_LEVEL``, ...); flags on the
command line override them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

logger = logging.getLogger("service")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Brain tumour segmentation service. Configuration comes from BRATS_* environment variables "
        "(see the README); these flags override them.",
    )
    parser.add_argument("--host", help="interface to listen on (BRATS_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (BRATS_PORT, default 8000)")
    parser.add_argument("--models-dir", help="folder of NAME.onnx + NAME.json models (BRATS_MODELS_DIR)")
    parser.add_argument(
        "--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="BRATS_LOG_LEVEL, default INFO",
    )
    return parser.parse_args(argv)


def _variable(loc: tuple) -> str:
    """The environment variable of a settings error's location (a field name, or an alias that is one)."""
    name = "_".join(map(str, loc)).upper()
    return name if name.startswith("BRATS_") else f"BRATS_{name}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from service.settings import Settings

    overrides = {
        key: value
        for key, value in {
            "host": args.host, "port": args.port, "models_dir": args.models_dir, "log_level": args.log_level,
        }.items()
        if value is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        errors = "; ".join(f"{_variable(e['loc'])}: {e['msg']}" for e in exc.errors())
        print(f"python -m service: invalid configuration: {errors}", file=sys.stderr)
        return 2

    import uvicorn

    from service.main import create_app
    from service.observability import configure_logging
    from service.catalogue import ModelCatalogue

    configure_logging(settings.log_level)
    catalogue = None
    if settings.require_models:  # fail fast, with one line, before the server starts
        catalogue = ModelCatalogue(settings)
        catalogue.load()
        if not catalogue.ready:
            print(f"python -m service: BRATS_REQUIRE_MODELS is set and {catalogue.reason}", file=sys.stderr)
            return 2
    app = create_app(settings, catalogue=catalogue)
    logger.info("serving on http://%s:%d (API docs at /docs)", settings.host, settings.port)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # configure_logging's handler: request id in every line
        access_log=False,  # RequestContextMiddleware logs one line per request, without query strings
        server_header=False,
        timeout_graceful_shutdown=30,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
