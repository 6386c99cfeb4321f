"""The shipped systemd units: valid for systemd, and the relay's unit independent of
the push unit, so that restarting one never restarts or cuts off the other.

No systemd runs as PID 1 here: `systemd-analyze verify` loads the units as
systemd would and reports what it would reject or ignore.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness.service import dovenotify_command

UNITS = Path(__file__).resolve().parents[2] / "dovecot-conf" / "systemd"
NAMES = ("dovenotify.service", "dovenotify-relay.service")
# Dependencies that would stop or restart one unit along with the other.
COUPLING = (
    "PartOf",
    "BindsTo",
    "Requires",
    "Requisite",
    "PropagatesReloadTo",
    "ReloadPropagatedFrom",
)

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / name).read_text())
    return parser


def test_systemd_accepts_both_units(tmp_path):
    command = " ".join(dovenotify_command())
    for name in NAMES:
        text = (UNITS / name).read_text().replace("/usr/local/bin/dovenotify", command)
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / n) for n in NAMES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_relay_unit_is_not_restarted_with_the_push_unit():
    push, relay = unit("dovenotify.service"), unit("dovenotify-relay.service")
    assert relay["Service"]["ExecStart"].split()[1:3] == ["relay", "--config"]
    assert relay["Service"]["Type"] == "notify"
    for this, other in ((push, "dovenotify-relay.service"), (relay, "dovenotify.service")):
        for key in COUPLING:
            assert other not in this["Unit"].get(key, "")
        # /run/dovenotify holds both sockets: stopping either unit must not remove it.
        assert this["Service"]["RuntimeDirectory"] == "dovenotify"
        assert this["Service"]["RuntimeDirectoryPreserve"] == "yes"
