"""Pure parts of `dovenotify doctor`: reading doveconf's lists, socket permissions."""

import os
import stat

from dovenotify.admin.doctor import _may, enabled


def test_enabled_reads_both_list_syntaxes():
    # 2.3: `doveconf -h mail_plugins` / imap_capability
    assert enabled(" notify push_notification mail_lua") == {
        "notify",
        "push_notification",
        "mail_lua",
    }
    assert enabled("+XAPPLEPUSHSERVICE") == {"XAPPLEPUSHSERVICE"}
    # 2.4: boolean lists, one `name = yes|no` per line, names possibly quoted
    listing = 'XAPPLEPUSHSERVICE = yes\n"COMPRESS=DEFLATE" = no\nnotify = yes\n'
    assert enabled(listing) == {"XAPPLEPUSHSERVICE", "notify"}


def _stat(mode: int, uid: int, gid: int) -> os.stat_result:
    return os.stat_result((stat.S_IFSOCK | mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))


def test_socket_permission_follows_owner_group_other():
    assert _may(_stat(0o600, 100, 100), 100, {100}, 0o2)
    assert not _may(_stat(0o600, 100, 100), 200, {200}, 0o2)
    assert _may(_stat(0o660, 100, 300), 200, {200, 300}, 0o2)
    # The owner's bits decide for the owner, even when others may.
    assert not _may(_stat(0o066, 100, 100), 100, {100}, 0o2)
    assert _may(_stat(0o666, 100, 100), 200, {200}, 0o2)
    assert _may(_stat(0o000, 100, 100), 0, {0}, 0o2)
