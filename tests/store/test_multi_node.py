"""Several Dovecot backends, each with its own dovenotify, sharing one PostgreSQL database."""

import json
import subprocess

import psycopg
import trio

from dovenotify.store.base import SCHEMA_VERSION
from tests.harness.dovecot import deliver, start_dovecot
from tests.harness.postgres import postgres_server, postgres_url
from tests.harness.service import dovenotify_command, run_service, write_config
from tests.harness.stack import dovecot_snippet, run_stack

__all__ = ["postgres_server", "postgres_url"]

ACCOUNT = "0715A26B-CA09-4730-A419-793000CA982E"
TOKEN = "2918390218931890821908309283098109381029309829018310983092892829"


def dovenotify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*dovenotify_command(), *args], capture_output=True, text=True)


async def test_db_migrate_creates_the_schema(tmp_path, postgres_url):
    config = write_config(tmp_path / "dovenotify.yaml", {"database": postgres_url})
    for _ in range(2):  # and running it again changes nothing
        migrated = dovenotify("db", "migrate", "--config", str(config))
        assert migrated.returncode == 0, migrated.stderr
        assert f"schema version {SCHEMA_VERSION}" in migrated.stdout
    with psycopg.connect(postgres_url) as db:
        assert db.execute("SELECT count(*) FROM registrations").fetchone() == (0,)


async def test_register_on_one_node_push_from_the_other(test_pki, postgres_url):
    """The iPhone registers through backend A; mail arrives at backend B; B pushes it."""
    async with run_stack(test_pki, {"database": postgres_url}, version=None) as a:
        b_root = a.root / "node-b"
        b_root.mkdir(mode=0o755)
        b_settings = {
            **a.settings,
            "event_socket": str(b_root / "run" / "events.sock"),
            "relay_socket": str(b_root / "run" / "relay.sock"),
            # Each backend's Dovecot appends to its own node's spool.
            "event_spool": str(b_root / "run" / "events.spool"),
        }
        snippet = dovecot_snippet(b_root, b_settings, a.dovecot.version)
        (b_root / "dovecot").mkdir(mode=0o755)
        b_dovecot = await trio.to_thread.run_sync(
            lambda: start_dovecot(b_root / "dovecot", extra_conf=snippet)
        )
        try:
            async with run_service(b_root / "service", b_settings) as b:
                phone = await a.iphone("alice")
                assert (await phone.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])).ok

                await trio.to_thread.run_sync(
                    deliver, b_dovecot, "alice", b"Subject: hi\r\n\r\nvia B\r\n"
                )
                request = await a.standin.next_request()
                assert request.path == f"/3/device/{TOKEN}"
                assert "push alice" in b.log_text()
                assert "push alice" not in a.service.log_text()

                # Both nodes see one registration, with B's push recorded on it.
                for node in (a.service, b):
                    listed = dovenotify(
                        "devices", "--config", str(node.config_path), "--json", "--user", "alice"
                    )
                    (device,) = json.loads(listed.stdout)
                    assert device["device_token"] == TOKEN
                await phone.logout()
        finally:
            await trio.to_thread.run_sync(b_dovecot.stop)


def _rename_database(postgres_server, old: str, new: str) -> None:
    """Rename a database, disconnecting its clients first (they reconnect at will)."""
    with psycopg.connect(postgres_server.url(), autocommit=True) as admin:
        for _ in range(50):
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (old,),
            )
            try:
                admin.execute(f'ALTER DATABASE "{old}" RENAME TO "{new}"')
                return
            except psycopg.errors.ObjectInUse:
                continue  # a client got back in between
    raise AssertionError(f"could not rename {old}")


async def test_database_away_and_back(test_pki, postgres_server):
    """PostgreSQL unreachable: registrations get NO, mail flows, the service lives on."""
    url = postgres_server.create_database("away")
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    async with run_stack(test_pki, {"database": url}, version=None) as stack:
        phone = await stack.iphone("alice")
        assert (await phone.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])).ok
        await phone.logout()

        _rename_database(postgres_server, name, name + "_away")
        try:
            await trio.to_thread.run_sync(deliver, stack.dovecot, "alice", b"Subject: x\r\n\r\n")
            await stack.service.wait_for_log("cannot read registrations")
            phone = await stack.iphone("bob")
            reply = await phone.xapplepushservice(ACCOUNT, "b0" * 32, ["INBOX"])
            assert reply.status == "NO", reply
            await phone.logout()
            assert stack.service.process.returncode is None
        finally:
            _rename_database(postgres_server, name + "_away", name)

        phone = await stack.iphone("bob")
        assert (await phone.xapplepushservice(ACCOUNT, "b0" * 32, ["INBOX"])).ok
        await phone.logout()
        await trio.to_thread.run_sync(deliver, stack.dovecot, "bob", b"Subject: y\r\n\r\n")
        while (await stack.standin.next_request()).path != f"/3/device/{'b0' * 32}":
            pass
