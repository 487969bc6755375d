"""Write a corpus of odd and hostile image files into a folder (nothing downloaded).

    python scripts/make_odd_images.py OUT_DIR

Each entry of ODD_FILES names a file, how it is made, and what cnnkit should do with it:
"load" (decoded, used), or "skip" (named in one warning by the image-folder loader, one
error line from `cnnkit predict`). The tests run every file through both.
"""
from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.full((h, w, 1), 128, np.float32)], 2)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def _png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def _bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header claims width×height pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(b"\x00" * (width + 1) * 16)  # a few rows; the rest is implied
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows)
            + chunk(b"IEND", b""))


def _exif_rotated_jpeg() -> bytes:
    """A 40×20 (wide) JPEG whose EXIF says: rotate 90°, so it is shown 20×40 (tall)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    buf = io.BytesIO()
    _gradient(40, 20).save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _palette_with_transparency() -> bytes:
    im = Image.new("P", (16, 16), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.paste(1, (0, 0, 8, 16))
    return _png_bytes(im, transparency=0)


def _sixteen_bit() -> bytes:
    arr = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    return _png_bytes(Image.fromarray(arr))  # uint16 -> mode I;16


def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(buf, "JPEG")  # red in CMYK
    return buf.getvalue()


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _half(data: bytes) -> bytes:
    return data[:len(data) // 2]


# name -> (bytes factory, expected: "load" or "skip")
ODD_FILES = {
    "bomb.png": (_bomb_png, "skip"),
    "zero-bytes.png": (lambda: b"", "skip"),
    "truncated.png": (lambda: _half(_png_bytes(_gradient(64, 64))), "skip"),
    "truncated.jpg": (lambda: _half(_jpeg(_gradient(64, 64))), "skip"),
    "text-named.jpg": (lambda: b"this is not an image\n", "skip"),
    "sixteen-bit.png": (_sixteen_bit, "load"),
    "cmyk.jpg": (_cmyk_jpeg, "load"),
    "palette-transparent.png": (_palette_with_transparency, "load"),
    "animated.gif": (_animated_gif, "load"),
    "one-pixel.png": (lambda: _png_bytes(Image.new("RGB", (1, 1), (9, 99, 199))), "load"),
    "large-4000x3000.jpg": (lambda: _jpeg(_gradient(4000, 3000)), "load"),
    "exif-rotated.jpg": (_exif_rotated_jpeg, "load"),
    "name with spaces.png": (lambda: _png_bytes(_gradient(20, 20)), "load"),
    "ñame-ünïcode-画像.png": (lambda: _png_bytes(_gradient(20, 20)), "load"),
}
# Made specially: a directory named like an image, a symlink to a good file, a dangling
# symlink, and a file without read permission (readable anyway when running as root).
SPECIAL = {"directory.png": "skip", "link-to-good.png": "load", "dangling-link.png": "skip",
           "no-permission.png": "load-as-root"}


def make_corpus(out: str | Path) -> dict[str, str]:
    """Write every odd file into `out`; return {file name: expected outcome}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, (make, outcome) in ODD_FILES.items():
        (out / name).write_bytes(make())
        expected[name] = outcome
    (out / "directory.png").mkdir(exist_ok=True)
    (out / "link-to-good.png").symlink_to("name with spaces.png")  # relative to its folder
    (out / "dangling-link.png").symlink_to("does-not-exist.png")
    no_perm = out / "no-permission.png"
    no_perm.write_bytes(_png_bytes(_gradient(20, 20)))
    no_perm.chmod(0)
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    expected.update({k: v if v != "load-as-root" else ("load" if root else "skip")
                     for k, v in SPECIAL.items()})
    return expected


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/make_odd_images.py OUT_DIR")
    for name, outcome in make_corpus(sys.argv[1]).items():
        print(f"{outcome:5}  {name}")
