"""Shared fixtures: offline hub, a per-test cache folder, the 57-image HAM10000 sample, a small toy set."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
HAM_SAMPLE = REPO.parent / "shared" / "data" / "ham10000-sample"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own cache folder; tests never touch the user's ~/.cache."""
    monkeypatch.setenv("DERMSYNTH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def ham_sample() -> Path:
    if not (HAM_SAMPLE / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"HAM10000 sample not found at {HAM_SAMPLE}")
    return HAM_SAMPLE


@pytest.fixture(scope="session")
def ham_manifest(tmp_path_factory, ham_sample) -> Path:
    """The sample prepared once per session (read-only for tests: copy it before changing it)."""
    from dermsynth.data.prepare import prepare

    return prepare("ham10000", ham_sample, tmp_path_factory.mktemp("ham_prepared"))


@pytest.fixture
def ham_copy(tmp_path, ham_sample) -> Path:
    """A private, writable copy of the HAM10000 sample (600 KB) for tests that edit files or metadata."""
    import shutil

    return Path(shutil.copytree(ham_sample, tmp_path / "ham"))
