"""After an APNs outage, pushes flow again at the outage's pace, not each device's.

The sender and the HTTP/2 mTLS APNs stand-in are real; the service is built in
this process so its backoffs can be scaled down to fit a test (seconds where a
site has minutes). Dovecot plays no part in when a retry goes, so events enter
where the event socket hands them over.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import trio

from dovenotify.apns_auth import load_auth, open_sender
from dovenotify.config import ApnsConfig, Config
from dovenotify.events import Event
from dovenotify.outbox import Outbox
from dovenotify.service import Service
from dovenotify.store import Registration, open_store
from tests.harness.apns_standin import Answer, RecordedRequest, run_apns_standin
from tests.harness.certs import Pki

TOKENS = [f"{n:064x}" for n in range(1, 4)]
# At most a second between probes here, a minute by default; the devices' own
# backoffs are left to grow as they do on a site.
PROBE_INTERVAL = 1.0
# Rounds of each device's own retries before APNs recovers: its backoff then is
# 1.5 * 2**ROUNDS seconds (jitter fixed at its largest), 24 s for 4.
ROUNDS = 4


async def test_pushes_flow_within_the_probe_interval_after_apns_recovers(
    test_pki: Pki, tmp_path: Path
) -> None:
    unavailable = Answer(503, {"reason": "ServiceUnavailable"})
    answered: list[tuple[float, RecordedRequest, int]] = []

    def responder(request: RecordedRequest) -> Answer:
        answer = Answer(200) if recovered_at is not None else unavailable
        answered.append((trio.current_time(), request, answer.status))
        return answer

    recovered_at: float | None = None
    store = open_store(str(tmp_path / "registrations.sqlite"))
    async with run_apns_standin(test_pki, responder=responder) as apple:
        apns = ApnsConfig(
            certificate=test_pki.client.combined_pem, endpoint=apple.url, ca_file=test_pki.ca_file
        )
        auth = load_auth(apns)
        for n, token in enumerate(TOKENS):
            store.register(Registration("alice", f"ACC-{n}", token, auth.topic, ("INBOX",)))
        service = Service(
            config=Config(path=tmp_path / "dovenotify.yaml", apns=apns),
            store=store,
            sender=open_sender(apns, auth),
            auth=auth,
            outbox=Outbox(probe_interval=PROBE_INTERVAL, jitter=lambda: 1.0),
        )
        async with service.sender, trio.open_nursery() as nursery:
            nursery.start_soon(service.run_sender)
            await service.handle_event(Event("MessageNew", "alice", "INBOX", "lmtp"))
            # The outage lasts until every device has failed ROUNDS times; one of
            # them may also have been the probe, the others were asked only at
            # their own pace.
            paths = [f"/3/device/{t}" for t in TOKENS]
            with trio.fail_after(1.5 * 2**ROUNDS + 10):
                while min(Counter(r.path for _, r, _ in answered)[p] for p in paths) < ROUNDS:
                    await apple.next_request()
            recovered_at = trio.current_time()
            outage = list(answered)
            # Without the probe, nothing would ask APNs for 1.5 * 2**(ROUNDS-1) s more.
            with trio.fail_after(1.5 * 2 ** (ROUNDS - 1) - 2):
                while {r.path for _, r, s in answered if s == 200} != set(paths):
                    await apple.next_request()
            pushed = [(at, r.path) for at, r, s in answered if s == 200]
            nursery.cancel_scope.cancel()
    store.close()

    # Every device is pushed once, the last within the probe interval (plus the
    # time to send) of APNs answering again.
    assert sorted(path for _, path in pushed) == sorted(f"/3/device/{t}" for t in TOKENS)
    last = max(at for at, _ in pushed) - recovered_at
    assert last < PROBE_INTERVAL + 0.5, last
    # During the outage probes went one at a time, at most one a second: beside
    # each device's own retries, no more requests than seconds it lasted.
    lasted = outage[-1][0] - outage[0][0]
    assert len(outage) <= len(TOKENS) * (ROUNDS + 1) + lasted / PROBE_INTERVAL + 1, len(outage)
