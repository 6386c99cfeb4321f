"""metrics_listen: Prometheus text and /healthz, scraped over HTTP from the running stack."""

from __future__ import annotations

import re
import signal
import socket
from pathlib import Path

import httpx
import trio

from tests.harness.dovecot import deliver, free_ports
from tests.harness.stack import Stack, run_stack

ACCOUNT = "0715A26B-CA09-4730-A419-793000CA982E"
TOKEN = "2918390218931890821908309283098109381029309829018310983092892829"
DELIVERED = 'dovenotify_pushes_total{result="delivered",reason=""}'


def metric(text: str, name: str) -> float:
    """The value of one sample line, `name` including its labels."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in:\n{text}")


async def scrape_until(http: httpx.AsyncClient, name: str, value: float) -> str:
    """Scrape until `name` reaches `value`: the service records an answer just after
    the stand-in has it, and nothing outside the service can await that moment."""
    with trio.fail_after(5):
        while True:
            text = (await http.get("/metrics")).text
            if f"\n{name} " in text and metric(text, name) >= value:
                return text
            await trio.sleep(0.01)


async def registered_stack_phone(stack: Stack):
    phone = await stack.iphone("alice")
    assert (await phone.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])).ok
    return phone


def send_raw_event(stack: Stack, data: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(stack.settings["event_socket"])
        s.sendall(data)


async def test_metrics_count_pushes_latency_and_gauges(test_pki):
    (port,) = free_ports(1)
    overrides = {"metrics_listen": f"127.0.0.1:{port}"}
    async with (
        run_stack(test_pki, overrides, version=None) as stack,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http,
    ):
        phone = await registered_stack_phone(stack)
        await trio.to_thread.run_sync(
            deliver, stack.dovecot, "alice", b"Subject: hi\r\n\r\nhello\r\n"
        )
        await stack.standin.next_request()
        text = await scrape_until(http, DELIVERED, 1)

        response = await http.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert metric(text, DELIVERED) == 1
        assert metric(text, "dovenotify_push_latency_seconds_count") == 1
        # LMTP delivery to APNs answer, on loopback: well under a second.
        assert 0 < metric(text, "dovenotify_push_latency_seconds_sum") < 1
        assert metric(text, 'dovenotify_push_latency_seconds_bucket{le="1"}') == 1
        assert metric(text, "dovenotify_events_received_total") >= 1
        assert metric(text, "dovenotify_registrations") == 1
        assert metric(text, "dovenotify_relayed_connections") == 1
        assert metric(text, "dovenotify_pending_pushes") == 0
        assert 364 < metric(text, "dovenotify_certificate_days_left") < 366
        assert metric(text, "dovenotify_apns_credentials_refused") == 0

        # A line cut off by the Lua driver's timeout is counted as dropped.
        send_raw_event(stack, b"MessageNew\talice\tINB")
        await scrape_until(http, 'dovenotify_events_dropped_total{reason="incomplete"}', 1)

        # A flag change waits to coalesce: pending until it is due.
        assert (await phone.command("SELECT INBOX")).ok
        assert (await phone.command("STORE 1 +FLAGS (\\Flagged)")).ok
        await scrape_until(http, "dovenotify_pending_pushes", 1)
        await phone.logout()
        await scrape_until(http, "dovenotify_relayed_connections", 0)
        text = (await http.get("/metrics")).text
        assert metric(text, "dovenotify_relayed_connections") == 0
        assert (await http.get("/nothing")).status_code == 404


async def test_healthz_fails_on_refused_credentials_and_a_lost_event_socket(test_pki):
    (port,) = free_ports(1)
    overrides = {"metrics_listen": f"127.0.0.1:{port}"}
    async with (
        run_stack(test_pki, overrides, version=None) as stack,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http,
    ):
        healthy = await http.get("/healthz")
        assert (healthy.status_code, healthy.text) == (200, "ok\n")

        phone = await registered_stack_phone(stack)
        stack.standin.queue_answers((403, {"reason": "BadCertificate"}))
        await trio.to_thread.run_sync(
            deliver, stack.dovecot, "alice", b"Subject: hi\r\n\r\nhello\r\n"
        )
        await stack.standin.next_request()
        await scrape_until(http, "dovenotify_apns_credentials_refused", 1)
        refused = await http.get("/healthz")
        assert refused.status_code == 503
        assert "APNs refuses our credentials: 403 BadCertificate" in refused.text
        text = (await http.get("/metrics")).text
        assert (
            metric(text, 'dovenotify_pushes_total{result="config_error",reason="BadCertificate"}')
            == 1
        )
        # The admin fixes the credentials and reloads: the held push goes out and
        # the first accepted push makes the service healthy again.
        stack.service.process.send_signal(signal.SIGHUP)
        await stack.standin.next_request()
        await scrape_until(http, DELIVERED, 1)
        assert (await http.get("/healthz")).status_code == 200
        await phone.logout()

        # /run cleaned up under a running service: Dovecot can no longer reach it.
        Path(stack.settings["event_socket"]).unlink()
        lost = await http.get("/healthz")
        assert lost.status_code == 503
        assert re.search(r"the event socket \S+ is gone", lost.text), lost.text
