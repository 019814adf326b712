"""Export a (filtered) synthetic samples folder as a Hugging Face ``imagefolder`` dataset with a dataset card.

Layout written under ``out``::

    README.md               dataset card: what made the images, from which split, licence, intended use
    train/metadata.jsonl    one JSON object per image: file_name, label, and the provenance columns of the manifest
    train/<image_id>.png    the images, byte-for-byte (their PNG text chunks keep the AI-generated marking)

``datasets.load_dataset("imagefolder", data_dir=out)`` reads it. The licence is inherited from the images the
generator learnt from: a synthetic image of a CC BY-NC-SA training set is not free of that licence.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from dermsynth import __version__
from dermsynth.data.labels import CLASS_NAMES, CLASSES
from dermsynth.data.manifest import read_manifest
from dermsynth.io import DataError, atomic_write_bytes, atomic_write_text

# Licence of the images a generator may have learnt from, by manifest ``source`` (HF licence id, human text).
LICENCES: dict[str, tuple[str, str]] = {
    "ham10000": ("cc-by-nc-sa-4.0", "CC BY-NC-SA 4.0, inherited from HAM10000 (Tschandl et al., Sci Data 2018)"),
    "isic2018": ("cc-by-nc-4.0", "CC BY-NC 4.0, inherited from the ISIC 2018 challenge data"),
    "isic2019": ("cc-by-nc-4.0", "CC BY-NC 4.0, inherited from the ISIC 2019 challenge data"),
    "toy": ("apache-2.0", "Apache-2.0: the training images are dermsynth's procedural toy set (no real patients)"),
}
NOTICE = "AI-generated, research use only, not for diagnosis."
# Manifest columns that are local details rather than provenance
_DROP = {"path", "group_id"}


def _generator_info(df: pd.DataFrame, samples: Path) -> tuple[Path | None, dict[str, Any]]:
    """Find the generator run (its generator.json) from the manifest's ``generator`` column or the folder tree."""
    candidates: list[Path] = []
    if "generator" in df.columns:
        candidates += [Path(str(g)) for g in df["generator"].dropna().unique()]
    candidates += [samples, *samples.parents]
    candidates += [Path(p).parent for p in df["path"].head(1)] + list(Path(df["path"].iloc[0]).parents)
    for c in candidates:
        if (c / "generator.json").is_file():
            return c, json.loads((c / "generator.json").read_text())
    return None, {}


def _training_sources(gen: dict[str, Any]) -> list[str]:
    """The ``source`` values of the generator's training manifest (via the split it records), if readable."""
    split = gen.get("split")
    if not split:
        return []
    try:
        from dermsynth.data.split import load_split

        return sorted(load_split(split).part("train")["source"].astype(str).unique())
    except (DataError, KeyError, OSError):
        return []


def _licence(sources: list[str]) -> tuple[str, str]:
    if len(sources) == 1 and sources[0] in LICENCES:
        return LICENCES[sources[0]]
    if not sources:
        return "other", ("unknown: the generator's training data could not be traced; the licence of that data "
                         "applies to these images, check it before sharing")
    return "other", ("inherited from the training data (sources: " + ", ".join(sources) + "); the most restrictive "
                     "of their licences applies")


