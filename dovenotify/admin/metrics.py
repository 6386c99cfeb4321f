"""Prometheus metrics and a health verdict for `metrics_listen`.

Counters and the latency histogram are updated as things happen (`Metrics`);
gauges are sampled at scrape time (`Samples`), so they cannot drift. The text
exposition format is small enough to write here rather than pull in a client
library and its global registry. `/healthz` answers 503 with the reasons when
APNs refuses our credentials, the certificate has expired, or the event socket
Dovecot writes to is no longer ours.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, Iterable

import attrs

from dovenotify.admin.httpserver import Request, Response
from dovenotify.apns import protocol as apns
from dovenotify.events.decoder import BadLine, Event
from dovenotify.events.dispatch import DELAYED, IMMEDIATE, wants
from dovenotify.store.base import Registration

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds from Dovecot's event to APNs's answer: new mail is pushed within
# milliseconds, other changes wait for coalescing (30 s, at most 120 s).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# What a TLS alert about our client certificate looks like in a transport failure.
_CERTIFICATE_ALERT = re.compile(
    r"ALERT_(BAD_CERTIFICATE|UNKNOWN_CA|CERTIFICATE_\w+|UNSUPPORTED_CERTIFICATE|ACCESS_DENIED)",
    re.IGNORECASE,
)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if value != int(value) else str(int(value))


def _family(name: str, kind: str, help: str) -> list[str]:
    return [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]


@attrs.define
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = attrs.field(init=False)
    total: float = 0.0
    count: int = 0

    def __attrs_post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [
            f'{name}_bucket{{le="{_number(b)}"}} {c}'
            for b, c in zip(self.buckets, self.counts, strict=True)
        ]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {_number(self.total)}")
        out.append(f"{name}_count {self.count}")
        return out


@attrs.frozen
class Samples:
    """Gauges read from the running service at scrape time."""

    pending_pushes: int
    registrations: int
    relayed_connections: int | None
    certificate_days_left: float | None
    event_listener_problem: str | None


@attrs.define
class Metrics:
    pushes: dict[Labels, int] = attrs.field(factory=dict)
    events_received: int = 0
    events_dropped: dict[Labels, int] = attrs.field(factory=dict)
    latency: Histogram = attrs.field(factory=Histogram)
    # Why APNs refuses our credentials, until an answer shows it accepts them.
    apns_refusal: str | None = None
    # When the oldest event not yet pushed happened, per device.
    _waiting_since: dict[tuple[str, str, str], float] = attrs.field(factory=dict)

    # --- recording -------------------------------------------------------

    def event(self, event: Event, devices: Iterable[Registration], now: float) -> None:
        self.events_received += 1
        if event.name not in IMMEDIATE and event.name not in DELAYED:
            return
        for device in devices:
            if wants(device, event.mailbox):
                self._waiting_since.setdefault(device.key, now)

    def dropped(self, bad: BadLine) -> None:
        # The reason text names the line's details; the label must stay few-valued.
        reason = "incomplete" if bad.reason.startswith("incomplete") else "malformed"
        key = (("reason", reason),)
        self.events_dropped[key] = self.events_dropped.get(key, 0) + 1

    def pushed(self, device: Registration, outcome: apns.Outcome, now: float) -> None:
        reason = outcome.reason if outcome.status is not None else "transport"
        key = (("result", outcome.action.value), ("reason", reason or ""))
        self.pushes[key] = self.pushes.get(key, 0) + 1
        if _refuses_credentials(outcome):
            self.apns_refusal = f"{outcome.status or 'TLS'} {outcome.reason}".strip()
        elif outcome.status is not None:
            self.apns_refusal = None
        if outcome.action is apns.Action.DELIVERED:
            since = self._waiting_since.pop(device.key, None)
            if since is not None:
                self.latency.observe(max(now - since, 0.0))
        elif outcome.action in (apns.Action.DROP_TOKEN, apns.Action.TOKEN_NOT_FOR_TOPIC):
            self._waiting_since.pop(device.key, None)

    def gave_up(self, device: Registration) -> None:
        self._waiting_since.pop(device.key, None)

    # --- reading ---------------------------------------------------------

    def render(self, samples: Samples) -> str:
        lines: list[str] = []
        lines += _family("dovenotify_pushes_total", "counter", "APNs answers by result and reason.")
        lines += [
            f"dovenotify_pushes_total{_labels(k)} {v}" for k, v in sorted(self.pushes.items())
        ]
        lines += _family(
            "dovenotify_push_latency_seconds",
            "histogram",
            "From Dovecot's event to APNs's answer, coalescing delay included.",
        )
        lines += self.latency.lines("dovenotify_push_latency_seconds")
        lines += _family("dovenotify_events_received_total", "counter", "Events read from Dovecot.")
        lines.append(f"dovenotify_events_received_total {self.events_received}")
        lines += _family(
            "dovenotify_events_dropped_total",
            "counter",
            "Event lines that could not be used (incomplete: the sender timed out).",
        )
        for reason in ("incomplete", "malformed"):
            key = (("reason", reason),)
            lines.append(
                f"dovenotify_events_dropped_total{_labels(key)} {self.events_dropped.get(key, 0)}"
            )
        gauges = [
            ("dovenotify_pending_pushes", "Pushes waiting to be sent.", samples.pending_pushes),
            ("dovenotify_registrations", "Registered devices.", samples.registrations),
            (
                "dovenotify_relayed_connections",
                "IMAP connections going through the relay now.",
                samples.relayed_connections,
            ),
            (
                "dovenotify_certificate_days_left",
                "Days until the APNs certificate expires.",
                samples.certificate_days_left,
            ),
            (
                "dovenotify_apns_credentials_refused",
                "1 while APNs refuses our credentials.",
                int(self.apns_refusal is not None),
            ),
        ]
        for name, help, value in gauges:
            if value is None:
                continue
            lines += _family(name, "gauge", help)
            lines.append(f"{name} {_number(value)}")
        return "\n".join(lines) + "\n"

    def health_problems(self, samples: Samples) -> list[str]:
        problems = []
        if self.apns_refusal is not None:
            problems.append(f"APNs refuses our credentials: {self.apns_refusal}")
        if samples.certificate_days_left is not None and samples.certificate_days_left < 0:
            problems.append("the APNs certificate has expired")
        if samples.event_listener_problem is not None:
            problems.append(samples.event_listener_problem)
        return problems


def _refuses_credentials(outcome: apns.Outcome) -> bool:
    if outcome.status == 403:
        return True
    return outcome.status is None and bool(_CERTIFICATE_ALERT.search(outcome.reason))


@attrs.define
class MetricsApi:
    metrics: Metrics
    sample: Callable[[], Awaitable[Samples]]

    async def handle(self, request: Request) -> Response:
        if request.method != "GET":
            return Response(405, b"GET only\n")
        if request.path == "/metrics":
            body = self.metrics.render(await self.sample()).encode()
            return Response(200, body, CONTENT_TYPE)
        if request.path == "/healthz":
            problems = self.metrics.health_problems(await self.sample())
            if problems:
                return Response(503, ("\n".join(problems) + "\n").encode())
            return Response(200, b"ok\n")
        return Response(404, b"not found: try /metrics or /healthz\n")
