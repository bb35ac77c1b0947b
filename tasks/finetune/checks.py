"""Checks of a chat fine-tuning dataset before it is written or uploaded: the format and token
checks of OpenAI's cookbook notebook "Data preparation and analysis for chat model fine-tuning",
extended to image parts, plus its token count and training-cost estimate."""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from tasks.core.config import Provider
from tasks.imaging.sizing import openai_image_tokens, text_tokens

__all__ = [
    "MAX_IMAGE_BYTES",
    "MAX_IMAGES_PER_EXAMPLE",
    "CostEstimate",
    "FormatReport",
    "check_example",
    "check_examples",
    "estimate_cost",
]

# OpenAI vision fine-tuning limits (fine-tuning guide, "Vision fine-tuning"):
MAX_IMAGES_PER_EXAMPLE = 10
MAX_IMAGE_BYTES = 10 * 1024 * 1024
IMAGE_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG"}
IMAGE_MODES = ("RGB", "RGBA")

# The cookbook's keys and roles (function calls are not used by radflow but are valid).
MESSAGE_KEYS = {"role", "content", "name", "function_call", "weight", "tool_calls", "refusal"}
ROLES = {"system", "developer", "user", "assistant", "function", "tool"}

# The cookbook's epoch heuristic and billing rule.
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES, MAX_TARGET_EXAMPLES = 100, 25_000
MIN_DEFAULT_EPOCHS, MAX_DEFAULT_EPOCHS = 1, 25


def _image(part: Mapping) -> tuple[Image.Image | None, int, str | None]:
    """(image, byte size, error) of one image_url part."""
    image_url = part.get("image_url")
    if not isinstance(image_url, Mapping) or not isinstance(image_url.get("url"), str):
        return None, 0, "image_part_missing_url"
    url = image_url["url"]
    head, sep, data = url.partition(",")
    media = head.removeprefix("data:").removesuffix(";base64")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        return None, 0, "image_not_data_url"
    if media not in IMAGE_FORMATS:
        return None, 0, "image_unsupported_media_type"
    if image_url.get("detail", "auto") not in ("auto", "low", "high"):
        return None, 0, "image_unrecognized_detail"
    try:
        raw = base64.b64decode(data, validate=True)
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (binascii.Error, UnidentifiedImageError, OSError):
        return None, 0, "image_undecodable"
    if img.format != IMAGE_FORMATS[media]:
        return None, len(raw), "image_format_mismatch"
    if img.mode not in IMAGE_MODES:
        return None, len(raw), "image_not_rgb"
    if len(raw) > MAX_IMAGE_BYTES:
        return None, len(raw), "image_too_large"
    return img, len(raw), None


def check_example(example: object) -> tuple[list[str], int, int]:
    """The cookbook's format errors of one example (extended to image parts), its prompt
    token count (cookbook rule: 3 per message, 1 per name, 3 for the reply; images by the
    published formula) and its assistant token count. Tokens are o200k_base (gpt-4o family)."""
    errors: list[str] = []
    if not isinstance(example, Mapping):
        return ["data_type"], 0, 0
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        return ["missing_messages_list"], 0, 0
    tokens, assistant_tokens, images = 3, 0, 0
    for message in messages:
        if not isinstance(message, Mapping):
            errors.append("data_type")
            continue
        if "role" not in message or "content" not in message:
            errors.append("message_missing_key")
        if any(k not in MESSAGE_KEYS for k in message):
            errors.append("message_unrecognized_key")
        role = message.get("role")
        if role not in ROLES:
            errors.append("unrecognized_role")
        tokens += 3 + (_tokens(role) if isinstance(role, str) else 0)
        if isinstance(message.get("name"), str):
            tokens += 1 + _tokens(message["name"])
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list) or not parts:
            if not message.get("function_call") and not message.get("tool_calls"):
                errors.append("missing_content")
            continue
        for part in parts:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text" and isinstance(part.get("text"), str):
                n = _tokens(part["text"])
                tokens += n
                assistant_tokens += n if role == "assistant" else 0
                if not part["text"].strip():
                    errors.append("missing_content")
            elif kind == "image_url":
                images += 1
                if role != "user":
                    errors.append("image_outside_user_message")
                img, _, error = _image(part)
                if error:
                    errors.append(error)
                else:
                    detail = part["image_url"].get("detail", "auto")
                    tokens += openai_image_tokens(img.width, img.height, detail)
            else:
                errors.append("unrecognized_content_part")
    if images > MAX_IMAGES_PER_EXAMPLE:
        errors.append("too_many_images")
    if not any(isinstance(m, Mapping) and m.get("role") == "assistant" for m in messages):
        errors.append("example_missing_assistant_message")
    return errors, tokens, assistant_tokens


@dataclass
class FormatReport:
    """Outcome of the checks over one file: counts per error kind and token statistics."""

    examples: int = 0
    errors: Counter = field(default_factory=Counter)
    bad_examples: list[int] = field(default_factory=list)  # 0-based indices with an error
    tokens: list[int] = field(default_factory=list)
    assistant_tokens: list[int] = field(default_factory=list)
    token_limit: int = 65_536
    over_limit: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors and not self.over_limit

    def summary(self) -> dict:
        tokens = sorted(self.tokens) or [0]
        return {
            "examples": self.examples,
            "format_errors": dict(sorted(self.errors.items())),
            "encoding": "o200k_base",
            "token_limit": self.token_limit,
            "over_limit": self.over_limit,
            "tokens_total": sum(self.tokens),
            "tokens_min": tokens[0],
            "tokens_max": tokens[-1],
            "tokens_median": tokens[len(tokens) // 2],
            "assistant_tokens_total": sum(self.assistant_tokens),
        }


def check_examples(examples: Iterable[object], token_limit: int = 65_536) -> FormatReport:
    """Run :func:`check_example` over a dataset; examples over ``token_limit`` are counted
    (the cookbook's "n_too_long": they would be truncated in training)."""
    report = FormatReport(token_limit=token_limit)
    for index, example in enumerate(examples):
        errors, tokens, assistant = check_example(example)
        report.examples += 1
        report.errors.update(errors)
        if errors:
            report.bad_examples.append(index)
        report.tokens.append(tokens)
        report.assistant_tokens.append(assistant)
        report.over_limit += tokens > token_limit
    return report


def _tokens(text: str) -> int:
    """Exact o200k_base count (the gpt-4o family's tokenizer), from ``tasks.imaging.sizing``."""
    return text_tokens(text, Provider.OPENAI)


@dataclass(frozen=True)
class CostEstimate:
    epochs: int
    billing_tokens_per_epoch: int
    training_tokens: int
    price_per_mtok: float
    cost_usd: float


def estimate_cost(
    tokens: list[int], token_limit: int, price_per_mtok: float, epochs: int | None = None
) -> CostEstimate:
    """The cookbook's estimate: epochs from the dataset size unless given (3, raised for
    fewer than 100 examples and lowered past 25 000, within 1..25), each example billed up to
    ``token_limit`` tokens, times the price per million training tokens."""
    n = len(tokens)
    if epochs is None:
        epochs = TARGET_EPOCHS
        if n and n * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
            epochs = min(MAX_DEFAULT_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / n))
        elif n * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
            epochs = max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n)
    billing = sum(min(token_limit, t) for t in tokens)
    training = epochs * billing
    return CostEstimate(
        epochs, billing, training, price_per_mtok, round(training * price_per_mtok / 1e6, 4)
    )
