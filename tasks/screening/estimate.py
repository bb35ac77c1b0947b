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
from tasks.models.cache import ReadingCache
from tasks.models.client import endpoint_url
from tasks.models.panel import load_prompt, request_key, user_text
from tasks.pacs.publish import publish_target
from tasks.screening.plan import to_read
from tasks.storage import open_store

__all__ = ["ModelEstimate", "RunEstimate", "estimate_run"]

logger = logging.getLogger(__name__)


@dataclass
class ModelEstimate:
    """One panel model's share of the run: its reading requests' tokens and their price."""

    cfg: ModelConfig
    calls: int = 0
    cached: int = 0  # studies whose reading the cache in DEST holds: no call, no cost
    images: int = 0
    image_tokens: int = 0
    text_tokens: int = 0

    @property
    def input_tokens(self) -> int:
        return self.image_tokens + self.text_tokens

    @property
    def input_cost_usd(self) -> float:
        return self.cfg.price.cost(self.input_tokens, 0)

    @property
    def max_output_tokens(self) -> int:
        """Every answer at its ``max_output_tokens`` budget: the most the answers can be."""
        return self.calls * self.cfg.max_output_tokens

    @property
    def max_cost_usd(self) -> float:
        return self.cfg.price.cost(self.input_tokens, self.max_output_tokens)


@dataclass
class RunEstimate:
    studies: int  # found by discovery (after --limit)
    to_read: int  # not already reported (all with --force)
    unreadable: int  # studies with no image that renders (no call would be made)
    errors: int  # error records the run would write (discovery and preprocessing)
    models: list[ModelEstimate] = field(default_factory=list)


def estimate_run(
    source: str, out: str, settings: Settings, limit: int | None = None, force: bool = False
) -> RunEstimate:
    """The tokens and cost of screening ``source`` into ``out`` with ``settings``: the studies
    the run would read, each model's first request per study unless the reading cache in
    ``out`` holds its answer (no re-ask, retry, fallback or impression: those happen only when
    a call goes wrong, or are text-only and small)."""
    src, dest = open_store(source, settings.storage), open_store(out, settings.storage)
    inventory = discover_studies(src, settings.storage.max_concurrency)
    studies = inventory.studies[:limit] if limit else inventory.studies
    pending = to_read(dest, studies, force, publish_target(settings, source))
    providers = tuple(sorted({m.provider.value for m in settings.models}))
    prompt = load_prompt(settings.language)
    cache = ReadingCache(dest)
    endpoints = {m.name: endpoint_url(m, settings.gateway) for m in settings.models}
    estimate = RunEstimate(len(studies), len(pending), 0, len(inventory.errors))
    estimate.models = [ModelEstimate(cfg) for cfg in settings.models]

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
                provider = entry.cfg.provider
                pngs = [img.for_provider(provider) for _, img in prepared]
                user = user_text(context, len(pngs), prompt.language)
                key = request_key(entry.cfg, endpoints[entry.cfg.name], pngs, user, prompt)
                if cache.store.exists(cache.path(key)):
                    entry.cached += 1
                    continue
                entry.calls += 1
                entry.images += len(pngs)
                entry.image_tokens += image_tokens(provider, map(png_size, pngs))
                entry.text_tokens += text_tokens(prompt.text + user, provider)
    logger.info("estimated %d studies over %d models", len(pending), len(estimate.models))
    return estimate
