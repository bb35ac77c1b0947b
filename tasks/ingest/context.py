"""PHI guard: the only header information that may reach a model is a de-identified clinical
context (age band, sex, modality, body part, view), each value a term of a closed vocabulary."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["MAX_VALUES", "Context", "clinical_context", "deidentify", "vocabularies"]

MAX_VALUES = 4  # terms per field in the prompt: the most frequent among the instances

# ViewPosition (0018,5101): the Defined Terms of PS3.3 Table C.8-1 (CR Series Module), which the
# DX Positioning Module (PS3.3 C.8.11.5.1.1) keeps consistent with its View Code Sequence, and
# the ACR MQCM 1999 equivalents of PS3.16 CID 4014 "View for Mammography", the abbreviations
# mammography headers carry in this element. Neither pydicom nor highdicom ships these as terms.
_VIEWS = frozenset(
    {"AP", "PA", "LL", "RL", "RLD", "LLD", "RLO", "LLO"}
    | {"CC", "FB", "ML", "MLO", "LM", "LMO", "SIO", "ISO", "XCCL", "XCCM"}
)
_FIELDS = (("modality", "Modality"), ("body_part", "BodyPartExamined"), ("view", "ViewPosition"))
_AGE = re.compile(r"^(\d{3})([DWMY])$")
_SEX = {"M": "M", "F": "F", "O": "O"}


@lru_cache(maxsize=1)
def vocabularies() -> dict[str, frozenset[str]]:
    """The closed vocabulary of each coded field.

    - modality: PS3.16 CID 33 "Modality" (pydicom's code dictionary), whose code values are
      the Defined Terms of Modality (0008,0060), PS3.3 C.7.3.1.1.1;
    - body_part: the Body Part Examined (0018,0015) Defined Terms of PS3.16 Annex L,
      Table L-1 "Correspondence of Anatomic Region Codes and Body Part Examined Defined
      Terms" (CID 4031 and others), as highdicom ships them (317 terms);
    - view: ``_VIEWS`` above.

    Loaded once per process (≈0.3 s the first time: pydicom's code dictionary).
    """
    from highdicom._standard_utils import get_anatomic_region_map
    from pydicom.sr.codedict import codes

    return {
        "modality": frozenset(getattr(codes.cid33, name).value for name in codes.cid33.dir()),
        "body_part": frozenset(get_anatomic_region_map()),
        "view": _VIEWS,
    }


@dataclass(frozen=True)
class Context:
    """What the models are sent (``values``) and, per field, how many distinct header values
    were not sent (``dropped``: ``unknown`` = outside the vocabulary, ``over_cap`` = past
    :data:`MAX_VALUES`). The dropped values themselves are never kept."""

    values: dict[str, str]
    dropped: dict[str, dict[str, int]]


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


def deidentify(headers: Iterable[Mapping[str, str]]) -> Context:
    """The de-identified context of a study from its instances' raw header values.

    A coded value passes only when it is a term of its field's vocabulary (compared after
    stripping and upper-casing), so free text such as a BodyPartExamined "IGNORE ALL RULES"
    or a name never reaches a prompt; at most :data:`MAX_VALUES` terms per field do (the
    most frequent, ties alphabetically). Age band and sex: the first well-formed value.
    """
    headers = list(headers)
    vocab = vocabularies()
    values: dict[str, str] = {}
    dropped: dict[str, dict[str, int]] = {}
    for field, tag in _FIELDS:
        seen = Counter(v for h in headers if (v := str(h.get(tag, "")).strip().upper()))
        known = sorted((v for v in seen if v in vocab[field]), key=lambda v: (-seen[v], v))
        if known:
            values[field] = ", ".join(sorted(known[:MAX_VALUES]))
        unknown, over = len(seen) - len(known), max(0, len(known) - MAX_VALUES)
        if unknown or over:
            dropped[field] = {"unknown": unknown, "over_cap": over}
    for field, tag, parse in (
        ("age_band", "PatientAge", _age_band),
        ("sex", "PatientSex", lambda v: _SEX.get(v.strip().upper())),
    ):
        raw = {v for h in headers if (v := str(h.get(tag, "")).strip())}
        good = [p for h in headers if (p := parse(str(h.get(tag, ""))))]
        if good:
            values[field] = good[0]
        if unknown := sum(parse(v) is None for v in raw):
            dropped[field] = {"unknown": unknown, "over_cap": 0}
    return Context(dict(sorted(values.items())), dropped)


def clinical_context(headers: Iterable[Mapping[str, str]]) -> dict[str, str]:
    """Only what :func:`deidentify` lets through: the context the models are sent."""
    return deidentify(headers).values
