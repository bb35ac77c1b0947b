"""Preprocessing speed on the whole pydicom-data corpus: radflow vs the floor (decode one
frame + PNG of the final image) vs a naive float64 pipeline like the seed tutorial's."""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import data_store
import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut, pixel_array

from tasks.core.config import PreprocessConfig
from tasks.core.errors import RadflowError
from tasks.imaging.preprocess import load, prepare
from tasks.imaging.sizing import encode_png

__all__ = ["main", "naive", "ours"]

CORPUS = Path(data_store.__file__).parent / "data"


def ours(data: bytes, config: PreprocessConfig) -> bytes:
    return prepare(io.BytesIO(data), config).png


def floor(data: bytes, final: Image.Image) -> bytes:
    """What cannot be avoided: parse, decode the one frame shown, encode the final PNG."""
    ds = load(io.BytesIO(data))
    n = int(ds.get("NumberOfFrames", 1) or 1)
    pixel_array(ds, index=n // 2 if n > 1 else None)
    return encode_png(final)


def naive(data: bytes, max_edge: int) -> bytes:
    """The seed tutorial's way: every frame decoded, float64 modality LUT and window math per
    pixel, normalise, ``Image.fromarray``, Lanczos resize, PNG at the default level."""
    ds = load(io.BytesIO(data))  # pydicom.dcmread (+ files without a Part 10 header)
    arr = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[len(arr) // 2]
    if ds.PhotometricInterpretation in ("MONOCHROME1", "MONOCHROME2"):
        x = apply_modality_lut(arr, ds).astype(np.float64)
        if "WindowCenter" in ds:
            c, w = ds.WindowCenter, ds.WindowWidth
            c = float(c[0] if isinstance(c, pydicom.multival.MultiValue) else c)
            w = float(w[0] if isinstance(w, pydicom.multival.MultiValue) else w)
            x = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
        x = (x - x.min()) / max(x.max() - x.min(), 1e-9)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            x = 1.0 - x
        arr = (x * 255).astype(np.uint8)
    else:
        arr = arr.astype(np.float64)
        arr = (arr / max(arr.max(), 1) * 255).astype(np.uint8)
    img = Image.fromarray(arr)
    if max(img.size) > max_edge:
        scale = max_edge / max(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _time(fn: Callable[[], object], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        runs.append(time.process_time() - start)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3, help="runs per file (median kept)")
    parser.add_argument("--max-edge", type=int, default=1024, help="preprocess.max_edge")
    parser.add_argument("--verbose", action="store_true", help="one line per file")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    config = PreprocessConfig(max_edge=args.max_edge)
    files = sorted(CORPUS.glob("*.dcm"))
    totals = {"ours": 0.0, "floor": 0.0, "naive": 0.0}
    used, refused = 0, []
    for path in files:
        data = path.read_bytes()
        try:
            png = ours(data, config)
            naive(data, args.max_edge)
        except RadflowError as exc:
            refused.append(f"{path.name}: {exc.kind}")
            continue
        final = Image.open(io.BytesIO(png))
        final.load()
        t = {
            "ours": _time(lambda d=data: ours(d, config), args.repeat),
            "floor": _time(lambda d=data, f=final: floor(d, f), args.repeat),
            "naive": _time(lambda d=data: naive(d, args.max_edge), args.repeat),
        }
        for key, value in t.items():
            totals[key] += value
        used += 1
        if args.verbose:
            print(
                f"{path.name:45s} ours {t['ours'] * 1e3:8.1f} ms  floor {t['floor'] * 1e3:8.1f}"
                f" ms  naive {t['naive'] * 1e3:8.1f} ms  {final.size[0]}x{final.size[1]}"
            )
    ours_s, floor_s, naive_s = totals["ours"], totals["floor"], totals["naive"]
    print(f"pydicom-data corpus: {used} of {len(files)} files rendered, median of {args.repeat}")
    for name in refused:
        print(f"  refused (named, with a reason): {name}")
    print(f"ours   {ours_s:7.3f} s")
    print(f"floor  {floor_s:7.3f} s   (decode one frame + PNG of the final image)")
    print(f"naive  {naive_s:7.3f} s   (float64 pipeline of the seed tutorial)")
    print(f"ours / floor = {ours_s / floor_s:.2f}x   (target <= 1.30x)")
    print(f"naive / ours = {naive_s / ours_s:.2f}x   (target >= 1.50x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
