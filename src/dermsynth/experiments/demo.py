"""``dermsynth demo``: the whole study on the built-in toy set, on CPU, ending with the report's path.

Nothing here is special-cased: it loads ``configs/demo.yaml`` and calls :func:`run_study`, which makes the toy set
(:func:`dermsynth.data.toy.make_toy`), splits it by lesion, trains the generator, samples, filters, measures quality,
trains every classifier condition with three seeds, aggregates and writes the report. Rerunning resumes.
"""
from __future__ import annotations

from pathlib import Path

from dermsynth.config import ConfigError, load_config

DEMO_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "demo.yaml"


def run_demo(out: str | Path = "runs/demo") -> Path:
    """Run (or resume) the demo study in ``out``; returns the report's HTML path."""
    from dermsynth.experiments.config import StudyConfig
    from dermsynth.experiments.study import run_study

    if not DEMO_CONFIG.is_file():
        raise ConfigError(f"the demo config {DEMO_CONFIG} is missing: run the demo from a source checkout of "
                          "dermsynth (pip install -e .), or run `dermsynth study -c <config> --out <dir>`")
    cfg = load_config(StudyConfig, DEMO_CONFIG)
    return run_study(cfg, out)


__all__ = ["run_demo", "DEMO_CONFIG"]
