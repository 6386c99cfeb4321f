"""The other Dovecot version, in a cached Debian chroot, so every run tests 2.3 and 2.4.

A Debian 12 host runs Dovecot 2.3 itself and 2.4 from a trixie chroot; a Debian 13
host runs 2.4 itself and 2.3 from a bookworm chroot. The chroot is made once with
debootstrap from the mirror the host's own apt sources name, and kept in
/var/cache/dovenotify-test/<codename>-<key>, where the key is a hash of what went
into it: change the package list and the next run builds a new one. It is built
in a temporary directory and renamed into place, so a directory under that name
is always complete.

Programs run in it through `command_prefix`: in a private mount namespace (so no
mount outlives the program or shows on the host) with the host's /dev, a fresh
/proc, and the host's /tmp bound over the chroot's. Tests keep their files under
/tmp, so every path, unix socket and log is the same inside and outside.

    python -m tests.harness.chroot     # build (or check) it now, as scripts/test does
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import attrs

CACHE = Path("/var/cache/dovenotify-test")
# What the tests need of a Dovecot installation (as in scripts/lib/setup.sh): the
# servers, Sieve, the Lua driver's socket library and the post-login helper's Python.
PACKAGES = (
    "dovecot-core",
    "dovecot-imapd",
    "dovecot-lmtpd",
    "dovecot-sieve",
    "lua-socket",
    "python3",
)
# Bump when the way the chroot is made changes, so that caches are rebuilt.
RECIPE = 1
# For each Dovecot the host may run: the other supported one, and where to get it.
OTHER_VERSION = {"2.3": ("2.4", "trixie"), "2.4": ("2.3", "bookworm")}
# Overrides the mirror read from the host's apt sources.
MIRROR_VARIABLE = "DOVENOTIFY_TEST_MIRROR"
BUILD_TIMEOUT = 900

# Runs "$@" chrooted in $0 inside the private mount namespace `unshare` made.
# `exec` keeps the PID, so the caller can stop the program by the PID it started.
_ENTER = (
    'mount --rbind /dev "$0/dev" && mount -t proc proc "$0/proc" '
    '&& mount --bind /tmp "$0/tmp" && exec chroot "$0" "$@"'
)


class ChrootError(RuntimeError):
    """The other-version chroot cannot be built or used."""


@attrs.frozen
class Target:
    version: str  # Dovecot major.minor in the chroot
    codename: str  # Debian release that ships it
    packages: tuple[str, ...] = PACKAGES
    # Roots for other purposes (the install test's) live beside, under a prefix of
    # their own, so that building one never removes another as stale.
    prefix: str = ""
    # Kept when something in the root runs apt-get install (the install test).
    keep_apt_lists: bool = False

    @property
    def key(self) -> str:
        recipe = f"{RECIPE}\n{self.codename}\n{platform.machine()}\n{' '.join(self.packages)}"
        return hashlib.sha256(recipe.encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        return f"{self.prefix}{self.codename}"

    @property
    def path(self) -> Path:
        return CACHE / f"{self.name}-{self.key}"


def other_target(host_version: str) -> Target:
    """The Dovecot version the host does not run, and the Debian release with it."""
    try:
        version, codename = OTHER_VERSION[host_version]
    except KeyError:
        raise ChrootError(
            f"no other Dovecot version is known for host version {host_version}"
        ) from None
    return Target(version, codename)


def command_prefix(chroot: Path) -> list[str]:
    """Prepend to an argv to run that program inside `chroot` (see the module doc)."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _ENTER, str(chroot)]


# --- the mirror, from the host's apt sources ---------------------------------


@attrs.frozen
class Source:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None = None


def _one_line_sources(text: str) -> Iterator[Source]:
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        options = re.match(r"^deb\s+\[([^\]]*)\]\s*", line)
        signed_by = None
        if options:
            found = re.search(r"signed-by=(\S+)", options[1])
            signed_by = found[1] if found else None
            line = "deb " + line[options.end() :]
        words = line.split()
        if len(words) >= 3 and words[0] == "deb":
            yield Source(words[1], (words[2],), tuple(words[3:]), signed_by)


def _deb822_sources(text: str) -> Iterator[Source]:
    for paragraph in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        name = None
        for line in paragraph.splitlines():
            if line.startswith("#"):
                continue
            if line[:1].isspace() and name:
                fields[name] += "\n" + line.strip()
            elif ":" in line:
                name, value = line.split(":", 1)
                name = name.strip().lower()
                fields[name] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        signed_by = fields.get("signed-by")
        # An inline key (several lines) cannot be passed to debootstrap as a file.
        signed_by = signed_by if signed_by and "\n" not in signed_by else None
        for uri in fields.get("uris", "").split():
            yield Source(
                uri,
                tuple(fields.get("suites", "").split()),
                tuple(fields.get("components", "").split()),
                signed_by,
            )


def host_sources(etc_apt: Path = Path("/etc/apt")) -> list[Source]:
    files = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*.list"))]
    sources = [s for f in files if f.is_file() for s in _one_line_sources(f.read_text())]
    for f in sorted((etc_apt / "sources.list.d").glob("*.sources")):
        sources.extend(_deb822_sources(f.read_text()))
    return sources


