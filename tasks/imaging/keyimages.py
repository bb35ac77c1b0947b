"""Key-image rules: which frames of a multi-frame object (or slices of a series) a model sees,
and the montage grid that puts several of them into one image."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tasks.core.errors import ConfigError, UnsupportedImage

__all__ = ["KeyRule", "montage", "parse_rule", "pick"]

_RULE = re.compile(r"^(?:(middle)|spaced:(\d{1,2})|montage:(\d)x(\d))$")


@dataclass(frozen=True)
class KeyRule:
    """``middle``: one image; ``spaced``: ``count`` images; ``montage``: one grid image."""

    kind: str  # middle | spaced | montage
    count: int = 1
    rows: int = 1
    cols: int = 1

    def __str__(self) -> str:
        if self.kind == "montage":
            return f"montage:{self.rows}x{self.cols}"
        return f"spaced:{self.count}" if self.kind == "spaced" else "middle"


def parse_rule(text: str | KeyRule) -> KeyRule:
    """``middle`` | ``spaced:N`` | ``montage:RxC`` → a KeyRule; anything else is a ConfigError."""
    if isinstance(text, KeyRule):
        return text
    m = _RULE.match(str(text).strip().lower())
    if not m or (m.group(2) and int(m.group(2)) < 1) or (m.group(3) and "0" in m.groups()[2:]):
        raise ConfigError(
            f'key image rule "{text}" is not one of middle, spaced:N, montage:RxC',
            hint="e.g. preprocess.key_images: spaced:3 or montage:3x3",
        )
    if m.group(1):
        return KeyRule("middle")
    if m.group(2):
        return KeyRule("spaced", count=int(m.group(2)))
    rows, cols = int(m.group(3)), int(m.group(4))
    return KeyRule("montage", count=rows * cols, rows=rows, cols=cols)


def pick(n: int, rule: KeyRule) -> list[int]:
    """Indices of the frames (or slices) to show out of ``n``, in order.

    ``middle`` is ``n // 2``; N evenly spaced are the centres of N equal bins, so the
    first and last slices (usually outside the organ) are avoided; with N ≥ n, all of them.
    """
    if n < 1:
        raise UnsupportedImage("the object has no frames")
    if rule.kind == "middle" or n == 1:
        return [n // 2]
    if rule.count >= n:
        return list(range(n))
    return [int((i + 0.5) * n / rule.count) for i in range(rule.count)]


def _fit(tile: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A tile of another size (slices of a series may differ) resized to the first one's."""
    size = (shape[1], shape[0])
    return np.asarray(Image.fromarray(tile).resize(size, Image.Resampling.LANCZOS))


def montage(tiles: list[np.ndarray], rows: int, cols: int, gap: int = 2) -> np.ndarray:
    """Put up to rows×cols 8-bit tiles in a grid, row by row, ``gap`` px apart on black;
    tiles take the first one's size, and the grid shrinks when there are fewer tiles."""
    if not tiles:
        raise UnsupportedImage("a montage needs at least one tile")
    if any(t.ndim == 3 for t in tiles):  # one colour tile makes the grid RGB
        tiles = [t if t.ndim == 3 else np.repeat(t[..., None], 3, axis=2) for t in tiles]
    shape = tiles[0].shape
    tiles = [t if t.shape == shape else _fit(t, shape) for t in tiles]
    if len(tiles) < rows * cols:
        cols = min(cols, len(tiles))
        rows = -(-len(tiles) // cols)
    h, w = shape[:2]
    out = np.zeros((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, *shape[2:]), np.uint8)
    for k, tile in enumerate(tiles[: rows * cols]):
        r, c = divmod(k, cols)
        out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tile
    return out
