"""Dovecot's events: the Lua driver's lines decoded (sans-I/O), the spool it falls back
to, the peers allowed to send them, and who is pushed when (`dispatch`, time as a
parameter). The I/O around them is push/intake.py.
"""

from dovenotify.events.decoder import BadLine, Event, EventDecoder
from dovenotify.events.dispatch import Dispatcher, wants
from dovenotify.events.peers import PeerRule, peer_of

__all__ = ["BadLine", "Dispatcher", "Event", "EventDecoder", "PeerRule", "peer_of", "wants"]
