"""Shared fixtures: real Dovecot, the APNs stand-in and the dovenotify service.

The fixtures live in tests/harness/ so that scripts (demo, bench) can reuse them;
this file only makes them visible to pytest.
"""