def host_codename(os_release: Path = Path("/etc/os-release")) -> str:
    found = re.search(r"^VERSION_CODENAME=\"?([\w-]+)", os_release.read_text(), re.MULTILINE)
    if found is None:
        raise ChrootError(f"{os_release} names no VERSION_CODENAME: is this Debian?")
    return found[1]


def debian_mirror(sources: Iterable[Source], codename: str) -> Source:
    """The source the host installs its own release's main packages from."""
    for source in sources:
        usable = re.match(r"^(https?|ftp|file):", source.uri)
        if usable and codename in source.suites and "main" in source.components:
            return source
    raise ChrootError(
        f"the host's apt sources (/etc/apt/sources.list, /etc/apt/sources.list.d/) have no "
        f"'deb' entry with suite {codename!r} and component 'main' on http(s), ftp or file; "
        f"debootstrap needs a Debian mirror: set {MIRROR_VARIABLE} to one"
    )


def mirror() -> Source:
    override = os.environ.get(MIRROR_VARIABLE)
    if override:
        return Source(override, (), ("main",))
    return debian_mirror(host_sources(), host_codename())


# --- building -----------------------------------------------------------------


def is_built(target: Target) -> bool:
    return (target.path / "usr" / "sbin" / "dovecot").is_file()


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        # Two test runs at once: the second waits for the first's build.
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _remove_tree(path: Path) -> None:
    # --one-file-system: never follow a mount a failed build may have left.
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def installed_version(chroot: Path) -> str:
    result = subprocess.run(
        [*command_prefix(chroot), "dovecot", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise ChrootError(
            f"`dovecot --version` fails in the chroot {chroot} (exit {result.returncode}): "
            f"{result.stderr.strip()[-500:]}"
        )
    return result.stdout.strip()


def build(target: Target, log: Path) -> None:
    """debootstrap `target` into a temporary directory and rename it into place."""
    if shutil.which("debootstrap") is None:
        raise ChrootError(
            "debootstrap is not installed (apt-get install debootstrap; scripts/test does it)"
        )
    source = mirror()
    work = Path(tempfile.mkdtemp(prefix=f".{target.path.name}.", dir=CACHE))
    # It becomes "/" for Dovecot's unprivileged users: mkdtemp's 0700 would lock them out.
    work.chmod(0o755)
    command = [
        # A private mount namespace: debootstrap's /proc and /sys mounts end with it.
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(target.packages)}",
    ]
    if source.signed_by and Path(source.signed_by).is_file():
        command.append(f"--keyring={source.signed_by}")
    command += [target.codename, str(work), source.uri]
    try:
        with log.open("wb") as out:
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=BUILD_TIMEOUT,
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            )
        if result.returncode != 0:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise ChrootError(
                f"debootstrap of {target.codename} from {source.uri} failed "
                f"(exit {result.returncode}); the end of {log}:\n" + "\n".join(tail)
            )
        # Downloaded packages and index files: 110 MB the tests never use.
        apt_dirs = ["var/cache/apt/archives"]
        apt_dirs += [] if target.keep_apt_lists else ["var/lib/apt/lists"]
        for directory in apt_dirs:
            for entry in (work / directory).glob("*"):
                if entry.is_file():
                    entry.unlink()
        version = installed_version(work)
        if not version.startswith(target.version + "."):
            raise ChrootError(
                f"{target.codename} from {source.uri} has Dovecot {version}, "
                f"not {target.version}: the tests need {target.version} there"
            )
        work.rename(target.path)
    except BaseException:
        _remove_tree(work)
        raise


def ensure(target: Target, *, report=sys.stderr) -> Path:
    """The chroot for `target`, built first if it is not in the cache."""
    if is_built(target):
        return target.path
    with _cache_lock():
        if is_built(target):
            return target.path
        log = CACHE / f"{target.name}.log"
        print(
            f"dovenotify tests: building a {target.codename} chroot with Dovecot "
            f"{target.version} in {target.path} (once; about a minute; log: {log}) ...",
            file=report,
            flush=True,
        )
        started = time.monotonic()
        build(target, log)
        print(
            f"dovenotify tests: built {target.path} in {time.monotonic() - started:.0f} s",
            file=report,
            flush=True,
        )
        # Chroots from older recipes or package lists, and what killed builds left
        # (we hold the lock: no build is running): 300 MB each, never used again.
        for stale in [*CACHE.glob(f"{target.name}-*"), *CACHE.glob(f".{target.name}-*")]:
            if stale != target.path:
                _remove_tree(stale)
    return target.path


def main() -> int:
    from dovenotify.dovecot_config import installed_dovecot_version

    try:
        target = other_target(installed_dovecot_version())
        path = ensure(target)
        print(f"Dovecot {installed_version(path)} for the tests is in {path}")
    except (ChrootError, ValueError) as e:
        print(f"dovenotify tests: cannot provide the other Dovecot version: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
