"""The command line on hostile input and output: ingest lines it cannot parse, refused rows and
Ctrl-C; control characters headed for a terminal; full disks; tail's interval floor; database
paths with every awkward character."""
import json
import os
import pty
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from argo_signals import SignalTracker
from argo_signals.safetext import escape_controls
from argo_signals.testing import AlpineServer
from conftest import count, make_signal, wait_for
from test_cli import cli, seeded

BIN = Path(sys.executable).parent
ESC = "\x1b]0;owned\x07\x1b[2J"


def test_ingest_skips_lines_it_cannot_parse_and_says_so_by_line_number(db, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join([
        json.dumps(make_signal(1)).encode(),
        b"[" * 200_000,                               # too deep for any JSON parser
        b'{"symbol": "' + b"A" * (2 << 20) + b'"}',   # longer than a line may be
        b'{"symbol": "\xff"}',                         # not UTF-8
        b"[1, 2]",                                     # not an object
        json.dumps(make_signal(2)).encode(),
    ]) + b"\n")
    r = cli("ingest", src, "--db", db)
    assert r.exit_code == 1, r.stderr
    for n, what in ((2, "nested too deeply"), (3, "longer than"), (4, "not valid UTF-8"), (5, "not a JSON object")):
        assert f"line {n}: " in r.stderr and what in r.stderr, (n, r.stderr)
    assert "Traceback" not in r.stderr and count(db) == 2
    assert "4 bad lines" in r.stdout
    assert cli("ingest", src, "--db", db, "--allow-rejects").exit_code == 0


def test_ingest_exit_code_is_non_zero_when_rows_are_refused(db, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(make_signal(1, signal_id="same")) + "\n"
                   + json.dumps(make_signal(2, signal_id="same", symbol="OTHER")) + "\n")
    r = cli("ingest", src, "--db", db)
    assert r.exit_code == 1 and "1 rejected" in r.stdout
    assert "--allow-rejects" in r.stderr
    r = cli("ingest", src, "--db", db, "--allow-rejects")
    assert r.exit_code == 0 and "1 rejected" in r.stdout


