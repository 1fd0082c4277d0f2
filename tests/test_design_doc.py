"""docs/design.md stays a true map of the code.

- its module table has one row per module of ``argo_signals/`` (and no row for a module that
  does not exist), and each row's imports column lists what that module imports from the package
  (read as a graph, without a cycle);
- every ``module.function`` / ``Class.method`` named in backticks in its trace sections and its
  table of the engine's shared state exists;
- every relative link points to an existing file.

The checkers work on a text (and a package folder), so each test also shows that they catch a
bad table, name or link.
"""
import ast
import graphlib
import re
import shutil
from pathlib import Path
from typing import Dict, List, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "design.md"
PKG = ROOT / "argo_signals"
PACKAGE = "argo_signals"

# Sections whose dotted names in backticks must exist.
CHECKED_SECTIONS = ("Trace", "Shared state of the engine")
# Dotted names in the traces that belong to the standard library, not to the package.
EXTERNAL = {"threading", "queue"}

_DOTTED = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+(?:\(\))?$")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


# -- reading the document ---------------------------------------------------------------------
def sections(text: str) -> Dict[str, str]:
    """Level-2 sections: heading text -> body."""
    out: Dict[str, str] = {}
    heading = None
    body: List[str] = []
    for line in text.splitlines():
        if line.startswith("## "):
            if heading is not None:
                out[heading] = "\n".join(body)
            heading, body = line[3:].strip(), []
        elif heading is not None:
            body.append(line)
    if heading is not None:
        out[heading] = "\n".join(body)
    return out


def module_rows(text: str) -> List[Tuple[List[str], List[str]]]:
    """The rows of the table in the "Modules" section: (modules named in the first cell,
    package modules named in the imports column)."""
    body = sections(text).get("Modules", "")
    rows = []
    for line in body.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "module" or set(cells[0]) <= set("-: "):
            continue   # header and separator
        names = re.findall(r"`([^`]+\.py)`", cells[0])
        imports = re.findall(r"`([^`]+)`", cells[2]) if len(cells) > 2 else []
        rows.append((names, imports))
    return rows


def trace_names(text: str) -> List[str]:
    """Dotted names in backticks in the traces and the engine's shared-state table."""
    names = []
    for heading, body in sections(text).items():
        if heading.startswith(CHECKED_SECTIONS):
            for span in re.findall(r"`([^`]+)`", body):
                if _DOTTED.match(span) and not span.endswith(".py"):   # a file name is a link's text
                    names.append(span[:-2] if span.endswith("()") else span)
    return names


# -- reading the package ----------------------------------------------------------------------
def package_modules(pkg: Path) -> Set[str]:
    return {p.stem for p in pkg.glob("*.py")}


