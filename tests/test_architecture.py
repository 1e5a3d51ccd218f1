"""Architecture rules, read statically from the source (every import at any depth, those inside functions too):
the library stays free of the orchestration stack, ``pipeline/`` has no import circle, its layers import only
downwards, stages stay independent of each other, and no module reaches into another's private names.

Each rule also runs on a tiny synthetic tree that breaks it, so a checker that silently finds nothing fails here.
docs/architecture.md describes the layers.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Layers of pipeline/, lowest first: a module may import its own layer and lower ones, never a higher one. A prefix
# names a module and everything below it (``pipeline.report`` is pipeline/report.py or pipeline/report/**).
# Every module of pipeline/ but its __init__ falls under one (test_every_module_has_a_layer).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        (
            "pipeline.config",
            "pipeline.errors",
            "pipeline.names",
            "pipeline.models",
            "pipeline.runtime",
            "pipeline.data",
            "pipeline.tracking",
            "pipeline.progress",
        ),
    ),
    ("stages", ("pipeline.stages", "pipeline.report")),
    ("composition", ("pipeline.job",)),
    ("entry points", ("pipeline.commands", "pipeline.cli")),
]
STAGES = "pipeline.stages"  # each pipeline.stages.<name> (package or module) is one stage
LIBRARY = "dcpnas"
LIBRARY_MUST_NOT_IMPORT = ("ray", "mlflow", "deepspeed", "pipeline")
PACKAGES = ("dcpnas", "pipeline", "tests")
SOURCE = ("dcpnas", "pipeline")  # where the private-name rule applies; tests are left free to test private helpers


@dataclass(frozen=True)
class Import:
    """``source`` uses ``target`` (a module; a repo submodule where ``from x import y`` names one), taking
    ``name`` from it (``from x import name``, ``x.name``) or, for ``import x``, the module itself."""

    source: str
    target: str
    name: str | None
    where: str


def in_prefix(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def is_private(name: str | None) -> bool:
    return name is not None and name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@cache
def modules(root: Path) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


@cache
def imports(root: Path) -> tuple[Import, ...]:
    """Every import and every private attribute use through an imported module, in every module under PACKAGES."""
    mods = modules(root)
    found: list[Import] = []
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        tree, rel = ast.parse(path.read_text(), str(path)), path.relative_to(root)
        aliases: dict[str, str] = {}  # local name -> module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    found.append(Import(mod, a.name, None, f"{rel}:{node.lineno}"))
                    local = a.asname or a.name.partition(".")[0]
                    aliases[local] = a.name if a.asname else local
            elif isinstance(node, ast.ImportFrom):
                up = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                base = ".".join([*up, *([node.module] if node.module else [])])
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    found.append(Import(mod, sub if sub in mods else base, a.name, f"{rel}:{node.lineno}"))
                    if sub in mods:
                        aliases[a.asname or a.name] = sub
        for node in ast.walk(tree):  # second pass: aliases bound in functions count for the whole module
            if isinstance(node, ast.Attribute) and is_private(node.attr) and (owner := dotted(node.value, aliases)):
                found.append(Import(mod, owner, node.attr, f"{rel}:{node.lineno}"))
    return tuple(found)


def dotted(node: ast.expr, aliases: dict[str, str]) -> str | None:
    """The module path an attribute chain spells (``pipeline.x`` from ``import pipeline.x``), if it starts at a
    name bound by an import."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute) and (head := dotted(node.value, aliases)):
        return f"{head}.{node.attr}"
    return None


def layer(module: str) -> int | None:
    return next((i for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes if in_prefix(module, p)), None)


def stage(module: str) -> str | None:
    return module.split(".")[2] if in_prefix(module, STAGES) and module != STAGES else None


# ---- rules: each returns its violations, empty when the rule holds ------------------------------------------------


def library_violations(root: Path) -> list[str]:
    return [
        f"{i.where}: {i.source} imports {i.target}"
        for i in imports(root)
        if in_prefix(i.source, LIBRARY) and any(in_prefix(i.target, m) for m in LIBRARY_MUST_NOT_IMPORT)
    ]


