"""Imports between the top-level packages run one way: callbacks may use datamodules and
lightning_modules, but datamodules and lightning_modules never import callbacks or experiments, and
datamodules and lightning_modules do not import each other."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {
    "datamodules": set(),
    "lightning_modules": set(),
    "callbacks": {"datamodules", "lightning_modules"},
}
PACKAGES = {"callbacks", "datamodules", "lightning_modules", "experiments"}


def imported_packages(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module.split(".")[0]
        elif isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)


def test_imports_between_packages_run_one_way():
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((REPO / package).rglob("*.py")):
            for target in imported_packages(path):
                if target in PACKAGES and target != package and target not in allowed:
                    wrong.append(f"{path.relative_to(REPO)} imports {target}")
    assert not wrong, wrong


def module_name(path, root=REPO):
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path, modules):
    """The project modules ``path`` imports, at the top or inside a function: ``from a.b import c`` names the
    module a.b.c where that is one, else a.b."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                yield candidate if candidate in modules else node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def import_graph(root=REPO):
    paths = [p for package in PACKAGES for p in sorted((root / package).rglob("*.py"))]
    modules = {module_name(p, root): p for p in paths}
    return {name: sorted({m for m in project_imports(path, modules) if m in modules and m != name})
            for name, path in modules.items()}


def find_cycle(graph):
    """One import cycle as [a, b, ..., a], or None (depth-first search with a colour per module)."""
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in graph[module]:
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[module] = "done"
        stack.pop()
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_no_import_cycle_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_sees_a_cycle_through_a_function_level_import(tmp_path):
    package = tmp_path / "experiments"
    package.mkdir()
    (package / "a.py").write_text("from experiments.b import f\n")
    (package / "b.py").write_text("def f():\n    from experiments import a\n")
    graph = import_graph(tmp_path)
    assert find_cycle(graph) == ["experiments.a", "experiments.b", "experiments.a"]
