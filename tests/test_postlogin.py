"""What the post-login helper costs a login, and that a stopped dovenotify costs no more.

Every IMAP login of every user waits for the helper (facts.md §3), so it must cost
little more than the system Python's own start, and never hold a login longer
than relay_timeout, whatever state dovenotify is in.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time

import trio

from dovenotify.cli import install_dovecot_files
from tests.harness.stack import SYSTEM_PYTHON, run_stack
from tests.test_relay import ACCOUNT, TOKEN

RELAY_TIMEOUT = 0.5  # as tests/harness/stack.py writes it into the snippet


def imported_modules(*argv: str) -> set[str]:
    """Modules the system Python imports to run `argv` (from -X importtime)."""
    result = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-S", "-X", "importtime", *argv],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return set(re.findall(r"^import time:.*\|\s+(\S+)$", result.stderr, re.MULTILINE))


def test_the_helper_imports_nothing_but_built_in_modules(tmp_path):
    # An import from the standard library's files (json, os, array...) costs
    # every login milliseconds: the helper must stay on what is compiled in.
    install_dovecot_files(tmp_path)
    builtin = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-S", "-c", "import sys; print(*sys.builtin_module_names)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    start = imported_modules("-c", "pass")
    helper = imported_modules(
        str(tmp_path / "postlogin.py"), "--socket", str(tmp_path / "none.sock"), "/bin/true"
    )
    assert "_socket" in helper  # the measurement sees the helper's imports
    assert helper - start <= set(builtin) | {"_socket"}, helper - start - set(builtin)


async def test_a_stopped_service_delays_a_login_by_relay_timeout_at_most(test_pki, dovecot_version):
    async with run_stack(test_pki, version=dovecot_version) as stack:
        phone = await stack.iphone()
        stack.service.process.send_signal(signal.SIGSTOP)
        try:
            started = time.perf_counter()
            bob = await stack.iphone("bob")
            assert (await bob.command("NOOP")).ok
            elapsed = time.perf_counter() - started
        finally:
            stack.service.process.send_signal(signal.SIGCONT)
        # The helper waits out relay_timeout once, then Dovecot serves bob itself.
        assert RELAY_TIMEOUT <= elapsed < RELAY_TIMEOUT + 1.0
        assert (await bob.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])).status == "BAD"
        await trio.to_thread.run_sync(
            stack.dovecot.wait_for_log, r"relay \S+ unavailable \(timed out\)"
        )
        # Woken, the relay drops the handoff nobody said GO to, and goes on.
        assert (await bob.command("NOOP")).ok
        assert (await phone.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])).ok
        again = await stack.iphone("alice")
        assert (await again.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])).ok
        for client in (phone, bob, again):
            await client.logout()
