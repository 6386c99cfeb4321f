"""The registration relay: an IMAP session handed over by Dovecot's post-login helper.

`imapscan` and `xaps` are sans-I/O (bytes in, actions out); `handoff` reads what
the post-login helper passes; `server` runs one task per handed-over connection
and steps aside (`zerocopy`) once the session is past what it needs to see;
`listen` opens it as configured. It stores registrations and knows nothing of
events or APNs: the topic comes in as a function.
"""

from dovenotify.relay.listen import open_relay, register_keyed
from dovenotify.relay.server import Relay

__all__ = ["Relay", "open_relay", "register_keyed"]
