"""The package layout holds: each subpackage's `__init__` docstring names what it never imports, and no module
outside `demos/` imports from `demos/`.  The rules are read from the docstrings, so docs and code cannot drift."""

import ast
import re
from pathlib import Path

import pytest

import eightbit

ROOT = Path(eightbit.__file__).parent
SUBPACKAGES = ("graph", "calibration", "export", "runtime", "analysis", "demos", "integer", "qat")
_NEVER = re.compile(r"Never\s+((?:`[\w.]+`(?:,\s*|\s+or\s+))*`[\w.]+`)")


def imported_modules(source: str) -> set[str]:
    """Every `eightbit...` module a source file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "eightbit":
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from eightbit import api`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "eightbit")
    return found


def forbidden_for(package: str) -> set[str]:
    """The modules a subpackage's docstring says it never imports, as dotted `eightbit.` names."""
    doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text())) or ""
    match = _NEVER.search(doc)
    assert match, f"eightbit/{package}/__init__.py must say what it never imports ('Never `x`, `y` or `z`')"
    return {f"eightbit.{name}" for name in re.findall(r"`([\w.]+)`", match.group(1))}


def violations(source: str, forbidden: set[str]) -> list[str]:
    return sorted(m for m in imported_modules(source) if any(m == f or m.startswith(f + ".") for f in forbidden))


def _modules(under: Path):
    return sorted(p for p in under.rglob("*.py"))


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_subpackage_never_imports_what_its_docstring_forbids(package):
    forbidden = forbidden_for(package)
    assert forbidden, package
    bad = {str(p.relative_to(ROOT)): v for p in _modules(ROOT / package) if (v := violations(p.read_text(), forbidden))}
    assert not bad, f"imports that eightbit/{package}/__init__.py forbids: {bad}"


def test_nothing_outside_demos_imports_demos():
    outside = [p for p in _modules(ROOT) if "demos" not in p.relative_to(ROOT).parts]
    bad = {str(p.relative_to(ROOT)): v for p in outside if (v := violations(p.read_text(), {"eightbit.demos"}))}
    assert not bad, bad


def test_pure_leaf_modules():
    """qmath and fileio import nothing of eightbit; observers and methods only qmath and each other (config reads
    the method registry, so they must not import config)."""
    for name in ("qmath.py", "fileio.py"):
        assert not imported_modules((ROOT / name).read_text()), name
    allowed = ("eightbit.qmath", "eightbit.calibration.observers", "eightbit.calibration.methods")
    for name in ("observers.py", "methods.py"):
        found = imported_modules((ROOT / "calibration" / name).read_text()) - {"eightbit", "eightbit.calibration"}
        assert not violations_outside(found, allowed), name


def violations_outside(found: set[str], allowed: tuple[str, ...]) -> list[str]:
    return sorted(m for m in found if not any(m == a or m.startswith(a + ".") for a in allowed))


def test_checker_sees_function_level_and_from_package_imports():
    source = "\n".join(
        [
            "def f():",
            "    from eightbit.export import onnx",
            "    import eightbit.runtime.hw",
            "from eightbit import api",
        ]
    )
    assert violations(source, {"eightbit.export"}) == ["eightbit.export", "eightbit.export.onnx"]
    assert violations(source, {"eightbit.runtime"}) == ["eightbit.runtime.hw"]
    assert violations(source, {"eightbit.api"}) == ["eightbit.api"]
    assert violations(source, {"eightbit.graph"}) == []
    assert forbidden_for("graph") >= {"eightbit.calibration", "eightbit.export", "eightbit.demos"}
