"""The package as installed: declared dependencies, the public namespace, one home per rule."""
import ast
import configparser
import importlib.util
import sys
import sysconfig
import types
from pathlib import Path

import argo_signals
from argo_signals.stats import percentile

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "argo_signals").glob("*.py"))


def _trees():
    return {p.name: ast.parse(p.read_text()) for p in SOURCES}


def _is_stdlib(name):
    if name in sys.builtin_module_names:
        return True
    spec = importlib.util.find_spec(name)
    origin = getattr(spec, "origin", None) or ""
    paths = sysconfig.get_paths()
    return origin in ("built-in", "frozen") or origin.startswith((paths["stdlib"], paths["platstdlib"]))


def test_every_third_party_import_is_declared():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    declared = set()
    for section in ("install_requires",):
        for line in cfg["options"][section].split("\n"):
            if line.strip():
                declared.add(line.strip().split(">")[0].split("=")[0].split("<")[0].strip().lower())
    optional = {"matplotlib": "report", "prometheus_client": "prometheus"}  # module: its extra
    for module, extra in optional.items():
        assert module.replace("_", "-") in cfg["options.extras_require"][extra], extra
    imported = set()
    for tree in _trees().values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if not _is_stdlib(m)} - set(optional)
    assert {m.replace("_", "-") for m in third_party} <= declared, third_party
    assert "click" in declared


def test_public_namespace_is_all_and_submodules():
    extra = [n for n in dir(argo_signals) if not n.startswith("_") and n not in argo_signals.__all__
             and not isinstance(getattr(argo_signals, n), types.ModuleType)]
    assert extra == []
    assert all(hasattr(argo_signals, n) for n in argo_signals.__all__)
    assert callable(argo_signals.stats)  # the function, not the argo_signals.stats module


def test_percentile_nearest_rank():
    assert percentile([], 0.5) is None
    assert percentile([1.0], 0.99) == 1.0
    assert percentile([1.0, 2.0, 3.0], 0.5) == 2.0
    values = [float(i) for i in range(101)]
    assert (percentile(values, 0.0), percentile(values, 0.99), percentile(values, 1.0)) == (0.0, 99.0, 100.0)


def _defined_functions(tree):
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_one_home_for_percentile_and_reserved_columns():
    trees = _trees()
    homes = [name for name, tree in trees.items()
             if any("pct" in f.lower() or "percentile" in f.lower() for f in _defined_functions(tree))]
    assert homes == ["stats.py"]
    reserved = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Tuple, ast.Set, ast.List)):
                consts = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                if {"verification_hash", "sync_claim_until"} <= consts:
                    reserved.append(name)
    assert reserved == ["record.py"]


def test_only_lifecycle_registers_fork_hooks():
    """``lifecycle`` is the one owner of process events: other modules go through
    ``lifecycle.after_fork_in_child`` (or ``guard_fork``/``watch``)."""
    callers = sorted(name for name, tree in _trees().items()
                     if any(isinstance(n, ast.Attribute) and n.attr == "register_at_fork" for n in ast.walk(tree)))
    assert callers == ["lifecycle.py"]


def _private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_uses(tree):
    """``from .x import _y`` and ``m._y`` where ``m`` names a module of the package, as text."""
    modules = {p.stem for p in SOURCES}
    bound = set()   # names this module binds to a module of the package
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("argo_signals")):
            package_itself = node.module in (None, "argo_signals")
            for alias in node.names:
                if package_itself and alias.name in modules:
                    bound.add(alias.asname or alias.name)
                elif _private(alias.name):
                    found.append(f"from {'.' * node.level}{node.module or ''} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("argo_signals.") and alias.asname:
                    bound.add(alias.asname)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in bound and _private(node.attr)):
            found.append(f"{node.value.id}.{node.attr}")
    return sorted(set(found))


def test_no_private_name_is_used_across_modules():
    """A module's private names are its own: no other module of the package imports them
    (``from .x import _y``) or reaches them (``x._y``)."""
    used = {name: _private_uses(tree) for name, tree in _trees().items()}
    assert {name: uses for name, uses in used.items() if uses} == {}


def test_the_private_name_check_sees_both_forms():
    tree = ast.parse("from . import spill, store as _store\nfrom .record import _reseed_ids, FIELDS\n"
                     "x = spill._thread_lock\ny = _store.connect\nz = _store._patiently\nw = self._pid\n")
    assert _private_uses(tree) == ["_store._patiently", "from .record import _reseed_ids", "spill._thread_lock"]


def test_the_test_command_type_checks_the_package():
    """README's test command (which .ci/run runs verbatim: test_docs) ends with mypy, installed
    by the test extra and set up in setup.cfg, so a type error fails it as a failing test does."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["mypy"].getboolean("check_untyped_defs")
    extra = [line.strip().split(">")[0].split("=")[0].split("<")[0].strip()
             for line in cfg["options.extras_require"]["test"].split("\n") if line.strip()]
    assert "mypy" in extra
    readme = (ROOT / "README.md").read_text()
    command = [line for line in readme.splitlines() if line.startswith("python3 -m venv") and "pytest" in line]
    assert len(command) == 1
    steps = [step.strip() for step in command[0].split("&&")]
    assert steps[-2].startswith(".venv/bin/python -m pytest ") and steps[-1] == ".venv/bin/mypy argo_signals"
