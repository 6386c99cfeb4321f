"""`dovenotify doctor`: check a real installation end to end, one verdict per check.

Each check is a function taking what earlier checks learnt (`Findings`) and
returning a `Verdict`: a one-line summary and, when it failed, the fix. Checks
act as the users Dovecot runs things as (the mail uid for the Lua driver,
Dovecot's internal user for the post-login helper), because "root can do it" is
how most broken installations look healthy. Nothing here sends a push or
changes a registration.

Over 400 lines: each check is short, and they read best side by side in the
order doctor prints them; split by topic, one verdict list would be scattered.
"""

from __future__ import annotations

import array
import ctypes
import grp
import json
import os
import pwd
import re
import socket
import ssl
import stat
import subprocess
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC
from pathlib import Path
from urllib.parse import urlsplit

import attrs
import h2.config
import h2.connection
import h2.events

from dovenotify.apns import certificates
from dovenotify.apns.auth import Auth, load_auth
from dovenotify.core import config as configuration
from dovenotify.dovecot.config import PLUGINS, VERSIONS
from dovenotify.events import spool
from dovenotify.store.backends import open_store
from dovenotify.store.base import StoreError

TIMEOUT = 5.0
RENEW_WARNING_DAYS = 30


@attrs.frozen
class Verdict:
    check: str
    ok: bool
    summary: str
    fix: str = ""


@attrs.frozen
class DovecotFacts:
    """What `doveconf` says about the parts of Dovecot's configuration dovenotify needs."""

    version: str
    mail_user: str
    internal_user: str
    lua_script: Path | None
    event_socket: Path | None
    relay_socket: Path | None
    mail_plugin_dir: Path


@attrs.define
class Findings:
    config_path: Path
    doveconf: Sequence[str]
    mail_user: str | None = None
    config: configuration.Config | None = None
    auth: Auth | None = None
    dovecot: DovecotFacts | None = None
    # Who the Lua driver runs as: Dovecot's mail_uid, --mail-user, or with system
    # users (mail_uid empty) the mail users found on this system.
    mail_users: tuple[str, ...] = ()


Check = Callable[[Findings], Verdict]


def run(findings: Findings) -> list[Verdict]:
    return [check(findings) for check in CHECKS]


# --- the checks, in the order an admin would fix things ----------------------


def check_config(f: Findings) -> Verdict:
    if not f.config_path.exists():
        return Verdict(
            "config",
            False,
            f"there is no configuration file {f.config_path}",
            "create it from dovenotify.example.yaml (`dovenotify setup` writes one), or "
            "name yours with --config FILE",
        )
    try:
        f.config = configuration.load(f.config_path)
    except configuration.ConfigError as e:
        fix = (
            "correct the key on the line named above"
            if f.config_path.is_file() and os.access(f.config_path, os.R_OK)
            else f"make {f.config_path} a file root can read"
        )
        return Verdict("config", False, str(e), fix)
    return Verdict("config", True, f"{f.config_path} is valid")


def check_certificate(f: Findings) -> Verdict:
    if f.config is None:
        return _skipped("certificate", "config")
    try:
        f.auth = load_auth(f.config.apns)
    except (certificates.CertificateError, OSError) as e:
        return Verdict("certificate", False, str(e), _credentials_fix(f.config.apns))
    user = service_user(f.config)
    config = f.config
    if unreadable := as_service_user(user, lambda: unreadable_file(credential_files(config))):
        return Verdict(
            "certificate",
            False,
            f"the service runs as {user}, who cannot read {unreadable}",
            f"let {user} read it: chgrp {_primary_group(user)} FILE && chmod 0640 FILE "
            "(`dovenotify cert import` keeps a replaced file's owner and mode)",
        )
    credentials = f.auth.credentials
    if credentials is None:
        apns = f.config.apns
        return Verdict(
            "certificate",
            True,
            f"token key {apns.key_id} of team {apns.team_id}, topic {f.auth.topic} "
            "(APNs judges a token only with a push)",
        )
    days = credentials.days_left()
    expiry = credentials.not_after.astimezone(UTC).date().isoformat()
    summary = f"topic {f.auth.topic}, {days:.0f} days left (until {expiry})"
    if days < RENEW_WARNING_DAYS:
        summary += "; renew it soon"
    return Verdict("certificate", True, summary)