def circles(root: Path) -> list[str]:
    """Groups of pipeline modules that import each other through some chain (strongly connected components)."""
    graph: dict[str, set[str]] = {}
    for i in imports(root):
        if in_prefix(i.source, "pipeline") and in_prefix(i.target, "pipeline") and i.source != i.target:
            graph.setdefault(i.source, set()).add(i.target)
    reach = {m: reachable(graph, m) for m in graph}
    groups = {frozenset({m, *(n for n in reach[m] if m in reach.get(n, ()))}) for m in graph}
    return sorted(" <-> ".join(sorted(g)) for g in groups if len(g) > 1)


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for n in graph.get(todo.pop(), ()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def private_violations(root: Path) -> list[str]:
    return [
        f"{i.where}: {i.source} takes {i.name} from {i.target}"
        for i in imports(root)
        if is_private(i.name)
        and i.target in modules(root)
        and i.target != i.source
        and any(in_prefix(i.source, p) for p in SOURCE)
    ]


def layer_violations(root: Path) -> list[str]:
    bad = []
    for i in imports(root):
        src, dst = layer(i.source), layer(i.target)
        if src is not None and dst is not None and dst > src:
            bad.append(f"{i.where}: {i.source} ({LAYERS[src][0]}) imports {i.target} ({LAYERS[dst][0]})")
        if stage(i.source) and stage(i.target) and stage(i.source) != stage(i.target):
            bad.append(f"{i.where}: stage {stage(i.source)} imports stage {stage(i.target)} ({i.target})")
    return bad


def cross_test_imports(root: Path) -> list[str]:
    """Test modules share helpers through conftest fixtures, never by importing each other."""
    return [
        f"{i.where}: {i.source} imports {i.target}"
        for i in imports(root)
        if in_prefix(i.source, "tests") and i.target.partition(".")[0].startswith("test_")
    ]


# ---- the tests ------------------------------------------------------------------------------------------------------


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_library_imports_no_orchestration_stack(tmp_path: Path) -> None:
    assert library_violations(ROOT) == []
    tree = write_tree(
        tmp_path,
        {
            "dcpnas/__init__.py": "",
            "dcpnas/a.py": "import torch\n\ndef f():\n    import ray.train\n",
            "dcpnas/b.py": "from mlflow.tracking import MlflowClient\nfrom deepspeed import ops\n",
        },
    )
    assert library_violations(tree) == [
        "dcpnas/a.py:4: dcpnas.a imports ray.train",
        "dcpnas/b.py:1: dcpnas.b imports mlflow.tracking",
        "dcpnas/b.py:2: dcpnas.b imports deepspeed",
    ]


def test_pipeline_has_no_import_circle(tmp_path: Path) -> None:
    assert circles(ROOT) == []
    tree = write_tree(
        tmp_path,
        {
            "pipeline/__init__.py": "",
            "pipeline/a.py": "import pipeline.b\n",
            "pipeline/b.py": "def f():\n    from pipeline.data import c\n",
            "pipeline/data/__init__.py": "",
            "pipeline/data/c.py": "from ..a import x\nfrom pipeline import d\n",
            "pipeline/d.py": "from pipeline.a import y\n",
            "pipeline/e.py": "import pipeline.a\n",  # imports the circle, is not in it
        },
    )
    assert circles(tree) == ["pipeline.a <-> pipeline.b <-> pipeline.d <-> pipeline.data.c"]


def test_no_module_takes_private_names_from_another(tmp_path: Path) -> None:
    assert private_violations(ROOT) == []
    tree = write_tree(
        tmp_path,
        {
            "pipeline/__init__.py": "",
            "pipeline/x.py": "_y = 1\n__all__ = []\nprint(_y)\n",
            "pipeline/u.py": "from pipeline.x import _y, __all__\n",
            "pipeline/v.py": "import pipeline.x\n\ndef f():\n    return pipeline.x._y\n",
            "dcpnas/__init__.py": "",
            "dcpnas/w.py": "from pipeline import x as m\nimport os\nm._y, os._exit, self._z\n",
        },
    )
    assert private_violations(tree) == [
        "dcpnas/w.py:3: dcpnas.w takes _y from pipeline.x",
        "pipeline/u.py:1: pipeline.u takes _y from pipeline.x",
        "pipeline/v.py:4: pipeline.v takes _y from pipeline.x",
    ]


def test_layers_import_downwards_and_stages_not_each_other(tmp_path: Path) -> None:
    assert layer_violations(ROOT) == []
    tree = write_tree(
        tmp_path,
        {
            "pipeline/__init__.py": "",
            "pipeline/config.py": "def f():\n    from pipeline.stages.search import run\n",
            "pipeline/stages/__init__.py": "",
            "pipeline/stages/search/__init__.py": "",
            "pipeline/stages/search/run.py": "from pipeline.stages.search import util\nfrom pipeline import config\n",
            "pipeline/stages/retrain.py": "from pipeline.stages.search.run import go\nimport pipeline.report\n",
            "pipeline/report.py": "import pipeline.cli\n",
            "pipeline/cli.py": "from pipeline.stages import retrain\n",
        },
    )
    assert sorted(layer_violations(tree)) == [
        "pipeline/config.py:2: pipeline.config (foundation) imports pipeline.stages.search.run (stages)",
        "pipeline/report.py:1: pipeline.report (stages) imports pipeline.cli (entry points)",
        "pipeline/stages/retrain.py:1: stage retrain imports stage search (pipeline.stages.search.run)",
    ]


def test_no_test_module_imports_another(tmp_path: Path) -> None:
    assert cross_test_imports(ROOT) == []
    tree = write_tree(tmp_path, {"tests/test_a.py": "from test_b import fixture\nfrom conftest_data import x\n"})
    assert cross_test_imports(tree) == ["tests/test_a.py:1: tests.test_a imports test_b"]


def test_metric_names_agree_with_the_library() -> None:
    """``pipeline.names`` spells the search metrics for processes that never import torch; they must be the
    names ``dcpnas.search`` logs under, or selection and the report read nothing."""
    import dcpnas.search as search
    from pipeline import names

    for name in ("PARENT_VAL_ACC", "CHILD_VAL_ACC", "ALPHA_ENTROPY", "SKIP_NORMAL"):
        assert getattr(names, name) == getattr(search, name), name


def test_every_module_has_a_layer() -> None:
    """A new module outside every layer would escape the layer rule: each one must be placed in LAYERS."""
    loose = [m for m in modules(ROOT) if in_prefix(m, "pipeline") and m != "pipeline" and layer(m) is None]
    assert loose == []
