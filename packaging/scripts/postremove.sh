#!/bin/sh
# postrm of the appliance .deb: `remove`, `purge`, `upgrade NEW-VERSION`, `disappear`,
# `failed-upgrade`, `abort-install` or `abort-upgrade`.
#
# `apt remove` keeps the settings (with the keys that seal the data) and the data, so a
# reinstall carries on where it was. `apt purge` deletes both: the conversations, the
# backups kept under /var/lib/appliance and the keys, and then the system user and group,
# whose only files those were.
set -e

PROGRAM_DIR=/usr/lib/appliance

# `appliance update` keeps the build it replaced (appliance.previous) and a build that
# failed (appliance.failed) beside the program, and the program dir may hold files of an
# updated build that this package did not ship: all of it is program, not data.
remove_program_leftovers() {
    rm -rf "$PROGRAM_DIR.previous" "$PROGRAM_DIR.failed" "$PROGRAM_DIR.swap" \
        "/usr/lib/.appliance.new" "$PROGRAM_DIR"
}

remove_user() {
    if getent passwd appliance >/dev/null; then
        userdel appliance
    fi
    # userdel takes the user's own group along only where login.defs says so.
    if getent group appliance >/dev/null; then
        groupdel appliance
    fi
}

case "$1" in
    remove)
        remove_program_leftovers
        ;;
    purge)
        rm -rf /var/lib/appliance /etc/appliance
        remove_program_leftovers
        remove_user
        ;;
esac
if [ "$1" = remove ] || [ "$1" = purge ]; then
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
    fi
fi
exit 0