def check_dovecot(f: Findings) -> Verdict:
    try:
        facts = read_dovecot(f.doveconf, f.mail_user)
    except DoveconfError as e:
        return Verdict(
            "dovecot", False, str(e), "fix Dovecot's configuration until doveconf -n works"
        )
    users = mail_users(facts.mail_user, f.mail_user is not None, f.config)
    if isinstance(users, str):
        return Verdict(
            "dovecot",
            False,
            users,
            "give --mail-user the user Dovecot reads mail as (e.g. vmail), or a user "
            "who gets mail here when mail users are system users",
        )
    problems = dovecot_problems(f.doveconf, facts, f.config)
    f.dovecot, f.mail_users = facts, users
    if problems:
        return Verdict(
            "dovecot",
            False,
            "; ".join(problems),
            "install the output of `dovenotify dovecot-config` in conf.d and reload Dovecot",
        )
    users = (
        f"; mail users are system users: checking as {', '.join(f.mail_users) or 'none found'}"
        if not facts.mail_user
        else ""
    )
    return Verdict(
        "dovecot",
        True,
        f"Dovecot {facts.version}: plugins, Lua driver, capability and post-login helper set"
        + users,
    )


def check_sockets(f: Findings) -> Verdict:
    if f.config is None or f.dovecot is None:
        return _skipped("sockets", "config" if f.config is None else "dovecot")
    mail, internal = ", ".join(f.mail_users) or "no mail user", f.dovecot.internal_user
    wanted = [(f.config.relay_socket, internal)]
    for user in f.mail_users:
        wanted.insert(0, (f.config.event_socket, user))
    problems = [problem for path, user in wanted if (problem := write_problem(path, user))]
    # Where the Lua driver appends each transaction's events.
    problems += [
        problem for user in f.mail_users if (problem := spool_problem(f.config.event_spool, user))
    ]
    if problems:
        return Verdict(
            "sockets",
            False,
            "; ".join(problems),
            f"start {_relay_runners(f.config)}; it creates the sockets (mode 0666), the "
            "event spool directory (0711) and a file in it for each mail uid (at its first "
            "event); their directories must let Dovecot's users in",
        )
    return Verdict(
        "sockets",
        True,
        f"{f.config.event_socket} and {f.config.event_spool} open to {mail}, "
        f"{f.config.relay_socket} open to {internal}",
    )


def check_lua(f: Findings) -> Verdict:
    if f.config is None or f.dovecot is None:
        return _skipped("lua", "config" if f.config is None else "dovecot")
    facts = f.dovecot
    script = facts.lua_script or f.config.dovecot_files / "dovenotify.lua"
    socket_path = facts.event_socket or f.config.event_socket
    try:
        library = lua_library(facts.mail_plugin_dir)
    except LuaError as e:
        return Verdict("lua", False, str(e), e.fix)
    if not f.mail_users:
        return Verdict(
            "lua",
            True,
            "not tried: no mail user found to try it as (system users, none has mail yet); "
            "`dovenotify doctor --mail-user NAME` tries it as NAME",
        )
    for user in f.mail_users:
        problem = as_user(user, lambda: run_lua_probe(library, script, socket_path))
        if problem:
            kind, _, detail = problem.partition(": ")
            fix = LUA_FIXES.get(kind, "see the message above")
            return Verdict("lua", False, f"as {user}: {detail or kind}", fix)
    return Verdict(
        "lua",
        True,
        f"as {', '.join(f.mail_users)}, {library.name} loads {script} and lua-socket "
        f"and connects to {socket_path}",
    )


LUA_FIXES = {
    "script": "run `dovenotify dovecot-config --install`: the mail user must read the script",
    "lua-socket": "apt-get install lua-socket",
    "connect": "start `dovenotify serve`, and check event_socket matches dovenotify_socket",
    "lua": "install Dovecot's Lua support (Debian: dovecot-core; Dovecot's own packages: "
    "dovecot-lua)",
}


