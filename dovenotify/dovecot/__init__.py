"""What Dovecot runs and reads: the Lua driver and the post-login helper (package
data, copied out by `dovenotify dovecot-config --install` and `setup`), and the
configuration snippet rendered for Dovecot 2.3 or 2.4.

postlogin.py runs under the system Python, outside this package: it imports
nothing of dovenotify.
"""

from dovenotify.dovecot.config import VERSIONS, installed_dovecot_version, render
from dovenotify.dovecot.files import DOVECOT_FILES, dovecot_snippet, install_dovecot_files

__all__ = [
    "DOVECOT_FILES",
    "VERSIONS",
    "dovecot_snippet",
    "install_dovecot_files",
    "installed_dovecot_version",
    "render",
]
