"""The layering the code promises (docs/architecture.md), checked on the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import in a file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = parts[:-node.level]
                base = ".".join([*anchor, base] if base else anchor)
            out.append((base, [alias.name for alias in node.names], node.lineno))
    return out


def test_the_lab_imports_nothing_from_the_daemons() -> None:
    found = [f"{path.relative_to(ROOT)}:{line} imports {module}"
             for path in modules("lab") for module, _, line in imports(path)
             if module == "daemons" or module.startswith("daemons.")]
    assert not found, found


def test_no_module_imports_a_private_name_of_another_package() -> None:
    found = []
    for package in ("daemons", "lab"):
        for path in modules(package):
            own = ".".join(path.relative_to(ROOT).parts[:-1])
            for module, names, line in imports(path):
                if not module.startswith(("daemons", "lab")):
                    continue
                source_package = module if (ROOT / module.replace(".", "/")).is_dir() else module.rpartition(".")[0]
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                private += [p for p in module.split(".") if p.startswith("_") and not p.startswith("__")]
                if private and source_package != own:
                    found.append(f"{path.relative_to(ROOT)}:{line} imports {', '.join(private)} from {module}")
    assert not found, found
