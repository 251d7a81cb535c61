#!/bin/sh
# prerm of the appliance .deb: `remove`, `upgrade NEW-VERSION`, `deconfigure ...` or
# `failed-upgrade OLD-VERSION`.
#
# The daemon is stopped before dpkg touches its files, on an upgrade too: a running
# PyInstaller program reads Python modules from its own files on demand (the archive
# appended to /usr/lib/appliance/appliance is reopened by name at each import), so a
# daemon left running over an upgrade would import from the new version's archive with
# the old one's table of contents. postinstall starts it again after an upgrade.
set -e

UNIT=appliance.service

[ -d /run/systemd/system ] || exit 0
case "$1" in
    remove)
        # Stop it and drop its enablement links, which would dangle once the unit is gone.
        systemctl disable --now "$UNIT" || true
        ;;
    upgrade | deconfigure | failed-upgrade)
        systemctl stop "$UNIT" || true
        ;;
esac
exit 0
