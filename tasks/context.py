"""PHI guard: the only header information that may reach a model is a de-identified clinical
context (age band, sex, modality, body part, view), each value checked against a closed form."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

__all__ = ["clinical_context"]

# Code strings (VR CS, PS3.5 6.2): upper case, digits, space, underscore, at most 16 chars.
_CS = re.compile(r"^[A-Z0-9 _]{1,16}$")
_AGE = re.compile(r"^(\d{3})([DWMY])$")
_SEX = {"M": "M", "F": "F", "O": "O"}


def _age_band(value: str) -> str | None:
    """PatientAge (VR AS, e.g. "045Y") → a decade band like "40-49"; None when malformed."""
    m = _AGE.match(value.strip())
    if not m:
        return None
    n, unit = int(m.group(1)), m.group(2)
    years = n if unit == "Y" else 0
    if years >= 90:
        return "90+"  # HIPAA Safe Harbor: ages over 89 are aggregated
    return f"{years // 10 * 10}-{years // 10 * 10 + 9}"


def _code(value: str) -> str | None:
    value = value.strip().upper()
    return value if _CS.match(value) else None


def clinical_context(headers: Iterable[Mapping[str, str]]) -> dict[str, str]:
    """The de-identified context of a study from its instances' raw header values.

    Free text never passes: a value that is not a well-formed code string is dropped, so a
    StudyDescription or BodyPartExamined carrying instructions cannot reach a prompt.
    """
    modalities: set[str] = set()
    parts: set[str] = set()
    views: set[str] = set()
    age = sex = None
    for h in headers:
        if (m := _code(h.get("Modality", ""))) is not None:
            modalities.add(m)
        if (b := _code(h.get("BodyPartExamined", ""))) is not None:
            parts.add(b)
        if (v := _code(h.get("ViewPosition", ""))) is not None:
            views.add(v)
        age = age or _age_band(h.get("PatientAge", ""))
        sex = sex or _SEX.get(h.get("PatientSex", "").strip().upper())
    context: dict[str, str] = {}
    if modalities:
        context["modality"] = ", ".join(sorted(modalities))
    if parts:
        context["body_part"] = ", ".join(sorted(parts))
    if views:
        context["view"] = ", ".join(sorted(views))
    if age:
        context["age_band"] = age
    if sex:
        context["sex"] = sex
    return context
