"""The whole path on real parts: Dovecot + `dovenotify serve` + the APNs stand-in.

Used by the end-to-end tests and by scripts/demo, so the demo shows exactly what
the tests check.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from dovenotify.cli import install_dovecot_files
from dovenotify.dovecot_config import render
from tests.harness.apns_standin import ApnsStandin, run_apns_standin
from tests.harness.certs import Pki
from tests.harness.dovecot import (
    DEFAULT_USERS,
    MAIL_USER,
    Dovecot,
    installation,
    make_root,
    start_dovecot,
    stop_later,
)
from tests.harness.imap_client import ImapClient
from tests.harness.service import RunningService, run_service

SYSTEM_PYTHON = "/usr/bin/python3"


@attrs.frozen
class Stack:
    root: Path
    dovecot: Dovecot
    service: RunningService
    standin: ApnsStandin
    settings: Mapping[str, Any]
    # `dovenotify relay`, when the settings say relay_process: separate.
    relay: RunningService | None = None
    # Every phone's connection, closed when the stack stops if the test has not.
    phones: list[ImapClient] = attrs.field(factory=list)

    async def iphone(self, user: str = "alice", password: str = "secret") -> ImapClient:
        """A logged-in IMAP client over TLS, as iOS Mail connects."""
        client = await ImapClient.connect(
            self.dovecot.host,
            self.dovecot.imaps_port,
            ssl_context=self.dovecot.client_ssl_context(),
        )
        self.phones.append(client)
        reply = await client.login(user, password)
        assert reply.ok, reply
        return client


def service_settings(
    root: Path, pki: Pki, standin_url: str, dovecot_version: str | None = None
) -> dict[str, Any]:
    """Settings for `dovenotify serve` beside Dovecot `dovecot_version` (None: the host's)."""
    # The post-login helper runs as Dovecot's internal user, whose uid in the
    # other version's chroot need not be the host's "dovecot".
    helper_uid = installation(dovecot_version).uid("dovecot")
    # Dovecot's mail_uid in the tests (the service cannot ask this Dovecot for it).
    mail_uid = installation(dovecot_version).uid(MAIL_USER)
    return {
        "database": str(root / "registrations.sqlite"),
        "event_socket": str(root / "run" / "events.sock"),
        "relay_socket": str(root / "run" / "relay.sock"),
        "event_spool": str(root / "run" / "events.spool"),
        "relay_peers": ["root", str(helper_uid)],
        "event_peers": [str(mail_uid)],
        "apns": {
            "certificate": str(pki.client.combined_pem),
            "endpoint": standin_url,
            "ca_file": str(pki.ca_file),
        },
        "log_level": "debug",
    }


def dovecot_snippet(root: Path, settings: Mapping[str, Any], version: str) -> str:
    files = root / "dovecot-files"
    install_dovecot_files(files)
    return render(
        version,
        lua_script=files / "dovenotify.lua",
        event_socket=Path(settings["event_socket"]),
        event_timeout=0.2,
        helper_command=[SYSTEM_PYTHON, "-I", "-S", str(files / "postlogin.py")],
        relay_socket=Path(settings["relay_socket"]),
        relay_timeout=0.5,
        user_field=settings.get("user_lookup"),
        event_spool=Path(settings["event_spool"]),
        relay_only_field=settings.get("relay_only_field"),
        event_spool_size=settings.get("event_spool_size", 1024 * 1024),
    )


@asynccontextmanager
async def run_stack(
    pki: Pki,
    overrides: Mapping[str, Any] | None = None,
    *,
    version: str | None,
    dovecot_conf: str = "",
    users: Mapping[str, str] = DEFAULT_USERS,
    userdb_fields: Mapping[str, Mapping[str, str]] | None = None,
    **standin_options: Any,
) -> AsyncIterator[Stack]:
    """The whole stack on Dovecot `version`: pass the `dovecot_version` fixture, so the
    test runs on both versions (None, the host's, is for scripts). `dovecot_conf` is
    added to Dovecot's configuration after dovenotify's snippet; `users` and
    `userdb_fields` as for `start_dovecot`."""
    root = make_root("dovenotify-stack-")
    dovecot: Dovecot | None = None
    try:
        async with run_apns_standin(pki, **standin_options) as standin:
            settings = {
                **service_settings(root, pki, standin.url, version),
                **(overrides or {}),
            }
            snippet = dovecot_snippet(root, settings, installation(version).version)
            snippet += dovecot_conf
            (root / "dovecot").mkdir(mode=0o755)
            dovecot = await trio.to_thread.run_sync(
                lambda: start_dovecot(
                    root / "dovecot",
                    version=version,
                    extra_conf=snippet,
                    users=users,
                    userdb_fields=userdb_fields,
                )
            )
            try:
                async with AsyncExitStack() as processes:
                    service = await processes.enter_async_context(
                        run_service(root / "service", settings)
                    )
                    relay = None
                    if settings.get("relay_process") == "separate":
                        relay = await processes.enter_async_context(
                            run_service(root / "service", settings, command="relay")
                        )
                    stack = Stack(root, dovecot, service, standin, settings, relay)
                    try:
                        yield stack
                    finally:
                        for phone in stack.phones:
                            await trio.aclose_forcefully(phone.stream)
            finally:
                # Stopped by PID now; waited for, and `root` removed, as it exits.
                stop_later(dovecot, root)
    finally:
        if dovecot is None:
            shutil.rmtree(root, ignore_errors=True)
