"""The package's modules import each other without a cycle and only downwards, layer by layer,
counting imports inside functions (not those under `if TYPE_CHECKING:`, which only name types for
annotations and never run)."""

from __future__ import annotations

import ast
from pathlib import Path

import fastcsm

ROOT = Path(fastcsm.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, modules: set[str], source: str | None = None) -> set[str]:
    """The fastcsm modules `path` names in any import statement, at any depth of the file
    (`source`: its text, if not read from the file)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            # `from . import protocol` needs the module; `from . import __version__` the package
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path (first node repeated at the end), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_among_fastcsm_modules():
    files = sorted(ROOT.rglob("*.py"))
    modules = {module_name(f) for f in files}
    graph = {module_name(f): imports(f, modules) for f in files}
    assert graph["fastcsm.server.cli"] and graph["fastcsm.cli"], "the walk sees imports"
    assert "fastcsm.server.cli" in graph["fastcsm.cli"], "function-level imports count"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The layers, bottom-up: a module imports its own layer's modules and those of lower floors only.
FLOORS = [
    {"base": ("fastcsm.audio", "fastcsm.bounds", "fastcsm.errors", "fastcsm.nested", "fastcsm.threads",
              "fastcsm.version")},
    {"model": ("fastcsm.model",)},
    {"codec": ("fastcsm.codec",)},
    {"engine": ("fastcsm.engine",), "listen": ("fastcsm.listen",)},
    {"speech": ("fastcsm.speech",)},
    {"assistant": ("fastcsm.assistant",), "generator": ("fastcsm.generator",),
     "testing": ("fastcsm.testing", "fastcsm.testing_llm")},
    {"server": ("fastcsm.server",)},
    {"integrations": ("fastcsm.integrations",), "bench": ("fastcsm.bench",)},
    {"commands": ("fastcsm.cli", "fastcsm.__main__", "fastcsm")},
]


def layer_of(module: str) -> tuple[int, str]:
    """(floor, layer) of `module`: the layer whose longest prefix names it."""
    found = [(len(prefix), floor, layer) for floor, layers in enumerate(FLOORS) for layer, prefixes in layers.items()
             for prefix in prefixes if module == prefix or module.startswith(prefix + ".")]
    assert found, f"{module} belongs to no layer: add it to FLOORS"
    _, floor, layer = max(found)
    return floor, layer


def test_layers_import_only_downwards():
    files = sorted(ROOT.rglob("*.py"))
    modules = {module_name(f) for f in files}
    upward = []
    for f in files:
        name = module_name(f)
        floor, layer = layer_of(name)
        for target in imports(f, modules):
            to_floor, to_layer = layer_of(target)
            if to_layer != layer and to_floor >= floor:
                upward.append(f"{name} ({layer}) -> {target} ({to_layer})")
    assert upward == [], "imports that run up or sideways:\n" + "\n".join(upward)
    assert len(FLOORS) <= 9


def test_the_core_layers_know_nothing_of_serving():
    files = sorted(ROOT.rglob("*.py"))
    modules = {module_name(f) for f in files}
    core = ("model", "codec", "engine", "speech", "listen", "assistant")
    for f in files:
        if layer_of(module_name(f))[1] in core:
            served = {t for t in imports(f, modules) if t.startswith(("fastcsm.server", "fastcsm.integrations"))}
            assert not served, f"{module_name(f)} imports {served}"


def test_type_only_imports_are_not_counted():
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fastcsm.server.conversation import X\n"
    path = ROOT / "server" / "_typing_probe.py"  # named only: the text is given, nothing is written
    assert imports(path, {"fastcsm.server.conversation"}, source) == set()
    source = source.replace("if TYPE_CHECKING:\n    ", "")
    assert imports(path, {"fastcsm.server.conversation"}, source) == {"fastcsm.server.conversation"}


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
