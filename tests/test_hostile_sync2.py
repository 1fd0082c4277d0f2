"""The sync attacked again: keys that look like escapes, claims of a zombie, URLs and rate limits
of odd shapes."""
import html
import json
import os
import signal
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from argo_signals.delivery import Redactor


@pytest.mark.parametrize("key", ["sk_%41%42%43%44%45_live9", "abcd&amp;efgh&lt;ijkl", "abc\\ndefg\\u0041hijk"])
def test_a_key_that_looks_like_an_escape_is_redacted_in_its_encoded_echoes(key):
    redact = Redactor([key])
    for echo in (key, urllib.parse.quote(key, safe=""), html.escape(key), json.dumps(key)[1:-1]):
        for cut in (len(echo), 14):   # whole, and truncated to a prefix of 14 characters
            shown = redact(f"bad key {echo[:cut]} here")
            assert echo[:cut] not in shown, (echo[:cut], shown)


def test_a_claim_of_a_killed_owner_nobody_reaped_yet_is_free():
    # kill -9 of a sync whose parent has not waited for it (a container whose PID 1 does not
    # reap): /proc still lists the pid, as a zombie, with its start time
    from argo_signals import owner
    child = subprocess.Popen(["sleep", "30"])
    try:
        start = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        parts = owner.new_token().split("|")
        token = "|".join(parts[:4] + [str(child.pid), start, parts[6]])
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert owner.Liveness().owner_alive(token) is False
    finally:
        child.kill()
        child.wait(10)
