"""Claim owners and their liveness (argo_signals/owner.py), on their own, with real processes.

A token: ``argo1|<host>|<boot id>|<pid namespace>|<pid>|<process start>|<random>``.
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from argo_signals import owner


def proc_stat(pid):
    """(state, start time) of ``pid`` from /proc/<pid>/stat, read independently of the module."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], fields[19]


def token_for(pid, start, **over):
    """A token of this host, boot and pid namespace naming ``pid`` (fields replaced by ``over``)."""
    parts = dict(zip(("prefix", "host", "boot", "pidns", "pid", "start", "random"), owner.new_token().split("|")))
    owner.forget("|".join(parts.values()))
    parts.update(pid=str(pid), start=start, **over)
    return "|".join(parts.values())


def wait_state(pid, state, timeout=15.0):
    deadline = time.monotonic() + timeout
    while proc_stat(pid)[0] != state:
        assert time.monotonic() < deadline, f"pid {pid} never reached state {state}"
        time.sleep(0.005)


@pytest.fixture
def child():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def test_a_token_names_this_process_and_is_unique():
    a, b = owner.new_token(), owner.new_token()
    try:
        parts = a.split("|")
        assert len(parts) == 7 and parts[0] == "argo1"
        assert parts[2] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        assert parts[3] == os.readlink("/proc/self/ns/pid")
        assert parts[4] == str(os.getpid())
        assert parts[5] == proc_stat(os.getpid())[1]
        assert a != b and a.split("|")[:6] == b.split("|")[:6]   # one owner, two syncers
    finally:
        owner.forget(a)
        owner.forget(b)


def test_this_process_is_alive_for_each_of_its_syncers_until_it_stops():
    a, b = owner.new_token(), owner.new_token()
    live = owner.Liveness()
    assert live.owner_alive(a) is True and live.owner_alive(b) is True
    owner.forget(a)
    assert live.owner_alive(a) is False and live.owner_alive(b) is True   # one stopped, not the other
    owner.forget(b)
    assert live.owner_alive(b) is False
    # a token naming this pid that no syncer of this process made (an earlier process that had
    # this pid, before it was reused)
    assert live.owner_alive(token_for(os.getpid(), proc_stat(os.getpid())[1])) is False


def test_a_live_process_is_alive_and_its_claim_is_not_taken_however_old_the_lease(child):
    token = token_for(child.pid, proc_stat(child.pid)[1])
    live = owner.Liveness()
    assert live.owner_alive(token) is True
    assert live.may_take(token, claim_until=0.0, now=time.time() + 10 * 365 * 86400) is False
    assert live.may_take(token, claim_until=None, now=time.time()) is False


def test_a_reaped_child_is_dead_and_its_claim_is_free_at_once():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    start = proc_stat(proc.pid)[1]
    token = token_for(proc.pid, start)
    proc.wait(10)
    assert not Path(f"/proc/{proc.pid}").exists()
    live = owner.Liveness()
    assert live.owner_alive(token) is False
    assert live.may_take(token, claim_until=time.time() + 3600, now=time.time()) is True


def test_a_child_that_exited_and_was_not_reaped_yet_counts_as_dead():
    # (the killed one is tested in test_hostile_sync2; this one ended by itself, status 0)
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        wait_state(proc.pid, "S")
        token = token_for(proc.pid, proc_stat(proc.pid)[1])
        assert owner.Liveness().owner_alive(token) is True
        proc.stdin.close()
        wait_state(proc.pid, "Z")
        assert Path(f"/proc/{proc.pid}/stat").exists()         # still listed, as a zombie
        assert owner.Liveness().owner_alive(token) is False
        assert proc.wait(10) == 0                              # (it had ended by itself)
    finally:
        proc.kill()
        proc.wait(10)


def test_a_live_process_whose_name_looks_like_a_zombie_is_alive(tmp_path):
    # the name (comm) is in parentheses in /proc/<pid>/stat and may hold ") Z (" itself
    sleep = shutil.which("sleep")
    assert sleep
    odd = tmp_path / "x) Z (y"
    shutil.copy(sleep, odd)
    proc = subprocess.Popen([str(odd), "30"])
    try:
        wait_state(proc.pid, "S")
        assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == "x) Z (y"
        assert owner.Liveness().owner_alive(token_for(proc.pid, proc_stat(proc.pid)[1])) is True
    finally:
        proc.kill()
        proc.wait(10)


def test_a_token_without_a_start_time_is_judged_by_the_pid_alone(child):
    live = owner.Liveness()
    assert live.owner_alive(token_for(child.pid, "")) is True
    child.kill()
    child.wait(10)
    assert live.owner_alive(token_for(child.pid, "")) is False


def test_another_boot_means_the_owner_is_gone_even_if_its_pid_runs_now(child):
    # (after a reboot the same pid, even the same start time, is another process)
    token = token_for(child.pid, proc_stat(child.pid)[1], boot="00000000-0000-0000-0000-000000000000")
    live = owner.Liveness()
    assert live.owner_alive(token) is False
    assert live.may_take(token, claim_until=time.time() + 3600, now=time.time()) is True


def test_another_host_or_pid_namespace_is_not_judged_by_pid_but_by_the_lease(child):
    live = owner.Liveness()
    start = proc_stat(child.pid)[1]
    now = time.time()
    for token in (token_for(child.pid, start, host="another-host"),      # the pid runs here: irrelevant
                  token_for(999_999_999, "1", host="another-host"),      # no such pid here: irrelevant too
                  token_for(999_999_999, "1", pidns="pid:[4026599999]"),  # a container's own pids
                  token_for(child.pid, start, boot="")):                 # no boot id to compare
        assert live.owner_alive(token) is None, token
        assert live.may_take(token, claim_until=now + 1, now=now) is False
        assert live.may_take(token, claim_until=now, now=now) is False   # (the lease's last instant)
        assert live.may_take(token, claim_until=now - 1, now=now) is True
        assert live.may_take(token, claim_until=None, now=now) is True   # no lease recorded


@pytest.mark.parametrize("mangle", [
    lambda p: p[:6],                          # a field missing
    lambda p: p + ["extra"],                  # a field too many
    lambda p: ["argo2"] + p[1:],              # another format
    lambda p: p[:4] + ["12x"] + p[5:],        # a pid that is not a number
])
def test_a_token_of_another_form_is_left_to_the_lease(child, mangle):
    parts = token_for(child.pid, proc_stat(child.pid)[1]).split("|")
    assert owner.Liveness().owner_alive("|".join(mangle(parts))) is None


def test_a_bar_in_the_host_name_does_not_break_the_token(monkeypatch):
    monkeypatch.setattr(owner.socket, "gethostname", lambda: "rack|7")
    token = owner.new_token()
    try:
        assert token.split("|")[1] == "rack_7" and len(token.split("|")) == 7
        assert owner.Liveness().owner_alive(token) is True
    finally:
        owner.forget(token)
