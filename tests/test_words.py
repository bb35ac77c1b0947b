"""The true/false words of tasks/core/words.py: the table itself, the labels parser and the
annotations parser reading the same words alike, and the docs' table being that table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from tasks.core.errors import AnnotationError, LabelError
from tasks.core.words import (
    ABNORMAL_WORDS,
    FALSE_WORDS,
    NORMAL_WORDS,
    TRUE_WORDS,
    parse_abnormal,
    parse_bool,
)
from tasks.evaluation.metrics import parse_labels
from tasks.finetune.examples import parse_annotation

DOCS = Path(__file__).resolve().parents[1] / "docs"
# Every word that means true or false, as a person may type it.
SPELLINGS = [(w, True) for w in sorted(ABNORMAL_WORDS)] + [(w, False) for w in sorted(NORMAL_WORDS)]


def _label(word: str) -> int:
    (label,) = parse_labels(f"study_instance_uid,abnormal\n1.2,{word}\n", "labels.csv")
    return label.abnormal


def _annotation(word: object) -> bool:
    row = {"image": "a.dcm", "patient_id": "p1", "abnormal": word}
    return parse_annotation(row, 1).reading.abnormal


def test_the_words_table_is_one_vocabulary():
    assert not TRUE_WORDS & FALSE_WORDS and not ABNORMAL_WORDS & NORMAL_WORDS
    assert TRUE_WORDS < ABNORMAL_WORDS and FALSE_WORDS < NORMAL_WORDS
    extra_true, extra_false = ABNORMAL_WORDS - TRUE_WORDS, NORMAL_WORDS - FALSE_WORDS
    assert extra_true == {"abnormal"} and extra_false == {"normal"}
    # The words older labels files and annotation files were written with are all still read.
    assert {"1", "true", "yes", "t", "y", "abnormal"} <= ABNORMAL_WORDS
    assert {"0", "false", "no", "f", "n", "normal"} <= NORMAL_WORDS


def test_parse_bool_agrees_with_pydantic_booleans():
    """A label, an annotation and a YAML boolean setting accept the same true/false words."""
    adapter = TypeAdapter(bool)
    for word in sorted(TRUE_WORDS | FALSE_WORDS):
        for typed in (word, word.upper(), f" {word.title()} "):
            assert parse_bool(typed) is adapter.validate_python(typed.strip()), typed
    assert parse_bool(None) is None and parse_bool("  ") is None and parse_bool(False) is False
    assert parse_bool(1) is True and parse_bool(0) is False
    with pytest.raises(ValueError, match=r'"maybe" is neither true \(1, on, t, true, y, yes\)'):
        parse_bool("maybe")
    with pytest.raises(ValueError, match="neither true"):
        parse_bool("abnormal")  # only parse_abnormal takes the words themselves
    with pytest.raises(ValidationError):
        adapter.validate_python("maybe")


@pytest.mark.parametrize(("word", "meaning"), SPELLINGS)
def test_labels_and_annotations_read_each_word_alike(word, meaning):
    for typed in (word, word.upper(), f" {word} "):
        assert parse_abnormal(typed) is meaning
        assert _label(typed) == int(meaning), typed
        assert _annotation(typed) is meaning, typed


@pytest.mark.parametrize("word", ["maybe", "2", "-1", "positive", "abnormality", "yes please"])
def test_labels_and_annotations_refuse_the_same_words(word):
    with pytest.raises(ValueError, match="neither true"):
        parse_abnormal(word)
    with pytest.raises(LabelError, match=rf'line 2: abnormal must be 0 or 1, not "{word}"'):
        _label(word)
    with pytest.raises(AnnotationError, match=rf'unknown label abnormal="{word}": .*neither true'):
        _annotation(word)


def test_json_booleans_and_numbers_in_annotations():
    assert _annotation(True) is True and _annotation(0) is False and _annotation(1) is True
    with pytest.raises(AnnotationError, match='abnormal="2"'):
        _annotation(2)


def test_the_docs_table_is_the_words_table():
    """docs/evaluation.md holds the one table of accepted words; docs/datasets.md links to it."""
    page = (DOCS / "evaluation.md").read_text()
    rows = dict(re.findall(r"^\| (true|false) \| (.+?) \|$", page, flags=re.M))
    documented = {k: {w.strip(" `") for w in v.split(",")} for k, v in rows.items()}
    assert documented == {"true": set(ABNORMAL_WORDS), "false": set(NORMAL_WORDS)}
    assert "evaluation.md#true-and-false-words" in (DOCS / "datasets.md").read_text()
