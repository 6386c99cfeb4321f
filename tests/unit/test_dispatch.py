"""When devices are pushed: immediately, delayed, coalesced, bounded."""

from dovenotify.dispatch import Dispatcher
from dovenotify.events import Event
from dovenotify.outbox import Outbox
from dovenotify.store import Registration

PHONE = Registration("alice", "ACC", "aa11", "topic", ("INBOX", "Work"), registered_at=0)
IPAD = Registration("alice", "ACC2", "bb22", "topic", ("Notes",), registered_at=0)


def ev(name: str, mailbox: str = "INBOX") -> Event:
    return Event(name, "alice", mailbox, "imap")


def test_new_mail_pushes_now_only_devices_that_registered_the_mailbox():
    d = Dispatcher()
    assert d.event(ev("MessageNew", "inbox"), [PHONE, IPAD], 0) == [PHONE]
    assert d.event(ev("MessageAppend", "Notes"), [PHONE, IPAD], 0) == [IPAD]
    assert d.event(ev("MessageNew", "work"), [PHONE, IPAD], 0) == []


def test_subfolders_of_inbox_match_as_dovecot_names_them():
    sub = Registration("alice", "ACC3", "cc33", "topic", ("inbox.Sub",), registered_at=0)
    d = Dispatcher()
    # Dovecot upper-cases the INBOX part of the name in its events.
    assert d.event(ev("MessageNew", "INBOX.Sub"), [PHONE, sub], 0) == [sub]
    assert d.event(ev("MessageNew", "INBOX.sub"), [PHONE, sub], 0) == []


def test_delayed_changes_coalesce_and_max_delay_bounds_them():
    d = Dispatcher(delay=30, max_delay=120)
    for t in range(0, 120, 10):  # a change every 10 s keeps postponing...
        assert d.event(ev("FlagsSet"), [PHONE], t) == []
        assert d.due(t) == []
    assert d.next_due() == 120  # ...but not past max_delay after the first
    assert d.due(120) == [PHONE]
    assert d.next_due() is None


def test_quiet_after_a_change_pushes_after_delay():
    d = Dispatcher(delay=30, max_delay=120)
    d.event(ev("MessageExpunge"), [PHONE], 5)
    assert d.due(34.9) == []
    assert d.due(35) == [PHONE]


def test_new_mail_absorbs_pending_delayed_push():
    d = Dispatcher()
    d.event(ev("FlagsSet"), [PHONE], 0)
    assert d.event(ev("MessageNew"), [PHONE], 1) == [PHONE]
    assert d.next_due() is None


def test_outbox_one_pending_push_per_device_and_retry():
    box = Outbox(jitter=lambda: 0.5)
    for _ in range(500):
        box.submit(PHONE)
    assert len(box) == 1
    taken = box.take(0)
    assert taken == PHONE and box.take(0) is None
    box.submit(PHONE)  # new mail while in flight: one more push afterwards
    assert box.failed(PHONE, 0) is True
    assert box.take(0.5) is None and box.next_retry() == 1.0
    assert box.take(1.0) == PHONE
    box.delivered(PHONE)
    assert len(box) == 0


def test_outbox_gives_up_after_the_deadline():
    box = Outbox(retry_deadline=10, jitter=lambda: 0.5)
    box.submit(PHONE)
    now = 0.0
    while (taken := box.take(now)) is not None or box.next_retry() is not None:
        if taken is None:
            now = box.next_retry()
            continue
        if not box.failed(taken, now):
            break
    assert now >= 10 and len(box) == 0


def test_rename_and_delete_push_devices_that_registered_the_old_name_after_delay():
    d = Dispatcher(delay=30, max_delay=120)
    renamed = Event("MailboxRename", "alice", "Done", "imap", old_mailbox="Work")
    assert d.event(renamed, [PHONE, IPAD], 0) == []
    assert d.due(30) == [PHONE]
    assert d.event(ev("MailboxDelete", "Notes"), [PHONE, IPAD], 40) == []
    assert d.due(70) == [IPAD]
    assert d.event(ev("MailboxCreate", "Work"), [PHONE, IPAD], 80) == []
    assert d.next_due() is None


def test_late_events_push_at_once_whatever_their_kind():
    d = Dispatcher(delay=30, max_delay=120)
    d.event(ev("FlagsSet"), [PHONE], 0)
    assert d.event(ev("MessageExpunge"), [PHONE, IPAD], 1, late=True) == [PHONE]
    assert d.next_due() is None
