"""The configuration reference, docs/config.md, generated from the settings model: every key
with its type, default, bounds or choices and the description of its pydantic ``Field``.

``make config-doc`` rewrites the file; ``tests/test_docs.py`` fails when it is stale, as
``tests/test_reports.py`` does for schemas/report.schema.json."""

from __future__ import annotations

import logging
import types
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from tasks.core.config import Settings

__all__ = ["CONFIG_DOC", "Row", "config_reference", "settings_rows", "write_config_doc"]

logger = logging.getLogger(__name__)

CONFIG_DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"

# Keys the YAML holds elsewhere than the model: `dicomweb:` is written at the top level and
# kept as storage.dicomweb (Settings._dicomweb_into_storage), so a pool process has it.
_WRITTEN_AS = {"storage.dicomweb": "dicomweb"}

# Where each section is explained in prose (a page, or several).
_SEE: dict[str, str | tuple[str, ...]] = {
    "": "design.md#the-contract",
    "preprocess": "preprocessing.md",
    "gateway": "models.md#gateways",
    "models[]": "models.md",
    "review": ("consensus.md#review-rules", "review.md#turning-it-on"),
    "synthesis": "models.md#synthesis-a-model-written-impression",
    "storage": "screening.md#s3",
    "dicomweb": "pacs.md",
    "evaluation": "evaluation.md",
    "runner": "scaling.md",
    "privacy": "security.md#identifiers-in-logs-artifacts-and-run-names",
    "publish": "pacs.md#publishing-back-stow-rs",
}

_HEADER = """\
# Configuration reference

<!-- Generated from the settings model (tasks/core/config.py, tasks/pacs/settings.py) by
tasks/core/settings_doc.py: run `make config-doc` after changing a setting; tests/test_docs.py
fails when this file is stale. Edit the Field descriptions, not this file. -->

radflow reads one YAML file: `--config FILE`, else `$RADFLOW_CONFIG`, else `./radflow.yaml`,
else the built-in defaults (below). Unknown keys are errors, and so is a value outside its
bounds: `radflow` then prints one line naming the file, the key and the reason, and exits 2. A
file that is not YAML is one error naming the line, the column and the YAML problem, never the
text of the line (`--config` may name the wrong file, a credentials file say). No secret is
ever a setting: the config names the environment variables (or Prefect Secret blocks) that hold
them.

Columns: the key as written in the YAML (`models[]` is each entry of the `models` list), its
type, its default (`required` where there is none), the bounds or choices the loader enforces,
and what it means. Each section links to the page that explains it.
"""


@dataclass(frozen=True)
class Row:
    """One key of the reference."""

    key: str
    type: str
    default: str
    bounds: str
    description: str


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (``X``, ``X | None``, ``list[X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is Literal or (isinstance(annotation, type) and issubclass(annotation, Enum)):
        return "choice"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    names = {bool: "bool", int: "integer", float: "number", str: "string"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _choices(annotation: Any) -> list[str]:
    if get_origin(annotation) is Literal:
        return [str(a) for a in get_args(annotation)]
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return [str(m.value) for m in annotation]
    return [c for arg in get_args(annotation) for c in _choices(arg)]


_SIGNS = (
    ("ge", "≥"),
    ("gt", ">"),
    ("le", "≤"),
    ("lt", "<"),
    ("min_length", "length ≥"),
    ("max_length", "length ≤"),
    ("pattern", "matches"),
)


def _bounds(field: FieldInfo) -> str:
    choices = _choices(field.annotation)
    parts = [f"one of {', '.join(f'`{c}`' for c in choices)}"] if choices else []
    for meta in field.metadata:  # annotated-types constraints and pydantic's own metadata
        for attr, sign in _SIGNS:
            if getattr(meta, attr, None) is not None:
                value = getattr(meta, attr)
                parts.append(
                    f"{sign} `{value}`" if attr == "pattern" else f"{sign} {_number(value)}"
                )
    return ", ".join(parts)


def _number(value: float) -> str:
    return f"{value:,}" if abs(value) >= 10_000 else str(value)


def _fields(model: type[BaseModel]) -> list[tuple[str, FieldInfo]]:
    """A model's fields, its own before the inherited ones (a model entry's name, provider
    and model id before the endpoint keys it shares with ``gateway``)."""
    own = [n for n in model.model_fields if n in vars(model).get("__annotations__", {})]
    names = own + [n for n in model.model_fields if n not in own]
    return [(n, model.model_fields[n]) for n in names]


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        data = value.model_dump(mode="json", exclude_defaults=True)
        return {n: data[n] for n, _ in _fields(type(value)) if n in data}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel) and not _plain(value):
        return ""  # a section of defaults: its keys say them
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=10_000, sort_keys=False)
    return f"`{text.strip().removesuffix('...').strip()}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _rows(
    model: type[BaseModel], prefix: str, parents: tuple[type[BaseModel], ...]
) -> Iterator[Row]:
    for name, field in _fields(model):
        key = f"{prefix}.{name}" if prefix else name
        if key in _WRITTEN_AS:
            continue
        nested = _models_in(field.annotation)
        description = field.description or ""
        if nested and nested[0] in parents:  # a recursive entry: models[].fallback
            entry = next(k for k, m in _sections() if m is nested[0])
            yield Row(
                key, "mapping or null", _default(field), "", f"{description}: the keys of `{entry}`"
            )
            continue
        if nested and get_origin(field.annotation) is not list:
            yield from _rows(nested[0], key, (*parents, nested[0]))
            continue
        yield _row(key, field)


