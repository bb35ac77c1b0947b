"""Provider-aware sizes and token estimates against the providers' published examples."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tasks.imaging.sizing import (
    anthropic_image_tokens,
    encode_png,
    estimate_input_tokens,
    fit_size,
    openai_image_tokens,
    png_size,
    provider_size,
    text_tokens,
)


@pytest.mark.parametrize(
    "size,tokens",
    [
        ((1024, 1024), 765),  # OpenAI docs: 768² → 4 tiles → 85 + 170·4
        ((2048, 4096), 1105),  # OpenAI docs: → 1024×2048 → 768×1536 → 6 tiles
        ((512, 512), 255),
    ],
)
def test_openai_formula_matches_the_published_examples(size, tokens):
    assert openai_image_tokens(*size) == tokens
    assert openai_image_tokens(*size, detail="low") == 85


@pytest.mark.parametrize(
    "size,tokens",
    [((200, 200), 54), ((1000, 1000), 1334)],  # Anthropic docs table (w·h/750)
)
def test_anthropic_formula_matches_the_published_table(size, tokens):
    assert anthropic_image_tokens(*size) == tokens


@pytest.mark.parametrize("w,h", [(1841, 1955), (4000, 300), (640, 480), (64, 64), (3000, 3000)])
def test_provider_sizes_are_within_limits_and_lose_no_more_than_needed(w, h):
    ow, oh = provider_size(w, h, "openai")
    assert max(ow, oh) <= 2048 and min(ow, oh) <= 768
    assert ow <= w and oh <= h and (min(ow, oh) >= 767 or (ow, oh) == (w, h) or max(ow, oh) >= 2047)
    aw, ah = provider_size(w, h, "anthropic")
    assert max(aw, ah) <= 1568 and aw * ah <= 1_150_000
    assert (aw, ah) == (w, h) or max(aw, ah) >= 1567 or aw * ah >= 1_140_000
    assert abs(aw / ah - w / h) < 0.02 * w / h + 1 / ah


def test_fit_size_never_upscales():
    assert fit_size(300, 200, 1024) == (300, 200)
    assert fit_size(2000, 1000, 1000) == (1000, 500)
    assert fit_size(2000, 1000, 0) == (2000, 1000)


def test_estimate_reads_the_png_size_and_counts_text():
    png = encode_png(Image.fromarray(np.zeros((480, 640), np.uint8)))
    assert png_size(png) == (640, 480) == Image.open(io.BytesIO(png)).size
    text = "Clinical context: modality=CT. 2 image(s)."
    assert estimate_input_tokens("anthropic", [png, png], text) == 2 * 410 + text_tokens(text)
    assert estimate_input_tokens("openai", [png], text) == 85 + 170 * 2 + text_tokens(
        text, "openai"
    )
    assert 5 < text_tokens(text, "openai") < len(text)
    with pytest.raises(ValueError, match="not a PNG"):
        png_size(b"GIF89a" + bytes(30))
