"""The pure parts of #12: who may send for whom, TCP peers, token syntax, escaping."""

import pwd
from pathlib import Path

import pytest

from dovenotify import cli, config
from dovenotify.logsetup import escape_controls
from dovenotify.peers import EventPolicy, Peer, PeerRule, find_tcp_uid
from dovenotify.xaps import token_problem

# /proc/net/tcp and tcp6 as Linux writes them (little-endian words): a connection
# from 127.0.0.1:48000 to 127.0.0.1:11619 owned by uid 1001, and its server end.
TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2D63 0100007F:BB80 01 00000000:00000000 00:00000000 00000000     0        0 1
   1: 0100007F:BB80 0100007F:2D63 01 00000000:00000000 00:00000000 00000000  1001        0 2
"""
TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:BB80 00000000000000000000000001000000:2D63 01 00000000:00000000 00:00000000 00000000  1002        0 3
"""  # noqa: E501
LOOPBACK6 = bytes(15) + b"\x01"
MAPPED = bytes(10) + b"\xff\xff\x7f\x00\x00\x01"


def test_the_owner_of_a_loopback_connection_is_found_in_proc_net_tcp():
    assert find_tcp_uid(TCP, ((MAPPED, 48000), (MAPPED, 11619))) == 1001
    assert find_tcp_uid(TCP6, ((LOOPBACK6, 48000), (LOOPBACK6, 11619))) == 1002
    assert find_tcp_uid(TCP, ((MAPPED, 48001), (MAPPED, 11619))) is None


def test_other_uids_may_send_events_only_for_their_own_user():
    nobody = pwd.getpwnam("nobody")
    policy = EventPolicy(PeerRule.parse(("daemon",)))
    key = str.lower
    root = policy.sender(Peer(1, 0, 0))
    daemon = policy.sender(Peer(1, 1, 1))
    own = policy.sender(Peer(1, nobody.pw_uid, nobody.pw_gid))
    stranger = policy.sender(Peer(1, 4_000_000, 4_000_000))
    assert root.may_send_for("alice", key) and daemon.may_send_for("alice", key)
    assert own.may_send_for("NOBODY", key) and not own.may_send_for("alice", key)
    assert not stranger.may_send_for("alice", key) and stranger.own is None
    assert own.describe() == f"pid 1 (uid {nobody.pw_uid} (nobody), gid {nobody.pw_gid})"


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        ("ab" * 32, None),
        ("AB" * 100, None),
        ("a", "must be hexadecimal, two digits per byte"),
        ("abc", "must be hexadecimal, two digits per byte"),
        ("zz", "must be hexadecimal, two digits per byte"),
        ("ab" * 101, "is longer than 200 characters"),
    ],
)
def test_a_device_token_is_whole_bytes_in_hex_within_apns_limit(token, problem):
    assert token_problem(token) == problem


def test_control_characters_are_escaped():
    assert escape_controls("a\x1b[2Jb\nc\td\x9b") == "a\\x1b[2Jb\\x0ac\\x09d\\x9b"
    assert escape_controls("Entwürfe") == "Entwürfe"


@pytest.mark.parametrize(
    "line",
    [
        "event_line_max: 100",
        "event_connections: 0",
        "registrations_per_user: -1",
        "event_connection_seconds: 0",
        "http_connections: many",
        "event_spool_size: 1.5",
    ],
)
def test_bounds_are_checked(line):
    with pytest.raises(config.ConfigError, match=line.split(":")[0]):
        config.parse(line, Path("dovenotify.yaml"))


def test_the_last_resort_says_what_failed_in_one_line():
    group = ExceptionGroup("nursery", [KeyError("alice")])
    assert cli._cause(group) == "KeyError: 'alice'"
    assert cli._cause(RuntimeError("first\nsecond")) == "RuntimeError: first"


def test_an_unexpected_failure_is_one_line_and_exit_1(monkeypatch, capsys):
    def boom(args):
        raise ExceptionGroup("nursery", [KeyError("nosuchuser")])

    monkeypatch.setattr(cli, "_devices", boom)
    assert cli.main(["devices"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "KeyError: 'nosuchuser'" in err
    assert "Traceback" not in err
