"""The YAML configuration: schema, defaults, and errors that name file, key and line.

Nothing else in dovenotify reads YAML. Every key named here is a public contract:
admins' files use them, so keys are added, never renamed or dropped.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import yaml

DEFAULT_PATH = Path("/etc/dovenotify/dovenotify.yaml")
LOG_LEVELS = ("debug", "info", "warning", "error")
SANDBOX_ENDPOINT = "https://api.sandbox.push.apple.com"


class ConfigError(Exception):
    """A configuration problem, worded for the admin who has to fix it."""


@attrs.frozen
class ApnsConfig:
    certificate: Path | None = None
    key: Path | None = None
    password_file: Path | None = None
    endpoint: str = "https://api.push.apple.com"
    ca_file: Path | None = None
    push_type: str = "background"
    expiration: int = 86400
    priority: int | None = None
    # Apple's development environment; switches the default endpoint.
    sandbox: bool = False
    # One of the certificate's topics (topics extension); default: its subject UID.
    topic: str | None = None
    # Seconds to wait for APNs (connect, TLS handshake, answer) before retrying.
    timeout: float = 10.0
    # Token authentication instead of a client certificate (.p8 key from Apple).
    token_key: Path | None = None
    key_id: str | None = None
    team_id: str | None = None


@attrs.frozen
class Config:
    path: Path
    database: str = "/var/lib/dovenotify/registrations.sqlite"
    event_socket: Path = Path("/run/dovenotify/events.sock")
    relay_socket: Path = Path("/run/dovenotify/relay.sock")
    apns: ApnsConfig = ApnsConfig()
    log_level: str = "info"
    # "text" for people, "json" (one object per line) for log collectors.
    log_format: str = "text"
    # host:port for Prometheus /metrics and /healthz; None: not served.
    metrics_listen: tuple[str, int] | None = None
    # host:port (loopback only) serving xapsd's /register and /notify to the
    # dovecot-xaps C plugin; None: not served.
    compat_listen: tuple[str, int] | None = None
    # Where `dovenotify dovecot-config --install` puts the Lua script and the
    # post-login helper: Dovecot's unprivileged users must be able to read them,
    # which a virtualenv under /root is not.
    dovecot_files: Path = Path("/usr/local/lib/dovenotify")
    helper_python: Path = Path("/usr/bin/python3")
    event_timeout: float = 0.2
    relay_timeout: float = 0.5
    # Users allowed to hand connections to the relay (they assert who logged in).
    relay_peers: tuple[str, ...] = ("root", "dovecot")
    user_lookup: str | None = None
    # How IMAP logins and LMTP recipients become one key (see usernames.py).
    username_format: str = "lowercase"
    default_domain: str | None = None
    # Changes other than new mail wait `delay` seconds for more to coalesce, but
    # never more than `max_delay` after the first one.
    delay: float = 30.0
    max_delay: float = 120.0
    # Dovecot services whose events push; doveadm (and dsync through it) is left
    # out because it replays changes the devices' own sessions already made.
    push_services: tuple[str, ...] = ("imap", "lmtp", "lda", "pop3")
    # Who may send events for any user (users or uids; @group or @gid for a group),
    # besides root and Dovecot's mail_uid. Any other uid may send events only for
    # the user whose account it is (system users).
    event_peers: tuple[str, ...] | None = None
    # The directory where the Lua driver appends the events it could not send, one
    # file per uid; drained by the service.
    event_spool: Path = Path("/var/lib/dovenotify/events.spool")
    # Bytes one uid's spool file may grow to; past it the driver stops appending
    # and the service, once back, pushes every device that uid may send events for.
    event_spool_size: int = 1024 * 1024
    # Bounds on what one event connection may cost: bytes per line, lines, seconds.
    event_line_max: int = 8192
    event_connection_lines: int = 10000
    event_connection_seconds: float = 2.0
    # Event connections read at once, in all and per uid that may send only its own
    # user's events (mail uids and root share the total).
    event_connections: int = 256
    event_connections_per_uid: int = 8
    # A user's registrations beyond this many: the oldest give way.
    registrations_per_user: int = 20
    # Mailboxes one registration may ask pushes for; the rest are not pushed.
    mailboxes_per_registration: int = 100
    # Connections the HTTP endpoints (metrics_listen, compat_listen) serve at once.
    http_connections: int = 64
    # Seconds a registration lasts unless the device registers again (iOS does at
    # every connection); older ones get no pushes and are deleted.
    registration_ttl: float = 30 * 86400.0
    # Relay only users whose userdb has this field, non-empty (e.g. the users who
    # may use push); the others' sessions go straight to Dovecot. None: everyone.
    relay_only_field: str | None = None
    # How long a push that keeps failing for transient reasons is retried.
    retry_deadline: float = 3600.0
    # inline: `dovenotify serve` runs the relay. separate: `dovenotify relay` runs
    # it, so restarting `serve` (upgrade, crash, new credentials) keeps relayed sessions.
    relay_process: str = "inline"


# --- schema -----------------------------------------------------------------

Check = Callable[[Any], Any]


def _string(what: str) -> Check:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError(f"expected {what}")
        return value

    return check


def _path(value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a file path")
    return Path(value)


def _optional(check: Check) -> Check:
    def optional(value: Any) -> Any:
        return None if value is None else check(value)

    return optional


def _number(minimum: float, maximum: float, integer: bool = False) -> Check:
    kind = "a whole number" if integer else "a number"

    def check(value: Any) -> float:
        ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type or not minimum <= value <= maximum:
            raise ValueError(f"expected {kind} from {minimum:g} to {maximum:g}")
        return value

    return check


def _choice(*choices: object) -> Check:
    def check(value: Any) -> Any:
        if isinstance(value, bool) or value not in choices:
            raise ValueError("expected one of " + ", ".join(map(str, choices)))
        return value

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _words(what: str) -> Check:
    def check(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(
            isinstance(v, str | int) and not isinstance(v, bool) and str(v) for v in value
        ):
            raise ValueError(f"expected a list of {what}")
        return tuple(str(v) for v in value)

    return check


def _domain(value: Any) -> str:
    if not isinstance(value, str) or not value or "@" in value or value != value.strip():
        raise ValueError("expected a mail domain such as example.org")
    return value.lower()


def _endpoint(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("https://"):
        raise ValueError("expected an https:// URL")
    return value.rstrip("/")


def _listen(*, loopback_only: bool) -> Check:
    def check(value: Any) -> tuple[str, int]:
        what = "a loopback host:port such as 127.0.0.1:11619" if loopback_only else "host:port"
        if not isinstance(value, str):
            raise ValueError(f"expected {what}")
        host, _, port = value.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        # isdigit() alone would let "²" through to int().
        if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise ValueError(f"expected {what}")
        if loopback_only and not _is_loopback(host):
            raise ValueError(f"expected {what}: this API has no authentication")
        return host, int(port)

    return check


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("expected a list of user names")
    return tuple(value)


APNS_KEYS: dict[str, Check] = {
    "certificate": _optional(_path),
    "key": _optional(_path),
    "password_file": _optional(_path),
    "endpoint": _endpoint,
    "ca_file": _optional(_path),
    "push_type": _choice("background", "alert"),
    "expiration": _number(0, 30 * 86400, integer=True),
    "priority": _optional(_choice(1, 5, 10)),
    "sandbox": _boolean,
    "topic": _optional(_string("an APNs topic")),
    "timeout": _number(0.1, 300),
    "token_key": _optional(_path),
    "key_id": _optional(_string("the key id Apple shows for the .p8 key")),
    "team_id": _optional(_string("your Apple developer team id")),
}

TOP_KEYS: dict[str, Check] = {
    "database": _string("a file path or a postgresql:// URL"),
    "event_socket": _path,
    "relay_socket": _path,
    "log_level": _choice(*LOG_LEVELS),
    "log_format": _choice("text", "json"),
    "metrics_listen": _optional(_listen(loopback_only=False)),
    "compat_listen": _optional(_listen(loopback_only=True)),
    "dovecot_files": _path,
    "helper_python": _path,
    "event_timeout": _number(0.01, 5),
    "relay_timeout": _number(0.05, 10),
    "relay_peers": _names,
    "user_lookup": _optional(_string("a userdb field name")),
    "username_format": _choice("lowercase", "localpart", "full"),
    "default_domain": _optional(_domain),
    "delay": _number(0, 3600),
    "max_delay": _number(0, 86400),
    "push_services": _words("Dovecot service names (imap, lmtp, lda, pop3, doveadm)"),
    "event_peers": _optional(_words("users or uids, and @groups or @gids")),
    "event_spool": _path,
    "event_spool_size": _number(4096, 1024**3, integer=True),
    "event_line_max": _number(512, 1024 * 1024, integer=True),
    "event_connection_lines": _number(1, 10**7, integer=True),
    "event_connection_seconds": _number(0.1, 60),
    "event_connections": _number(1, 100000, integer=True),
    "event_connections_per_uid": _number(1, 100000, integer=True),
    "registrations_per_user": _number(1, 100000, integer=True),
    "mailboxes_per_registration": _number(1, 100000, integer=True),
    "http_connections": _number(1, 100000, integer=True),
    "registration_ttl": _number(60, 10 * 365 * 86400),
    "relay_only_field": _optional(_string("a userdb field name")),
    "retry_deadline": _number(0, 7 * 86400),
    "relay_process": _choice("inline", "separate"),
}


# --- loading ----------------------------------------------------------------


def load(path: Path) -> Config:
    """Read and check the configuration file; raise ConfigError naming what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration file: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: the configuration file is not UTF-8 text") from e
    return parse(text, path)


