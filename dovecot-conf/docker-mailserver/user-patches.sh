#!/bin/bash
# dovenotify for docker-mailserver: wires the image's dovenotify into Dovecot and
# supervisord at each container start. Works on DMS v15 (Dovecot 2.3) and edge
# (Dovecot 2.4): `dovenotify dovecot-config` writes the syntax of the Dovecot it finds.
#
# Call it from docker-data/dms/config/user-patches.sh:
#     /usr/local/share/dovenotify/user-patches.sh
# and put the APNs certificate in docker-data/dms/config/dovenotify/push.pem
# (optionally with push.key and a dovenotify.yaml of your own).
#
# The paths are variables so that the test suite can run this against a copy of
# Debian's /etc/dovecot; in the container the defaults apply.
set -euo pipefail

DMS_CONFIG=${DMS_CONFIG:-/tmp/docker-mailserver}
DOVECOT_CONF_DIR=${DOVECOT_CONF_DIR:-/etc/dovecot}
DOVENOTIFY_ETC=${DOVENOTIFY_ETC:-/etc/dovenotify}
# Under /var/mail-state, which docker-mailserver keeps across container rebuilds.
DOVENOTIFY_STATE=${DOVENOTIFY_STATE:-/var/mail-state/lib-dovenotify}
DOVENOTIFY_RUN=${DOVENOTIFY_RUN:-/run/dovenotify}
DOVENOTIFY_SHARE=${DOVENOTIFY_SHARE:-/usr/local/share/dovenotify}
# Where the Lua driver and post-login helper are installed for Dovecot's users.
DOVENOTIFY_FILES=${DOVENOTIFY_FILES:-/usr/local/lib/dovenotify}
SUPERVISOR_CONF_DIR=${SUPERVISOR_CONF_DIR:-/etc/supervisor/conf.d}
DOVENOTIFY=${DOVENOTIFY:-/usr/local/bin/dovenotify}
# Empty: do not touch a running supervisord (tests).
SUPERVISORCTL=${SUPERVISORCTL-supervisorctl}
# Empty: ask the installed `dovecot --version`.
DOVECOT_VERSION=${DOVECOT_VERSION:-}
SERVICE_USER=${SERVICE_USER:-dovenotify}

say() { echo "dovenotify user-patches: $*"; }

# Everything the admin put in config/dovenotify/ (certificate, key, own config),
# copied where only root and the service user can read the key.
install -d -m 0750 -o root -g "$SERVICE_USER" "$DOVENOTIFY_ETC"
if [[ -d "$DMS_CONFIG/dovenotify" ]]; then
  find "$DMS_CONFIG/dovenotify" -maxdepth 1 -type f -print0 |
    xargs -0 -r -I{} install -m 0640 -o root -g "$SERVICE_USER" {} "$DOVENOTIFY_ETC/"
fi
if [[ ! -f "$DOVENOTIFY_ETC/push.pem" && ! -f "$DOVENOTIFY_ETC/dovenotify.yaml" ]]; then
  say "no $DMS_CONFIG/dovenotify/push.pem: dovenotify stays off until you add the certificate"
  exit 0
fi
if [[ ! -f "$DOVENOTIFY_ETC/dovenotify.yaml" ]]; then
  cat >"$DOVENOTIFY_ETC/dovenotify.yaml" <<YAML
# Written by dovenotify's user-patches.sh; put your own in config/dovenotify/.
database: $DOVENOTIFY_STATE/registrations.sqlite
event_socket: $DOVENOTIFY_RUN/events.sock
relay_socket: $DOVENOTIFY_RUN/relay.sock
dovecot_files: $DOVENOTIFY_FILES
apns:
  certificate: push.pem
YAML
  chgrp "$SERVICE_USER" "$DOVENOTIFY_ETC/dovenotify.yaml"
  chmod 0640 "$DOVENOTIFY_ETC/dovenotify.yaml"
fi

install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$DOVENOTIFY_STATE"
# Files made by root (e.g. `dovenotify import-xapsd` run with docker exec) must
# become the service's, or it cannot write its database.
chown -R "$SERVICE_USER:$SERVICE_USER" "$DOVENOTIFY_STATE"
# Dovecot's users connect to the sockets in here.
install -d -m 0755 -o "$SERVICE_USER" -g "$SERVICE_USER" "$DOVENOTIFY_RUN"

# The Lua driver and post-login helper go where Dovecot's users can read them;
# the snippet is written for this Dovecot's version and dovenotify's settings.
"$DOVENOTIFY" dovecot-config --install --config "$DOVENOTIFY_ETC/dovenotify.yaml" \
  ${DOVECOT_VERSION:+--dovecot-version "$DOVECOT_VERSION"} \
  >"$DOVECOT_CONF_DIR/conf.d/95-dovenotify.conf.new"
mv "$DOVECOT_CONF_DIR/conf.d/95-dovenotify.conf.new" "$DOVECOT_CONF_DIR/conf.d/95-dovenotify.conf"
say "wrote $DOVECOT_CONF_DIR/conf.d/95-dovenotify.conf"

install -m 0644 "$DOVENOTIFY_SHARE/supervisord/dovenotify.conf" "$SUPERVISOR_CONF_DIR/dovenotify.conf"
if [[ -n "$SUPERVISORCTL" ]]; then
  # Adds the program and starts it (autostart); Dovecot starts after this script.
  "$SUPERVISORCTL" update
fi
