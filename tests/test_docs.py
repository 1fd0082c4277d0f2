"""The examples in docs/ run as written."""
import doctest
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize("name", ["api.md"])
def test_doc_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = doctest.testfile(str(DOCS / name), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_readme_quick_start_runs(tmp_path, monkeypatch):
    readme = (DOCS.parent / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ARGO_SIGNALS_DB", str(tmp_path / "default.db"))
    import argo_signals
    exec(compile(code, "README.md", "exec"), {})
    assert argo_signals.close(5)
    import sqlite3
    assert sqlite3.connect(tmp_path / "signals.db").execute("SELECT order_id FROM signals").fetchall() == [("X-1",)]
    assert sqlite3.connect(tmp_path / "default.db").execute("SELECT count(*) FROM signals").fetchone() == (1,)


def test_ci_runs_exactly_the_readme_test_command():
    readme = (DOCS.parent / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2 and commands[0].endswith("argo-signals demo")
    ci = (DOCS.parent / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci
