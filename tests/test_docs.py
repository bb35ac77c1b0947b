"""The docs keep up with the code: docs/config.md is the settings as they are, every module,
test, link, command, option and config example the README and docs/ name exists and works."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main
import yaml
from pydantic import ValidationError

from tasks.core.config import Settings
from tasks.core.settings_doc import CONFIG_DOC, config_reference, settings_rows

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Modules the docs describe that sibling branches of issue 16 create (tasks/models/client.py:
# one model client; tasks/screening/summary.py and plan.py: accounting and planning out of
# flows/screen.py; tests/helpers.py: shared test helpers; tests/test_layout.py: the layout's
# rules). Allowed to be missing until those branches are merged; once one exists, drop it here
# so the check below covers it.
PENDING: set[str] = set()  # paths the docs name before they land

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_PATH = re.compile(
    r"(?<![\w./-])((?:tasks|flows|tests|simulator|benchmarks|schemas|deployments|infra)"
    r"/[\w./-]*\.(?:py|md|yaml|yml|json|txt))(?:::(\w+))?"
)
_DOTTED = re.compile(r"(?<![\w./])(tasks(?:\.\w+){2,})")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (a repeated heading's are ``-1``, ``-2``, …)."""
    anchors: set[str] = set()
    for line in _FENCE.sub("", _text(page)).splitlines():
        if m := re.match(r"#{1,6} (.+)", line):
            slug, n = _slug(m[1]), 0
            while (f"{slug}-{n}" if n else slug) in anchors:
                n += 1
            anchors.add(f"{slug}-{n}" if n else slug)
    return anchors


def test_config_reference_is_up_to_date():
    assert CONFIG_DOC.read_text(encoding="utf-8") == config_reference(), (
        "docs/config.md is stale: regenerate it with `make config-doc`"
    )


def _schema_leaves(schema: dict, node: dict, prefix: str, seen: tuple[str, ...]) -> set[str]:
    """Leaf key paths of a pydantic JSON schema, followed through $refs (a ref already on the
    path, as models[].fallback, is a leaf)."""
    leaves: set[str] = set()
    for name, prop in node.get("properties", {}).items():
        key = f"{prefix}.{name}" if prefix else name
        refs = [p["$ref"] for p in [prop, *prop.get("anyOf", [])] if "$ref" in p]
        items = prop.get("items", {})
        if items.get("$ref"):
            refs, key = [items["$ref"]], f"{key}[]"
        ref = refs[0].rsplit("/", 1)[-1] if refs else None
        if ref and ref not in seen and "properties" in schema["$defs"][ref]:  # not an enum
            leaves |= _schema_leaves(schema, schema["$defs"][ref], key, (*seen, ref))
        else:
            leaves.add(key)
    return leaves


def test_the_reference_lists_every_key_the_settings_accept():
    schema = Settings.model_json_schema()
    expected = _schema_leaves(schema, schema, "", ("Settings",))
    expected = {k.replace("storage.dicomweb.", "dicomweb.") for k in expected}  # written so
    documented = {row.key for _, _, rows in settings_rows() for row in rows}
    assert documented == expected
    # the keys issue 16 found missing from the README's hand-written table
    assert {"preprocess.header_window", "preprocess.key_images", "models[].max_output_tokens"} <= (
        documented
    )
    text = CONFIG_DOC.read_text(encoding="utf-8")
    assert "| `models[].max_output_tokens` | integer | `1024` | ≥ 64, ≤ 32,768 |" in text
    assert "| `storage.sse` | choice | `AES256` | one of `AES256`, `aws:kms` |" in text
    assert "| `synthesis.model` | string | required | length ≥ 1 |" in text


def test_every_setting_has_a_description():
    missing = [row.key for _, _, rows in settings_rows() for row in rows if not row.description]
    sections = [name for name, field in Settings.model_fields.items() if not field.description]
    assert not missing, f"settings without a Field description: {missing}"
    assert not sections, f"sections without a Field description: {sections}"


