"""What a screening run would cost, before it spends anything (``radflow screen --estimate``):
discover and preprocess as the run does, build each model's reading request as the run would
send it (the images sized for its provider, the system prompt, the user text), count its image
tokens by the provider's published rule and its text tokens by radflow's tokenizer
(tasks/imaging/sizing.py), and price them. No model is called."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tasks.core.config import ModelConfig, Settings
from tasks.imaging.sizing import image_tokens, png_size, text_tokens
from tasks.imaging.studyimages import prepare_study
from tasks.ingest.context import deidentify
from tasks.ingest.discover import Study, discover_studies
from tasks.models.panel import load_prompt, user_text
from tasks.pacs.publish import publish_target
from tasks.screening.plan import to_read
from tasks.storage import open_store

__all__ = ["ModelEstimate", "RunEstimate", "estimate_run"]

logger = logging.getLogger(__name__)


@dataclass
class ModelEstimate:
    """One panel model's share of the run: its reading requests' tokens and their price."""

    name: str
    provider: str
    model_id: str
    max_output_tokens: int
    input_per_mtok: float
    output_per_mtok: float
    calls: int = 0
    images: int = 0
    image_tokens: int = 0
    text_tokens: int = 0

    @property
    def input_tokens(self) -> int:
        return self.image_tokens + self.text_tokens

    @property
    def input_cost_usd(self) -> float:
        return self.input_tokens * self.input_per_mtok / 1e6

    @property
    def max_cost_usd(self) -> float:
        """Input, plus every answer at its ``max_output_tokens`` budget: the most it can cost."""
        return (
            self.input_cost_usd + self.calls * self.max_output_tokens * self.output_per_mtok / 1e6
        )


@dataclass
class RunEstimate:
    studies: int  # found by discovery (after --limit)
    to_read: int  # not already reported (all with --force)
    unreadable: int  # studies with no image that renders (no call would be made)
    errors: int  # error records the run would write (discovery and preprocessing)
    models: list[ModelEstimate] = field(default_factory=list)


def _entry(cfg: ModelConfig) -> ModelEstimate:
    return ModelEstimate(
        name=cfg.name,
        provider=cfg.provider.value,
        model_id=cfg.model,
        max_output_tokens=cfg.max_output_tokens,
        input_per_mtok=cfg.price.input_per_mtok,
        output_per_mtok=cfg.price.output_per_mtok,
    )


def estimate_run(
    source: str, out: str, settings: Settings, limit: int | None = None, force: bool = False
) -> RunEstimate:
    """The tokens and cost of screening ``source`` into ``out`` with ``settings``: the studies
    the run would read, each model's first request per study (no re-ask, retry, fallback or
    impression: those happen only when a call goes wrong, or are text-only and small)."""
    src, dest = open_store(source, settings.storage), open_store(out, settings.storage)
    inventory = discover_studies(src, settings.storage.max_concurrency)
    studies = inventory.studies[:limit] if limit else inventory.studies
    pending = to_read(dest, studies, force, publish_target(settings, source))
    providers = tuple(sorted({m.provider.value for m in settings.models}))
    prompt = load_prompt(settings.language)
    estimate = RunEstimate(len(studies), len(pending), 0, len(inventory.errors))
    estimate.models = [_entry(cfg) for cfg in settings.models]

    def prepare(study: Study):
        return study, prepare_study(src, study, settings.preprocess, providers)

    with ThreadPoolExecutor(settings.runner.workers or 2) as pool:  # decoding: CPU-bound
        for study, (prepared, errors) in pool.map(prepare, pending):
            estimate.errors += len(errors)
            if not prepared:
                estimate.unreadable += 1
                continue
            context = deidentify(i.header for i in study.instances).values
            for entry in estimate.models:
                pngs = [img.for_provider(entry.provider) for _, img in prepared]
                text = prompt.text + user_text(context, len(pngs), prompt.language)
                entry.calls += 1
                entry.images += len(pngs)
                entry.image_tokens += image_tokens(entry.provider, map(png_size, pngs))
                entry.text_tokens += text_tokens(text, entry.provider)
    logger.info("estimated %d studies over %d models", len(pending), len(estimate.models))
    return estimate
