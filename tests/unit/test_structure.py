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


def constants(path: Path) -> dict[str, object]:
    """Module-level names bound to a literal."""
    tree = ast.parse(path.read_text(), str(path))
    return {target.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant) for target in node.targets if isinstance(target, ast.Name)}


ROLE_MODULES = [p for p in modules("daemons/agents") + modules("daemons/aaa") if p.name != "application.py"]


def test_no_role_module_defines_a_diameter_application_or_command_code() -> None:
    found = [f"{path.relative_to(ROOT)}: {name}" for path in ROLE_MODULES for name, value in constants(path).items()
             if isinstance(value, int) and ("APPLICATION" in name or "COMMAND" in name or "CMD" in name)]
    assert not found, found


def test_nothing_above_the_path_api_names_a_backend() -> None:
    """Agents and AAA ask a backend's capabilities (daemons.vpn.path.Capability), never its name."""
    found = []
    for path in [*ROLE_MODULES, ROOT / "daemons/vpn/mavpn.py"]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare):
                literals = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if any(value in ("xfrm", "strongswan") for value in literals):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and \
                    any(isinstance(a, ast.Constant) and a.value in ("name", "wait_ready") for a in node.args):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} getattr")
    assert not found, found


def test_test_modules_have_unique_basenames() -> None:
    """pytest (rootdir-relative imports, no packages) refuses two test modules with one name and
    then collects nothing: the whole native tier stops."""
    seen: dict[str, str] = {}
    clashes = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        where = str(path.relative_to(ROOT))
        if path.name in seen:
            clashes.append(f"{seen[path.name]} and {where}")
        seen.setdefault(path.name, where)
    assert not clashes, clashes
