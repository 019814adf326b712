"""Top-level job functions for the pooled-unit tests (worker processes import them by module name)."""
from __future__ import annotations

import os
import time
from pathlib import Path


def write_pid(out: str, fail: bool = False, *, resume: bool) -> None:
    """A stand-in unit: writes its process id to ``out/pid.txt``, or fails."""
    time.sleep(0.2)  # long enough that a second worker picks up the next unit
    if fail:
        raise ValueError(f"planned failure in {out}")
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "pid.txt").write_text(str(os.getpid()))
