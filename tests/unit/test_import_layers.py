"""The package's import layers, read from the source (every import statement, lazy ones inside
functions included): nothing imports a layer above its own, no two modules import each other in a
circle, every module has a layer, and the layers a notebook or an exported model needs import
neither Lightning nor Hydra."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "mmpretrain"

#: Bottom first. A module belongs to the longest prefix listed; it may import its own layer and below.
LAYERS: list[tuple[str, ...]] = [
    (
        "mmpretrain.io",
        "mmpretrain.storage",
        "mmpretrain.config",
        "mmpretrain.runtime.distributed",
        "mmpretrain.runtime.allocator",
        "mmpretrain.sweeps",
    ),
    ("mmpretrain.pretrained", "mmpretrain.interop"),
    ("mmpretrain.towers",),
    ("mmpretrain.model", "mmpretrain.losses"),
    ("mmpretrain.data.stream",),
    ("mmpretrain.data.convert",),
    ("mmpretrain.data.synthetic",),
    ("mmpretrain.data",),
    ("mmpretrain.evaluation",),
    ("mmpretrain.export",),
    ("mmpretrain.runtime", "mmpretrain.training"),
    ("mmpretrain.finetune",),
    ("mmpretrain.runs",),
    ("mmpretrain.commands",),
    ("mmpretrain.cli", "mmpretrain"),
]
#: Layers that import neither Lightning nor Hydra (STYLE.md): everything up to and including export.
WITHOUT_LIGHTNING_OR_HYDRA = LAYERS.index(("mmpretrain.export",))
FRAMEWORKS = ("lightning", "pytorch_lightning", "hydra", "omegaconf")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "conf" not in p.relative_to(PACKAGE).parts}


def imports(path: Path, names: set[str]) -> set[str]:
    """Every module of ours that ``path`` imports (``from a import b`` counts ``a.b`` when that is a
    module), and every top-level third-party package, as written."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module
                for a in node.names
            }
    return found


def layer(name: str) -> int:
    best, rank = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{name} has no layer: add it to LAYERS in {__file__}"
    return rank


def graph() -> dict[str, set[str]]:
    names = set(modules())
    return {name: imports(path, names) for name, path in modules().items()}


def test_every_module_has_a_layer_and_imports_nothing_above_it():
    upward = []
    for name, imported in graph().items():
        for other in imported:
            if other.startswith("mmpretrain") and other != "mmpretrain" and layer(other) > layer(name):
                upward.append(f"{name} (layer {layer(name)}) imports {other} (layer {layer(other)})")
    assert not upward, "imports that run up the layers:\n" + "\n".join(sorted(upward))


def test_no_import_circle():
    edges = {
        name: {o for o in imported if o in graph_names and o != name}
        for name, imported in graph().items()
        for graph_names in [set(modules())]
    }
    # Parent packages are imported implicitly with their modules: an edge into a package's own
    # __init__ from inside it is no circle of ours, so only edges between modules are followed.
    edges = {a: {b for b in bs if not a.startswith(b + ".")} for a, bs in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_the_lower_layers_import_neither_lightning_nor_hydra():
    found = [
        f"{name} imports {other}"
        for name, imported in graph().items()
        if layer(name) <= WITHOUT_LIGHTNING_OR_HYDRA
        for other in imported
        if other.split(".")[0] in FRAMEWORKS
    ]
    assert not found, "\n".join(sorted(found))


def test_the_layer_table_names_only_what_exists():
    names = set(modules())
    for prefixes in LAYERS:
        for prefix in prefixes:
            assert any(n == prefix or n.startswith(prefix + ".") for n in names), prefix


def test_every_folder_says_what_lives_there_and_what_it_may_import():
    for init in PACKAGE.rglob("__init__.py"):
        if "conf" in init.relative_to(PACKAGE).parts:
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert doc, f"{init} has no docstring"
        if init.parent != PACKAGE and init.parent.parent == PACKAGE or init.parent.parent.name == "data":
            assert "import" in doc.lower(), f"{init}: say what the folder may import"