def check_relay(f: Findings) -> Verdict:
    if f.config is None or f.dovecot is None:
        return _skipped("relay", "config" if f.config is None else "dovecot")
    user = f.dovecot.internal_user
    path, timeout = f.config.relay_socket, f.config.relay_timeout * 4
    problem = as_user(user, lambda: probe_relay(path, timeout))
    if problem == REFUSED:
        return Verdict(
            "relay",
            False,
            f"the relay at {path} hung up on {user} without answering",
            f"add {user} to relay_peers in {f.config_path} and restart {_relay_owner(f.config)}",
        )
    if problem:
        return Verdict("relay", False, f"as {user}: {problem}", f"start {_relay_owner(f.config)}")
    return Verdict("relay", True, f"the relay at {path} accepts connections from {user}")


def _relay_owner(config: configuration.Config) -> str:
    """Which command holds the relay socket (relay_process)."""
    return "`dovenotify relay`" if config.relay_process == "separate" else "`dovenotify serve`"


def _relay_runners(config: configuration.Config) -> str:
    if config.relay_process == "separate":
        return "`dovenotify serve` and `dovenotify relay`"
    return "`dovenotify serve`"


def check_apns(f: Findings) -> Verdict:
    if f.config is None or f.auth is None:
        return _skipped("apns", "config" if f.config is None else "certificate")
    endpoint = f.config.apns.endpoint
    problem = apns_handshake(f.auth.credentials, endpoint, f.config.apns.ca_file)
    if problem:
        return Verdict("apns", False, f"{endpoint}: {problem.message}", APNS_FIXES[problem.cause])
    what = "the certificate" if f.auth.credentials else "our connection"
    return Verdict("apns", True, f"{endpoint} accepts {what} (no push sent)")


def check_registrations(f: Findings) -> Verdict:
    if f.config is None:
        return _skipped("registrations", "config")
    database = f.config.database
    if "://" not in database and not Path(database).exists():
        return Verdict(
            "registrations",
            False,
            f"no database at {database}",
            "start `dovenotify serve` once; it creates the database",
        )
    try:
        store = open_store(database)
        try:
            devices = store.devices()
        finally:
            store.close()
    except StoreError as e:
        return Verdict("registrations", False, str(e), "check database in the configuration")
    if "://" not in database:
        user = service_user(f.config)
        if problem := as_service_user(user, lambda: unwritable_file(Path(database))):
            return Verdict(
                "registrations",
                False,
                f"the service runs as {user}, who cannot write {problem}",
                f"chown {user}: {database} (and its directory)",
            )
    users = len({d.username for d in devices})
    if not devices:
        return Verdict(
            "registrations",
            True,
            "no devices yet: on the iPhone, set the account to Push "
            "(Settings > Mail > Accounts > Fetch New Data)",
        )
    return Verdict("registrations", True, f"{len(devices)} device(s) of {users} user(s)")


CHECKS: tuple[Check, ...] = (
    check_config,
    check_certificate,
    check_dovecot,
    check_sockets,
    check_lua,
    check_relay,
    check_apns,
    check_registrations,
)


def _credentials_fix(apns: configuration.ApnsConfig) -> str:
    """The fix for credentials that would not load, by what is wrong with their files."""
    for key, path in (
        ("apns.certificate", apns.certificate),
        ("apns.key", apns.key),
        ("apns.password_file", apns.password_file),
        ("apns.token_key", apns.token_key),
    ):
        if path is None:
            continue
        if not path.exists():
            return (
                f"{key} names {path}, which does not exist: install the certificate with "
                "`dovenotify cert import FILE`, or correct the path (README: Certificates)"
            )
        if not os.access(path, os.R_OK):
            return f"{path} cannot be read even by root: check its permissions and mount"
    if apns.certificate is None and apns.token_key is None:
        return "set apns.certificate (or apns.token_key) to your APNs credentials"
    return (
        "replace them with current ones from Apple: `dovenotify cert import FILE` "
        "(README: Certificates)"
    )


def _skipped(check: str, needs: str) -> Verdict:
    return Verdict(check, False, f"not checked: the {needs} check failed", "fix that first")


# --- Dovecot's configuration -------------------------------------------------


class DoveconfError(Exception):
    pass