def _scalar(v: Any) -> Any:
    """JSON-friendly cell: NaN -> None, numpy scalars -> Python."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _card(df: pd.DataFrame, gen_run: Path | None, gen: dict[str, Any], licence: tuple[str, str],
          samples: Path, out: Path) -> str:
    counts = df["label"].value_counts()
    lines = ["---", f"license: {licence[0]}", "task_categories:", "- image-classification", "tags:", "- synthetic",
             "- ai-generated", "- dermoscopy", "- not-for-diagnosis",
             f"size_categories: {'n<1K' if len(df) < 1000 else '1K<n<10K' if len(df) < 10000 else '10K<n<100K'}",
             "---", "", "# Synthetic dermoscopy images (dermsynth)", "", f"**{NOTICE}**", "",
             "Class-conditional diffusion samples of skin-lesion classes, made to study class imbalance in "
             "skin-lesion classification. They are not real patients, not medical images of anyone, and must not be "
             "used to diagnose, to train a clinical system without independent validation, or as evidence of any "
             "lesion's appearance.", "", "## Contents", "", "| class | name | images |", "|---|---|---|"]
    lines += [f"| {c} | {CLASS_NAMES.get(c, c)} | {int(counts[c])} |" for c in CLASSES if c in counts]
    lines += ["", "`train/metadata.jsonl` holds one row per image: `file_name`, `label` and the provenance columns "
              f"({', '.join(c for c in df.columns if c not in _DROP and c not in ('image_id', 'label'))}). Each PNG also "
              "carries text metadata marking it AI-generated.", "", "## Provenance", ""]
    prov = {
        "generator run": str(gen_run) if gen_run else "unknown",
        "generator kind": gen.get("kind", "unknown"),
        "training split": gen.get("split", "unknown"),
        "training split fingerprint (SHA-256 of the parts)": gen.get("split_fingerprint", "unknown"),
        "image size": gen.get("image_size", "unknown"),
        "checkpoint hash(es)": ", ".join(sorted(map(str, df["checkpoint_hash"].dropna().unique())))
        if "checkpoint_hash" in df else "unknown",
        "sampler / steps / guidance": " / ".join(
            ", ".join(sorted(map(str, df[c].dropna().unique()))) if c in df else "?" for c in ("sampler", "steps",
                                                                                             "guidance")),
        "exported from": str(samples),
        "exported by": f"dermsynth {__version__}",
    }
    lines += [f"- {k}: {v}" for k, v in prov.items()]
    filt = samples / "filter.json"
    if filt.is_file():
        info = json.loads(filt.read_text())
        lines += ["", "## Filtering", "", "These images passed dermsynth's filter; the checks applied were:", ""]
        lines += [f"- {k}: {v}" for k, v in (info.get("checks") or {}).items()]
        lines += ["", "| class | generated | kept | rejected (reasons) |", "|---|---|---|---|"]
        for c, v in (info.get("per_class") or {}).items():
            why = ", ".join(f"{r.replace('_', ' ')} {n}" for r, n in (v.get("by_reason") or {}).items() if n)
            lines.append(f"| {c} | {v.get('in')} | {v.get('kept')} | {v.get('rejected')} ({why or 'none'}) |")
    lines += ["", "## Licence", "", licence[1] + ".", "",
              "Only the generator's TRAIN part was used to train it; the split fingerprint above lets anyone check "
              "that evaluation images of that split were never seen by the generator.", "",
              "## Load", "", "```python", "from datasets import load_dataset",
              f"ds = load_dataset(\"imagefolder\", data_dir=\"{out.name}\")  # this folder", "```", ""]
    return "\n".join(lines)


def export_imagefolder(samples: str | Path, out: str | Path) -> Path:
    """Copy the images of ``samples/manifest.csv`` into a Hugging Face imagefolder at ``out``; returns ``out``.

    The export is built in ``.<out name>.partial`` beside ``out`` and renamed to ``out`` once complete: an interrupted
    export leaves ``out`` as it was (absent, or the earlier export); a rerun writes the partial folder again. A folder
    that holds anything besides an earlier export's README.md and train/ is refused, since it would be replaced.
    """
    samples, out = Path(samples), Path(out)
    manifest = samples / "manifest.csv"
    df = read_manifest(manifest, check_files=True)
    real = df[df["source"] != "synthetic"]
    if len(real):
        raise DataError(f"{manifest}: {len(real)} row(s) are not synthetic (e.g. {real['image_id'].iloc[0]}, source "
                        f"{real['source'].iloc[0]!r}); export only synthetic samples, never real patient images")
    if out.exists() and any(out.iterdir()):
        # a re-export replaces the whole folder: anything but an earlier export's own files (a .git of a dataset
        # repo, a licence file added by hand) would be lost
        extra = sorted(p.name for p in out.iterdir() if p.name not in ("README.md", "train"))
        if extra or not (out / "train" / "metadata.jsonl").is_file():
            raise DataError(f"{out}: exists and is not an earlier export (or holds more: {extra[:3]}); a re-export "
                            f"replaces the whole folder, so choose an empty or new one")
    gen_run, gen = _generator_info(df, samples)
    licence = _licence(_training_sources(gen))

    part = out.parent / f".{out.name}.partial"
    rows = []
    for r in df.itertuples(index=False):
        src = Path(r.path)
        name = f"{r.image_id}{src.suffix.lower() or '.png'}"
        atomic_write_bytes(part / "train" / name, src.read_bytes())  # bytes as they are: keep the PNG text chunks
        meta = {"file_name": name, "label": r.label}
        meta.update({k: _scalar(v) for k, v in r._asdict().items() if k not in _DROP and k not in meta})
        meta["ai_generated"] = True
        rows.append(meta)
    atomic_write_text(part / "train" / "metadata.jsonl", "".join(json.dumps(m) + "\n" for m in rows))
    atomic_write_text(part / "README.md", _card(df, gen_run, gen, licence, samples, out))
    # an interrupted earlier try of another set must not leave its images behind
    keep = {m["file_name"] for m in rows} | {"metadata.jsonl"}
    for f in (part / "train").iterdir():
        if f.is_file() and f.name not in keep:
            f.unlink()
    _replace_dir(part, out)
    return out


def _replace_dir(new: Path, out: Path) -> None:
    """Rename the finished folder ``new`` to ``out``; an earlier export (or empty folder) at ``out`` is moved aside
    first and deleted after, so ``out`` is at every moment absent, the old export or the new one."""
    old = out.parent / f".{out.name}.old"
    if old.exists():
        shutil.rmtree(old)  # left by an interrupted replacement: the export it held is being replaced now
    if out.exists():
        out.rename(old)
    new.rename(out)
    if old.exists():
        shutil.rmtree(old)


__all__ = ["export_imagefolder", "LICENCES", "NOTICE"]
