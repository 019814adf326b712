"""The benchmark helpers that a GPU round depends on, checked on CPU: the compact HAM10000 archive reads back
through the normal data path."""
from __future__ import annotations

import importlib.util
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from dermsynth.data.prepare import prepare

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compact_archive_unpacks_to_a_ham10000_folder_with_small_images(ham_sample, tmp_path):
    pack = _load("pack_ham10000")
    archive = pack.pack(ham_sample, tmp_path / "ham-compact.tar.gz", short_side=64, quality=80)
    assert not (tmp_path / "ham-compact.tar.gz.tmp").exists()
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    root = tmp_path / "x" / "ham-compact"
    manifest = pd.read_csv(prepare("ham10000", root, tmp_path / "prepared"))
    original = pd.read_csv(ham_sample / "HAM10000_metadata.csv")
    assert sorted(manifest["image_id"]) == sorted(original["image_id"])
    for p in list(root.glob("HAM10000_images_part_*/*.jpg"))[:5]:
        with Image.open(p) as im:
            assert min(im.size) == 64 and abs(im.width / im.height - 4 / 3) < 0.02  # aspect kept


def _samples(folder: Path, images: dict[tuple[str, int], int]) -> Path:
    """A samples folder whose image (label, index) is filled with one grey level."""
    rows = []
    for (label, index), level in images.items():
        path = f"images/{label}/{label}-{index}.png"
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (level,) * 3).save(folder / path)
        rows.append({"label": label, "index": index, "path": path})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder


def test_sampler_quality_pairs_images_by_class_and_index(tmp_path):
    sq = _load("sampler_quality")
    a = _samples(tmp_path / "a", {("df", 0): 10, ("df", 1): 20, ("mel", 0): 30})
    b = _samples(tmp_path / "b", {("df", 0): 14, ("df", 1): 20, ("mel", 0): 40, ("mel", 1): 0})  # mel 1: no pair
    assert sq.pixel_distance(a, a) == 0.0
    assert abs(sq.pixel_distance(a, b) - (4 + 0 + 10) / 3) < 1e-6
    assert sq.parse_variant("dpmpp:25:1") == ("dpmpp", 25, 1, 1.0)
    assert sq.parse_variant("dpmpp:25:1:0.25") == ("dpmpp", 25, 1, 0.25)
    assert sq.variant_name(("dpmpp", 25, 1, 1.0)) == "dpmpp25_s1"
    assert sq.variant_name(("dpmpp", 25, 1, 0.25)) == "dpmpp25_s1_img0.25"
    for bad in ("dpmpp-25", "dpmpp:25:1:0.5:2", "dpmpp:x:1"):
        with pytest.raises(SystemExit, match="SAMPLER:STEPS:SEED"):
            sq.parse_variant(bad)


def test_sampler_quality_table_pairs_only_the_same_start_and_takes_the_null_from_another_seed(tmp_path):
    sq = _load("sampler_quality")
    variants = [sq.parse_variant(v) for v in ("ddim:50:0", "dpmpp:25:0", "ddim:50:1", "dpmpp:25:0:0.25")]
    levels = (10, 13, 30, 100)  # the same starting noise gives near images; another seed or an init image does not
    folders = [_samples(tmp_path / sq.variant_name(v), {("df", 0): lv}) for v, lv in zip(variants, levels)]
    kid = (1.0, 1.5, 1.2, 0.4)
    quality = [{"groups": {"df": {"N": 1, "synthetic": {"KID_lite0": k}, "floor": {"KID_lite0": 0.2}}}} for k in kid]
    rows, null = sq.table(variants, list(zip(folders, quality)))
    by = {r["variant"]: r for r in rows}
    assert by["ddim50_s0"]["pixel_vs_ref"] is None  # the reference itself
    assert by["dpmpp25_s0"]["pixel_vs_ref"] == 3.0
    assert by["ddim50_s1"]["pixel_vs_ref"] is None and by["dpmpp25_s0_img0.25"]["pixel_vs_ref"] is None
    assert null == 20.0  # reference vs its other seed
    assert abs(by["dpmpp25_s0_img0.25"]["KID_minus_ref"] + 0.6) < 1e-9
    assert by["dpmpp25_s0_img0.25"]["KID_lite0_floor"] == 0.2


def test_sampler_quality_samples_the_checkpoint_it_is_given(tmp_path, monkeypatch):
    sq = _load("sampler_quality")
    calls = []

    def fake_generate(gen, **kw):  # records what would be sampled; the quality below is already on disk
        calls.append(kw)
        return kw["out"]

    monkeypatch.setattr(sq, "generate", fake_generate)
    cfg = sq.QualityConfig()
    variant = sq.parse_variant("dpmpp:25:0")
    for checkpoint in (None, "gen/checkpoints/step_00002400"):
        out = tmp_path / str(checkpoint).replace("/", "_")
        qdir = out / "dpmpp25_s0" / f"quality-{sq.config_hash(cfg)[:8]}-n4"
        qdir.mkdir(parents=True)
        (qdir / "quality.json").write_text('{"groups": {}}')
        folder, q = sq.score(Path("gen"), Path("split.json"), out, variant, "df", 4, cfg, checkpoint)
        assert folder == out / "dpmpp25_s0" and q == {"groups": {}}
    assert [c["checkpoint"] for c in calls] == [None, "gen/checkpoints/step_00002400"]
    assert all(c["sampler"] == "dpmpp" and c["steps"] == 25 and c["seed"] == 0 for c in calls)