def doveconf(command: Sequence[str], *args: str) -> str:
    try:
        result = subprocess.run(
            [*command, *args], capture_output=True, text=True, timeout=TIMEOUT * 2
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DoveconfError(f"cannot run {command[0]}: {e}") from None
    if result.returncode != 0:
        message = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise DoveconfError(f"`{' '.join(command)} {' '.join(args)}` failed: {message[-1:]}")
    return result.stdout


def read_dovecot(command: Sequence[str], mail_user: str | None) -> DovecotFacts:
    def value(*args: str) -> str:
        return doveconf(command, *args).strip()

    # Parses the whole file, and its first line names the version: "# 2.3.19.1 (...)".
    header = re.match(r"# (\d+\.\d+)\.", doveconf(command, "-n"))
    if header is None or header[1] not in VERSIONS:
        raise DoveconfError(f"this Dovecot is not {' or '.join(VERSIONS)}")
    version = header[1]
    if version == "2.3":
        plugin = value("-f", "protocol=lmtp", "plugin")
        driver = re.search(r"push_notification_driver\d* = lua:file=(\S+)", plugin)
        lua_script = driver[1] if driver else None
        event_socket = re.search(r"dovenotify_socket = (\S+)", plugin)
    else:
        try:
            lua_script = value("-h", "push_notification/lua/lua_file") or None
            settings = value("-n", "push_notification/lua")
        except DoveconfError:
            lua_script, settings = None, ""
        event_socket = re.search(r"dovenotify_socket = (\S+)", settings)
    helper = value("-h", "service/imap-postlogin/executable") if _has_postlogin(command) else ""
    relay_socket = re.search(r"--socket (\S+)", helper)
    return DovecotFacts(
        version=version,
        mail_user=mail_user if mail_user is not None else value("-h", "mail_uid"),
        internal_user=value("-h", "default_internal_user"),
        lua_script=Path(lua_script) if lua_script else None,
        event_socket=Path(event_socket[1]) if event_socket else None,
        relay_socket=Path(relay_socket[1]) if relay_socket else None,
        mail_plugin_dir=Path(value("-h", "mail_plugin_dir")),
    )


def _has_postlogin(command: Sequence[str]) -> bool:
    return "imap-postlogin" in doveconf(command, "-h", "service/imap/executable")


def enabled(listing: str) -> set[str]:
    """Names in a 2.3 space-separated list or a 2.4 boolean list (`name = yes`)."""
    names = set()
    for line in listing.splitlines():
        if "=" in line:
            name, _, flag = line.partition("=")
            if flag.strip() == "yes":
                names.add(name.strip().strip('"'))
        else:
            names.update(word.lstrip("+") for word in line.split())
    return names


def dovecot_problems(
    command: Sequence[str], facts: DovecotFacts, config: configuration.Config | None
) -> list[str]:
    problems = []
    for protocol in ("imap", "lmtp"):
        plugins = enabled(doveconf(command, "-f", f"protocol={protocol}", "-h", "mail_plugins"))
        missing = [p for p in PLUGINS if p not in plugins]
        if missing:
            problems.append(f"{protocol} lacks mail plugins {', '.join(missing)}")
    if "XAPPLEPUSHSERVICE" in enabled(
        doveconf(command, "-f", "protocol=imap", "-h", "imap_capability")
    ):
        # The relay advertises it where it answers it; Dovecot would offer it
        # also where nobody does (relay down, users outside relay_only_field).
        problems.append("imap_capability adds XAPPLEPUSHSERVICE (the relay advertises it)")
    if facts.lua_script is None:
        problems.append("no push_notification Lua driver is configured")
    if facts.relay_socket is None:
        problems.append("imap does not run the dovenotify post-login helper")
    if config is not None:
        for what, dovecots, ours, key in (
            ("Lua driver", facts.event_socket, config.event_socket, "event_socket"),
            ("post-login helper", facts.relay_socket, config.relay_socket, "relay_socket"),
        ):
            if dovecots is not None and dovecots != ours:
                problems.append(f"the {what} uses {dovecots} but {key} is {ours}")
    return problems


# --- sockets, as the users that use them ------------------------------------


def write_problem(path: Path, user: str) -> str | None:
    """Why `user` could not connect to the socket at `path`."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError as e:
        return f"{path}: {e.strerror}"
    if not stat.S_ISSOCK(st.st_mode):
        return f"{path} is not a socket"
    try:
        entry = _user(user)
    except KeyError as e:
        return e.args[0]
    groups = set(os.getgrouplist(entry.pw_name, entry.pw_gid))
    if problem := _entry_problem(path.parents, entry, groups, user):
        return problem
    if not _may(st, entry.pw_uid, groups, 0o2):
        return (
            f"{user} may not write to {path} "
            f"(mode {stat.S_IMODE(st.st_mode):04o}, owner {_name(st.st_uid)})"
        )
    return None


def spool_problem(path: Path, user: str) -> str | None:
    """Why `user`'s mail processes could not append to their file in the spool at
    `path`. No file yet is fine: the service makes it at the uid's first event."""
    try:
        entry = _user(user)
        if not path.is_dir():
            return f"{path} is not a directory" if path.exists() else f"{path} does not exist"
        groups = set(os.getgrouplist(entry.pw_name, entry.pw_gid))
        if problem := _entry_problem([path, *path.parents], entry, groups, user):
            return problem
        own = spool.file_of(path, entry.pw_uid)
        if own.exists() and not spool.appendable(own, entry.pw_uid):
            return f"{user} may not append to {own}: dovenotify gives it an ACL saying so"
    except KeyError as e:
        return e.args[0]
    except OSError as e:
        return f"{path}: {e.strerror}"
    return None


def _entry_problem(
    directories: Iterable[Path], entry: pwd.struct_passwd, groups: set[int], user: str
) -> str | None:
    """Which of `directories` (a path's parents) `user` cannot enter, if any."""
    for directory in sorted(directories, key=lambda d: len(d.parts)):
        if not _may(directory.stat(), entry.pw_uid, groups, 0o1):
            return f"{user} cannot enter {directory}"
    return None


def _may(st: os.stat_result, uid: int, groups: set[int], bit: int) -> bool:
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid in groups:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def _user(user: str) -> pwd.struct_passwd:
    """The passwd entry of a name or uid; KeyError naming the problem if none."""
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError, OverflowError):
        raise KeyError(f"there is no user {user!r} on this system") from None


