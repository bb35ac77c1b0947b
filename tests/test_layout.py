"""The layout's two rules, checked: radflow's modules import each other without a cycle, and a
process-pool worker (tasks/imaging, tasks/reports, tasks/storage, tasks/core) never loads
Prefect or a model SDK."""

from __future__ import annotations

import ast
import multiprocessing
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from simulator.samples import build_sample_folder
from tasks.core.config import PreprocessConfig, StorageConfig
from tasks.ingest.discover import discover_studies
from tasks.screening.pool import _in_worker, _warm
from tasks.storage import LocalStore

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "flows", "simulator")
HEAVY = ("prefect", "openai", "anthropic")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_graph() -> dict[str, set[str]]:
    """radflow module → the radflow modules it imports when it runs (at module level or in a
    function; imports under ``if TYPE_CHECKING:`` do not run and are left out)."""
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(tree):
            if _type_checking_only(node, parents):
                continue
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                # `from pkg import mod` imports the module pkg.mod when there is one
                targets |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
                targets.add(base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_radflow_modules():
    graph = import_graph()
    assert "tasks.storage.s3" in graph and "tasks.storage.base" in graph["tasks.storage.s3"]
    assert find_cycle(graph) is None, f"import cycle: {' → '.join(find_cycle(graph))}"


@pytest.mark.e2e
def test_a_pool_worker_loads_neither_prefect_nor_a_model_sdk(tmp_path):
    """A real spawn worker, as tasks.screening.pool starts them: warmed, then rendering a
    study's key images through ``_in_worker``, then asked what it has imported."""
    build_sample_folder(tmp_path, synthetic=1, real=False, junk=False)
    store = LocalStore(tmp_path)
    study = discover_studies(store).studies[0]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        pool.submit(_warm).result(timeout=120)
        images, errors = pool.submit(
            _in_worker,
            __import__("tasks.imaging.studyimages", fromlist=["prepare_study"]).prepare_study,
            [store.uri],
            StorageConfig(),
            study,
            PreprocessConfig(),
            ("openai", "anthropic"),
        ).result(timeout=120)
        loaded = pool.submit(eval, "sorted(__import__('sys').modules)").result(timeout=60)
    assert images and not errors
    assert "tasks.reports.sr" in loaded and "tasks.imaging.preprocess" in loaded
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    assert not heavy, f"a pool worker imported {heavy[:8]}"


# imported when a run reads (the model SDKs), computes the kappa, evaluates or builds a
# dataset: never by importing the CLI or the screening flow. (highdicom stays with the flow:
# its package has import cycles that break when two threads import it at once.)
DEFERRED = ("openai", "anthropic", "sklearn", "matplotlib", "statsmodels")


@pytest.mark.e2e
def test_importing_the_cli_and_the_screening_flow_defers_the_heavy_modules():
    """A fresh interpreter imports ``flows.cli`` and ``flows.screen`` (what ``radflow screen``
    imports before its run starts) and lists what it loaded."""
    code = (
        "import sys, flows.cli; cli = sorted(sys.modules); import flows.screen; "
        "print(repr((cli, sorted(sys.modules))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, check=True, timeout=120
    )
    cli, flow = ast.literal_eval(out.stdout.decode().strip().splitlines()[-1])
    assert "typer" in cli and "prefect" in flow and "pydicom" in flow  # it did import them
    for name, loaded in (("flows.cli", cli), ("flows.screen", flow)):
        early = sorted({m.split(".")[0] for m in loaded} & set(DEFERRED))
        assert not early, f"importing {name} loaded {early}"
