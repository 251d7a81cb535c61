"""The systemd unit and the sysusers.d entry that `appliance install` writes.

The text lives here, in the package, so that an installed wheel or a frozen binary can
write it without any file beside it. `systemd/appliance.service` and
`packaging/sysusers/appliance.conf` in the repository are the same text (a test compares
them); after editing this module, regenerate them with `python -m appliance.ops.unit`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Final

from appliance.ops.control import UNIT as UNIT_NAME

DEFAULT_BINARY: Final = "/usr/bin/appliance"
SERVICE_USER: Final = "appliance"
ENV_FILE: Final = "/etc/appliance/appliance.env"

_UNIT_TEMPLATE: Final = """\
# appliance: a private AI assistant (HTTP API, embedded Redis, llama.cpp worker).
# Written by `appliance install` to /etc/systemd/system/appliance.service.
# Settings belong in /etc/appliance/appliance.env. Change this unit only with a drop-in
# (`systemctl edit appliance`; docs/operations.md's systemd section has examples), so that an
# upgrade does not overwrite your change.
#
# `systemd-analyze security appliance.service` rates this unit 0.9 (SAFE). Each setting
# that the report still flags says below, after "Flagged", why it is what it is.

[Unit]
Description=Private AI assistant appliance (local LLM, encrypted conversations)
After=network.target
# Restart=on-failure gives up after 5 failed starts in 10 minutes (a broken model or
# config must not loop forever); `systemctl reset-failed appliance` re-arms it.
StartLimitIntervalSec=600
StartLimitBurst=5

[Service]
Type=notify
# Only `appliance serve` itself (the main PID) may send READY/STATUS/WATCHDOG.
NotifyAccess=main
ExecStart={binary} serve
# The daemon reads this file itself (one parser for the daemon and for `appliance
# config check`, and the secrets stay out of its children's environment). Naming it
# here makes a missing file a clear error at start, not a silent development start.
Environment=APPLIANCE_ENV_FILE={env_file}
User={user}
Group={user}

# READY=1 waits for Redis, HTTP and the preloaded default model: allow a large model.
TimeoutStartSec=300
# Stopping drains HTTP (APPLIANCE_GRACEFUL_TIMEOUT, 30 s) and saves Redis (up to ~30 s).
TimeoutStopSec=90
# SIGTERM goes to the supervisor only, which stops the worker and redis-server in
# order; whatever still runs after TimeoutStopSec gets SIGKILL.
KillMode=mixed
# WATCHDOG=1 comes every 15 s while every critical service answers its probe; 30 s
# without one and systemd aborts the daemon and restarts it.
WatchdogSec=30s
Restart=on-failure
RestartSec=5s
# The supervisor handles an OOM kill of the inference worker (503 for requests in
# flight, the worker restarts); it must not stop the whole unit (the default, stop).
OOMPolicy=continue

# Created at start with these modes. State and runtime belong to User=; the
# configuration directory stays root's (`appliance install` gives it group appliance).
StateDirectory=appliance
StateDirectoryMode=0700
RuntimeDirectory=appliance
RuntimeDirectoryMode=0700
ConfigurationDirectory=appliance
ConfigurationDirectoryMode=0750
UMask=0077

# Resources: the deployment guide's limits (2 CPUs, 4 GB; 1 GB reserved). The worker
# recycles itself above APPLIANCE_WORKER_MAX_RSS_MB (3072) before MemoryMax is reached.
MemoryMax=4G
MemoryLow=1G
CPUQuota=200%
TasksMax=256
# Above redis-server's maxclients + 32, so it never calls setrlimit (filtered below).
LimitNOFILE=65536

# Hardening. Checked under systemd 252 (Debian 12) with the daemon serving: Redis, the
# llama.cpp worker (portable CPU build), generation, metrics, backups, the watchdog.
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
# Flagged "RootDirectory=": the program and its libraries live in the host's /usr,
# which ProtectSystem=strict makes read-only; the service writes only to its own
# StateDirectory and RuntimeDirectory (a backup or models dir elsewhere needs
# ReadWritePaths= in a drop-in).
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateMounts=yes
# Flagged "DeviceAllow=char-rtc:r": ProtectClock= adds that entry itself, and
# PrivateDevices= hides /dev/rtc anyway. A GPU needs a drop-in (gpu.conf.example).
PrivateDevices=yes
DevicePolicy=closed
PrivateUsers=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
# Flagged "ProcSubset=": not set to pid, because the metrics API reads /proc/meminfo,
# /proc/stat and /proc/loadavg (memory, CPU and load of the box), which pid hides.
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
# Python 3.11, ctypes callbacks (libffi 3.4 uses static trampolines) and llama.cpp's
# CPU backend need no writable and executable memory.
MemoryDenyWriteExecute=yes
RemoveIPC=yes
KeyringMode=private
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
# Flagged "SystemCallFilter=~@resources" (sched_setaffinity allowed): a worker binds each
# of its llama.cpp threads to a core of its own, or a request's first decode may run at
# one thread's speed; it can pin only this service's own threads. The other calls of
# @resources (priorities, rlimits, memory policy) stay refused.
SystemCallFilter=sched_setaffinity
# A filtered call fails with EPERM instead of killing the process: a library that
# tries setpriority() carries on at normal priority.
SystemCallErrorNumber=EPERM
# Flagged "AF_UNIX" and "AF_(INET|INET6)": the API listens on TCP; Redis, the worker,
# the journal and sd_notify use unix sockets. No other address family is allowed.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
# Flagged "PrivateNetwork=" and "IPAddressDeny=" (localhost allowed): the API must be
# reachable, so the service keeps the host's network, but only loopback traffic passes
# (APPLIANCE_BIND defaults to 127.0.0.1:8000). Serving the LAN or using an external
# Redis needs a drop-in that allows those addresses (lan.conf.example).
IPAddressDeny=any
IPAddressAllow=localhost

[Install]
WantedBy=multi-user.target
"""

SYSUSERS_TEXT: Final = """\
# The system user and group that `appliance serve` runs as (see sysusers.d(5)).
# Installed to /usr/lib/sysusers.d/appliance.conf; `appliance install` applies it with
# systemd-sysusers.
u appliance - "appliance daemon" /var/lib/appliance
"""


def render_unit(binary: str = DEFAULT_BINARY) -> str:
    """The unit file text, with ExecStart running `binary`."""
    return _UNIT_TEMPLATE.format(
        binary=binary,
        env_file=ENV_FILE,
        user=SERVICE_USER,
    )


def _write_repository_copies(repository: Path) -> None:
    (repository / "systemd" / UNIT_NAME).write_text(render_unit(), encoding="utf-8")
    sysusers = repository / "packaging" / "sysusers" / "appliance.conf"
    sysusers.parent.mkdir(parents=True, exist_ok=True)
    sysusers.write_text(SYSUSERS_TEXT, encoding="utf-8")


if __name__ == "__main__":
    # Regenerate the source checkout's copies: python -m appliance.ops.unit [REPOSITORY]
    _write_repository_copies(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[2])