def _primary_group(user: str) -> str:
    try:
        gid = _user(user).pw_gid
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return user


# The service's own user, when nothing running says otherwise (README, setup).
SERVICE_USER = "dovenotify"
# Users checked as when mail users are system users: enough to catch a directory
# closed to them, few enough to stay quick.
MAX_MAIL_USERS = 3
# Debian's range of accounts made with adduser (login.defs UID_MIN, UID_MAX).
_REGULAR_UIDS = range(1000, 60001)


def mail_users(
    configured: str, given: bool, config: configuration.Config | None
) -> tuple[str, ...] | str:
    """Who the Lua driver runs as, or why that cannot be told.

    `configured` is --mail-user (`given`) or Dovecot's mail_uid. Empty mail_uid
    means system users: the driver runs as each recipient, so check as users who
    registered devices, else as the first regular accounts.
    """
    if given or configured:
        source = "--mail-user" if given else "Dovecot's mail_uid"
        if not configured:
            return f"{source} is empty, so it names no user"
        try:
            return (_user(configured).pw_name,)
        except KeyError as e:
            return f"{source}: {e.args[0]}"
    found = [name for name in _registered_users(config) if _exists(name)]
    if not found:
        found = [
            entry.pw_name
            for entry in sorted(pwd.getpwall(), key=lambda e: e.pw_uid)
            if entry.pw_uid in _REGULAR_UIDS and not entry.pw_shell.endswith(("/nologin", "/false"))
        ]
    return tuple(found[:MAX_MAIL_USERS])


def _registered_users(config: configuration.Config | None) -> list[str]:
    if config is None:
        return []
    try:
        store = open_store(config.database)
        try:
            return sorted({d.username for d in store.devices()})
        finally:
            store.close()
    except StoreError:
        return []


def _exists(user: str) -> bool:
    try:
        _user(user)
    except KeyError:
        return False
    return True


def service_user(config: configuration.Config) -> str:
    """Who `dovenotify serve` runs as: the owner of the socket it made, else its usual user."""
    for path in (config.event_socket, config.relay_socket):
        try:
            return _name(path.stat().st_uid)
        except OSError:
            continue
    return SERVICE_USER if _exists(SERVICE_USER) else _name(os.geteuid())