def parse(text: str, path: Path) -> Config:
    try:
        data = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}{where}: this is not valid YAML: {problem}") from e
    except RecursionError as e:
        # PyYAML builds nested lists and mappings recursively: "[[[[…" a thousand deep.
        raise ConfigError(f"{path}: this YAML is nested too deeply to read") from e
    if data is None:
        return Config(path=path)
    top = _mapping(data, path, "the top level", lines.get(()))
    values = _check_keys(top, TOP_KEYS, path, lines, prefix=(), nested={"apns"})
    if "apns" in top:
        apns = _mapping(top["apns"], path, "apns", lines.get(("apns",)))
        apns_values = _check_keys(apns, APNS_KEYS, path, lines, prefix=("apns",))
        if apns_values.get("sandbox") and "endpoint" not in apns_values:
            apns_values["endpoint"] = SANDBOX_ENDPOINT
        values["apns"] = ApnsConfig(**apns_values)
    _check_together(values, path, lines)
    return _resolve_relative_paths(Config(path=path, **values))


def _check_together(
    values: Mapping[str, Any], path: Path, lines: Mapping[tuple[str, ...], int]
) -> None:
    """Keys that are each fine but do not fit together."""
    defaults = Config(path=path)
    delay = values.get("delay", defaults.delay)
    max_delay = values.get("max_delay", defaults.max_delay)
    if max_delay < delay:
        where = f"{path} line {lines.get(('max_delay',), lines.get(('delay',), '?'))}"
        raise ConfigError(
            f"{where}: max_delay ({max_delay:g} s) is shorter than delay ({delay:g} s);"
            " it bounds how long delay may postpone a push, so it must be at least as long"
        )
    if values.get("username_format") == "full" and not values.get("default_domain"):
        where = f"{path} line {lines.get(('username_format',), '?')}"
        raise ConfigError(
            f"{where}: username_format 'full' needs default_domain, the domain added"
            " to user names that have none (e.g. default_domain: example.org)"
        )


