"""Pack HAM10000 into a compact archive for a GPU run: the release layout, images re-encoded small.

    python bench/pack_ham10000.py data/ham10000-small data/ham10000-compact.tar.gz     # ~35 MB

Keeps the official layout (``HAM10000_metadata.csv`` + ``HAM10000_images_part_{1,2}/ISIC_*.jpg``) so
``dermsynth data prepare --source ham10000`` reads the unpacked folder unchanged; masks are left out. Each image is
resized so its short side is ``--short-side`` px (128: the classifier's working size, so the centre crop it takes
loses nothing it would keep) and saved as JPEG at ``--quality``. The archive is gzip-compressed tar (what that saves is the 10,015 tar headers,
not the JPEGs) and is written to a temporary name, then renamed. HAM10000 is CC BY-NC-SA 4.0: keep the archive out of git.
"""
from __future__ import annotations

import argparse
import io
import os
import tarfile
import time
from pathlib import Path

from PIL import Image
from tqdm import tqdm


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0  # fixed mtime: the same input packs to the same bytes
    tar.addfile(info, io.BytesIO(data))


def pack(root: Path, out: Path, short_side: int, quality: int) -> Path:
    meta = root / "HAM10000_metadata.csv"
    if not meta.is_file():
        raise SystemExit(f"{meta} not found: {root} is not a HAM10000 folder")
    images = sorted(root.glob("HAM10000_images_part_*/*.jpg"))
    if not images:
        raise SystemExit(f"{root}: no HAM10000_images_part_*/*.jpg")
    top = out.name.removesuffix(".gz").removesuffix(".tar")
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
        _add(tar, f"{top}/HAM10000_metadata.csv", meta.read_bytes())
        for p in tqdm(images, desc="pack", unit="img"):
            with Image.open(p) as im:
                im = im.convert("RGB")
                scale = short_side / min(im.size)
                if scale < 1:
                    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=quality)
            _add(tar, f"{top}/{p.parent.name}/{p.name}", buf.getvalue())
    os.replace(tmp, out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="HAM10000 folder in the release layout")
    p.add_argument("out", type=Path, help="archive to write (.tar.gz); it unpacks to a folder of the same name")
    p.add_argument("--short-side", type=int, default=128)
    p.add_argument("--quality", type=int, default=80)
    a = p.parse_args()
    t0 = time.time()
    out = pack(a.root, a.out, a.short_side, a.quality)
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
