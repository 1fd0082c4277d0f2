"""docs/cli.md's reference is what the commands say about themselves (tools/cli_docs.py)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_tool():
    spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "tools" / "cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_cli_reference_is_up_to_date():
    tool = load_tool()
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert tool.current(text), "docs/cli.md has no generated reference: run `python tools/cli_docs.py`"
    assert tool.current(text) == tool.render(), \
        "docs/cli.md's generated reference differs from the commands: run `python tools/cli_docs.py`"


def test_the_reference_follows_a_changed_option(monkeypatch):
    """The comparison above can fail: a help text edited in a command shows in the rendering."""
    tool = load_tool()
    before = tool.render()
    option = next(p for p in tool.main.commands["tail"].params if p.name == "symbol")
    monkeypatch.setattr(option, "help", "Only rows of this ticker.")
    after = tool.render()
    assert before != after and "Only rows of this ticker." in after
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert tool.current(tool.updated(text)) == after and tool.current(text) != after


def test_the_tool_checks_without_writing(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "cli_docs.py"), "--check"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_updated_keeps_the_hand_written_text():
    tool = load_tool()
    text = "# title\n\nprose\n\n" + tool.BEGIN + "\nold\n" + tool.END + "\n\nafter\n"
    new = tool.updated(text)
    assert new.startswith("# title\n\nprose\n\n" + tool.BEGIN) and new.endswith(tool.END + "\n\nafter\n")
    assert "\nold\n" not in new and "### `argo-signals tail`" in new
