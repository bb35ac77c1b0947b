"""The words radflow reads and writes for yes/no, abnormal/normal and urgency, in one place:
the true/false words accepted in labels and annotations, and the wording and codes of every
report, table and page (ko/en)."""

from __future__ import annotations

from tasks.core.config import Language
from tasks.core.schema import Urgency

__all__ = [
    "ABNORMAL_CODES",
    "ABNORMAL_WORDS",
    "FALSE_WORDS",
    "LANGUAGE_TAGS",
    "NORMAL_DIAGNOSES",
    "NORMAL_WORDS",
    "SNOMED_CT",
    "TRUE_WORDS",
    "URGENCY_MEANINGS",
    "YES_NO_CODES",
    "parse_abnormal",
    "parse_bool",
    "result",
    "short_result",
    "urgency_word",
    "yes_no",
]

# ---- read: the true/false words -------------------------------------------------------------

# The words pydantic accepts for a boolean setting (so a label, an annotation and the YAML
# config agree), compared without case and surrounding spaces.
TRUE_WORDS = frozenset({"1", "true", "t", "yes", "y", "on"})
FALSE_WORDS = frozenset({"0", "false", "f", "no", "n", "off"})
# ``abnormal`` of labels and annotations also takes the words themselves.
ABNORMAL_WORDS = TRUE_WORDS | {"abnormal"}
NORMAL_WORDS = FALSE_WORDS | {"normal"}
# A ``diagnosis`` of an annotation that means no abnormality (compared in lower case).
NORMAL_DIAGNOSES = frozenset(
    {"normal", "정상", "no finding", "no findings", "no abnormality", "none"}
)


def parse_bool(
    value: object, *, true: frozenset[str] = TRUE_WORDS, false: frozenset[str] = FALSE_WORDS
) -> bool | None:
    """``value`` as a boolean: a bool as it is; None, or a blank string, → None (not given);
    else the text of ``value`` (an int 1 is "1"), case and surrounding spaces aside, must be
    one of ``true`` (default: 1, true, t, yes, y, on) or ``false`` (0, false, f, no, n, off).
    Anything else is a ValueError naming the value and the words accepted."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if not text:
        return None
    if text in true:
        return True
    if text in false:
        return False
    raise ValueError(
        f'"{value}" is neither true ({", ".join(sorted(true))}) '
        f"nor false ({', '.join(sorted(false))})"
    )


def parse_abnormal(value: object) -> bool | None:
    """An ``abnormal`` label (labels CSV, annotations): :func:`parse_bool` with the words
    ``abnormal`` and ``normal`` as well."""
    return parse_bool(value, true=ABNORMAL_WORDS, false=NORMAL_WORDS)


# ---- write: wording per language --------------------------------------------------------------

# A study's or reading's result (consensus ``abnormal``; None: no model produced a reading), as
# report.md (in the report's language) and the FHIR conclusion (in English) say it.
_RESULT: dict[Language, dict[bool | None, str]] = {
    Language.EN: {True: "abnormal", False: "no abnormality", None: "no reading"},
    Language.KO: {True: "이상 소견 있음", False: "이상 소견 없음", None: "판독 없음"},
}
# The short form of tables, queues and pages (run review table, `radflow reviews list`, the
# review page, the demo's table).
_SHORT: dict[bool | None, str] = {True: "abnormal", False: "normal", None: "no reading"}
_YES_NO: dict[Language, dict[bool, str]] = {
    Language.EN: {True: "yes", False: "no"},
    Language.KO: {True: "예", False: "아니오"},
}
# Urgency as report.md and the demo's table say it (the value itself elsewhere).
_URGENCY: dict[Language, dict[Urgency, str]] = {
    Language.EN: {
        Urgency.IMMEDIATE: "immediate",
        Urgency.FOLLOW_UP: "follow-up",
        Urgency.NORMAL: "normal",
    },
    Language.KO: {
        Urgency.IMMEDIATE: "즉시 치료",
        Urgency.FOLLOW_UP: "추적 검사",
        Urgency.NORMAL: "정상",
    },
}


def result(abnormal: bool | None, language: Language | str = Language.EN) -> str:
    """ "abnormal" / "no abnormality" / "no reading" (None), or the words of ``language``."""
    return _RESULT[Language(language)][abnormal]


def short_result(abnormal: bool | None) -> str:
    """ "abnormal" / "normal" / "no reading" (None): the column of a table."""
    return _SHORT[abnormal]


def yes_no(flag: bool, language: Language | str = Language.EN) -> str:
    """ "yes" / "no", or the words of ``language``."""
    return _YES_NO[Language(language)][bool(flag)]


def urgency_word(urgency: Urgency | str, language: Language | str = Language.EN) -> str:
    """ "immediate" / "follow-up" / "normal", or the words of ``language``."""
    return _URGENCY[Language(language)][Urgency(urgency)]


# ---- write: codes ----------------------------------------------------------------------------------

SNOMED_CT = "http://snomed.info/sct"  # FHIR's system URI; DICOM's coding scheme designator "SCT"
# SNOMED CT (code, meaning): the conclusion abnormal/normal (SR and FHIR) and the SR's yes/no.
ABNORMAL_CODES: dict[bool, tuple[str, str]] = {
    True: ("263654008", "Abnormal"),
    False: ("17621005", "Normal"),
}
YES_NO_CODES: dict[bool, tuple[str, str]] = {True: ("373066001", "Yes"), False: ("373067005", "No")}
# The meaning of radflow's urgency codes (the code is the value) in the SR.
URGENCY_MEANINGS: dict[Urgency, str] = {
    Urgency.IMMEDIATE: "Immediate treatment",
    Urgency.FOLLOW_UP: "Follow-up",
    Urgency.NORMAL: "Normal",
}
# A report's language as an RFC 5646 tag and its name (SR, FHIR).
LANGUAGE_TAGS: dict[Language, tuple[str, str]] = {
    Language.EN: ("en-US", "English (United States)"),
    Language.KO: ("ko-KR", "Korean (Republic of Korea)"),
}
