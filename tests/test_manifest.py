"""The canonical manifest: validation, relative/absolute paths, escapes, counts."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from dermsynth.data.labels import CLASSES
from dermsynth.data.manifest import REQUIRED_COLUMNS, class_counts, read_manifest, write_manifest
from dermsynth.io import DataError


def frame(paths: list[str], labels: list[str] | None = None, **extra) -> pd.DataFrame:
    n = len(paths)
    return pd.DataFrame({"image_id": [f"img{i}" for i in range(n)], "group_id": [f"les{i // 2}" for i in range(n)],
                         "label": labels or ["nv"] * n, "path": paths, "source": "test", **extra})


def test_round_trip_relative_inside_absolute_outside(tmp_path):
    (tmp_path / "ds" / "images").mkdir(parents=True)
    inside = tmp_path / "ds" / "images" / "a.jpg"
    outside = tmp_path / "elsewhere" / "b.jpg"
    df = frame([str(inside), str(outside)], ["Melanoma", "NV"], age=[40, 50])
    path = write_manifest(df, tmp_path / "ds" / "manifest.csv")
    raw = pd.read_csv(path)
    assert list(raw.columns[:5]) == list(REQUIRED_COLUMNS) and "age" in raw.columns
    assert raw["path"].tolist() == ["images/a.jpg", str(outside.resolve())]
    assert raw["label"].tolist() == ["mel", "nv"]  # canonical on disk
    back = read_manifest(path)
    assert back["path"].tolist() == [str(inside.resolve()), str(outside.resolve())]
    assert back["image_id"].tolist() == ["img0", "img1"] and back["age"].tolist() == [40, 50]


@pytest.mark.parametrize("drop", ["image_id", "group_id", "label", "path", "source"])
def test_missing_required_column(tmp_path, drop):
    with pytest.raises(DataError, match=rf"missing column\(s\) \['{drop}'\]"):
        write_manifest(frame(["a.jpg"]).drop(columns=drop), tmp_path / "manifest.csv")
    assert not (tmp_path / "manifest.csv").exists()


def test_validation_errors_name_the_row(tmp_path):
    out = tmp_path / "m.csv"
    with pytest.raises(DataError, match=r"m.csv, row 3"):
        write_manifest(frame(["a.jpg", "b.jpg"], ["nv", "squamous"]), out)
    bad = frame(["a.jpg", "b.jpg", "c.jpg"])
    bad.loc[2, "group_id"] = None
    with pytest.raises(DataError, match=r"row 4: empty group_id"):
        write_manifest(bad, out)
    dup = frame(["a.jpg", "b.jpg", "c.jpg"])
    dup.loc[2, "image_id"] = "img0"
    with pytest.raises(DataError, match=r"duplicate image_id \['img0'\] at rows \[2, 4\]"):
        write_manifest(dup, out)
    with pytest.raises(DataError, match="empty"):
        write_manifest(frame([]), out)
    assert not out.exists()


def test_read_refuses_escaping_paths_but_accepts_absolute(tmp_path):
    m = tmp_path / "ds" / "manifest.csv"
    m.parent.mkdir()
    frame(["ok.jpg", "../../etc/passwd"]).to_csv(m, index=False)
    with pytest.raises(DataError, match=r"manifest.csv, row 3: path '../../etc/passwd' escapes the manifest folder"):
        read_manifest(m)
    frame(["ok.jpg", "/data/x.jpg"]).to_csv(m, index=False)
    assert read_manifest(m)["path"].tolist()[1] == "/data/x.jpg"


def test_check_files_and_unreadable(tmp_path):
    m = tmp_path / "manifest.csv"
    (tmp_path / "a.jpg").write_bytes(b"x")
    frame(["a.jpg", "missing.jpg"]).to_csv(m, index=False)
    read_manifest(m)  # no file checks by default
    with pytest.raises(DataError, match=r"row 3: image file not found: .*missing.jpg"):
        read_manifest(m, check_files=True)
    with pytest.raises(DataError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv")
    m.write_bytes(b'image_id,group_id\n"unterminated\n\xff\xfe')
    with pytest.raises(DataError):
        read_manifest(m)


def test_class_counts_lists_every_class():
    df = frame(["a", "b", "c", "d"], ["mel", "mel", "mel", "df"])  # mel: img0-2 in les0, les0, les1
    counts = class_counts(df)
    assert list(counts) == list(CLASSES)
    assert counts["mel"] == {"images": 3, "lesions": 2} and counts["df"] == {"images": 1, "lesions": 1}
    assert counts["nv"] == {"images": 0, "lesions": 0}


def test_ids_stay_strings(tmp_path):
    m = tmp_path / "manifest.csv"
    # a synthetic row's checkpoint hash of digits only, or one that reads as a float, stays the hash
    write_manifest(frame(["a.jpg"]).assign(image_id="007", group_id="0010", checkpoint_hash="1234567e89012345"), m)
    back = read_manifest(m)
    assert back["image_id"].item() == "007" and back["group_id"].item() == "0010"
    assert back["checkpoint_hash"].item() == "1234567e89012345"
    assert Path(back["path"].item()).name == "a.jpg"


def test_backslash_paths_from_windows_resolve(tmp_path):
    m = tmp_path / "ds" / "manifest.csv"
    (tmp_path / "ds" / "images").mkdir(parents=True)
    (tmp_path / "ds" / "images" / "a.jpg").write_bytes(b"x")
    frame(["images\\a.jpg", "..\\..\\etc\\passwd"]).iloc[:1].to_csv(m, index=False)
    assert read_manifest(m, check_files=True)["path"].item() == str((tmp_path / "ds" / "images" / "a.jpg").resolve())
    frame(["images\\a.jpg", "..\\..\\etc\\passwd"]).to_csv(m, index=False)
    with pytest.raises(DataError, match=r"manifest.csv, row 3: path .*etc.*passwd' escapes the manifest folder"):
        read_manifest(m)


def test_an_empty_label_says_so(tmp_path):
    m = tmp_path / "manifest.csv"
    frame(["a.jpg", "b.jpg"], ["nv", ""]).to_csv(m, index=False)
    with pytest.raises(DataError, match=r"^empty label at .*manifest.csv, row 3"):
        read_manifest(m)