def _row(key: str, field: FieldInfo) -> Row:
    return Row(
        key, _type_name(field.annotation), _default(field), _bounds(field), field.description or ""
    )


def _sections() -> list[tuple[str, type[BaseModel]]]:
    """(key, model) per section: the top level, then each nested model the YAML holds under
    a key of its own, in the order of the settings' fields."""
    sections: list[tuple[str, type[BaseModel]]] = [("", Settings)]
    for name, field in Settings.model_fields.items():
        nested = _models_in(field.annotation)
        if nested:
            key = f"{name}[]" if get_origin(field.annotation) is list else name
            sections.append((key, nested[0]))
        for inner, inner_field in nested[0].model_fields.items() if nested else ():
            written = _WRITTEN_AS.get(f"{name}.{inner}")
            if written:
                sections.append((written, _models_in(inner_field.annotation)[0]))
    return sections


def settings_rows() -> list[tuple[str, type[BaseModel], list[Row]]]:
    """Per section (its key, its model) the rows of the keys under it."""
    out = []
    for key, model in _sections():
        if model is Settings:  # the top level: its scalar keys (the sections follow)
            rows = [_row(n, f) for n, f in _fields(Settings) if not _models_in(f.annotation)]
        else:
            rows = list(_rows(model, key, (model,)))
        out.append((key, model, rows))
    return out


def _intro(key: str, model: type[BaseModel]) -> str:
    """The section's description, its class docstring, its default when it is not made of
    its keys' defaults (optional sections, the default panel) and the page explaining it."""
    if not key:
        parts = ["Keys at the top of the file; each section below is a mapping under its key."]
    else:
        field = Settings.model_fields.get(key.removesuffix("[]"))
        text = field.description if field and field.description else model.__doc__
        parts = [" ".join(text.split())] if text else []
        default = _default(field) if field else ""
        if default:
            parts.append(f"Default: {default}.")
    see = _SEE.get(key, ())
    links = [
        f"[{page.split('#')[0]}]({page})" for page in ((see,) if isinstance(see, str) else see)
    ]
    if links:
        parts.append(f"See {' and '.join(links)}.")
    text = " ".join(p if p.endswith(".") else f"{p}." for p in parts)
    return _cell(text[:1].upper() + text[1:])


def config_reference() -> str:
    """docs/config.md's text."""
    parts = [_HEADER]
    for key, model, rows in settings_rows():
        title = f"`{key}`" if key else "Top level"
        parts.append(f"\n## {title}\n")
        parts.append(f"\n{_intro(key, model)}\n")
        parts.append("\n| key | type | default | bounds | description |\n|---|---|---|---|---|\n")
        for row in rows:
            cells = (f"`{row.key}`", row.type, row.default, row.bounds, row.description)
            parts.append("| " + " | ".join(_cell(c) for c in cells) + " |\n")
    return "".join(parts)


def write_config_doc(path: Path = CONFIG_DOC) -> Path:
    """Write the reference to ``path`` (docs/config.md) and return it."""
    path.write_text(config_reference(), encoding="utf-8")
    logger.info("wrote %s", path)
    return path
