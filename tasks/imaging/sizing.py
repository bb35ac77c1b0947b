"""Provider-aware image sizing and token estimates, from the providers' published rules."""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Iterable
from functools import cache
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from tasks.core.config import Provider

if TYPE_CHECKING:
    import bpe_openai

__all__ = [
    "ANTHROPIC_MAX_BYTES",
    "anthropic_image_tokens",
    "encode_png",
    "estimate_input_tokens",
    "fit_size",
    "image_tokens",
    "openai_image_tokens",
    "png_size",
    "provider_size",
    "resize_to",
    "text_tokens",
]

# Anthropic vision docs: images over 1568 px on the long edge or ~1.15 megapixels are scaled
# down server side; 5 MB per image at most.
ANTHROPIC_MAX_EDGE = 1568
ANTHROPIC_MAX_PIXELS = 1_150_000
ANTHROPIC_MAX_BYTES = 5 * 1024 * 1024
# OpenAI vision docs, detail "high": fit 2048 × 2048, then scale the short side to 768.
OPENAI_MAX_EDGE = 2048
OPENAI_MAX_SHORT = 768


def fit_size(width: int, height: int, max_edge: int) -> tuple[int, int]:
    """(w, h) with the long edge fitted into ``max_edge`` (0 = keep); never upscales."""
    if not max_edge or max(width, height) <= max_edge:
        return width, height
    scale = max_edge / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def provider_size(width: int, height: int, provider: Provider | str) -> tuple[int, int]:
    """The largest (w, h) of the same aspect that ``provider`` accepts without rescaling."""
    provider = Provider(provider)
    if provider is Provider.ANTHROPIC:
        scale = min(
            1.0,
            ANTHROPIC_MAX_EDGE / max(width, height),
            math.sqrt(ANTHROPIC_MAX_PIXELS / (width * height)),
        )
    else:
        scale = min(1.0, OPENAI_MAX_EDGE / max(width, height))
        scale *= min(1.0, OPENAI_MAX_SHORT / (min(width, height) * scale))
    w, h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    return w, h


def openai_image_tokens(width: int, height: int, detail: str = "high") -> int:
    """OpenAI: 85 + 170 per 512-px tile after fitting 2048² and scaling the short side to
    768 (detail "low": 85)."""
    if detail == "low":
        return 85
    scale = min(1.0, OPENAI_MAX_EDGE / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, OPENAI_MAX_SHORT / min(w, h))
    w, h = w * scale, h * scale
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


def anthropic_image_tokens(width: int, height: int) -> int:
    """Anthropic: about w·h/750 tokens, after its own resize to ≤ 1568 px and ≤ 1.15 MP."""
    scale = min(
        1.0,
        ANTHROPIC_MAX_EDGE / max(width, height),
        math.sqrt(ANTHROPIC_MAX_PIXELS / (width * height)),
    )
    return math.ceil(width * scale * height * scale / 750)


def image_tokens(provider: Provider | str, sizes: Iterable[tuple[int, int]]) -> int:
    """Estimated input tokens of images of ``sizes`` sent to ``provider``."""
    provider = Provider(provider)
    formula = openai_image_tokens if provider is Provider.OPENAI else anthropic_image_tokens
    return sum(formula(w, h) for w, h in sizes)


@cache
def _o200k() -> bpe_openai.Encoding:
    # imported here: bpe_openai loads every encoding it has (~0.5 s) as it is imported, and
    # the preprocessing that imports this module (pool workers included) counts no text
    import bpe_openai

    return bpe_openai.get_encoding("o200k_base")


def text_tokens(text: str, provider: Provider | str | None = None) -> int:
    """Text tokens: exact o200k_base for OpenAI (the gpt-4o family's tokenizer, offline);
    otherwise one token per 4 UTF-8 bytes, the usual rule of thumb (Anthropic publishes no
    tokenizer). Message framing adds a few tokens that are not counted."""
    if provider is not None and Provider(provider) is Provider.OPENAI:
        return len(_o200k().encode(text))
    return math.ceil(len(text.encode("utf-8")) / 4)


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, without decoding it."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG image")
    return struct.unpack(">II", png[16:24])


def estimate_input_tokens(provider: Provider | str, pngs: Iterable[bytes], text: str) -> int:
    """Input tokens of one request: its images by the provider's formula, plus its text."""
    return image_tokens(provider, (png_size(p) for p in pngs)) + text_tokens(text, provider)


def resize_to(pixels: np.ndarray | Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to ``size`` with Lanczos; a box reduce first when shrinking by 2× or more
    (PIL ``reducing_gap``), which is faster and indistinguishable at the output size."""
    img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    if img.size == size:
        return img
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode_png(img: Image.Image, compress_level: int = 1) -> bytes:
    """PNG bytes; level 1 is the fast end of zlib (a few % larger than level 6)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()
