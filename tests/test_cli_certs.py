"""`dovenotify cert show|import`, `test-push` and `import-xapsd`, run as an admin runs them.

The xapsd fixtures are built from the formats in facts.md §6 with the test PKI's
certificates and made-up tokens; no real data.
"""

from __future__ import annotations

import base64
import grp
import json
import pwd
import shutil
import signal
import stat
import subprocess
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml
from cryptography.hazmat.primitives import serialization

from dovenotify.certificates import load_credentials
from dovenotify.store import Registration, SQLiteStore
from tests.harness.apns_standin import Answer, ApnsStandin, RecordedRequest
from tests.harness.certs import P12_PASSWORD, ClientCert, Pki
from tests.harness.service import (
    SERVICE_USER,
    dovenotify_command,
    owner,
    run_service,
    service_layout,
)

TOKENS = [f"{n:02x}" * 32 for n in range(0xB0, 0xB4)]  # made up
ACCOUNTS = [
    "0715A26B-CA09-4730-A419-793000CA982E",
    "4D1C2A41-6D0E-4E42-9F4B-2D7C0B1E9A11",
    "9A0B7C3E-1F22-4C55-8E66-77D8E9F00A12",
]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*dovenotify_command(), *args], capture_output=True, text=True)


def write_config(tmp_path: Path, apns: dict[str, Any]) -> Path:
    path = tmp_path / "dovenotify.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "database": str(tmp_path / "registrations.sqlite"),
                "event_socket": str(tmp_path / "events.sock"),
                "relay_socket": str(tmp_path / "relay.sock"),
                "apns": apns,
            }
        )
    )
    return path


