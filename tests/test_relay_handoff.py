"""The relay's handshake with the post-login helper, fed anything, over a real socket.

The helper connects, sends its hello line with the client's and Dovecot's
descriptors, waits for OK and answers GO. Whatever it sends instead (a hello
that is not one, too few or too many descriptors, no GO or another word), the
relay must neither die (it would take every relayed session with it) nor keep a
descriptor it will not use (each one is a client connection held open).
"""

from __future__ import annotations

import array
import json
import os
import socket
from pathlib import Path

import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dovenotify import relay
from dovenotify.dovecot.postlogin import hello_line
from dovenotify.service import unix_listener
from tests.harness.handoff import relays

names = st.text(st.characters(blacklist_categories=["Cs"]), max_size=20)
hellos = st.one_of(
    st.builds(hello_line, names, names, st.none() | names),
    st.binary(min_size=1, max_size=200),
    st.recursive(
        st.none() | st.booleans() | st.integers() | names,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3),
        max_leaves=8,
    ).map(lambda document: json.dumps(document).encode()),
)
answers = st.sampled_from([b"GO\n", b"", b"NO\n", b"GO", b"GO\nGO\n"]) | st.binary(max_size=8)


def helper(path: Path, hello: bytes, descriptors: int, go: bytes) -> tuple[bytes, list]:
    """Do what the post-login helper does, with these words; our ends of the
    descriptors handed over, and the relay's answer to the hello."""
    ours, theirs = [], []
    for _ in range(descriptors):
        mine, far = socket.socketpair()
        ours.append(mine)
        theirs.append(far)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as control:
        control.settimeout(5)
        control.connect(str(path))
        fds = array.array("i", [far.fileno() for far in theirs])
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)] if theirs else []
        control.sendmsg([hello], rights)
        for far in theirs:
            far.close()
        answer = control.recv(16)
        if answer == b"OK\n" and go:
            control.sendall(go)
        control.shutdown(socket.SHUT_WR)
        # The relay is done with the handshake once it hangs up.
        while control.recv(16):
            pass
    return answer, ours


def closed_by_the_relay(end: socket.socket) -> bool:
    end.settimeout(2)
    try:
        return end.recv(1) == b""
    except TimeoutError:
        return False
    finally:
        end.close()


async def handshake(path: Path, hello: bytes, descriptors: int, go: bytes) -> None:
    """The helper's handshake with these words, against a relay that must survive
    it, take the session if and only if it was the real thing, and otherwise close
    every descriptor it was given."""
    try:
        relay.parse_hello(hello)
        welcome = descriptors == 2
    except ValueError:
        welcome = False

    async def register(_registration: relay.Registration) -> None:
        raise AssertionError("nothing registers here")

    the_relay = relay.Relay(
        topic=lambda: "topic", register=register, allowed_uids=frozenset({os.getuid()})
    )
    # Run by the nursery: a relay that dies of the handshake fails the test.
    async with unix_listener(path, 0o600) as listener, trio.open_nursery() as nursery:
        await nursery.start(the_relay.serve, listener)
        answer, ours = await trio.to_thread.run_sync(helper, path, hello, descriptors, go)
        assert (answer == b"OK\n") == welcome, answer
        if welcome and go == b"GO\n":
            client, server = ours
            assert await trio.to_thread.run_sync(relays, (client, server))
            client.close()
            server.close()
            with trio.fail_after(5):
                while the_relay.connections:
                    await trio.sleep(0.01)
        else:
            for end in ours:
                assert await trio.to_thread.run_sync(closed_by_the_relay, end)
        nursery.cancel_scope.cancel()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hellos, st.integers(min_value=0, max_value=3), answers)
# The helper's own handshake, every run: the relay takes the session.
@example(hello_line("alice", "192.0.2.1", None), 2, b"GO\n")
def test_any_handshake_leaves_the_relay_running_and_no_descriptor_behind(
    tmp_path_factory, hello, descriptors, go
):
    path = tmp_path_factory.mktemp("relay") / "relay.sock"
    trio.run(handshake, path, hello, descriptors, go)


async def test_a_hello_nested_deeper_than_the_stack(tmp_path):
    # Not drawn by hypothesis, which lifts Python's recursion limit while it runs a
    # test: 2,000 brackets fit the relay's 4 KiB read and overflow the usual limit.
    await handshake(tmp_path / "relay.sock", b"[" * 2000 + b"]" * 2000, 2, b"GO\n")
