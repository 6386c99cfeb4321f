"""Hand a connection to the relay exactly as the post-login helper does, without Dovecot.

    client, server = hand_over(relay_socket)   # the two far ends the relay joins
    client.sendall(b"a NOOP\\r\\n"); server.recv(64) == b"a NOOP\\r\\n"

For tests and benchmarks that need many relayed sessions (a Dovecot process per
session would measure Dovecot). Runs as the caller's uid, which the relay must
allow (root is allowed by default).
"""

from __future__ import annotations

import array
import json
import socket


def hand_over(relay_socket: str, user: str = "bench") -> tuple[socket.socket, socket.socket]:
    """Give the relay one connection; return the client's and Dovecot's far ends."""
    client, client_far = socket.socketpair()
    server_far, server = socket.socketpair()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as control:
            control.settimeout(5)
            control.connect(relay_socket)
            fds = array.array("i", [client_far.fileno(), server_far.fileno()])
            hello = json.dumps({"v": 1, "user": user, "ip": "127.0.0.1"}).encode() + b"\n"
            control.sendmsg([hello], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            answer = control.recv(16)
            if answer != b"OK\n":
                raise ConnectionRefusedError(f"the relay answered {answer!r}")
            control.sendall(b"GO\n")
    except BaseException:
        client.close()
        server.close()
        raise
    finally:
        client_far.close()
        server_far.close()
    return client, server


def relays(pair: tuple[socket.socket, socket.socket]) -> bool:
    """Whether a command written at the client's end comes out at Dovecot's."""
    client, server = pair
    client.sendall(b"c NOOP\r\n")
    server.settimeout(5)
    return server.recv(64) == b"c NOOP\r\n"