def test_ctrl_c_during_ingest_says_what_was_committed(db):
    proc = subprocess.Popen([str(BIN / "argo-signals"), "ingest", "-", "--db", str(db), "--quiet"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for i in range(120):  # more than two batches: committed at once, no batch timeout to wait for
            proc.stdin.write(json.dumps(make_signal(i)) + "\n")
        proc.stdin.flush()
        assert wait_for(lambda: os.path.exists(db) and count(db) >= 100, timeout=30)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted: 120 rows committed" in err and "--dedupe" in err
    assert count(db) == 120


def read_until_closed(master):
    """Everything a pseudo-terminal's other side wrote until it was closed."""
    got = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:   # EIO: the other side is closed
            return got
        if not chunk:
            return got
        got += chunk


def in_a_terminal(*args):
    """Run the command with stdout on a pseudo-terminal; returns (exit code, what the terminal got)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(BIN / "argo-signals"), *map(str, args)], stdout=slave, stderr=slave)
    os.close(slave)
    got = read_until_closed(master)
    os.close(master)
    return proc.wait(30), got.decode("utf-8", "replace")


def test_control_characters_are_escaped_on_a_terminal_but_kept_in_a_file(db, tmp_path):
    with SignalTracker(db, register_atexit=False) as t:
        t.log_signal(make_signal(1, strategy="evil" + ESC))
    code, shown = in_a_terminal("export", "--db", db, "--format", "csv")
    assert code == 0 and "\x1b" not in shown and "\x07" not in shown and "\\x1b]0;owned" in shown
    out = tmp_path / "out.csv"
    assert cli("export", "--db", db, "--format", "csv", "-o", out).exit_code == 0
    assert ESC in out.read_text()
    src = tmp_path / "head.txt"
    src.write_text("symbol,action" + ESC + "\n")
    r = cli("ingest", src, "--db", db)
    assert r.exit_code == 1 and "looks like a CSV header" in r.stderr and "\x1b" not in r.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_write_errors_end_with_one_line_and_no_claim(db, tmp_path):
    seeded(db, 3)
    for args in (("export", "--db", db, "-o", "/dev/full"), ("export", "--db", db, "--format", "csv", "-o", "/dev/full")):
        r = subprocess.run([str(BIN / "argo-signals"), *map(str, args)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "Traceback" not in r.stderr and "exported" not in r.stderr, r.stderr
        assert "No space left on device" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with open("/dev/full", "w") as full:  # stdout itself on a full disk
        r = subprocess.run([str(BIN / "argo-signals"), "status", "--db", str(db)], stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("export", "--db", db, "-o", tmp_path)  # a directory
    assert r.exit_code != 0 and "Traceback" not in r.stderr and "exported" not in r.stderr


def test_tail_follow_has_a_floor_on_its_interval(db, monkeypatch):
    seeded(db, 1)
    waits = []

    def sleep(seconds):  # the poll's own wait, recorded; the third ends the follow like Ctrl-C
        waits.append(seconds)
        if len(waits) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr("argo_signals.cli.time.sleep", sleep)
    assert cli("tail", "--db", db, "-f", "--interval", 0).exit_code == 0
    assert len(waits) == 3 and min(waits) >= 0.1  # no busy loop


AWKWARD = "-a b#c?d%41é.db"


def test_every_command_works_on_a_path_with_awkward_characters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    decoy = tmp_path / "-a b"  # what the path would mean cut at '#'
    seeded(AWKWARD, 2)
    server = AlpineServer("k").start()
    try:
        r = cli("demo", "--db", AWKWARD, "--count", 20, "--quiet", "--json", "--alpine-url", server.url,
                env={"ARGO_API_KEY": "k"})
        assert r.exit_code == 0, r.stderr
        synced = json.loads(r.stdout)["sync"]
        assert synced["pending"] == 0 and synced["synced"] + synced["skipped"] == 20 and synced["synced"] > 0
        r = cli("sync", "--db", AWKWARD, "--alpine-url", server.url, "--quiet", env={"ARGO_API_KEY": "k"})
        assert r.exit_code == 0, r.stderr
    finally:
        server.stop()
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(make_signal(99)) + "\n")
    assert cli("ingest", src, "--db", AWKWARD).exit_code == 0
    assert json.loads(cli("status", "--db", AWKWARD, "--json").stdout)["signals"] == 23
    assert json.loads(cli("status", "--db", AWKWARD, "--json").stdout)["by_sync_status"]["pending"] == 1
    assert len(cli("export", "--db", AWKWARD).stdout.splitlines()) == 23
    assert len(cli("tail", "--db", AWKWARD, "-n", 5).stdout.splitlines()) == 6
    assert cli("verify", "--db", AWKWARD).exit_code == 0
    assert json.loads(cli("report", "--db", AWKWARD, "--json").stdout)["health"]["signals"] == 23
    assert cli("report", "--db", AWKWARD, "--out", "-r#1?.html").exit_code == 0
    assert (tmp_path / "-r#1?.html").exists() and not decoy.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".db")) == [AWKWARD]
    conn = sqlite3.connect(AWKWARD)
    assert conn.execute("SELECT count(*) FROM signals").fetchone()[0] == 23
    conn.close()


# What the commands show for stored text with characters a terminal would act on or that pass
# for other text: each one escaped, the same way in every command (safetext.escape_controls).
SHOWN = [("\t", "\\x09"), ("\x1b", "\\x1b"), ("\r", "\\x0d"), ("\u00a0", "\\xa0"), ("\u200e", "\\u200e"),
         ("\u2028", "\\u2028"), ("\u3000", "\\u3000"), ("\ue000", "\\ue000")]


@pytest.mark.parametrize("char,shown", SHOWN)
def test_escape_controls_shows_each_invisible_or_acting_character(char, shown):
    assert escape_controls(f"a{char}b") == f"a{shown}b"
    assert escape_controls(escape_controls(f"a{char}b")) == f"a{shown}b"   # escaping twice changes nothing


def test_tail_shows_each_such_character_escaped(db):
    seeded(db, 1)
    stored = "s" + "".join(char for char, _ in SHOWN) + "e"
    conn = sqlite3.connect(str(db))
    with conn:
        conn.execute("UPDATE signals SET strategy = ? WHERE id = 1", (stored,))
    conn.close()
    r = cli("tail", "--db", db)
    assert r.exit_code == 0
    assert "s" + "".join(shown for _, shown in SHOWN) + "e" in r.output
    assert r.output.isascii() and r.output.count("\n") == 2
    assert escape_controls(stored) == "s" + "".join(shown for _, shown in SHOWN) + "e"


@pytest.mark.parametrize("command", ["ingest", "demo"])
def test_the_progress_bar_on_a_terminal(db, tmp_path, command):
    """stderr on a terminal (no --quiet): the bar is drawn there, also for ingest's stream of
    unknown length, and the command ends as it does without one."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(make_signal(i)) + "\n" for i in range(20)))
    args = ["ingest", src] if command == "ingest" else ["demo", "-n", 20, "--no-sync"]
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(BIN / "argo-signals"), *map(str, args), "--db", str(db)],
                            stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    shown = read_until_closed(master)
    os.close(master)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, shown.decode(errors="replace")[-2000:]
    assert b"Traceback" not in shown and (b"ingesting" if command == "ingest" else b"logging") in shown
    assert count(db) == 20 and "20" in out
