"""The simulator's 'vision': a bright-blob detector plus seeded per-model error rates.

A TEST DOUBLE: it decides from the pixels it receives (a compact saturated region → lesion),
then flips the answer with each model's configured sensitivity/specificity, deterministically
for a given seed, model and image."""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = [
    "Profile",
    "Verdict",
    "anthropic_image_tokens",
    "detect_lesion",
    "judge",
    "openai_image_tokens",
]


@dataclass(frozen=True)
class Profile:
    sensitivity: float = 0.9
    specificity: float = 0.9


@dataclass(frozen=True)
class Verdict:
    lesion: bool  # what the detector saw
    extent: float  # share of the image covered by saturated blobs
    abnormal: bool  # what this simulated model answers
    urgency: str


def detect_lesion(png: bytes) -> tuple[bool, float]:
    """True when some 5×5 window of the image (shrunk to 128 px) is ≥ 90 % near-white."""
    img = Image.open(io.BytesIO(png)).convert("L")
    img.thumbnail((128, 128))
    mask = (np.asarray(img) >= 240).astype(np.float64)
    if mask.shape[0] < 5 or mask.shape[1] < 5:
        return False, 0.0
    integral = np.pad(mask, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    k = 5
    boxes = integral[k:, k:] - integral[:-k, k:] - integral[k:, :-k] + integral[:-k, :-k]
    return bool((boxes / (k * k) >= 0.9).any()), float(mask.mean())


def _uniform(*parts: object) -> float:
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def judge(pngs: list[bytes], model: str, profile: Profile, seed: int) -> Verdict:
    """Seeded, reproducible answer of one simulated model for one set of images."""
    seen = [detect_lesion(p) for p in pngs]
    lesion = any(s[0] for s in seen)
    extent = max((s[1] for s in seen), default=0.0)
    u = _uniform(seed, model, *(hashlib.sha256(p).hexdigest() for p in pngs))
    abnormal = u < profile.sensitivity if lesion else u >= profile.specificity
    urgency = "normal" if not abnormal else "immediate" if lesion and extent > 0.02 else "follow_up"
    return Verdict(lesion, extent, abnormal, urgency)


def openai_image_tokens(width: int, height: int, detail: str = "high") -> int:
    """OpenAI's published formula: 85 + 170 per 512-px tile after fitting 2048² and scaling
    the short side to 768 (low detail: 85)."""
    if detail == "low":
        return 85
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


def anthropic_image_tokens(width: int, height: int) -> int:
    """Anthropic's published estimate w·h/750 after its resize to ≤ 1568 px and ≤ 1.15 MP."""
    scale = min(1.0, 1568 / max(width, height), math.sqrt(1_150_000 / (width * height)))
    return math.ceil(width * scale * height * scale / 750)
