"""The system prompts of the model calls, one Markdown file per kind, version and language
(``<kind>.v1.<language>.md``), and the one loader that reads them and names their version."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from importlib import resources

from tasks.core.config import Language

__all__ = ["PROMPT_FILE_VERSION", "Prompt", "PromptKind", "load_prompt"]

logger = logging.getLogger(__name__)

PROMPT_FILE_VERSION = "v1"


class PromptKind(StrEnum):
    """What a prompt asks for: a structured reading of the images, or the narrative impression."""

    READING = "reading"
    IMPRESSION = "impression"

    @property
    def label(self) -> str:
        """How its prompts' versions start: part of the reading cache key and of every
        report's provenance, so it stays as first published (a change re-asks the cache)."""
        if self is PromptKind.READING:
            return PROMPT_FILE_VERSION
        return f"{self.value}-{PROMPT_FILE_VERSION}"


@dataclass(frozen=True)
class Prompt:
    text: str
    language: Language
    version: str  # "<label>-<sha256 prefix>": changes whenever the prompt text does


@cache
def load_prompt(language: Language | str, kind: PromptKind | str = PromptKind.READING) -> Prompt:
    """The ``kind`` system prompt in ``language``; its version is ``v1-<sha256 prefix>`` for
    the reading, ``impression-v1-<sha256 prefix>`` for the impression."""
    language, kind = Language(language), PromptKind(kind)
    name = f"{kind.value}.{PROMPT_FILE_VERSION}.{language.value}.md"
    text = resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    logger.debug("loaded prompt %s", name)
    return Prompt(text, language, f"{kind.label}-{digest}")
