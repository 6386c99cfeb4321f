"""Delivery to APNs: the request and answer rules (`protocol`, sans-I/O), an HTTP/2
client state machine (`http2`), the trio sender over it, credentials
(certificates or a token), and the outbox that retries with backoff.
"""

from dovenotify.apns.auth import Auth, load_auth, open_sender
from dovenotify.apns.certificates import CertificateError, Credentials
from dovenotify.apns.outbox import Gate, Outbox
from dovenotify.apns.protocol import Action, Outcome, Push
from dovenotify.apns.sender import ApnsSender

__all__ = [
    "Action",
    "ApnsSender",
    "Auth",
    "CertificateError",
    "Credentials",
    "Gate",
    "Outbox",
    "Outcome",
    "Push",
    "load_auth",
    "open_sender",
]
