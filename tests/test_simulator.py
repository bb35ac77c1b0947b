"""The simulator's formulas and decisions (it is a test double, but tests rely on it)."""

from __future__ import annotations

import pytest

from simulator.samples import synthetic_ct
from simulator.server import parse_faults
from simulator.vision import (
    Profile,
    anthropic_image_tokens,
    detect_lesion,
    judge,
    openai_image_tokens,
)
from tasks.core.config import PreprocessConfig
from tasks.imaging.preprocess import prepare


@pytest.mark.parametrize(
    "size, tokens",
    [((1024, 1024), 765), ((2048, 4096), 1105), ((512, 512), 255), ((4000, 3000), 765)],
)
def test_openai_tokens_follow_the_published_examples(size, tokens):
    assert openai_image_tokens(*size) == tokens


def test_openai_low_detail_is_flat():
    assert openai_image_tokens(4000, 4000, "low") == 85


def test_anthropic_tokens():
    assert anthropic_image_tokens(1000, 1000) == 1334
    # 1955×1841 is resized to ≤ 1.15 MP first
    assert anthropic_image_tokens(1955, 1841) == pytest.approx(1_150_000 / 750, rel=0.01)


def test_detector_sees_the_synthetic_lesion(tmp_path):
    config = PreprocessConfig()
    with_lesion = prepare(str(synthetic_ct(tmp_path / "a.dcm", lesion=True, seed=4)), config)
    without = prepare(str(synthetic_ct(tmp_path / "b.dcm", lesion=False, seed=5)), config)
    assert detect_lesion(with_lesion.png)[0] is True
    assert detect_lesion(without.png)[0] is False


def test_judge_is_seeded_and_follows_the_profile(tmp_path):
    png = prepare(
        str(synthetic_ct(tmp_path / "a.dcm", lesion=True, seed=4)), PreprocessConfig()
    ).png
    perfect, blind = Profile(1.0, 1.0), Profile(0.0, 1.0)
    assert judge([png], "m", perfect, 1).abnormal is True
    assert judge([png], "m", blind, 1).abnormal is False
    assert judge([png], "m", Profile(0.5, 0.5), 7) == judge([png], "m", Profile(0.5, 0.5), 7)


def test_fault_spec_is_validated():
    assert parse_faults("429:0.1,refusal:0.02") == {"*": {"429": 0.1, "refusal": 0.02}}
    assert parse_faults("429:0.5,401:1@m,429:0@m") == {"*": {"429": 0.5}, "m": {"401": 1, "429": 0}}
    for bad in ("teapot:0.1", "429:x", "500:2", "429:0.6,500:0.6", "429:0.5,401:0.6@m"):
        with pytest.raises(ValueError):
            parse_faults(bad)
