"""What an administrator looks at: metrics and /healthz, the xapsd-compatible API, the
HTTP endpoints serving both, `doctor`'s checks and the xapsd import.

It reads the flows below (relay, events, apns, store, dovecot); nothing below
imports it.
"""

from dovenotify.admin.compat import CompatApi
from dovenotify.admin.endpoints import EndpointError, Gauges, open_endpoints, serve_endpoints
from dovenotify.admin.metrics import Metrics, MetricsApi, Samples

__all__ = [
    "CompatApi",
    "EndpointError",
    "Gauges",
    "Metrics",
    "MetricsApi",
    "Samples",
    "open_endpoints",
    "serve_endpoints",
]
