"""The project's import graph, read from the source with `ast`: no circles, and each zone imports
only what its rule allows (issue 22). Every `import` and `from` counts, those inside functions
too (a lazy import is still an arrow), relative ones resolved against their package.

The zones are data, below: moving modules into zone packages edits only these tables."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "trainer")

# Zone -> its modules (a name covers its submodules: "pipeline.decode" is the whole package).
ZONES: dict[str, tuple[str, ...]] = {
    # records, schemas and the rules every consumer shares; imports nothing else of the project.
    "contract": (
        "pipeline.records",
        "pipeline.kinds",
        "pipeline.versions",
        "pipeline.handoff",
        "pipeline.taxonomy",
        "pipeline.render",
        "pipeline.text",
        "pipeline.recovery",
        "pipeline.dedup",
        "pipeline.seeds",
        "pipeline.prompting",
        "pipeline.card",
        "pipeline.tokenizing",
    ),
    # handed its stage list; imports no stage and no trainer.
    "engine": (
        "pipeline.dag",
        "pipeline.store",
        "pipeline.stage",
        "pipeline.env",
        "pipeline.config",
        "pipeline.overrides",
        "pipeline.digest",
        "pipeline.progress",
        "pipeline.errors",
        "pipeline.executor",
        "pipeline.executor_ray",
        "pipeline.retry",
        "pipeline.jsonl",
    ),
    # generation and decoding: generators, their KV caches, models, scorers, judges.
    "serving": (
        "pipeline.generator_base",
        "pipeline.backends",
        "pipeline.backend_openai",
        "pipeline.batching",
        "pipeline.decode",
        "pipeline.models",
        "pipeline.scorers",
        "pipeline.judges",
        "pipeline.agreement",
    ),
    "trainer": ("trainer",),
    "stages": ("stages",),
    # the top floor: the only room that knows every other.
    "cli": ("pipeline.cli", "pipeline.chat", "pipeline.show"),
}

# (from zone, to zone) pairs that must not occur; the contract's rule is checked on its own.
FORBIDDEN = (
    ("engine", "stages"),  # the engine is handed its stage modules
    ("engine", "trainer"),
    ("trainer", "serving"),  # the trainer builds on the contract, never on generation code
    ("serving", "trainer"),  # the decoder's privileged tokenisation is the contract's
    ("serving", "stages"),
    # the CLI is the top floor: nothing below imports it.
    ("engine", "cli"),
    ("serving", "cli"),
    ("stages", "cli"),
    ("trainer", "cli"),
)

# Module -> module arrows the rules allow anyway, each with why.
EXCEPTIONS = {
    # `train.model: embedded` resolves the shipped Gemma's folder (a lazy import in `resolve`).
    ("trainer.tokens", "pipeline.models"): "the embedded model's path",
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, set[str]]:
    """Module -> the project modules it imports, anywhere in the file."""
    files = {
        module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))
    }

    def project_module(dotted: str) -> str | None:
        # `from pipeline import records` names the module pipeline.records; `from
        # pipeline.records import row_id` names pipeline.records: the longest known prefix.
        while dotted and dotted not in files:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        named: list[str] = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                named += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    source = f"{base}.{node.module}" if node.module else base
                else:
                    source = node.module or ""
                named += [f"{source}.{alias.name}" for alias in node.names]
        found = {project_module(n) for n in named}
        graph[name] = {m for m in found if m and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def zone_of(module: str) -> str | None:
    for zone, members in ZONES.items():
        if any(module == m or module.startswith(f"{m}.") for m in members):
            return zone
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = import_graph(ROOT, PACKAGES)
    # The reader sees the project: a module-level and a function-level import of the engine.
    assert "pipeline.store" in found["pipeline.dag"]
    assert "pipeline.executor_ray" in found["pipeline.dag"]  # imported inside _ray_executor
    return found


def test_the_reader_counts_lazy_and_relative_imports_and_finds_a_circle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n")
    (pkg / "sub" / "c.py").write_text("from .b import f\n")
    graph = import_graph(tmp_path, ["pkg"])
    assert graph["pkg.sub.c"] == {"pkg.sub.b"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]


def test_the_project_has_no_import_circle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_every_module_has_a_zone(graph):
    assert [m for m in graph if zone_of(m) is None and m not in PACKAGES] == []


def test_the_contract_imports_only_the_contract(graph):
    arrows = [
        f"{m} -> {t}"
        for m in sorted(graph)
        if zone_of(m) == "contract"
        for t in sorted(graph[m])
        if zone_of(t) != "contract"
    ]
    assert arrows == []


@pytest.mark.parametrize(("source", "target"), FORBIDDEN, ids=[f"{s}->{t}" for s, t in FORBIDDEN])
def test_no_zone_imports_what_its_rule_forbids(graph, source, target):
    arrows = [
        f"{m} -> {t}"
        for m in sorted(graph)
        if zone_of(m) == source
        for t in sorted(graph[m])
        if zone_of(t) == target and (m, t) not in EXCEPTIONS
    ]
    assert arrows == []


def test_every_exception_is_still_needed(graph):
    assert [pair for pair in EXCEPTIONS if pair[1] not in graph.get(pair[0], set())] == []
