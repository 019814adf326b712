"""Per-run logging to ``<run>/log.txt`` (and the console), set up by the caller, never at import."""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Iterator

LOGGER_NAME = "dermsynth"


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


@contextlib.contextmanager
def run_log(run_dir: str | Path) -> Iterator[logging.Logger]:
    """Append the package's log records to ``run_dir/log.txt`` for the duration of the block (the package logger's
    level is at most INFO meanwhile, and restored afterwards)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(LOGGER_NAME)
    handler = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    level = logger.level
    if level == logging.NOTSET or level > logging.INFO:  # the file gets INFO records even when the console does not
        logger.setLevel(logging.INFO)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(level)  # the caller's level again: a library leaves the process's logging as it found it


def setup_console(verbose: bool = False) -> None:
    """Console logging for the CLI (the only caller)."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(getattr(h, "_dermsynth_console", False) for h in logger.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        h._dermsynth_console = True  # type: ignore[attr-defined]
        logger.addHandler(h)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
