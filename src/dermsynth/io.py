"""Atomic file writes and safe image reading.

Every artifact dermsynth writes goes through a temp file in the same folder followed by ``os.replace``, so a crash
leaves either the old file or the new one, never half of one. Image reading turns every way a file can be bad into
one :class:`DataError` that names the file (and the manifest row when the caller knows it).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np
from PIL import Image, ImageFile, PngImagePlugin

# Images larger than this many pixels are refused (a 600x450 dermoscopy image is 0.27 MP; full ISIC ones ~30 MP).
MAX_IMAGE_PIXELS = 100_000_000


class DataError(ValueError):
    """Bad input data: the message names the file (and row) and says what is wrong."""


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temp file beside ``path``; on clean exit fsync and rename it over ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with open(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _create_temp(path: Path) -> tuple[int, str]:
    """A new empty file beside ``path``, opened for writing: (descriptor, name).

    Created with mode 0o666 so that the process umask applies as for a plain open(): mkstemp's 0600 would need a
    chmod from the umask, and reading the umask means setting it, which races with other threads' file creation.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):  # a name clash needs another writer of the same file at the same moment: rare
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def read_json(path: str | Path, what: str, missing: str = "", hint: str = "") -> Any:
    """A JSON file's content; a DataError naming the file when it is absent (``missing``: what to say then) or not
    valid JSON (``what`` the file holds, ``hint`` what to do about it)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(missing or f"{path}: no {what} here")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: corrupt {what}: {e}" + (f"; {hint}" if hint else "")) from e


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def atomic_write_csv(path: str | Path, df: "Any") -> Path:
    """Write a pandas DataFrame as CSV atomically (no index)."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        df.to_csv(f, index=False)
    return Path(path)


def atomic_save_npy(path: str | Path, array: np.ndarray) -> Path:
    with atomic_open(path, "wb") as f:
        np.save(f, array)
    return Path(path)


def atomic_save_image(path: str | Path, image: Image.Image | np.ndarray, text: dict[str, str] | None = None) -> Path:
    """Save a PNG/JPEG atomically; ``text`` becomes PNG tEXt chunks (e.g. provenance of synthetic images)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    path = Path(path)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    kwargs: dict[str, Any] = {}
    if fmt == "PNG" and text:
        info = PngImagePlugin.PngInfo()
        for k, v in text.items():
            info.add_text(k, str(v))
        kwargs["pnginfo"] = info
    if fmt == "JPEG":
        kwargs["quality"] = 95
    with atomic_open(path, "wb") as f:
        image.save(f, format=fmt, **kwargs)
    return path


class _EofWatch(io.BufferedReader):
    """A file that remembers whether a read came back empty: the reader wanted more than the file holds."""

    hit_eof = False

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if not data and size != 0:
            self.hit_eof = True
        return data


def load_image(path: str | Path, where: str = "") -> Image.Image:
    """Open an image fully and return it as 8-bit RGB.

    Grayscale, palette, RGBA (composited on white) and 16-bit images are converted; truncated, corrupt, missing and
    oversized (decompression-bomb) files raise :class:`DataError` naming ``path`` and ``where`` (e.g. a CSV row).
    """
    path = Path(path)
    loc = f" ({where})" if where else ""
    if not path.is_file():
        raise DataError(f"image file not found: {path}{loc}")
    try:
        with _EofWatch(io.FileIO(path, "rb")) as f, Image.open(f) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise DataError(
                    f"image too large: {path}{loc} is {w}x{h} = {w * h / 1e6:.0f} MP "
                    f"(limit {MAX_IMAGE_PIXELS / 1e6:.0f} MP; possible decompression bomb)"
                )
            im.load()
            # Truncated files must fail loudly, not be padded with grey. PIL refuses them itself unless the program
            # set ImageFile.LOAD_TRUNCATED_IMAGES; that process-wide setting is the program's (setting it here would
            # race with its other threads), so then the decoder's read past the end of the file tells instead.
            if f.hit_eof and ImageFile.LOAD_TRUNCATED_IMAGES:
                raise DataError(f"corrupt or truncated image: {path}{loc}: the file ends before the image does")
            return _to_rgb(im, path, loc)
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise DataError(f"image too large: {path}{loc}: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"corrupt or truncated image: {path}{loc}: {e}") from e


def _to_rgb(im: Image.Image, path: Path, loc: str) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: map the 16-bit range to 8 bits rather than clipping at 255. "I;16*" is known to be 16-bit (a
        # dark image stays dark); a 32-bit "I" image gives no bit depth, so its values decide.
        a = np.asarray(im, dtype=np.float64)
        hi = max(a.max(), 1.0)
        scale = 65535.0 if mode.startswith("I;16") or hi > 255 else 255.0
        a8 = np.clip(a / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    if mode in ("L", "P", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return im.convert("RGB")
    if mode in ("F", "I;16S", "RGB;16", "RGBa"):
        raise DataError(f"unsupported image mode {mode!r}: {path}{loc}; convert it to 8-bit RGB first")
    return im.convert("RGB")


def image_array(path: str | Path, where: str = "") -> np.ndarray:
    """``load_image`` as an HxWx3 uint8 array."""
    return np.asarray(load_image(path, where), dtype=np.uint8)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
