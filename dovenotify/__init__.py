"""dovenotify: iOS Mail push for Dovecot."""

__version__ = "0.1.0"
