"""Only the command line knows click: the library takes typed arguments and raises UserError, so it can be called
from components, notebooks and tests without a click context."""

from __future__ import annotations

import ast
from pathlib import Path

import rlhf_pipeline

PACKAGE = Path(rlhf_pipeline.__file__).parent
CLI = PACKAGE / "cli"


def imported_modules(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):  # walk, so an import inside a function counts too
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_module_outside_the_cli_imports_click():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if CLI in path.parents:
            continue
        modules = imported_modules(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        if any(m == "click" or m.startswith("click.") for m in modules):
            offenders.append(str(path.relative_to(PACKAGE.parent)))
    assert offenders == [], f"click imported outside rlhf_pipeline/cli: {offenders}"


def test_the_check_sees_imports_inside_functions():
    tree = ast.parse("def f():\n    from click.testing import CliRunner\n")
    assert "click.testing" in imported_modules(tree)