def package_imports(pkg: Path, module: str) -> Set[str]:
    """Modules of the package that ``module`` imports, at module level or inside a function."""
    modules = package_modules(pkg)
    tree = ast.parse((pkg / f"{module}.py").read_text(encoding="utf-8"))
    found: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                target = node.module
            elif node.level == 0 and (node.module or "").split(".")[0] == PACKAGE:
                target = node.module[len(PACKAGE) + 1:] or None
            else:
                continue
            if target:
                found.add(target.split(".")[0])
            else:   # from . import a, b: submodules, or names of __init__
                for alias in node.names:
                    found.add(alias.name if alias.name in modules else "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE:
                    found.add(parts[1] if len(parts) > 1 else "__init__")
    found.discard(module)
    return found


def _targets(node: ast.AST) -> List[ast.AST]:
    if isinstance(node, (ast.Assign,)):
        return list(node.targets)
    if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        return [node.target]
    return []


def _flat(target: ast.AST) -> List[ast.AST]:
    if isinstance(target, (ast.Tuple, ast.List)):
        return [t for e in target.elts for t in _flat(e)]
    return [target]


class Index:
    """What the package defines: each module's top-level names, each top-level class's
    members (methods, class attributes, attributes set on ``self``, those of package bases)."""

    def __init__(self, pkg: Path) -> None:
        self.top: Dict[str, Set[str]] = {}
        self.classes: Dict[str, Dict[str, Set[str]]] = {}   # class -> module -> members
        bases: Dict[Tuple[str, str], List[str]] = {}
        for path in sorted(pkg.glob("*.py")):
            module = path.stem
            tree = ast.parse(path.read_text(encoding="utf-8"))
            names: Set[str] = set()
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(node.name)
                for target in _targets(node):
                    names.update(t.id for t in _flat(target) if isinstance(t, ast.Name))
                if isinstance(node, ast.ClassDef):
                    self.classes.setdefault(node.name, {})[module] = self._members(node)
                    bases[(node.name, module)] = [b.id for b in node.bases if isinstance(b, ast.Name)]
            self.top[module] = names
        for (cls, module), names in bases.items():   # members inherited from package classes
            for base in names:
                for members in self.classes.get(base, {}).values():
                    self.classes[cls][module] |= members

    @staticmethod
    def _members(cls: ast.ClassDef) -> Set[str]:
        out: Set[str] = set()
        for node in cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.add(node.name)
            for target in _targets(node):
                out.update(t.id for t in _flat(target) if isinstance(t, ast.Name))
        for node in ast.walk(cls):
            for target in _targets(node):
                for t in _flat(target):
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                        out.add(t.attr)
        return out

    def problem(self, name: str) -> str:
        """Why ``name`` names nothing in the package ("" when it does)."""
        head, *rest = name.split(".")
        if head == PACKAGE:
            head = "__init__"
        if head in self.top:
            if rest[0] not in self.top[head]:
                return f"{name}: {head}.py defines no {rest[0]}"
            if len(rest) == 1:
                return ""
            members = self.classes.get(rest[0], {}).get(head)
            if members is None:
                return f"{name}: {rest[0]} is not a class of {head}.py"
            return "" if rest[1] in members and len(rest) == 2 else f"{name}: {rest[0]} has no {'.'.join(rest[1:])}"
        if head in self.classes:
            homes = self.classes[head]
            if len(homes) > 1:
                return f"{name}: {head} is a class of several modules ({', '.join(sorted(homes))}): name the module"
            members = next(iter(homes.values()))
            if len(rest) == 1 and rest[0] in members:
                return ""
            return f"{name}: {head} ({next(iter(homes))}.py) has no {'.'.join(rest)}"
        if head in EXTERNAL:
            return ""
        return f"{name}: {head} is neither a module nor a class of the package"


# -- the checks ---------------------------------------------------------------------------------
def module_table_problems(text: str, pkg: Path) -> List[str]:
    problems = []
    modules = package_modules(pkg)
    seen: Dict[str, int] = {}
    for names, _ in module_rows(text):
        if len(names) != 1:
            problems.append(f"a row names {len(names)} modules ({', '.join(names) or 'none'}): one per row")
        for name in names:
            seen[name] = seen.get(name, 0) + 1
            if name[:-3] not in modules:
                problems.append(f"{name} has a row but there is no argo_signals/{name}")
    problems += [f"{name} has {n} rows" for name, n in seen.items() if n > 1]
    problems += [f"argo_signals/{m}.py has no row" for m in sorted(modules) if f"{m}.py" not in seen]
    return problems


def imports_column_problems(text: str, pkg: Path) -> List[str]:
    problems = []
    modules = package_modules(pkg)
    for names, imports in module_rows(text):
        if len(names) != 1 or names[0][:-3] not in modules:
            continue   # reported by module_table_problems
        module = names[0][:-3]
        listed, actual = set(imports), package_imports(pkg, module)
        if listed != actual:
            missing, extra = sorted(actual - listed), sorted(listed - actual)
            problems.append(f"{module}.py imports: the table misses {missing}, lists {extra} it does not import")
    return problems


def cycle_problems(text: str) -> List[str]:
    """The table's imports, read as a graph, have no cycle ("dependencies point one way")."""
    graph = {names[0][:-3]: set(imports) for names, imports in module_rows(text) if len(names) == 1}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return [f"import cycle: {' -> '.join(exc.args[1])}"]
    return []


def name_problems(text: str, pkg: Path) -> List[str]:
    index = Index(pkg)
    return [p for p in (index.problem(name) for name in trace_names(text)) if p]


def link_problems(text: str, doc_dir: Path) -> List[str]:
    problems = []
    for target in _LINK.findall(text):
        if "://" in target or target.startswith(("#", "mailto:")):
            continue
        path = target.split("#", 1)[0]
        if path and not (doc_dir / path).exists():
            problems.append(f"link to {target}: no such file")
    return problems


def class_index_problems(text: str, pkg: Path) -> List[str]:
    """Rows of the "where the classes live" table whose module does not define that class."""
    problems = []
    for cls, module in re.findall(r"^\| `(\w+)` \| \[`(\w+)\.py`\]", text, re.M):
        path = pkg / f"{module}.py"
        tree = ast.parse(path.read_text(encoding="utf-8")) if path.exists() else ast.Module(body=[], type_ignores=[])
        if not any(isinstance(n, ast.ClassDef) and n.name == cls for n in tree.body):
            problems.append(f"{cls}: {module}.py defines no such class")
    return problems


# -- the tests ---------------------------------------------------------------------------------
def test_every_module_has_one_row_and_every_row_an_existing_module():
    assert module_table_problems(DOC.read_text(encoding="utf-8"), PKG) == []


def test_the_module_table_check_catches_a_missing_row_an_unknown_module_and_a_new_file(tmp_path):
    text = DOC.read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| `writelock.py` |"))
    assert any("writelock.py has no row" in p for p in module_table_problems(text.replace(row + "\n", ""), PKG))
    bogus = text.replace(row, row + "\n| `nosuch.py` | nothing | — |")
    assert any("nosuch.py has a row" in p for p in module_table_problems(bogus, PKG))
    twice = text.replace("| `writelock.py` |", "| `writelock.py`, `spill.py` |")
    assert any("names 2 modules" in p for p in module_table_problems(twice, PKG))
    pkg = tmp_path / PACKAGE
    shutil.copytree(PKG, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "newpart.py").write_text('"""A module nobody wrote a row for."""\n')
    assert module_table_problems(text, pkg) == ["argo_signals/newpart.py has no row"]


def test_the_imports_column_is_what_each_module_imports_from_the_package():
    assert imports_column_problems(DOC.read_text(encoding="utf-8"), PKG) == []


def test_the_imports_check_catches_a_new_import_and_a_stale_one(tmp_path):
    text = DOC.read_text(encoding="utf-8")
    pkg = tmp_path / PACKAGE
    shutil.copytree(PKG, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    with open(pkg / "writelock.py", "a", encoding="utf-8") as f:
        f.write("\n\ndef _late() -> None:\n    from . import stats  # noqa: F401\n")
    assert imports_column_problems(text, pkg) == [
        "writelock.py imports: the table misses ['stats'], lists [] it does not import"]
    stale = with_import(text, "drain.py", "report")
    assert imports_column_problems(stale, PKG) == [
        "drain.py imports: the table misses [], lists ['report'] it does not import"]


def with_import(text: str, module: str, extra: str) -> str:
    """``text`` with ``extra`` added to the imports column of ``module``'s row."""
    row = next(line for line in text.splitlines() if line.startswith(f"| `{module}` |"))
    head, imports = row.rstrip(" |").rsplit("| ", 1)
    imports = f"`{extra}`" if imports.strip() == "—" else f"{imports.strip()}, `{extra}`"
    return text.replace(row, f"{head}| {imports} |")


def test_dependencies_point_one_way():
    text = DOC.read_text(encoding="utf-8")
    assert cycle_problems(text) == []
    looped = with_import(text, "record.py", "sink")
    assert len(cycle_problems(looped)) == 1 and "record" in cycle_problems(looped)[0]


def test_every_name_in_the_traces_exists():
    text = DOC.read_text(encoding="utf-8")
    names = trace_names(text)
    assert len(names) > 100   # both traces are there and name functions
    assert {"SignalTracker.log_signal", "Engine.put", "store.write_batch", "alpine.classify",
            "Outcomes.record", "Engine.close"} <= set(names)
    assert name_problems(text, PKG) == []


def test_the_name_check_catches_a_bad_name():
    good = DOC.read_text(encoding="utf-8")
    head = "## Trace: a test\n\n"
    assert name_problems(head + "`Engine.put`, `engine._oldest`, `argo_signals.log_signal`, `Engine._done`\n", PKG) == []
    bad = (head + "`Engine.no_such_method`, `engine.no_such_function`, `nosuch.thing()`, "
           "`record.SignalValidationError.nothing`, `State.OPEN`\n")
    assert name_problems(bad, PKG) == [
        "Engine.no_such_method: Engine (engine.py) has no no_such_method",
        "engine.no_such_function: engine.py defines no no_such_function",
        "nosuch.thing: nosuch is neither a module nor a class of the package",
        "record.SignalValidationError.nothing: SignalValidationError has no nothing",
        "State.OPEN: State is a class of several modules (breaker, engine): name the module",
    ]
    # a name outside the trace sections is not checked; inside one it is
    renamed = good.replace("`Engine._write_batch` claims", "`Engine._write_a_batch` claims")
    assert renamed != good
    assert name_problems(renamed, PKG) == ["Engine._write_a_batch: Engine (engine.py) has no _write_a_batch"]


def test_every_relative_link_points_to_an_existing_file():
    text = DOC.read_text(encoding="utf-8")
    assert len(_LINK.findall(text)) > 20
    assert link_problems(text, DOC.parent) == []


def test_the_link_check_catches_a_broken_link():
    text = "see [`engine.py`](../argo_signals/engine.py) and [ops](operations.md#spill), " \
           "[gone](../argo_signals/signal.py), [web](https://example.org/x)"
    assert link_problems(text, DOC.parent) == ["link to ../argo_signals/signal.py: no such file"]


def test_the_class_index_names_the_module_of_each_class():
    text = DOC.read_text(encoding="utf-8")
    assert len(re.findall(r"^\| `(\w+)` \| \[`(\w+)\.py`\]", text, re.M)) >= 15
    assert class_index_problems(text, PKG) == []
    wrong = text.replace("| `Gate` | [`ratelimit.py`]", "| `Gate` | [`breaker.py`]")
    assert class_index_problems(wrong, PKG) == ["Gate: breaker.py defines no such class"]
