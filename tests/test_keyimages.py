"""Key images of multi-slice series by rule (middle, spaced:N, montage:RxC), with neighbours
standing in for slices that fail, on real files through the local store."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from simulator.samples import synthetic_ct
from tasks.core.config import PreprocessConfig
from tasks.core.errors import ConfigError, StorageError
from tasks.imaging.keyimages import KeyRule, montage, parse_rule, pick
from tasks.imaging.studyimages import prepare_study
from tasks.ingest.discover import discover_studies
from tasks.storage import open_store


@pytest.fixture
def series(tmp_path):
    """One study, one series of 9 CT slices (instance numbers 1..9), 128 px."""
    study, serie = generate_uid(entropy_srcs=["ki-study"]), generate_uid(entropy_srcs=["ki-s"])
    for n in range(1, 10):
        synthetic_ct(
            tmp_path / f"slice{n}.dcm",
            lesion=n == 5,
            seed=n,
            size=128,
            study_uid=study,
            series_uid=serie,
            instance=n,
        )
    store = open_store(str(tmp_path))
    (study,) = discover_studies(store).studies
    return store, study


def _numbers(images):
    return [inst.instance_number for inst, _ in images]


def test_rules_parse_and_pick_evenly_spaced_indices():
    assert parse_rule("middle") == KeyRule("middle")
    assert parse_rule("montage:2x3") == KeyRule("montage", count=6, rows=2, cols=3)
    assert pick(9, parse_rule("middle")) == [4]
    assert pick(9, parse_rule("spaced:3")) == [1, 4, 7]
    assert pick(2, parse_rule("spaced:5")) == [0, 1]
    with pytest.raises(ConfigError, match="every"):
        parse_rule("every")


def test_middle_rule_sends_the_middle_slice(series):
    store, study = series
    images, errors = prepare_study(store, study, PreprocessConfig())
    assert _numbers(images) == [5] and errors == []


def test_spaced_rule_sends_evenly_spaced_slices(series):
    store, study = series
    config = PreprocessConfig(key_images="spaced:3")
    images, errors = prepare_study(store, study, config, ("openai", "anthropic"))
    assert _numbers(images) == [2, 5, 8] and errors == []
    assert all(set(img.sized) == {"openai", "anthropic"} for _, img in images)


def test_montage_rule_sends_one_grid_of_slices(series):
    store, study = series
    images, _ = prepare_study(store, study, PreprocessConfig(key_images="montage:2x2"))
    ((inst, image),) = images
    assert image.frames == (1, 3, 5, 7)  # slice positions in the series
    grid = np.asarray(Image.open(io.BytesIO(image.png)))
    assert grid.shape == (2 * 128 + 2, 2 * 128 + 2)
    assert (grid[128:130] == 0).all()  # the gap between rows is black


def test_a_failing_slice_is_replaced_by_its_neighbour(series, tmp_path):
    store, study = series
    (tmp_path / "slice5.dcm").write_bytes((tmp_path / "slice5.dcm").read_bytes()[:2000])
    images, errors = prepare_study(store, study, PreprocessConfig())
    assert _numbers(images) == [4] or _numbers(images) == [6]
    assert len(errors) == 1 and errors[0].source.endswith("slice5.dcm")
    assert errors[0].kind == "CorruptDicom" and "slice5.dcm" in errors[0].reason


def test_montage_tiles_of_other_sizes_are_fitted():
    tiles = [np.full((4, 6), 100, np.uint8), np.full((8, 12, 3), 200, np.uint8)]
    grid = montage(tiles, 1, 2, gap=1)
    assert grid.shape == (4, 13, 3) and (grid[:, 7:] == 200).all()


def test_a_storage_error_while_rendering_is_the_stores_not_an_instance_record(series):
    """An error record says the instance is bad; a failing store is raised instead, so the
    study fails (and its task run is retried when that is transient)."""
    store, study = series
    outside = [replace(i, ref=replace(i.ref, key=f"../{i.ref.key}")) for i in study.instances]
    with pytest.raises(StorageError, match="escapes the folder"):
        prepare_study(store, replace(study, instances=outside), PreprocessConfig())
