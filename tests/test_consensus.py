"""Consensus rules on their edge cases: ties, failures, everyone refusing, weights."""

from __future__ import annotations

import pytest

from tasks.consensus.vote import build_consensus, merge_items, panel_kappa
from tasks.core.config import ReviewConfig
from tasks.core.schema import Urgency
from tests.helpers import reading

REVIEW = ReviewConfig()


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


def test_all_refuse_names_every_model_and_keeps_no_findings():
    readings = [reading("a", None, ok=False), reading("b", None, ok=False)]
    c = build_consensus(readings, {}, REVIEW)
    assert [d.code for d in c.review_details] == ["model_failed", "no_reading"]
    assert c.review_details[0].models == ["a", "b"] and c.findings == []


def test_weighted_tie_goes_abnormal():
    c = build_consensus([reading("a", True), reading("b", False)], {"a": 2.0, "b": 2.0}, REVIEW)
    assert c.abnormal is True and c.score == 0.5 and c.urgency is Urgency.FOLLOW_UP


def test_measured_reliability_weights_and_their_source_are_recorded():
    readings = [reading("a", True), reading("b", False), reading("c", False)]
    c = build_consensus(readings, {"a": 0.95, "b": 0.4, "c": 0.4}, REVIEW, "reliability.json")
    assert c.abnormal is True and c.score == round(0.95 / 1.75, 4)
    assert c.weights == {"a": 0.95, "b": 0.4, "c": 0.4}
    assert c.weights_source == "reliability.json"


def test_a_failed_reading_does_not_vote_even_if_it_carries_a_verdict():
    bad = reading("b", True, ok=False)
    c = build_consensus([reading("a", False), bad], {"b": 100.0}, REVIEW)
    assert c.abnormal is False and c.score == 0.0 and "b" not in c.weights


def test_negative_or_nan_weight_is_one_clear_error():
    with pytest.raises(ValueError, match='weight of model "a"'):
        build_consensus([reading("a", True)], {"a": -1.0}, REVIEW)
    with pytest.raises(ValueError, match='weight of model "a"'):
        build_consensus([reading("a", True)], {"a": float("nan")}, REVIEW)


def test_review_rules_can_be_switched_off():
    quiet = ReviewConfig(
        min_agreement=0.0, on_disagreement=False, on_immediate=False, on_degraded=False
    )
    readings = [reading("a", True, "immediate"), reading("b", False), reading("c", None, ok=False)]
    c = build_consensus(readings, {}, quiet)
    assert c.needs_review is False and c.review_reasons == []
    assert c.urgency is Urgency.IMMEDIATE  # the safety rule still sets urgency
    loud = build_consensus(readings, {}, REVIEW)
    assert [d.code for d in loud.review_details] == ["model_failed", "disagree", "immediate"]
    assert loud.review_details[2].models == ["a"]


def test_low_agreement_reason_when_disagreement_rule_is_off():
    review = ReviewConfig(min_agreement=0.9, on_disagreement=False)
    c = build_consensus([reading("a", True), reading("b", True), reading("c", False)], {}, review)
    assert c.review_reasons == ["agreement 0.67 is below 0.90"]
    assert c.review_details[0].value == 0.6667 and c.review_details[0].threshold == 0.9


def test_fleiss_kappa_matches_the_hand_computed_value():
    # 4 studies x 2 raters: P-bar = 0.75, P_e = 0.375² + 0.625² = 0.53125 → κ = 0.4667
    kappa, n = panel_kappa([[True, True], [False, False], [True, False], [False, False]])
    assert (kappa, n) == (0.4667, 4)


def test_fleiss_kappa_skips_incomplete_studies_and_is_undefined_without_variety():
    kappa, n = panel_kappa([[True, True], [False, False], [True, None], [True, True]])
    assert (kappa, n) == (1.0, 3)
    assert panel_kappa([[False, False], [False, False]]) == (None, 2)
    assert panel_kappa([[True]]) == (None, 1)
    assert panel_kappa([]) == (None, 0)
