"""compat_listen: xapsd's /register and /notify over HTTP/1.1, with the C plugin's bytes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

from dovenotify.store.sqlite import SQLiteStore
from tests.harness.apns_standin import ApnsStandin
from tests.harness.certs import Pki
from tests.harness.dovecot import free_ports
from tests.harness.service import run_service
from tests.harness.stack import service_settings

ACCOUNT = "0715A26B-CA09-4730-A419-793000CA982E"
TOKEN = "2918390218931890821908309283098109381029309829018310983092892829"
# Exactly what the dovecot-xaps C plugin writes (xaps_register, its notify
# driver): no spaces, except the one after "Mailboxes": and "Events":.
REGISTER = (
    b'{"ApsAccountId":"' + ACCOUNT.encode() + b'","ApsDeviceToken":"' + TOKEN.encode() + b'",'
    b'"ApsSubtopic":"com.apple.mobilemail","Username":"Alice","Mailboxes": ["INBOX","Notes"]}'
)
NOTIFY_NEW = b'{"Username":"alice","Mailbox":"INBOX","Events": ["MessageNew"]}'
HEADERS = {"content-type": "application/json; charset=utf-8"}


@asynccontextmanager
async def compat_service(
    tmp_path: Path, pki: Pki, standin: ApnsStandin
) -> AsyncIterator[tuple[httpx.AsyncClient, dict]]:
    (port,) = free_ports(1)
    settings = {
        **service_settings(tmp_path, pki, standin.url),
        "compat_listen": f"127.0.0.1:{port}",
    }
    async with (
        run_service(tmp_path / "service", settings),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=HEADERS) as http,
    ):
        yield http, settings


async def test_register_then_notify_pushes(tmp_path, test_pki, apns_standin):
    async with compat_service(tmp_path, test_pki, apns_standin) as (http, settings):
        registered = await http.post("/register", content=REGISTER)
        assert registered.status_code == 200
        # The plugin copies this body into its IMAP answer as the topic.
        assert registered.text == test_pki.client.topic
        store = SQLiteStore(Path(settings["database"]))
        try:
            (device,) = store.devices()
        finally:
            store.close()
        # Lowercased like xapsd, so the plugin's notify for "alice" finds it.
        assert (device.username, device.account_id, device.device_token) == (
            "alice",
            ACCOUNT,
            TOKEN,
        )
        assert device.mailboxes == ("INBOX", "Notes")

        notified = await http.post("/notify", content=NOTIFY_NEW)
        assert notified.status_code == 200
        request = await apns_standin.next_request()
        assert request.path == f"/3/device/{TOKEN}"
        assert request.json() == {"aps": {"account-id": ACCOUNT}}
        assert request.headers["apns-topic"] == test_pki.client.topic

        # Beyond INBOX, unlike xapsd: Notes was registered, so it pushes too.
        notes = b'{"Username":"alice","Mailbox":"Notes","Events": ["MessageAppend"]}'
        assert (await http.post("/notify", content=notes)).status_code == 200
        assert (await apns_standin.next_request()).path == f"/3/device/{TOKEN}"


async def test_status_codes_as_xapsd(tmp_path, test_pki, apns_standin):
    async with compat_service(tmp_path, test_pki, apns_standin) as (http, _settings):
        # Nobody registered yet: the user is unknown.
        assert (await http.post("/notify", content=NOTIFY_NEW)).status_code == 404
        # Field names in any case, as Go's encoding/json reads them.
        lower = REGISTER.replace(b'"ApsAccountId"', b'"apsaccountid"').replace(
            b'"Username"', b'"USERNAME"'
        )
        assert (await http.post("/register", content=lower)).status_code == 200
        # Known user, but no device wants this mailbox.
        spam = b'{"Username":"alice","Mailbox":"Junk","Events": ["MessageNew"]}'
        answer = await http.post("/notify", content=spam)
        assert (answer.status_code, answer.content) == (204, b"")
        # Refused, with the reason: an unknown subtopic, an empty field, no JSON.
        for path, body, reason in (
            ("/register", REGISTER.replace(b"com.apple.mobilemail", b"x"), "ApsSubtopic"),
            ("/register", REGISTER.replace(TOKEN.encode(), b""), "ApsDeviceToken is missing"),
            ("/register", REGISTER.replace(b'["INBOX","Notes"]', b"[]"), "Mailboxes must be"),
            ("/notify", b'{"Mailbox":"INBOX","Events": ["MessageNew"]}', "Username is missing"),
            ("/notify", b"Username=alice", "not JSON"),
        ):
            refused = await http.post(path, content=body)
            assert refused.status_code == 400, body
            assert reason in refused.text
        assert (await http.get("/register")).status_code == 405
        assert (await http.post("/unknown", content=b"{}")).status_code == 404
        # Events may be absent (older plugins): a push at once, as for new mail.
        bare = json.dumps({"Username": "alice", "Mailbox": "INBOX"}).encode()
        assert (await http.post("/notify", content=bare)).status_code == 200
        with trio.fail_after(5):
            assert (await apns_standin.next_request()).path == f"/3/device/{TOKEN}"


async def test_warns_of_a_topic_the_plugin_would_crash_on(tmp_path, test_pki, apns_standin):
    (port,) = free_ports(1)
    settings = service_settings(tmp_path, test_pki, apns_standin.url)
    settings["compat_listen"] = f"127.0.0.1:{port}"
    topic = "com.apple.mobilemail.push.a.b"  # 29 bytes
    settings["apns"] = {
        "token_key": str(test_pki.token_key),
        "key_id": "TESTKEY123",
        "team_id": "TEAM123456",
        "topic": topic,
        "endpoint": apns_standin.url,
        "ca_file": str(test_pki.ca_file),
    }
    async with run_service(tmp_path / "service", settings) as service:
        assert f"compat_listen: the topic {topic} is shorter than 32 bytes" in service.log_text()
