"""Consensus rules on their edge cases: ties, failures, everyone refusing, weights."""

from __future__ import annotations

from tasks.config import ReviewConfig
from tasks.consensus import build_consensus, merge_items
from tasks.schema import ModelReading, Urgency

REVIEW = ReviewConfig()


def reading(
    model: str,
    abnormal: bool | None,
    urgency: str | None = None,
    ok: bool = True,
    findings: list[str] | None = None,
) -> ModelReading:
    if ok and urgency is None:
        urgency = "follow_up" if abnormal else "normal"
    return ModelReading(
        model=model,
        provider="openai",
        model_id=model,
        ok=ok,
        abnormal=abnormal,
        urgency=Urgency(urgency) if urgency else None,
        findings=findings or [],
        error=None if ok else "boom",
    )


def test_agreeing_normal_readings_need_no_review():
    c = build_consensus([reading("a", False), reading("b", False)], {}, REVIEW)
    assert (c.abnormal, c.urgency, c.agreement, c.score, c.needs_review) == (
        False,
        Urgency.NORMAL,
        1.0,
        0.0,
        False,
    )


def test_disagreement_is_flagged_and_tie_goes_abnormal():
    c = build_consensus([reading("a", True), reading("b", False)], {}, REVIEW)
    assert c.abnormal is True and c.score == 0.5 and c.agreement == 0.5
    assert c.needs_review and "models disagree on abnormal" in c.review_reasons


def test_weights_decide_the_vote():
    readings = [reading("a", True), reading("b", False), reading("c", False)]
    c = build_consensus(readings, {"a": 3.0, "b": 1.0, "c": 1.0}, REVIEW)
    assert c.abnormal is True and c.score == 0.6
    c = build_consensus(readings, {}, REVIEW)
    assert c.abnormal is False and round(c.agreement, 2) == 0.67


def test_most_urgent_urgency_wins_and_immediate_needs_review():
    c = build_consensus(
        [reading("a", True, "immediate"), reading("b", True, "follow_up")], {}, REVIEW
    )
    assert c.urgency is Urgency.IMMEDIATE and c.needs_review


def test_a_failed_model_degrades_to_the_others_with_review():
    c = build_consensus([reading("a", False), reading("b", None, ok=False)], {}, REVIEW)
    assert c.abnormal is False and c.agreement == 1.0
    assert c.needs_review and c.review_reasons == ["no reading from b"]


def test_all_refuse_gives_no_verdict():
    c = build_consensus([reading("a", None, ok=False), reading("b", None, ok=False)], {}, REVIEW)
    assert c.abnormal is None and c.urgency is None and c.score is None
    assert c.needs_review and "no model produced a reading" in c.review_reasons


def test_zero_weights_fall_back_to_unweighted_vote():
    c = build_consensus([reading("a", True), reading("b", True)], {"a": 0, "b": 0}, REVIEW)
    assert c.abnormal is True and c.score == 1.0


def test_findings_merge_case_insensitively_with_supporting_models():
    merged = merge_items(
        [
            reading("a", True, findings=["Nodule", "effusion"]),
            reading("b", True, findings=["nodule "]),
        ],
        "findings",
    )
    assert [(m.text, m.models) for m in merged] == [("Nodule", ["a", "b"]), ("effusion", ["a"])]


def test_min_agreement_threshold_is_configurable():
    readings = [reading("a", True), reading("b", True), reading("c", False)]
    assert build_consensus(readings, {}, ReviewConfig(min_agreement=0.5)).review_reasons == [
        "models disagree on abnormal"
    ]
