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