def _key_lines(node: yaml.Node | None, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Line number of every key, so a message can point at the line to fix."""
    lines: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*prefix, str(key_node.value))
            lines[key] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, key))
    return lines


def _mapping(value: Any, path: Path, what: str, line: int | None) -> dict[str, Any]:
    if not isinstance(value, dict):
        where = f" line {line}" if line else ""
        raise ConfigError(f"{path}{where}: {what}: expected a mapping of keys to values")
    return {str(k): v for k, v in value.items()}


def _check_keys(
    given: Mapping[str, Any],
    schema: Mapping[str, Check],
    path: Path,
    lines: Mapping[tuple[str, ...], int],
    prefix: tuple[str, ...],
    nested: frozenset[str] | set[str] = frozenset(),
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, value in given.items():
        if name in nested:
            continue
        dotted = ".".join((*prefix, name))
        where = f"{path} line {lines.get((*prefix, name), '?')}"
        if name not in schema:
            close = difflib.get_close_matches(name, [*schema, *nested], n=1)
            hint = f" (did you mean '{'.'.join((*prefix, close[0]))}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key {_quoted(name, dotted)}{hint}")
        try:
            values[name] = schema[name](value)
        except ValueError as e:
            raise ConfigError(f"{where}: {dotted}: {e}, got {_describe(value)}") from None
    return values


def _quoted(name: str, dotted: str) -> str:
    """A key as the message shows it. Dots, quotes and control characters in a name
    that YAML allowed would make the message ambiguous, or reach a terminal raw:
    such a key is shown in double quotes, escaped as in JSON."""
    if re.fullmatch(r"[\w-]+", name):
        return f"'{dotted}'"
    return json.dumps(dotted, ensure_ascii=False)


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a yes/no value)"
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, list | dict):
        return "a list" if isinstance(value, list) else "a mapping"
    return repr(value)


def _resolve_relative_paths(config: Config) -> Config:
    """Relative paths in the file are relative to the file, not to the working directory."""
    base = config.path.parent

    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else base / p

    apns = attrs.evolve(
        config.apns,
        certificate=fix(config.apns.certificate),
        key=fix(config.apns.key),
        password_file=fix(config.apns.password_file),
        ca_file=fix(config.apns.ca_file),
        token_key=fix(config.apns.token_key),
    )
    database = config.database
    if "://" not in database and not Path(database).is_absolute():
        database = str(base / database)
    return attrs.evolve(
        config,
        apns=apns,
        database=database,
        event_socket=fix(config.event_socket),
        relay_socket=fix(config.relay_socket),
        dovecot_files=fix(config.dovecot_files),
        event_spool=fix(config.event_spool),
    )
