"""The post-login helper's hello line is JSON without the json module."""

import json

from hypothesis import given
from hypothesis import strategies as st

from dovenotify.dovecot.postlogin import hello_line

text = st.text(st.characters(blacklist_categories=["Cs"]))


@given(user=text, ip=text, lookup=st.none() | text)
def test_hello_line_is_the_json_the_relay_reads(user, ip, lookup):
    line = hello_line(user, ip, lookup)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    expected = {"v": 1, "user": user, "ip": ip}
    if lookup is not None:
        expected["lookup"] = lookup
    assert json.loads(line) == expected
