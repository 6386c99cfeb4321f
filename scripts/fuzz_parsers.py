"""Coverage-guided fuzzing of dovenotify's parsers with atheris (libFuzzer), bounded in time.

The hypothesis tests in tests/unit/test_fuzz.py run a few hundred cases of each
parser in CI; this goes further when there is time: libFuzzer mutates inputs
towards new branches of the (instrumented) dovenotify code, starting from real
inputs (event lines, XAPPLEPUSHSERVICE commands, a configuration, the test PKI's
certificates and keys). Each target runs in a process of its own for
`--seconds`; an input that raises anything but the parser's own error is saved
under `--artifacts` and the run exits non-zero.

    python -m scripts.fuzz_parsers [--seconds 20] [--artifacts DIR] [target ...]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris

from scripts.bench_table import print_table

# Only the child that fuzzes needs the coverage instrumentation (and its log lines).
RUNNING = sys.argv[1:2] == ["--run"]
with atheris.instrument_imports(include=["dovenotify"]) if RUNNING else contextlib.nullcontext():
    from dovenotify.admin import compat
    from dovenotify.apns import protocol as apns
    from dovenotify.apns.certificates import CertificateError, load_credentials
    from dovenotify.apns.token import load_token_key
    from dovenotify.core import config
    from dovenotify.events import decoder as events
    from dovenotify.relay import imapscan, xaps
    from dovenotify.relay.handoff import parse_hello


CONFIG_PATH = Path("/etc/dovenotify/dovenotify.yaml")


def events_target(data: bytes) -> None:
    decoder = events.EventDecoder()
    # Split where the first byte says, so lines cross chunk boundaries.
    cut = data[0] if data else 0
    for chunk in (data[1 : 1 + cut], data[1 + cut :]):
        decoder.feed(chunk)
    decoder.close()


def xaps_target(data: bytes) -> None:
    with contextlib.suppress(xaps.XapsError):
        xaps.parse(data)


def imapscan_target(data: bytes) -> None:
    client = imapscan.ClientScanner()
    server = imapscan.ServerScanner()
    for chunk in (data[: len(data) // 2], data[len(data) // 2 :]):
        client.feed(chunk)
        for _ in server.feed(chunk):
            pass


def apns_target(data: bytes) -> None:
    status = int.from_bytes(data[:2], "big") % 1000
    apns.classify(status, data[2:], data[2:40].decode("utf-8", "replace"))


def config_target(data: bytes) -> None:
    with contextlib.suppress(config.ConfigError):
        config.parse(data.decode("utf-8", "replace"), CONFIG_PATH)


def relay_hello_target(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        parse_hello(data)


def xapsd_api_target(data: bytes) -> None:
    for parse in (compat.parse_register, compat.parse_notify):
        with contextlib.suppress(compat.CompatError):
            parse(data)


def _credentials_target(load: Callable[[Path], object]) -> Callable[[bytes], None]:
    path = Path(tempfile.mkdtemp(prefix="dovenotify-fuzz-")) / "credentials"

    def target(data: bytes) -> None:
        path.write_bytes(data)
        with contextlib.suppress(CertificateError):
            load(path)

    return target


TARGETS: dict[str, Callable[[], Callable[[bytes], None]]] = {
    "events": lambda: events_target,
    "xaps": lambda: xaps_target,
    "imapscan": lambda: imapscan_target,
    "apns": lambda: apns_target,
    "config": lambda: config_target,
    "relay-hello": lambda: relay_hello_target,
    "xapsd-api": lambda: xapsd_api_target,
    "certificate": lambda: _credentials_target(load_credentials),
    "p8-key": lambda: _credentials_target(load_token_key),
}


def seeds(target: str, directory: Path) -> None:
    """Real inputs to start from: libFuzzer mutates them towards new code."""
    texts: dict[str, list[bytes]] = {
        "events": [b"\x10MessageNew\talice\tINBOX\tlmtp\nMailboxRename\tbob\tA%09B\timap\tOld\n"],
        "xaps": [
            b'A1 XAPPLEPUSHSERVICE "aps-version" "2" "aps-account-id" "0715A26B"'
            b' "aps-device-token" "2918390218931890" "aps-subtopic" "com.apple.mobilemail"'
            b' "mailboxes" ("INBOX" "Notes")'
        ],
        "imapscan": [
            b"A1 LOGIN a b\r\nA2 APPEND INBOX {5}\r\nhello\r\n"
            b"A3 XAPPLEPUSHSERVICE aps-version 2\r\nA4 COMPRESS DEFLATE\r\n"
            b"* OK done\r\ndovenotify.1 OK NOOP done\r\n"
        ],
        "apns": [b"\x01\x9a" + b'{"reason": "Unregistered", "timestamp": 1700000000000}'],
        "config": [
            b"database: /var/lib/dovenotify/registrations.sqlite\nmetrics_listen: 127.0.0.1:9"
            b"\napns:\n  certificate: apns.pem\n  timeout: 5\nrelay_peers: [root, dovecot]\n"
        ],
        "relay-hello": [b'{"v": 1, "user": "alice", "ip": "192.0.2.1", "lookup": ""}\n'],
        "xapsd-api": [
            b'{"ApsAccountId": "A", "ApsDeviceToken": "ab", "ApsSubtopic": "com.apple.mobilemail",'
            b' "Username": "alice", "Mailboxes": ["INBOX"], "Mailbox": "INBOX"}'
        ],
    }
    if target in ("certificate", "p8-key"):
        from tests.harness.certs import make_test_pki

        pki = make_test_pki(directory / "pki")
        if target == "p8-key":
            files = [pki.token_key]
        else:
            c = pki.client_with_topics
            files = [c.combined_pem, c.p12, c.cert_pem, pki.client_without_uid]
        for n, path in enumerate(files):
            (directory / f"seed-{n}").write_bytes(path.read_bytes())
        shutil.rmtree(directory / "pki")
        return
    for n, text in enumerate(texts[target]):
        (directory / f"seed-{n}").write_bytes(text)


def run_one(target: str, seconds: int, artifacts: Path) -> tuple[str, str, str]:
    """(target, inputs tried, outcome)."""
    with tempfile.TemporaryDirectory(prefix=f"dovenotify-fuzz-{target}-") as corpus:
        seeds(target, Path(corpus))
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "scripts.fuzz_parsers",
                "--run",
                target,
                corpus,
                f"-max_total_time={seconds}",
                f"-artifact_prefix={artifacts}/{target}-",
                "-print_final_stats=1",
                "-rss_limit_mb=2048",
            ],
            capture_output=True,
            text=True,
        )
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", result.stderr)
    crashes = sorted(artifacts.glob(f"{target}-*"))
    if result.returncode == 0:
        outcome = "no crash"
    elif crashes:
        outcome = f"CRASH, input in {crashes[-1]}"
    else:
        tail = result.stderr.strip().splitlines()[-1:] or ["?"]
        outcome = f"failed ({result.returncode}): {tail[0]}"
    return target, f"{runs.group(1) if runs else '?'} inputs", outcome


def main() -> int:
    if RUNNING:
        # In the child: libFuzzer takes the rest of the arguments.
        target = TARGETS[sys.argv[2]]()
        atheris.Setup([sys.argv[0], *sys.argv[3:]], target)
        atheris.Fuzz()
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", metavar="target", help=", ".join(TARGETS))
    parser.add_argument("--seconds", type=int, default=20, help="per target (default 20)")
    parser.add_argument(
        "--artifacts", type=Path, default=Path("fuzz-artifacts"), help="where crashing inputs go"
    )
    args = parser.parse_args()
    for unknown in set(args.targets) - set(TARGETS):
        parser.error(f"unknown target {unknown!r}")
    args.artifacts.mkdir(parents=True, exist_ok=True)
    rows = [run_one(t, args.seconds, args.artifacts.resolve()) for t in args.targets or TARGETS]
    print_table(f"atheris, {args.seconds} s per parser", rows)
    return 0 if all(outcome == "no crash" for _, _, outcome in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