def test_module_paths_named_in_the_docs_exist():
    named: dict[str, set[str]] = {}
    for page in PAGES:
        for m in _PATH.finditer(_text(page)):
            named.setdefault(m[1], set()).add(page.name)
        for m in _DOTTED.finditer(_text(page)):
            parts = m[1].split(".")
            module = "/".join(parts[:3]) + ".py"
            if not (ROOT / module).exists() and (ROOT / "/".join(parts[:3])).is_dir():
                continue  # a package: tasks.review.page is tasks/review/page.py, checked here
            named.setdefault(module, set()).add(page.name)
    missing = {p: sorted(pages) for p, pages in named.items() if not (ROOT / p).exists()}
    assert set(missing) <= PENDING, f"named in the docs but not in the tree: {missing}"
    arrived = sorted(p for p in PENDING if (ROOT / p).exists())
    assert not arrived, f"now in the tree: drop {arrived} from PENDING in tests/test_docs.py"


def test_tests_named_in_the_docs_exist():
    missing = []
    for page in PAGES:
        for m in _PATH.finditer(_text(page)):
            path, name = m[1], m[2]
            if not name or path in PENDING:
                continue
            source = (ROOT / path).read_text(encoding="utf-8")
            if not re.search(rf"^(async )?def {name}\(", source, re.M):
                missing.append(f"{page.name}: {path}::{name}")
    assert not missing, f"tests named in the docs that do not exist: {missing}"


def test_links_between_the_pages_resolve():
    broken = []
    for page in PAGES:
        for target in _LINK.findall(_FENCE.sub("", _text(page))):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def _usage_texts() -> list[str]:
    """Every command line the docs show: fenced blocks (continued lines joined) and code spans."""
    texts = []
    for page in PAGES:
        text = _text(page)
        for block in _FENCE.findall(text):
            texts.append(block.replace("\\\n", " "))
        texts += re.findall(r"`([^`\n]+)`", _FENCE.sub("", text))
    return texts


def _commands() -> dict[str, list[list[str]]]:
    """``radflow`` command → its options, each as its spellings (``--warm``, ``--no-warm``)."""
    out = {}
    root = typer.main.get_command(__import__("flows.cli", fromlist=["app"]).app)
    for name, command in root.commands.items():
        for sub, cmd in getattr(command, "commands", {None: command}).items():
            opts = [p.opts + p.secondary_opts for p in cmd.params if p.opts[0].startswith("--")]
            out[f"{name} {sub}" if sub else name] = opts
    return out


def test_every_command_and_option_is_documented():
    texts = _usage_texts()
    readme = _text(ROOT / "README.md")
    undocumented = []
    for command, options in _commands().items():
        lines = [
            line[line.index(f"radflow {command}") :]
            for text in texts
            for line in text.splitlines()
            if re.search(rf"radflow {command}(?![\w-])", line)
        ]
        if not any(f"`radflow {command}" in line for line in readme.splitlines()):
            undocumented.append(f"radflow {command} (not in the README's table of commands)")
        for spellings in options:
            if not any(re.search(rf"{s}(?![\w-])", line) for s in spellings for line in lines):
                undocumented.append(f"radflow {command} {spellings[0]}")
    assert not undocumented, f"not shown in any usage line of the docs: {undocumented}"


def _yaml_blocks() -> list:
    """Every ```yaml block of the README and docs/ (each is a radflow config or part of one)."""
    blocks = []
    for page in PAGES:
        found = re.findall(r"^```yaml\n(.*?)^```", _text(page), re.S | re.M)
        blocks += [pytest.param(page.name, b, id=f"{page.stem}-{i}") for i, b in enumerate(found)]
    return blocks


@pytest.mark.parametrize("page, block", _yaml_blocks())
def test_config_examples_in_the_docs_load(page, block):
    data = yaml.safe_load(block)
    try:
        Settings.model_validate(data)
    except ValidationError as exc:
        pytest.fail(f"a config example in {page} does not load: {exc}")


def test_readme_is_a_guide_and_design_is_in_the_repo():
    lines = _text(ROOT / "README.md").splitlines()
    assert len(lines) <= 250, "README.md is a guide: move reference material into docs/"
    cited = "DESIGN" + ".md"  # a file outside the repository: docs/design.md replaces it
    files = [*PAGES, *ROOT.glob("tasks/**/*.py"), *ROOT.glob("flows/*.py")]
    citing = [str(f.relative_to(ROOT)) for f in files if cited in f.read_text(encoding="utf-8")]
    assert not citing, f"cite docs/design.md instead of {cited}: {citing}"
