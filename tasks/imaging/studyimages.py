"""A study's key images: which instances of each series are rendered (the key-image rule; a
copy that fails gives way to the next copy of the instance, a failed instance to its nearest
neighbour), rendered and sized for the providers. Light on imports (no Prefect, no model
SDKs): process-pool workers run it."""

from __future__ import annotations

import io
from dataclasses import replace
from typing import TYPE_CHECKING

from tasks.core.config import PreprocessConfig
from tasks.core.errors import DuplicateInstance, RadflowError, StorageError
from tasks.core.schema import ErrorRecord
from tasks.imaging.keyimages import KeyRule, parse_rule, pick
from tasks.imaging.keyimages import montage as montage_of
from tasks.imaging.preprocess import PreparedImage, finish, prepare_all, render_file
from tasks.storage import Store

if TYPE_CHECKING:
    from tasks.ingest.discover import Instance, Study

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
    provider in ``providers``. A copy that fails becomes an error record and the instance's
    next copy is tried (its record says which copy was read instead); an instance none of
    whose copies renders is replaced by its nearest unused neighbour. Every copy not read
    and not failed gets a ``DuplicateInstance`` record naming the copy that was read (the
    first, for an instance that was not rendered). A StorageError is raised (it is the
    store's, not the instance's)."""
    rule = parse_rule(config.key_images)
    single = config.model_copy(update={"key_images": "middle"})
    images: list[tuple[Instance, PreparedImage]] = []
    errors: list[ErrorRecord] = []
    read: dict[str, int] = {}  # SOPInstanceUID → index of the copy that rendered, -1: none

    def record(inst: Instance, reason: str, kind: str) -> None:
        errors.append(
            ErrorRecord(
                source=inst.ref.uri,
                reason=reason,
                kind=kind,
                stage="preprocess",
                study_instance_uid=study.study_instance_uid,
            )
        )

    def attempt(candidates: list[Instance], used: set[str], fn):
        for inst in candidates:
            if inst.sop_instance_uid in used:
                continue
            used.add(inst.sop_instance_uid)
            failures: list[tuple[Instance, RadflowError]] = []
            read[inst.sop_instance_uid] = -1
            for n, copy in enumerate(inst.copies):
                try:
                    with store.open_read(copy.ref.key) as fh:
                        size = fh.seek(0, io.SEEK_END)  # what was fetched (a PACS: the instance)
                        fh.seek(0)
                        result = fn(fh, copy)
                except StorageError:
                    raise  # the store's (down, denied): not this copy's, and maybe transient
                except RadflowError as exc:
                    failures.append((copy, exc))
                    continue
                read[inst.sop_instance_uid] = n
                for failed, exc in failures:
                    instead = f'{exc.args[0]}; its copy "{copy.ref.uri}" was read instead'
                    record(failed, str(type(exc)(instead, hint=exc.hint)), exc.kind)
                return copy, result, size
            for failed, exc in failures:
                record(failed, str(exc), exc.kind)
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
                pixels = montage_of([p for _, (p, _, _), _ in tiles], rule.rows, rule.cols)
                members = [i.sop_instance_uid for i in study.series[key.series_instance_uid]]
                index = [members.index(i.sop_instance_uid) for i, _, _ in tiles]  # slice positions
                flags = {flag for _, (_, _, flag), _ in tiles}
                worst = next(f for f in ("yes", "unknown", "no") if f in flags)
                image = finish(pixels, tiles[0][1][1], index, config, providers, burned_in=worst)
                images.append((key, replace(image, source_bytes=sum(t[2] for t in tiles))))
            continue
        per_slot = single if len(slots) > 1 else config
        for slot in slots:
            got = attempt(
                slot, used, lambda fh, i, c=per_slot: prepare_all(fh, c, i.ref.uri, providers)
            )
            if got:
                inst, prepared, size = got
                room = config.max_images_per_study - len(images)
                if prepared:
                    prepared = [replace(prepared[0], source_bytes=size), *prepared[1:]]
                images += [(inst, img) for img in prepared[:room]]
    for inst in study.instances:
        used_copy = read.get(inst.sop_instance_uid, 0)
        if used_copy < 0 or not inst.alternates:
            continue
        kept = inst.copies[used_copy].ref.uri
        for extra in inst.copies[used_copy + 1 :]:
            exc = DuplicateInstance(
                f'"{extra.ref.uri}": duplicate instance: SOPInstanceUID '
                f'{inst.sop_instance_uid} is already read from "{kept}"'
            )
            record(extra, str(exc), exc.kind)
    return images, errors
