# Shared by scripts/test, scripts/demo and scripts/bench: install what they need.
# shellcheck shell=bash

# Dovecot and the Lua socket library the driver script uses; python3 is the
# system Python the post-login helper runs under; debootstrap makes the chroot with
# the other Dovecot version (tests/harness/chroot.py); mbsync (isync) and offlineimap3
# are the real IMAP clients tests/test_clients.py syncs through the relay (they run
# on the host against both Dovecot versions: a client needs no Dovecot beside it).
TEST_PACKAGES=(dovecot-core dovecot-imapd dovecot-lmtpd dovecot-sieve lua-socket python3 python3-venv
    supervisor debootstrap postgresql isync offlineimap3)
# The sender benchmark's HTTP/2 sink (nghttpd) and reference load generator (h2load).
BENCH_PACKAGES=("${TEST_PACKAGES[@]}" nghttp2-server nghttp2-client)

ensure_debian_packages() {
    local missing=() package
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" \
            || missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "dovenotify: these Debian packages are missing and installing them needs root: ${missing[*]}" >&2
        exit 1
    fi
    echo "Installing ${missing[*]} ..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# A virtualenv in .venv with the locked dependencies (requirements/LOCK.txt, exact
# versions and hashes: what the suite passed with) and dovenotify installed from this
# tree (not editable: the tests run the installed `dovenotify` command, so packaging
# mistakes show up here). scripts/lock refreshes the locks.
ensure_venv() {
    local lock=$1
    local python=${PYTHON:-python3}
    if [ ! -x .venv/bin/python ]; then
        "$python" -m venv .venv
    fi
    .venv/bin/python -m pip install -q --disable-pip-version-check --require-hashes \
        -r "requirements/$lock.txt"
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation .
}
