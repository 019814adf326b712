"""Every shipped config loads into its stage's dataclass: a typo in a recipe fails here, not an hour into a run."""
from __future__ import annotations

from pathlib import Path

import pytest

from dermsynth.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _schema(name: str) -> type:
    from dermsynth.classify.config import ClfConfig
    from dermsynth.data.toy import ToyConfig
    from dermsynth.experiments.config import StudyConfig
    from dermsynth.generate.config import GenConfig
    from dermsynth.metrics.filter import FilterConfig
    from dermsynth.metrics.quality import QualityConfig

    prefixes = {"clf_": ClfConfig, "gen_": GenConfig, "sd15_": GenConfig, "study_": StudyConfig,
                "ham10000": StudyConfig, "demo": StudyConfig, "toy": ToyConfig, "filter": FilterConfig,
                "quality": QualityConfig}
    for prefix, cls in prefixes.items():
        if name.startswith(prefix):
            return cls
    raise AssertionError(f"configs/{name}.yaml has no known schema: name it after its stage (clf_, gen_, study_, ...)")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_config_loads(path):
    cfg = load_config(_schema(path.stem), path)
    assert type(cfg).__name__.endswith("Config")