def as_service_user(user: str, work: Callable[[], str | None]) -> str | None:
    """`work`'s answer as `user`; None when this doctor cannot act as them (not root):
    the checks done as root stand then."""
    if os.geteuid() != 0 and user != _name(os.geteuid()):
        return None
    return as_user(user, work)


def credential_files(config: configuration.Config) -> list[Path]:
    apns = config.apns
    candidates = (apns.certificate, apns.key, apns.password_file, apns.token_key, apns.ca_file)
    return [path for path in candidates if path is not None]


def unreadable_file(paths: Sequence[Path]) -> str | None:
    """The first of `paths` this process cannot open for reading, with why."""
    for path in paths:
        try:
            path.open("rb").close()
        except OSError as e:
            return f"{path} ({e.strerror})"
    return None


def unwritable_file(path: Path) -> str | None:
    try:
        os.close(os.open(path, os.O_RDWR))
    except OSError as e:
        return f"{path} ({e.strerror})"
    return None


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def as_user(user: str, work: Callable[[], str | None]) -> str | None:
    """Run `work` in a child process with `user`'s uid, gid and groups; return its answer."""
    try:
        entry = _user(user)
    except KeyError as e:
        return e.args[0]
    if os.geteuid() != 0:
        if entry.pw_uid == os.geteuid():
            return work()
        return f"run the doctor as root, so it can act as {user}"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        answer = ""
        try:
            os.close(read_end)
            os.initgroups(entry.pw_name, entry.pw_gid)
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            answer = work() or ""
        except BaseException as e:
            answer = f"{type(e).__name__}: {e}"
        finally:
            os.write(write_end, answer.encode("utf-8", "replace"))
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode()
    os.waitpid(pid, 0)
    return answer or None


# --- the Lua driver's view ---------------------------------------------------


class LuaError(Exception):
    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.fix = fix


def lua_library(plugin_dir: Path) -> Path:
    """The Lua library Dovecot's mail_lua plugin is linked against."""
    plugin = plugin_dir / "lib01_mail_lua_plugin.so"
    if not plugin.exists():
        raise LuaError(f"{plugin} is missing", LUA_FIXES["lua"])
    try:
        linked = subprocess.run(
            ["ldd", str(plugin)], capture_output=True, text=True, timeout=TIMEOUT
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LuaError(f"cannot run ldd: {e}", "install libc-bin") from None
    found = re.search(r"\bliblua[\w.-]*\.so[\d.]* => (\S+)", linked)
    if found is None:
        raise LuaError(f"cannot tell which Lua {plugin.name} uses", LUA_FIXES["lua"])
    return Path(found[1])


# Runs in the mail user's process. Errors start with a kind for LUA_FIXES.
_LUA_PROBE = """
local script, path = [==[%s]==], [==[%s]==]
-- What Dovecot gives scripts: a warning (e.g. bytecode of another Lua) is a problem.
local warned
dovecot = { i_warning = function(text) warned = warned or text end }
local chunk, err = loadfile(script)
if not chunk then error("script: " .. tostring(err), 0) end
local ok, loaded = pcall(chunk)
if not ok then error("script: " .. tostring(loaded), 0) end
if warned then error("script: " .. warned, 0) end
local ok2, unix = pcall(require, "socket.unix")
if not ok2 then error("lua-socket: " .. tostring(unix), 0) end
local conn = (unix.stream or unix)()
conn:settimeout(%g)
local connected, cerr = conn:connect(path)
conn:close()
if not connected then error("connect: " .. path .. ": " .. tostring(cerr), 0) end
"""


def run_lua_probe(library: Path, script: Path, socket_path: Path) -> str | None:
    """Run the driver script (which loads the driver) and load lua-socket in the Lua
    Dovecot uses, then connect to the socket the driver falls back to."""
    # Global, as in Dovecot: C modules such as lua-socket resolve lua_* from it.
    lua = ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    lua.luaL_newstate.restype = ctypes.c_void_p
    lua.lua_tolstring.restype = ctypes.c_char_p
    lua.lua_tolstring.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)
    state = ctypes.c_void_p(lua.luaL_newstate())
    lua.luaL_openlibs(state)
    code = (_LUA_PROBE % (script, socket_path, TIMEOUT)).encode()
    failed = lua.luaL_loadstring(state, ctypes.c_char_p(code)) or lua.lua_pcallk(
        state, 0, 0, 0, None, None
    )
    answer = " ".join(lua.lua_tolstring(state, -1, None).decode().split()) if failed else None
    lua.lua_close(state)
    return answer