def import_xapsd(database: Path, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run("import-xapsd", "--database", str(database), *args, "--config", str(config))


def devices(config: Path) -> list[dict[str, Any]]:
    result = run("devices", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- cert show -----------------------------------------------------------------------


def test_cert_show_prints_what_an_admin_needs(test_pki: Pki, tmp_path: Path) -> None:
    config = write_config(tmp_path, {"certificate": str(test_pki.client.combined_pem)})
    result = run("cert", "show", "--config", str(config))
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(":", 1) for line in result.stdout.splitlines())
    fields = {name: value.strip() for name, value in fields.items()}
    assert fields["Topic"] == test_pki.client.topic
    assert f"UID={test_pki.client.topic}" in fields["Subject"]
    assert "Test Apple Application Integration 2" in fields["Issuer"]
    assert fields["Environment"] == "production (mail server certificate)"
    assert fields["Not after"] == f"{test_pki.client.not_after:%Y-%m-%d %H:%M} UTC"
    assert fields["Days left"] == "365"
    assert "Topics" not in fields


def test_cert_show_lists_the_topics_extension(test_pki: Pki) -> None:
    result = run("cert", "show", str(test_pki.client_with_topics.p12))
    assert result.returncode == 0, result.stderr
    topic = test_pki.client_with_topics.topic
    assert f"Topics:      {topic}, {topic}.voip, {topic}.complication" in result.stdout


def test_cert_show_exits_1_for_an_expired_certificate(test_pki: Pki) -> None:
    result = run("cert", "show", str(test_pki.client_expired.combined_pem))
    assert result.returncode == 1
    assert "Days left:   -35" in result.stdout
    expired = f"{test_pki.client_expired.not_after:%Y-%m-%d}"
    assert f"cannot be used: it expired on {expired} (35 days ago)" in result.stderr


def test_cert_show_exits_1_for_a_key_that_does_not_match(test_pki: Pki, tmp_path: Path) -> None:
    config = write_config(
        tmp_path, {"certificate": str(test_pki.client.cert_pem), "key": str(test_pki.stray_key)}
    )
    result = run("cert", "show", "--config", str(config))
    assert result.returncode == 1
    assert "this private key does not belong to the certificate" in result.stderr
    assert "Traceback" not in result.stderr


# --- cert import ---------------------------------------------------------------------


@pytest.mark.parametrize("source", ["pem", "p12 with password"])
def test_cert_import_installs_mode_0600(test_pki: Pki, tmp_path: Path, source: str) -> None:
    target = tmp_path / "etc" / "push.pem"
    config = write_config(tmp_path, {"certificate": str(target)})
    if source == "pem":
        args = [str(test_pki.client.combined_pem)]
    else:
        password = tmp_path / "password"
        password.write_bytes(P12_PASSWORD)
        args = [str(test_pki.client.p12_with_password), "--password-file", str(password)]
    result = run("cert", "import", *args, "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert f"Installed the certificate for {test_pki.client.topic} in {target}" in result.stdout
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    installed = load_credentials(target)
    assert installed.certificate == load_credentials(test_pki.client.combined_pem).certificate


def test_cert_import_into_separate_key_file(test_pki: Pki, tmp_path: Path) -> None:
    cert, key = tmp_path / "push.crt", tmp_path / "push.key"
    config = write_config(tmp_path, {"certificate": str(cert), "key": str(key)})
    result = run("cert", "import", str(test_pki.client.p12), "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert b"PRIVATE KEY" not in cert.read_bytes()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert load_credentials(cert, key).topic == test_pki.client.topic


def test_cert_import_refuses_a_key_that_does_not_match(test_pki: Pki, tmp_path: Path) -> None:
    target = tmp_path / "push.pem"
    config = write_config(tmp_path, {"certificate": str(target)})
    result = run(
        "cert",
        "import",
        str(test_pki.client.cert_pem),
        "--key",
        str(test_pki.stray_key),
        "--config",
        str(config),
    )
    assert result.returncode == 2
    assert "this private key does not belong to the certificate" in result.stderr
    assert not target.exists()


def test_cert_import_refuses_an_expired_certificate(test_pki: Pki, tmp_path: Path) -> None:
    target = tmp_path / "push.pem"
    config = write_config(tmp_path, {"certificate": str(target)})
    result = run("cert", "import", str(test_pki.client_expired.p12), "--config", str(config))
    assert result.returncode == 2
    assert "not imported: it expired on" in result.stderr
    assert not target.exists()


def test_cert_import_of_a_der_cer_needs_its_key(test_pki: Pki, tmp_path: Path) -> None:
    cer = tmp_path / "aps.cer"
    cer.write_bytes(
        load_credentials(test_pki.client.combined_pem).certificate.public_bytes(
            serialization.Encoding.DER
        )
    )
    config = write_config(tmp_path, {"certificate": str(tmp_path / "push.pem")})
    result = run("cert", "import", str(cer), "--config", str(config))
    assert result.returncode == 2
    assert f"{cer}: this certificate file holds no key: give the key" in result.stderr
    assert "Traceback" not in result.stderr


# --- cert request, then Apple's answer -----------------------------------------------

TOPIC = "com.apple.mobilemail.push.org.example"


async def test_cert_request_then_import_apples_cer(
    test_pki: Pki, apns_standin: ApnsStandin, tmp_path: Path
) -> None:
    target = tmp_path / "push.pem"
    config = write_config(
        tmp_path,
        {
            "certificate": str(target),
            "endpoint": apns_standin.url,
            "ca_file": str(test_pki.ca_file),
        },
    )
    refused = run("cert", "request", "--topic", "com.apple.mail.XServer.x", "--config", str(config))
    assert refused.returncode == 2
    assert "does not start with com.apple.mobilemail.push." in refused.stderr

    requested = run("cert", "request", "--topic", TOPIC, "--config", str(config))
    assert requested.returncode == 0, requested.stderr
    key, csr = tmp_path / f"{TOPIC}.key", tmp_path / f"{TOPIC}.csr"
    # No service group here (a directory of root's): the key is root's alone.
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert f"dovenotify cert import aps.cer --key {key}" in requested.stdout
    assert "not self-service" in requested.stdout
    again = run("cert", "request", "--topic", TOPIC, "--config", str(config))
    assert again.returncode == 2
    assert f"{key} already exists" in again.stderr

    # Apple (the test CA standing in) signs the request; the admin downloads aps.cer.
    cer = tmp_path / "aps.cer"
    cer.write_bytes(test_pki.answer_request(csr.read_bytes(), TOPIC))
    imported = run("cert", "import", str(cer), "--key", str(key), "--config", str(config))
    assert imported.returncode == 0, imported.stderr
    assert f"Installed the certificate for {TOPIC} in {target} (root:root, mode 0600)" in (
        imported.stdout
    )
    assert f"Topics:      {TOPIC}, {TOPIC}.voip, {TOPIC}.complication" in imported.stdout

    # The sender the service uses presents it, and the stand-in (trusting only
    # "Apple") accepts it.
    store = SQLiteStore(tmp_path / "registrations.sqlite")
    store.register(Registration("alice", ACCOUNTS[0], TOKENS[0], TOPIC, ("INBOX",)))
    store.close()
    pushed = await trio.run_process(
        [*dovenotify_command(), "test-push", "--user", "alice", "--config", str(config)],
        capture_stdout=True,
        check=False,
    )
    assert pushed.returncode == 0
    assert pushed.stdout.decode().endswith(f"{TOPIC}: delivered\n")
    presented = apns_standin.peer_certificates[-1]
    assert presented.public_bytes(serialization.Encoding.DER) == cer.read_bytes()
    assert [r.headers.get("apns-topic") for r in apns_standin.requests] == [TOPIC]


# --- test-push -----------------------------------------------------------------------


async def test_test_push_prints_apns_answer_per_device(
    test_pki: Pki, apns_standin: ApnsStandin, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        {
            "certificate": str(test_pki.client.combined_pem),
            "endpoint": apns_standin.url,
            "ca_file": str(test_pki.ca_file),
        },
    )
    store = SQLiteStore(tmp_path / "registrations.sqlite")
    for token, account in zip(TOKENS[:2], ACCOUNTS, strict=False):
        store.register(Registration("alice", account, token, test_pki.client.topic, ("INBOX",)))
    store.close()

    def answer(request: RecordedRequest) -> Answer:
        if request.path.endswith(TOKENS[1]):
            return Answer(410, {"reason": "Unregistered", "timestamp": 1_700_000_000_000})
        return Answer(200)

    apns_standin.responder = answer
    result = await trio.run_process(
        [*dovenotify_command(), "test-push", "--user", "alice", "--config", str(config)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    lines = result.stdout.decode().splitlines()
    assert result.returncode == 1  # not every device was reached
    assert sorted(lines) == sorted(
        [
            f"{ACCOUNTS[0]}  {TOKENS[0][:12]}…  {test_pki.client.topic}: delivered",
            f"{ACCOUNTS[1]}  {TOKENS[1][:12]}…  {test_pki.client.topic}:"
            " drop_token (410 Unregistered)",
        ]
    )
    assert {r.path for r in apns_standin.requests} == {f"/3/device/{t}" for t in TOKENS[:2]}


# --- import-xapsd --------------------------------------------------------------------


def apple_certs(mail: ClientCert, others: list[ClientCert]) -> dict[str, Any]:
    """AppleCerts as xapsd wrote it: five pairs, calendar, contact, mail, mgmt, alerts."""
    pairs = [*others[:2], mail, *others[2:4]]
    signature, keys = [], []
    for pair in pairs:
        credentials = load_credentials(pair.combined_pem)
        der = credentials.certificate.public_bytes(serialization.Encoding.DER)
        signature.append({"Certificate": [base64.b64encode(der).decode()], "Signature": "x"})
        key = credentials.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        keys.append(base64.b64encode(key).decode())
    return {"Signature": signature, "Keys": keys}


# As Go writes it: nanoseconds and the server's offset; two days ago.
RECENT_AT = datetime.fromtimestamp(time.time() - 2 * 86400, timezone(timedelta(hours=1)))
RECENT = RECENT_AT.strftime("%Y-%m-%dT%H:%M:%S.123456789+01:00")


def xapsd_database(path: Path, apple: dict[str, Any] | None) -> Path:
    document: dict[str, Any] = {
        "Users": {
            "alice@example.org": {
                "Accounts": {
                    ACCOUNTS[0]: {
                        "DeviceToken": TOKENS[0],
                        "Mailboxes": ["INBOX", "Notes", "Entw&APw-rfe"],
                        "RegistrationTime": RECENT,
                    },
                    ACCOUNTS[1]: {
                        "DeviceToken": TOKENS[1],
                        "Mailboxes": ["INBOX"],
                        "RegistrationTime": "0001-01-01T00:00:00Z",
                    },
                }
            },
            "Bob": {"Accounts": {ACCOUNTS[2]: {"DeviceToken": TOKENS[2]}}},
            "carol": {"Accounts": {ACCOUNTS[0]: {"DeviceToken": "not-a-token"}}},
            # Past registration_ttl (30 days): the device has not connected since.
            "dave": {
                "Accounts": {
                    ACCOUNTS[1]: {
                        "DeviceToken": TOKENS[3],
                        "RegistrationTime": "2022-03-02T09:47:54.855456616+01:00",
                    }
                }
            },
        }
    }
    if apple is not None:
        document["AppleCerts"] = apple
    path.write_text(json.dumps(document))
    path.chmod(0o644)  # as xapsd writes it
    return path


def test_import_xapsd_with_apple_certs(test_pki: Pki, tmp_path: Path) -> None:
    target = tmp_path / "etc" / "push.pem"
    config = write_config(tmp_path, {"certificate": str(target)})
    others = [test_pki.client_with_topics, test_pki.client_expiring] * 2
    database = xapsd_database(tmp_path / "database.json", apple_certs(test_pki.client, others))

    before = time.time()
    result = import_xapsd(database, config)
    assert result.returncode == 0, result.stderr
    topic = test_pki.client.topic
    assert f"Imported 3 registration(s) from {database}, topic {topic}." in result.stdout
    assert "Skipped 2:" in result.stdout
    assert "user 'carol'" in result.stdout and "'not-a-token' is not hex" in result.stdout
    assert (
        f"user 'dave' account '{ACCOUNTS[1]}': last registered 2022-03-02, longer ago than"
        " registration_ttl (30 days)" in result.stdout
    )
    # The mail pair (index 2) is the one installed, readable by root only.
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert load_credentials(target).topic == topic

    listed = {(d["username"], d["device_token"]): d for d in devices(config)}
    assert set(listed) == {
        ("alice@example.org", TOKENS[0]),
        ("alice@example.org", TOKENS[1]),
        ("bob", TOKENS[2]),
    }
    kept = listed[("alice@example.org", TOKENS[0])]
    assert kept["registered_at"] == f"{RECENT_AT.astimezone(UTC):%Y-%m-%dT%H:%M:%S+00:00}"
    assert kept["mailboxes"] == ["INBOX", "Notes", "Entwürfe"]  # as Dovecot's events name it
    assert kept["topic"] == topic
    for zero_or_missing in (("alice@example.org", TOKENS[1]), ("bob", TOKENS[2])):
        registered = listed[zero_or_missing]["registered_at"]
        assert datetime.fromisoformat(registered).timestamp() >= int(before)
    assert listed[("bob", TOKENS[2])]["mailboxes"] == ["INBOX"]

    # Again: nothing changes, and it says so.
    again = import_xapsd(database, config)
    assert again.returncode == 0, again.stderr
    assert "Imported 0 registration(s)" in again.stdout
    assert again.stdout.count("already registered") == 3
    assert f"The certificate for {topic} is already in {target}." in again.stdout
    assert {(d["username"], d["device_token"]) for d in devices(config)} == set(listed)


def test_import_xapsd_without_apple_certs_takes_the_p12_named_in_xapsd_yaml(
    test_pki: Pki, tmp_path: Path
) -> None:
    xapsd_dir = tmp_path / "etc-xapsd"
    xapsd_dir.mkdir()
    # xapsd writes its .p12 with an empty password.
    p12 = test_pki.client.p12_empty_password or test_pki.client.p12
    shutil.copyfile(p12, xapsd_dir / "certificate.p12")
    xapsd_yaml = tmp_path / "xapsd.yaml"
    xapsd_yaml.write_text(
        "loglevel: info\ndatabaseFile: database.json\ncertificateFileP12: certificate.p12\n"
    )
    target = tmp_path / "push.pem"
    config = write_config(tmp_path, {"certificate": str(target)})
    database = xapsd_database(tmp_path / "database.json", None)
    result = import_xapsd(
        database,
        config,
        "--xapsd-config",
        str(xapsd_yaml),
        "--xapsd-dir",
        str(xapsd_dir),
    )
    assert result.returncode == 0, result.stderr
    assert "Imported 3 registration(s)" in result.stdout
    assert load_credentials(target).topic == test_pki.client.topic
    assert {d["topic"] for d in devices(config)} == {test_pki.client.topic}


def test_import_xapsd_without_any_certificate_uses_the_configured_one(
    test_pki: Pki, tmp_path: Path
) -> None:
    config = write_config(tmp_path, {"certificate": str(test_pki.client_with_topics.p12)})
    database = xapsd_database(tmp_path / "database.json", None)
    result = import_xapsd(database, config)
    assert result.returncode == 0, result.stderr
    assert {d["topic"] for d in devices(config)} == {test_pki.client_with_topics.topic}


def test_import_xapsd_names_a_broken_database(tmp_path: Path) -> None:
    config = write_config(tmp_path, {})
    database = tmp_path / "database.json"
    database.write_text("{not json")
    result = import_xapsd(database, config)
    assert result.returncode == 2
    assert result.stderr.startswith(f"dovenotify: {database}: not xapsd's database.json")


def test_import_xapsd_keeps_out_a_token_the_device_has_replaced(
    test_pki: Pki, tmp_path: Path
) -> None:
    config = write_config(tmp_path, {"certificate": str(test_pki.client.combined_pem)})
    # Since xapsd last saw it, alice's phone registered with dovenotify, new token.
    store = SQLiteStore(tmp_path / "registrations.sqlite")
    topic = test_pki.client.topic
    store.register(Registration("alice@example.org", ACCOUNTS[0], TOKENS[3], topic, ("INBOX",)))
    # xapsd kept no time for bob's: any registration with dovenotify is newer.
    store.register(Registration("bob", ACCOUNTS[2], TOKENS[3], topic, ("INBOX",)))
    store.close()
    database = xapsd_database(tmp_path / "database.json", None)
    result = import_xapsd(database, config)
    assert result.returncode == 0, result.stderr
    assert "Imported 1 registration(s)" in result.stdout
    for user, account in (("alice@example.org", ACCOUNTS[0]), ("bob", ACCOUNTS[2])):
        assert (
            f"user '{user}' account '{account}': registered with dovenotify"
            " since, under a newer token" in result.stdout
        )
    tokens = {(d["account_id"], d["device_token"]) for d in devices(config)}
    assert tokens == {(ACCOUNTS[0], TOKENS[3]), (ACCOUNTS[1], TOKENS[1]), (ACCOUNTS[2], TOKENS[3])}


def test_import_xapsd_exports_apple_certs_beside_a_certificate_in_place(
    test_pki: Pki, tmp_path: Path
) -> None:
    in_place = tmp_path / "push.pem"
    shutil.copyfile(test_pki.client_with_topics.combined_pem, in_place)
    config = write_config(tmp_path, {"certificate": str(in_place)})
    others = [test_pki.client_with_topics, test_pki.client_expiring] * 2
    database = xapsd_database(tmp_path / "database.json", apple_certs(test_pki.client, others))
    exported = tmp_path / "xapsd-push.pem"
    result = import_xapsd(
        database,
        config,
        "--export-certificate",
        str(exported),
    )
    assert result.returncode == 0, result.stderr
    assert f"Left {in_place} as it is: it holds another certificate." in result.stdout
    assert f"with its key to {exported} (root:root, mode 0600)" in result.stdout
    assert load_credentials(exported).topic == test_pki.client.topic
    assert in_place.read_bytes() == test_pki.client_with_topics.combined_pem.read_bytes()
    # What was exported is what `cert import` takes.
    assert run("cert", "show", str(exported)).returncode == 0


def test_import_xapsd_names_a_database_nested_too_deeply(tmp_path: Path) -> None:
    config = write_config(tmp_path, {})
    database = tmp_path / "database.json"
    database.write_text('{"Users": ' + "[" * 100_000 + "]" * 100_000 + "}")
    result = import_xapsd(database, config)
    assert result.returncode == 2
    assert result.stderr == (
        f"dovenotify: {database}: not xapsd's database.json"
        " (its JSON is nested too deeply to read)\n"
    )


def test_import_xapsd_refuses_a_list_where_xapsd_yaml_has_a_value(tmp_path: Path) -> None:
    config = write_config(tmp_path, {})
    database = xapsd_database(tmp_path / "database.json", None)
    xapsd_yaml = tmp_path / "xapsd.yaml"
    xapsd_yaml.write_text(
        "keyFileP8: AuthKey.p8\nkeyFileTopic: com.apple.mobilemail.push.org.example\n"
        "keyFileKeyId: [1]\nkeyFileTeamId: 1234567890\n"
    )
    result = import_xapsd(
        database,
        config,
        "--xapsd-config",
        str(xapsd_yaml),
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"dovenotify: {xapsd_yaml}: keyFileKeyId must be a single name or value, not a list ([1])\n"
    )
    assert not (tmp_path / "registrations.sqlite").exists()


# --- files the service reads, with the service as its own user ----------------------


async def test_cert_import_keeps_the_service_user_able_to_reload(
    test_pki: Pki, apns_standin: ApnsStandin
) -> None:
    root, settings = service_layout(test_pki, apns_standin.url, test_pki.client.combined_pem)
    group = grp.getgrgid(pwd.getpwnam(SERVICE_USER).pw_gid).gr_name
    try:
        certificate = Path(settings["apns"]["certificate"])
        async with run_service(root / "service", settings, user=SERVICE_USER) as service:
            renewal = str(test_pki.client_with_topics.p12)
            result = run("cert", "import", renewal, "--config", str(service.config_path))
            assert result.returncode == 0, result.stderr
            assert f"{certificate} (root:{group}, mode 0640)" in result.stdout
            assert owner(certificate) == ("root", group, 0o640)

            service.process.send_signal(signal.SIGHUP)
            topic = test_pki.client_with_topics.topic
            await service.wait_for_log(
                f"reloaded: now using certificate {certificate}, topic {topic}"
            )
            assert "reload failed" not in service.log_text()
    finally:
        shutil.rmtree(root)


async def test_import_xapsd_writes_files_the_service_user_can_use(
    test_pki: Pki, apns_standin: ApnsStandin
) -> None:
    root, settings = service_layout(test_pki, apns_standin.url)
    group = grp.getgrgid(pwd.getpwnam(SERVICE_USER).pw_gid).gr_name
    try:
        config = root / "import.yaml"
        config.write_text(yaml.safe_dump(settings))
        others = [test_pki.client_with_topics, test_pki.client_expiring] * 2
        database = xapsd_database(root / "database.json", apple_certs(test_pki.client, others))
        result = import_xapsd(database, config)
        assert result.returncode == 0, result.stderr
        assert "Imported 3 registration(s)" in result.stdout
        # New files: the certificate takes its directory's group, the database its
        # directory's owner, as the service needs to read one and write the other.
        certificate = Path(settings["apns"]["certificate"])
        assert owner(certificate) == ("root", group, 0o640)
        assert owner(Path(settings["database"])) == (SERVICE_USER, group, 0o640)

        async with run_service(root / "service", settings, user=SERVICE_USER) as service:
            # The service, as its own user, opens the database and reloads the certificate.
            service.process.send_signal(signal.SIGHUP)
            await service.wait_for_log(f"reloaded: now using certificate {certificate}")
        assert "Permission denied" not in service.log_text()
        assert "readonly" not in service.log_text()
        assert len(devices(config)) == 3
    finally:
        shutil.rmtree(root)
