"""Screen one study: key images → panel readings → consensus → report. This is the coarse
Prefect task of the screening flow (one task run per study; model calls are plain async calls
inside it, see DESIGN.md for why)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

import tasks
from tasks.config import PreprocessConfig, Settings
from tasks.consensus import build_consensus
from tasks.context import clinical_context
from tasks.diagnose import Panel, Prompt
from tasks.discover import Instance, Study
from tasks.errors import RadflowError
from tasks.keyimages import KeyRule, parse_rule, pick
from tasks.keyimages import montage as montage_of
from tasks.preprocess import PreparedImage, finish, prepare_all, render_file
from tasks.report import publish_report, write_error
from tasks.runner import off_loop
from tasks.schema import ErrorRecord, ImageInfo, ModelProvenance, Provenance, Report
from tasks.storage import Store
from tasks.synthesis import impression_prompt, synthesize

__all__ = ["StudyOutcome", "key_instances", "prepare_study", "screen_study"]


@dataclass
class StudyOutcome:
    """What the flow needs to know about a screened study (the report itself is in DEST)."""

    study_instance_uid: str
    report: Report | None
    errors: list[ErrorRecord] = field(default_factory=list)


def key_instances(study: Study) -> list[list[Instance]]:
    """Per series, its instances ordered middle-out: the first that renders is the key image."""
    out = []
    for instances in study.series.values():
        mid = len(instances) // 2
        out.append(sorted(instances, key=lambda i: abs(instances.index(i) - mid)))
    return out


def _near(instances: list[Instance], position: int, used: set[str]) -> list[Instance]:
    """Candidates for the slice at ``position``: it, then its neighbours outwards."""
    order = sorted(range(len(instances)), key=lambda k: (abs(k - position), k))
    return [instances[k] for k in order if instances[k].sop_instance_uid not in used]


def _series_slots(study: Study, rule: KeyRule) -> list[tuple[list[list[Instance]], bool]]:
    """Per series: one candidate list per key slot, and whether the slots form a montage.
    A single-instance series has one slot (its frames follow the rule inside the object)."""
    out = []
    for instances in study.series.values():
        if len(instances) == 1 or rule.kind == "middle":
            out.append(([_near(instances, len(instances) // 2, set())], False))
        else:
            slots = [_near(instances, k, set()) for k in pick(len(instances), rule)]
            out.append((slots, rule.kind == "montage"))
    return out


def prepare_study(
    store: Store,
    study: Study,
    config: PreprocessConfig,
    providers: tuple[str, ...] = (),
) -> tuple[list[tuple[Instance, PreparedImage]], list[ErrorRecord]]:
    """Render the key images of each series by ``config.key_images`` (middle slice, N evenly
    spaced slices, or one montage of R×C slices; a multi-frame object follows the same rule
    over its frames), up to ``config.max_images_per_study``, each also sized for every
    provider in ``providers``. An instance that fails becomes an error record and its
    nearest unused neighbour is tried instead."""
    rule = parse_rule(config.key_images)
    single = config.model_copy(update={"key_images": "middle"})
    images: list[tuple[Instance, PreparedImage]] = []
    errors: list[ErrorRecord] = []

    def attempt(candidates: list[Instance], used: set[str], fn):
        for inst in candidates:
            if inst.sop_instance_uid in used:
                continue
            used.add(inst.sop_instance_uid)
            try:
                with store.open_read(inst.ref.key) as fh:
                    return inst, fn(fh, inst)
            except RadflowError as exc:
                errors.append(
                    ErrorRecord(
                        source=inst.ref.uri,
                        reason=str(exc),
                        kind=exc.kind,
                        stage="preprocess",
                        study_instance_uid=study.study_instance_uid,
                    )
                )
        return None

    for slots, as_montage in _series_slots(study, rule):
        if len(images) >= config.max_images_per_study:
            break
        used: set[str] = set()
        if as_montage:
            tiles = [
                t
                for slot in slots
                if (t := attempt(slot, used, lambda fh, i: render_file(fh, config, i.ref.uri)))
            ]
            if tiles:
                key = tiles[len(tiles) // 2][0]
                pixels = montage_of([p for _, (p, _) in tiles], rule.rows, rule.cols)
                members = study.series[key.series_instance_uid]
                index = [members.index(inst) for inst, _ in tiles]  # slice positions
                image = finish(pixels, tiles[0][1][1], index, config, providers)
                images.append((key, image))
            continue
        per_slot = single if len(slots) > 1 else config
        for slot in slots:
            got = attempt(
                slot, used, lambda fh, i, c=per_slot: prepare_all(fh, c, i.ref.uri, providers)
            )
            if got:
                inst, prepared = got
                room = config.max_images_per_study - len(images)
                images += [(inst, img) for img in prepared[:room]]
    return images, errors


@task(
    name="screen-study",
    task_run_name="study-{study.study_instance_uid}",
    retries=2,
    retry_delay_seconds=[5, 30],
    timeout_seconds=1800,
    cache_policy=NO_CACHE,
    # no tags: a tagged task run asks the API for tag concurrency slots as it starts (one
    # round trip per study, and stalls of seconds when the server's database is busy)
)
async def screen_study(
    study: Study,
    source: Store,
    dest: Store,
    settings: Settings,
    panel: Panel,
    prompt: Prompt,
    weights: tuple[dict[str, float], str],
) -> StudyOutcome:
    """Preprocess, read with every model, combine, and write the study's report.
    ``weights`` is (vote weight per model, where they come from), loaded once per run."""
    logger = get_run_logger()
    uid = study.study_instance_uid
    cpu = partial(off_loop, settings.runner, settings.storage)  # threads or the process pool
    prepared, errors = await cpu(
        prepare_study, [source], study, settings.preprocess, panel.providers
    )
    for record in errors:
        write_error(dest, record)
    failed = {e.source for e in errors}
    if not prepared:
        logger.warning("study %s: no instance could be rendered, no report", uid)
        return StudyOutcome(uid, None, errors)
    context = clinical_context(i.header for i in study.instances)
    sized = {p: [img.for_provider(p) for _, img in prepared] for p in panel.providers}
    readings = await panel.read(sized, context, prompt)
    consensus = build_consensus(readings, weights[0], settings.review, weights_source=weights[1])
    impression = None
    if settings.synthesis is not None:
        impression = await synthesize(settings.synthesis, settings, consensus, readings)
    report = Report(
        study_instance_uid=uid,
        status="complete" if all(r.ok for r in readings) else "degraded",
        language=settings.language.value,
        consensus=consensus,
        readings=readings,
        images=[
            ImageInfo(
                sop_instance_uid=inst.sop_instance_uid,
                series_instance_uid=inst.series_instance_uid,
                source=inst.ref.uri,
                sha256=img.sha256,
                width=img.width,
                height=img.height,
                window=img.window,
                frame=img.frame,
                modality=inst.modality or None,
            )
            for inst, img in prepared
        ],
        sources=[i.ref.uri for i in study.instances if i.ref.uri not in failed],
        context=context,
        inputs_fingerprint=study.fingerprint,
        prompt_version=prompt.version,
        cost_usd=round(
            sum(r.cost_usd for r in readings) + (impression.cost_usd if impression else 0), 6
        ),
        simulated=any(r.simulated for r in readings),
        radflow_version=tasks.__version__,
        impression=impression,
        provenance=Provenance(
            radflow_version=tasks.__version__,
            prompt_version=prompt.version,
            consensus_rule=consensus.rule,
            weights=consensus.weights,
            weights_source=consensus.weights_source,
            review_rules=settings.review.model_dump(),
            models=[
                ModelProvenance(
                    name=r.model,
                    provider=r.provider,
                    model_id=r.model_id,
                    endpoint_host=r.endpoint_host,
                    response_model=r.response_model,
                )
                for r in readings
            ],
            image_sha256=[img.sha256 for _, img in prepared],
            synthesis_prompt_version=(
                impression_prompt(settings.language)[1] if settings.synthesis else None
            ),
        ),
    )
    evidence = [(inst.ref.key, inst.ref.uri) for inst, _ in prepared]
    pngs = {img.sha256: img.png for _, img in prepared}
    errors += await cpu(publish_report, [source, dest], report, pngs, evidence)
    logger.info(
        "study %s: %s, urgency %s, agreement %.2f%s",
        uid,
        {True: "abnormal", False: "normal", None: "no reading"}[consensus.abnormal],
        consensus.urgency.value if consensus.urgency else "-",
        consensus.agreement,
        ", needs review" if consensus.needs_review else "",
    )
    return StudyOutcome(uid, report, errors)