# --- the relay and APNs ------------------------------------------------------

REFUSED = "refused"


def probe_relay(path: Path, timeout: float) -> str | None:
    """Hand the relay a connection the way the post-login helper does, minus the GO.

    Without the final GO the relay lets go of the connection silently, as it does
    when a helper gives up waiting, so a probe leaves no trace in any session.
    """
    ours, theirs = socket.socketpair()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as control:
            control.settimeout(timeout)
            control.connect(str(path))
            hello = json.dumps({"v": 1, "user": "dovenotify-doctor", "ip": ""}).encode()
            fds = array.array("i", [theirs.fileno(), theirs.fileno()])
            control.sendmsg([hello + b"\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            answer = control.recv(64)
    except (BrokenPipeError, ConnectionResetError):
        # The relay checks the peer's uid first and hangs up on strangers.
        return REFUSED
    except OSError as e:
        return f"{path}: {e.strerror or e}"
    finally:
        ours.close()
        theirs.close()
    if answer == b"OK\n":
        return None
    return REFUSED if not answer else f"unexpected answer {answer[:40]!r}"


@attrs.frozen
class ApnsProblem:
    cause: str  # a key of APNS_FIXES
    message: str


APNS_FIXES = {
    "dns": "this host cannot look up the APNs name: check its DNS resolver "
    "(/etc/resolv.conf) and apns.endpoint",
    "connect": "nothing answered there: allow outgoing TCP to APNs (port 443 or 2197) "
    "through firewall and proxy, and check apns.endpoint",
    "trust": "the server's certificate is not trusted: something intercepts TLS on the "
    "way, or apns.ca_file is wrong",
    "tls": "APNs refused the certificate: check it is Apple's, current, and for this "
    "environment (production or sandbox) (README: Troubleshooting)",
    "server": "the server there is not APNs: check apns.endpoint",
}


def apns_handshake(
    credentials: certificates.Credentials | None, endpoint: str, ca_file: Path | None
) -> ApnsProblem | None:
    """TLS with the client certificate, then HTTP/2 SETTINGS both ways; no request.

    Under TLS 1.3 the server judges the client certificate after the client has
    finished its handshake, so only the server's first HTTP/2 frame proves the
    certificate was accepted.
    """
    url = urlsplit(endpoint)
    host, port = url.hostname or "", url.port or 443
    try:
        context = certificates.client_ssl_context(credentials, ca_file)
        with (
            socket.create_connection((host, port), timeout=TIMEOUT) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            if tls.selected_alpn_protocol() != "h2":
                return ApnsProblem("server", "the server does not speak HTTP/2")
            h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            h2c.initiate_connection()
            tls.sendall(h2c.data_to_send())
            while True:
                data = tls.recv(65536)
                if not data:
                    return ApnsProblem("tls", "the server closed the connection")
                for event in h2c.receive_data(data):
                    if isinstance(event, h2.events.ConnectionTerminated):
                        detail = (event.additional_data or b"").decode(errors="replace")
                        message = f"the server ended the connection: {detail or event.error_code}"
                        return ApnsProblem("tls", message)
                    if isinstance(event, h2.events.RemoteSettingsChanged):
                        h2c.close_connection()
                        tls.sendall(h2c.data_to_send())
                        return None
    except socket.gaierror as e:
        return ApnsProblem("dns", f"DNS lookup of {host} failed: {e.strerror}")
    except ssl.SSLCertVerificationError as e:
        return ApnsProblem("trust", f"TLS failed: {e.verify_message or e.reason}")
    except ssl.SSLError as e:
        return ApnsProblem("tls", f"TLS failed: {e.reason or e}")
    except (ConnectionResetError, BrokenPipeError) as e:
        # Under TLS 1.2 a refused client certificate can look like this too.
        return ApnsProblem("tls", f"the server hung up during TLS: {e.strerror or e}")
    except OSError as e:
        return ApnsProblem("connect", f"cannot connect: {e.strerror or e}")
