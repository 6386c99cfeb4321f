"""The push engine: events in (`Intake`), pushes out to APNs (`Sending`)."""

from dovenotify.push.intake import Intake
from dovenotify.push.sending import Sending, describe

__all__ = ["Intake", "Sending", "describe"]
