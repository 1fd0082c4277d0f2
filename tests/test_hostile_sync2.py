"""The sync attacked again: keys that look like escapes, claims of a zombie, URLs and rate limits
of odd shapes."""
import html
import json
import urllib.parse

import pytest

from argo_signals.delivery import Redactor


@pytest.mark.parametrize("key", ["sk_%41%42%43%44%45_live9", "abcd&amp;efgh&lt;ijkl", "abc\\ndefg\\u0041hijk"])
def test_a_key_that_looks_like_an_escape_is_redacted_in_its_encoded_echoes(key):
    redact = Redactor([key])
    for echo in (key, urllib.parse.quote(key, safe=""), html.escape(key), json.dumps(key)[1:-1]):
        for cut in (len(echo), 14):   # whole, and truncated to a prefix of 14 characters
            shown = redact(f"bad key {echo[:cut]} here")
            assert echo[:cut] not in shown, (echo[:cut], shown)
