#!/bin/sh
# postrm of the appliance .deb: `remove`, `purge`, `upgrade NEW-VERSION`, `disappear`,
# `failed-upgrade`, `abort-install` or `abort-upgrade`.
#
# `apt remove` keeps the settings (with the keys that seal the data) and the data, so a
# reinstall carries on where it was. `apt purge` deletes both: the conversations, the
# backups kept under /var/lib/appliance and the keys. The system user is kept (Debian
# practice: files elsewhere may still belong to its uid).
set -e

case "$1" in
    purge)
        rm -rf /var/lib/appliance /etc/appliance
        ;;
esac
if [ "$1" = remove ] || [ "$1" = purge ]; then
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
    fi
fi
exit 0
