"""Export of a synthetic samples folder as a Hugging Face imagefolder with a dataset card."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermsynth.data.labels import CLASSES
from dermsynth.data.manifest import write_manifest
from dermsynth.data.split import SplitConfig, load_split, make_split
from dermsynth.experiments.export import NOTICE, export_imagefolder
from dermsynth.io import DataError, atomic_save_image


def _real_split(root: Path, source: str = "ham10000") -> Path:
    """A 56-image manifest (8 one-image lesions per class) and its lesion-grouped split."""
    rng = np.random.default_rng(0)
    rows = []
    for c in CLASSES:
        for j in range(8):
            p = root / "real" / f"{c}{j}.png"
            atomic_save_image(p, rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
            rows.append({"image_id": f"{c}{j}", "group_id": f"L{c}{j}", "label": c, "path": str(p), "source": source})
    write_manifest(pd.DataFrame(rows), root / "real" / "manifest.csv")
    return make_split(root / "real" / "manifest.csv", root / "split", SplitConfig(seed=0))


def _samples(root: Path, split: Path, n: int = 4) -> Path:
    """A generator run (generator.json) and a samples folder as ``generate`` writes them."""
    gen = root / "gen"
    gen.mkdir(parents=True)
    (gen / "generator.json").write_text(json.dumps({"kind": "scratch", "split": str(split), "image_size": 8,
                                                    "split_fingerprint": load_split(split).fingerprint,
                                                    "classes": list(CLASSES)}))
    rows = []
    for c in ("df", "vasc"):
        for i in range(n):
            p = root / "samples" / c / f"{c}_{i:05d}.png"
            atomic_save_image(p, np.full((8, 8, 3), 10 * i, np.uint8), text={"ai_generated": "true", "class": c})
            rows.append({"image_id": f"syn_{c}_{i}", "group_id": f"syn_{c}_{i}", "label": c, "path": str(p),
                         "source": "synthetic", "seed": i, "generator": str(gen), "checkpoint_hash": "abc123",
                         "guidance": 2.0, "sampler": "dpmpp", "steps": 10})
    write_manifest(pd.DataFrame(rows), root / "samples" / "manifest.csv")
    return root / "samples"


def test_export_writes_imagefolder_with_metadata_and_card(tmp_path):
    split = _real_split(tmp_path)
    samples = _samples(tmp_path, split)
    out = export_imagefolder(samples, tmp_path / "hf")

    meta = [json.loads(line) for line in (out / "train" / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == 8 and {m["label"] for m in meta} == {"df", "vasc"}
    first = meta[0]
    assert first["file_name"] == "syn_df_0.png" and first["checkpoint_hash"] == "abc123" and first["seed"] == 0
    assert first["ai_generated"] is True and "path" not in first
    for m in meta:
        assert (out / "train" / m["file_name"]).is_file()
    # bytes copied as they are: the AI-generated marking in the PNG text chunks survives
    with Image.open(out / "train" / "syn_vasc_3.png") as im:
        assert im.text["ai_generated"] == "true"

    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: cc-by-nc-sa-4.0\n")
    assert NOTICE in card and "HAM10000" in card
    assert load_split(split).fingerprint in card and "scratch" in card and "| df |" in card


def test_export_card_summarises_the_filter(tmp_path):
    split = _real_split(tmp_path)
    samples = _samples(tmp_path, split)
    (samples / "filter.json").write_text(json.dumps({
        "checks": {"realism": "inside the class's real train k-NN manifold, k=5"},
        "per_class": {"df": {"in": 10, "kept": 4, "rejected": 6, "by_reason": {"outside_real_manifold": 5,
                                                                             "copy_of_train": 1}}}}))
    card = (export_imagefolder(samples, tmp_path / "hf") / "README.md").read_text()
    assert "- realism: inside the class's real train k-NN manifold, k=5" in card
    assert "| df | 10 | 4 | 6 (outside real manifold 5, copy of train 1) |" in card


def test_export_refuses_real_images_and_foreign_folders_and_replaces_an_earlier_export(tmp_path):
    split = _real_split(tmp_path, source="toy")
    samples = _samples(tmp_path, split)
    out = export_imagefolder(samples, tmp_path / "hf")
    assert "license: apache-2.0" in (out / "README.md").read_text()

    # a smaller re-export leaves no image of the earlier one behind
    df = pd.read_csv(samples / "manifest.csv").iloc[:3]
    df.to_csv(samples / "manifest.csv", index=False)
    export_imagefolder(samples, out)
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "metadata.jsonl", "syn_df_0.png", "syn_df_1.png", "syn_df_2.png"]

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not an earlier export"):
        export_imagefolder(samples, tmp_path / "other")
    # an earlier export with a file added by hand (a dataset repo's .git, say) is not replaced, losing it
    (out / ".gitattributes").write_text("*.png filter=lfs")
    with pytest.raises(DataError, match=r"holds more: \['.gitattributes'\]"):
        export_imagefolder(samples, out)
    assert (out / ".gitattributes").is_file()

    df.loc[1, "source"] = "ham10000"
    df.to_csv(samples / "manifest.csv", index=False)
    with pytest.raises(DataError, match="not synthetic"):
        export_imagefolder(samples, tmp_path / "hf2")


def test_an_interrupted_export_leaves_the_folder_as_it_was_and_a_rerun_finishes_it(tmp_path, monkeypatch):
    import dermsynth.experiments.export as export_mod

    split = _real_split(tmp_path, source="toy")
    samples = _samples(tmp_path, split)
    real_write, written = export_mod.atomic_write_bytes, []

    def die_after_two(path, data):
        if len(written) == 2:
            raise KeyboardInterrupt("killed mid-export")
        written.append(path)
        return real_write(path, data)

    monkeypatch.setattr(export_mod, "atomic_write_bytes", die_after_two)
    with pytest.raises(KeyboardInterrupt):
        export_imagefolder(samples, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # no half export that looks like a dataset, nor one that blocks a rerun
    monkeypatch.undo()
    out = export_imagefolder(samples, tmp_path / "hf")
    assert len((out / "train" / "metadata.jsonl").read_text().splitlines()) == 8
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".hf")) == []

    # an interrupted re-export keeps the earlier export whole
    df = pd.read_csv(samples / "manifest.csv").iloc[:3]
    df.to_csv(samples / "manifest.csv", index=False)
    written.clear()
    monkeypatch.setattr(export_mod, "atomic_write_bytes", die_after_two)
    with pytest.raises(KeyboardInterrupt):
        export_imagefolder(samples, out)
    assert len((out / "train" / "metadata.jsonl").read_text().splitlines()) == 8 and "license:" in (
        out / "README.md").read_text()
    monkeypatch.undo()
    export_imagefolder(samples, out)
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "metadata.jsonl", "syn_df_0.png", "syn_df_1.png", "syn_df_2.png"]
