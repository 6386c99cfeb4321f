"""Below every flow: the configuration, user and mailbox names, files and sockets.

Nothing here imports another dovenotify package.
"""

from dovenotify.core.config import ApnsConfig, Config, ConfigError, load
from dovenotify.core.mailboxes import MailboxNameError
from dovenotify.core.usernames import UserKeys

__all__ = ["ApnsConfig", "Config", "ConfigError", "MailboxNameError", "UserKeys", "load"]
