"""Fresh Debian roots for the install test: what an admin has before the README.

One per Dovecot version (bookworm: 2.3, trixie: 2.4), built once with debootstrap
like the other-version chroot (tests/harness/chroot.py) and cached beside it under
the prefix `install-`. They hold what the README's install block asks apt for, and
keep apt's package lists so that its `apt-get install` line runs as written. A test
works on a copy (`fresh_copy`), never on the cached root.

    python -m tests.harness.install_root     # build both now
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from tests.harness import chroot

# The packages of the README's apt-get line, plus what a Debian server has anyway
# (ca-certificates for pip, openssl for Dovecot's self-signed certificate).
PACKAGES = (
    "adduser",
    "ca-certificates",
    "dovecot-core",
    "dovecot-imapd",
    "dovecot-lmtpd",
    "lua-socket",
    "openssl",
    "python3",
    "python3-venv",
    "supervisor",
)
TARGETS = {
    version: chroot.Target(version, codename, PACKAGES, prefix="install-", keep_apt_lists=True)
    for version, codename in (("2.3", "bookworm"), ("2.4", "trixie"))
}


def ensure(version: str) -> Path:
    return chroot.ensure(TARGETS[version])


def fresh_copy(version: str) -> Path:
    """A private copy of the cached root for `version`, in a new directory under /tmp."""
    cached = ensure(version)
    work = Path(tempfile.mkdtemp(prefix=f"dovenotify-install-{version}-"))
    work.chmod(0o755)
    subprocess.run(["cp", "-a", "--reflink=auto", f"{cached}/.", str(work)], check=True)
    return work


def remove(root: Path) -> None:
    # --one-file-system: never follow a mount a test may have left behind.
    subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)


def main() -> int:
    for version in TARGETS:
        print(f"Dovecot {version}: {ensure(version)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
