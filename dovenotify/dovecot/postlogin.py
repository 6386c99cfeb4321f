"""dovenotify post-login helper: hands the IMAP connection to the dovenotify relay.

Dovecot runs this after a user has logged in (facts.md §3), with the client
connection on fds 0 and 1 and the rest of the login chain in argv. It runs as
Dovecot's internal user under the system Python, so it uses the standard library
only. Whatever goes wrong, it ends by exec'ing the chain: at worst the user gets
plain IMAP without push registration, never a failed login.

Usage (appended by script-login): postlogin.py --socket PATH --timeout SECONDS
    [--user-field NAME] [--only-field NAME] CHAIN...

With --only-field, users whose userdb lacks that field (or has it empty) are not
relayed: the chain goes on at once, without a word in the log.
"""

# Every login waits for this script, so it imports only modules built into the
# interpreter, and the C ones: `socket`, `json`, `os` and `array` would pull in
# enum, re and collections, whose import takes longer than the rest of the script
# takes to run (`array` alone costs 4 ms through collections.abc).
import _socket
import posix
import sys
import time

PROTOCOL = 1
# Dovecot writes the session's output to our end of the new pipe: a bigger send
# buffer lets it write ahead of the relay, as it would to a TCP socket. The kernel
# caps it at net.core.wmem_max.
SEND_BUFFER = 4 * 1024 * 1024


def parse_args(args):
    options = {
        "socket": "/run/dovenotify/relay.sock",
        "timeout": "0.5",
        "user-field": "",
        "only-field": "",
    }
    while args and args[0].startswith("--") and len(args) >= 2:
        options[args[0][2:]] = args[1]
        args = args[2:]
    return options, args


def json_string(text):
    escaped = "".join(
        "\\" + c if c in '"\\' else f"\\u{ord(c):04x}" if c < " " else c for c in text
    )
    return '"' + escaped + '"'


def hello_line(user, ip, lookup=None):
    """The JSON line that tells the relay who logged in."""
    fields = [("user", user), ("ip", ip)] + ([("lookup", lookup)] if lookup is not None else [])
    body = ", ".join(f"{json_string(k)}: {json_string(v)}" for k, v in fields)
    return f'{{"v": {PROTOCOL}, {body}}}\n'.encode()


def environ(name):
    # posix.environ holds bytes; decoded as os.environ does, so that a name that is
    # not UTF-8 fails the hello's encode() below (a ValueError) and not the login.
    return posix.environ.get(name.upper().encode(), b"").decode("utf-8", "surrogateescape")


def hand_over(path, timeout, user_field):
    """Give the client connection to the relay; return our end of the new pipe."""
    deadline = time.monotonic() + timeout
    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
    control = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        ours.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF, SEND_BUFFER)
        control.settimeout(timeout)
        control.connect(path)
        hello = hello_line(
            environ("USER"), environ("IP"), environ(user_field) if user_field else None
        )
        # Two C ints, as SCM_RIGHTS wants them.
        fds = (0).to_bytes(4, sys.byteorder) + theirs.fileno().to_bytes(4, sys.byteorder)
        control.sendmsg([hello], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        control.settimeout(max(deadline - time.monotonic(), 0.001))
        answer = control.recv(64)
        if answer != b"OK\n":
            raise OSError(f"the relay answered {answer[:40]!r}")
        # Only now do we commit: a relay that answered late sees no GO and lets go.
        control.sendall(b"GO\n")
        return ours
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
        control.close()


def main(argv):
    options, chain = parse_args(argv[1:])
    if not chain:
        sys.stderr.write("dovenotify-postlogin: no login chain to continue with\n")
        return 1
    only = options["only-field"]
    if only and not environ(only):
        posix.execv(chain[0], chain)
    try:
        ours = hand_over(options["socket"], float(options["timeout"]), options["user-field"])
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or "timed out"
        sys.stderr.write(
            f"dovenotify-postlogin: relay {options['socket']} unavailable ({reason});"
            " this session goes on without push registration\n"
        )
    else:
        posix.dup2(ours.fileno(), 0)
        posix.dup2(ours.fileno(), 1)
        ours.close()
    posix.execv(chain[0], chain)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
