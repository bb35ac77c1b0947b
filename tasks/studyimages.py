"""A study's key images: which instances of each series are rendered (the key-image rule,
a failed instance replaced by its nearest neighbour), rendered and sized for the providers.
Light on imports (no Prefect, no model SDKs): process-pool workers run it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tasks.config import PreprocessConfig
from tasks.errors import RadflowError, StorageError
from tasks.keyimages import KeyRule, parse_rule, pick
from tasks.keyimages import montage as montage_of
from tasks.preprocess import PreparedImage, finish, prepare_all, render_file
from tasks.schema import ErrorRecord
from tasks.storage import Store

if TYPE_CHECKING:
    from tasks.discover import Instance, Study

__all__ = ["prepare_study"]


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
    nearest unused neighbour is tried instead; a StorageError is raised (it is the store's)."""
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
            except StorageError:
                raise  # the store's (down, denied): not this instance's, and maybe transient
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
                pixels = montage_of([p for _, (p, _, _) in tiles], rule.rows, rule.cols)
                members = study.series[key.series_instance_uid]
                index = [members.index(inst) for inst, _ in tiles]  # slice positions
                flags = {flag for _, (_, _, flag) in tiles}
                worst = next(f for f in ("yes", "unknown", "no") if f in flags)
                image = finish(pixels, tiles[0][1][1], index, config, providers, burned_in=worst)
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
