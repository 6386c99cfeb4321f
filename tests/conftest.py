"""Shared fixtures: real Dovecot, the APNs stand-in and the dovenotify service.

The fixtures live in tests/harness/ so that scripts (demo, bench) can reuse them;
this file only makes them visible to pytest.
"""

from tests.harness.apns_standin import apns_standin
from tests.harness.certs import test_pki
from tests.harness.dovecot import dovecot, dovecot_factory, dovecot_version

__all__ = ["apns_standin", "dovecot", "dovecot_factory", "dovecot_version", "test_pki"]
