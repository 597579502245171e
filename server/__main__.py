"""`python -m server`: parse settings (flags over VITSERVE_* variables), then run uvicorn, one worker."""

from __future__ import annotations

import logging
import sys

import uvicorn

from server.app import create_app
from server.errors import StartupError
from server.settings import Settings


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_cli(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        app = create_app(settings)
    except StartupError as exc:
        logging.getLogger("server").error("cannot start: %s", exc)
        return 2
    # One process: the metrics live in it, and threads (decode pool, one inference thread per
    # model version) give the parallelism, since Pillow and ONNX Runtime release the GIL.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        server_header=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
