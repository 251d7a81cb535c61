#!/bin/sh
# postinst of the appliance .deb. dpkg calls it as `configure [OLD-VERSION]` (OLD-VERSION is
# empty on a first install) or `abort-*` after a failed upgrade or removal.
#
# It creates the system user, /etc/appliance and (only when absent) the env file with new
# secrets, then lets systemd know about the unit. An existing env file is never touched: it
# holds the keys that seal the stored conversations.
set -e

APP=/usr/lib/appliance/appliance
SYSUSERS_CONF=/usr/lib/sysusers.d/appliance.conf
CONFIG_DIR=/etc/appliance
ENV_FILE=$CONFIG_DIR/appliance.env
STATE_DIR=/var/lib/appliance
UNIT=appliance.service

create_user() {
    if [ -f "$SYSUSERS_CONF" ] && command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers "$SYSUSERS_CONF"
    elif ! getent passwd appliance >/dev/null; then
        if command -v adduser >/dev/null 2>&1; then
            adduser --system --group --home "$STATE_DIR" --no-create-home appliance
        else
            useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
                --shell /usr/sbin/nologin appliance
        fi
    fi
}

create_config() {
    install -d -m 0750 -o root -g appliance "$CONFIG_DIR"
    if [ ! -e "$ENV_FILE" ]; then
        # `init` refuses to overwrite, writes mode 0600 and prints one line.
        "$APP" --env-file "$ENV_FILE" init
        chown appliance:appliance "$ENV_FILE"
        chmod 0600 "$ENV_FILE"
    else
        echo "appliance: keeping $ENV_FILE as it is"
    fi
}

systemd_units() {
    # Only with systemd as the running init: not in a chroot, an image build or a container
    # without it (the unit is enabled at the next `systemctl enable` or by a preset there).
    [ -d /run/systemd/system ] || return 0
    systemctl daemon-reload
    if [ -z "$1" ]; then
        systemctl enable "$UNIT"
        echo "appliance: enabled $UNIT; start it with: systemctl start appliance"
    elif systemctl --quiet is-enabled "$UNIT" 2>/dev/null; then
        # An upgrade: preremove stopped the old daemon before its files were replaced.
        systemctl start "$UNIT" || echo "appliance: $UNIT did not start; see: journalctl -u appliance" >&2
    fi
}

case "$1" in
    configure)
        create_user
        create_config
        systemd_units "$2"
        ;;
    abort-upgrade | abort-remove | abort-deconfigure)
        # The old version's files are back in place: start what preremove stopped.
        if [ -d /run/systemd/system ] && systemctl --quiet is-enabled "$UNIT" 2>/dev/null; then
            systemctl start "$UNIT" || true
        fi
        ;;
    *)
        echo "postinstall called with unknown argument: $1" >&2
        exit 1
        ;;
esac
exit 0
