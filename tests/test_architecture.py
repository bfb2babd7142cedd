"""docs/architecture.md is kept true by the code.

The map names every top-level module and subpackage of ``sksegcal`` once, with
what it may import from the rest of the package. This test reads the map,
parses every source file (lazy imports inside functions included) and fails
when a unit is missing from the map, the map names a unit that does not exist,
or a unit imports one it may not.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sksegcal"
MAP = ROOT / "docs" / "architecture.md"

# names the package root defines itself (not units): importing them is always allowed
_ROOT_NAMES = {"__version__"}


def _units() -> set[str]:
    found = set()
    for p in PACKAGE.iterdir():
        if p.name.startswith("__") or p.name.startswith("."):
            continue
        if p.is_dir() and (p / "__init__.py").is_file():
            found.add(p.name)
        elif p.suffix == ".py":
            found.add(p.stem)
    return found


def _read_map() -> dict[str, set[str]]:
    """unit -> the units it may import, from the map's headings and 'May import:' lines."""
    text = MAP.read_text()
    rules: dict[str, set[str]] = {}
    current = None
    for line in text.splitlines():
        heading = re.match(r"^#{2,4} `sksegcal\.([A-Za-z_][\w]*)`", line)
        if heading:
            current = heading.group(1)
            assert current not in rules, f"{current} appears twice in {MAP.name}"
            rules[current] = None
            continue
        allowed = re.match(r"^\*?\*?May import:?\*?\*?:?\s*(.*)$", line)
        if allowed and current is not None:
            names = set(re.findall(r"`([A-Za-z_]\w*)`", allowed.group(1)))
            rules[current] = names
    missing_rule = [u for u, r in rules.items() if r is None]
    assert not missing_rule, f"units without a 'May import:' line in {MAP.name}: {missing_rule}"
    return rules


def _imports_of(path: Path, unit: str, module: list[str] | None = None) -> set[str]:
    """The other units ``path`` imports (absolute or relative, at any depth).

    ``module``: the file's dotted name as parts (default: from its place in the repo).
    """
    if module is None:
        module = list(path.relative_to(ROOT).with_suffix("").parts)
    package = module[:-1]  # a module's package; for __init__ the package itself
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                full = base + (node.module.split(".") if node.module else [])
            else:
                full = (node.module or "").split(".")
            if not full or full[0] != "sksegcal":
                continue
            targets = [a.name for a in node.names] if len(full) == 1 else [full[1]]
        elif isinstance(node, ast.Import):
            targets = [
                a.name.split(".")[1]
                for a in node.names
                if a.name.startswith("sksegcal.") and a.name.count(".") >= 1
            ]
        else:
            continue
        found |= {t for t in targets if t != unit and t not in _ROOT_NAMES}
    return found


def test_the_map_names_every_unit_and_only_those():
    rules = _read_map()
    units = _units()
    assert sorted(units - set(rules)) == [], f"units missing from {MAP.name}"
    assert sorted(set(rules) - units) == [], f"{MAP.name} names units that do not exist"


def _unit_files():
    for unit in sorted(_units()):
        target = PACKAGE / unit
        files = sorted(target.rglob("*.py")) if target.is_dir() else [PACKAGE / f"{unit}.py"]
        yield unit, files


_UNIT_FILES = list(_unit_files())


@pytest.mark.parametrize("unit,files", _UNIT_FILES, ids=[u for u, _ in _UNIT_FILES])
def test_each_unit_imports_only_what_the_map_allows(unit, files):
    rules = _read_map()
    allowed = rules.get(unit, set())
    broken = {}
    for path in files:
        extra = _imports_of(path, unit) - allowed
        if extra:
            broken[str(path.relative_to(ROOT))] = sorted(extra)
    assert not broken, f"{unit} may import {sorted(allowed)} ({MAP.name}), but: {broken}"


def test_the_import_parser_sees_relative_lazy_and_absolute_imports(tmp_path):
    # the parser is what makes the rule bite: check it on files of known imports
    top = tmp_path / "unit.py"  # as if sksegcal/unit.py
    top.write_text(
        "import numpy\nfrom . import features\nfrom .metrics import x\n"
        "def f():\n    from sksegcal.pixels import y\n    import sksegcal.plotting\n"
    )
    found = _imports_of(top, "unit", module=["sksegcal", "unit"])
    assert found == {"features", "metrics", "pixels", "plotting"}
    nested = tmp_path / "mod.py"  # as if sksegcal/unit/mod.py
    nested.write_text(
        "from . import _helper\nfrom ._other import z\nfrom .. import store\n"
        "from ..persistence import load\nfrom .. import __version__\n"
    )
    found = _imports_of(nested, "unit", module=["sksegcal", "unit", "mod"])
    assert found == {"store", "persistence"}


@pytest.mark.parametrize("unit,files", _UNIT_FILES, ids=[u for u, _ in _UNIT_FILES])
def test_each_allowance_of_the_map_is_used(unit, files):
    # an allowance nothing uses is a map that has drifted from the code
    allowed = _read_map().get(unit, set())
    used = set().union(*(_imports_of(path, unit) for path in files))
    assert sorted(allowed - used) == [], f"{MAP.name} lets {unit} import units it never imports"


def test_every_public_submodule_is_an_attribute_of_the_package():
    import importlib

    import sksegcal

    public = {u for u in _units() if not u.startswith("_")}
    assert public <= set(sksegcal.__all__)
    for name in ("conformal", "local_scaling", "store", "context"):
        assert getattr(sksegcal, name) is importlib.import_module(f"sksegcal.{name}")
