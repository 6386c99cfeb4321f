"""Prometheus metrics and a health verdict for `metrics_listen`.

Counters and the latency histogram are updated as things happen (`Metrics`);
gauges are sampled at scrape time (`Samples`), so they cannot drift. The text
comes from prometheus_client, on a registry of our own (not its global one, which
would add the process's own metrics under names we never promised). `/healthz`
answers 503 with the reasons when APNs refuses our credentials, the certificate
has expired, or the event socket Dovecot writes to is no longer ours.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Iterator

import attrs
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE

from dovenotify.admin.httpserver import Request, Response
from dovenotify.apns import protocol as apns
from dovenotify.events.decoder import BadLine, Event
from dovenotify.events.dispatch import DELAYED, IMMEDIATE, wants
from dovenotify.store.base import Registration

# A `_created` series per counter is not among the names dovenotify exposes.
prometheus_client.disable_created_metrics()

# Seconds from Dovecot's event to APNs's answer: new mail is pushed within
# milliseconds, other changes wait for coalescing (30 s, at most 120 s).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# What a TLS alert about our client certificate looks like in a transport failure.
_CERTIFICATE_ALERT = re.compile(
    r"ALERT_(BAD_CERTIFICATE|UNKNOWN_CA|CERTIFICATE_\w+|UNSUPPORTED_CERTIFICATE|ACCESS_DENIED)",
    re.IGNORECASE,
)


# prometheus_client writes labels sorted by name; dovenotify_pushes_total has
# always put `result` first, and text that alerts and scripts grep keeps that order.
_PUSH_LABELS = re.compile(
    r'^dovenotify_pushes_total\{reason="((?:[^"\\]|\\.)*)",result="((?:[^"\\]|\\.)*)"\}',
    re.MULTILINE,
)


def _bound(value: float) -> str:
    """A bucket's `le` as it has always been written (`1`, not prometheus_client's `1.0`):
    dashboards and alerts select buckets by that label."""
    return str(int(value)) if value == int(value) else repr(float(value))


@attrs.define
class Histogram:
    """Latency observations, kept here so that the buckets' labels stay as they were."""

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

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation)
        buckets = [(_bound(b), c) for b, c in zip(self.buckets, self.counts, strict=True)]
        family.add_metric([], [*buckets, ("+Inf", self.count)], self.total)
        return family


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
    registry: CollectorRegistry = attrs.field(factory=CollectorRegistry)
    latency: Histogram = attrs.field(factory=Histogram)
    # Why APNs refuses our credentials, until an answer shows it accepts them.
    apns_refusal: str | None = None
    # When the oldest event not yet pushed happened, per device.
    _waiting_since: dict[tuple[str, str, str], float] = attrs.field(factory=dict)
    # The gauges' values for the scrape under way (`render` sets them).
    _samples: Samples | None = None
    _pushes: Counter = attrs.field(init=False)
    _events_received: Counter = attrs.field(init=False)
    _events_dropped: Counter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._pushes = Counter(
            "dovenotify_pushes",
            "APNs answers by result and reason.",
            ("result", "reason"),
            registry=self.registry,
        )
        self.registry.register(_Scraped(self))
        self._events_received = Counter(
            "dovenotify_events_received", "Events read from Dovecot.", registry=self.registry
        )
        self._events_dropped = Counter(
            "dovenotify_events_dropped",
            "Event lines that could not be used (incomplete: the sender timed out).",
            ("reason",),
            registry=self.registry,
        )
        for reason in ("incomplete", "malformed"):
            self._events_dropped.labels(reason)

    # --- recording -------------------------------------------------------

    def event(self, event: Event, devices: Iterable[Registration], now: float) -> None:
        self._events_received.inc()
        if event.name not in IMMEDIATE and event.name not in DELAYED:
            return
        for device in devices:
            if wants(device, event.mailbox):
                self._waiting_since.setdefault(device.key, now)

    def dropped(self, bad: BadLine) -> None:
        # The reason text names the line's details; the label must stay few-valued.
        self._events_dropped.labels(
            "incomplete" if bad.reason.startswith("incomplete") else "malformed"
        ).inc()

    def pushed(self, device: Registration, outcome: apns.Outcome, now: float) -> None:
        reason = outcome.reason if outcome.status is not None else "transport"
        self._pushes.labels(outcome.action.value, reason or "").inc()
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
        # Scrapes run one at a time, in the service's one trio thread.
        self._samples = samples
        try:
            text = generate_latest(self.registry).decode()
        finally:
            self._samples = None
        return _PUSH_LABELS.sub(r'dovenotify_pushes_total{result="\2",reason="\1"}', text)

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


@attrs.define(eq=False)  # registered by identity
class _Scraped:
    """The latency histogram and the gauges, read when a scrape asks for them."""

    metrics: Metrics

    def collect(self) -> Iterator[Metric]:
        yield self.metrics.latency.family(
            "dovenotify_push_latency_seconds",
            "From Dovecot's event to APNs's answer, coalescing delay included.",
        )
        samples = self.metrics._samples
        if samples is None:
            return
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
                int(self.metrics.apns_refusal is not None),
            ),
        ]
        for name, documentation, value in gauges:
            # None: not ours to tell (token auth has no certificate to expire).
            if value is not None:
                yield GaugeMetricFamily(name, documentation, value=value)


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
