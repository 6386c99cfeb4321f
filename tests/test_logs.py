"""Logs as an admin reads them: JSON lines, short tokens, silence about users without devices."""

from __future__ import annotations

import json

import trio

from tests.harness.dovecot import deliver
from tests.harness.stack import run_stack

ACCOUNT = "0715A26B-CA09-4730-A419-793000CA982E"
TOKEN = "2918390218931890821908309283098109381029309829018310983092892829"


async def test_json_logs_short_tokens_and_no_noise_for_users_without_devices(test_pki):
    overrides = {"log_format": "json", "log_level": "debug"}
    async with run_stack(test_pki, overrides, version=None) as stack:
        phone = await stack.iphone("alice")
        assert (await phone.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])).ok
        # bob has no device: his mail must not cost a log line, even at debug.
        for user in ("bob", "bob", "alice"):
            await trio.to_thread.run_sync(
                deliver, stack.dovecot, user, b"Subject: hi\r\n\r\nhello\r\n"
            )
        await stack.standin.next_request()
        await phone.logout()
        assert await stack.service.stop() == 0
        text = stack.service.log_text()

    entries = [json.loads(line) for line in text.splitlines()]
    assert all(set(e) >= {"time", "level", "logger", "message"} for e in entries)
    messages = [e["message"] for e in entries]
    assert TOKEN not in text, "a full device token reached the log"
    assert not [m for m in messages if "bob" in m]
    short = TOKEN[:8] + "…"
    assert f"registered alice account {ACCOUNT} device {short} for INBOX" in messages
    # One line for the decision, one for APNs's answer.
    assert f"push alice device {short} now: MessageNew in INBOX" in messages
    assert f"pushed alice device {short}: delivered" in messages
