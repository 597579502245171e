"""`python -m server`: parse settings (flags over VITSERVE_* variables), then run uvicorn, one worker."""

from __future__ import annotations

import logging
import sys

import uvicorn

from server.app import create_app
from server.connections import uvicorn_options
from server.errors import StartupError
from server.preprocess import harden_pillow
from server.settings import Settings


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_cli(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    harden_pillow(settings.max_image_pixels)  # process-wide, so here rather than in create_app
    try:
        app = create_app(settings)
    except StartupError as exc:
        logging.getLogger("server").error("cannot start: %s", exc)
        return 2
    # One process: the metrics live in it, and threads (decode pool, inference threads per lane of
    # each model version) give the parallelism, since Pillow and ONNX Runtime release the GIL.
    uvicorn.run(app, workers=1, **uvicorn_options(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
