"""`appliance backup [verify FILE]`, `appliance backups [prune-previous]`,
`appliance restore FILE [--unauthenticated | --from-other-box ENV_FILE]`.

Backups talk to the store directly (the daemon's redis-server when it runs, else one
started for the duration); a lock file keeps them from overlapping with the daemon's timer.
A restore while the daemon runs is done by the daemon (it owns the store): this command
verifies and admits the archive, places a plain copy in the backup dir and asks for it over
HTTP. Bringing another box's backup here is done with the daemon stopped only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any, Final

import coredis
import httpx
import msgspec
import trio

from appliance.auth.operator import operator_key
from appliance.backup.allowlist import Plan
from appliance.backup.archive import (
    BackupError,
    BackupInfo,
    list_backups,
    read_passphrase_file,
    verify_archive,
)
from appliance.backup.jobs import exclusive, make_backup, require_embedded_store
from appliance.backup.other_box import carry_over, keep_this_box, read_other_box
from appliance.backup.previous import PRUNE_COMMAND, PreviousData, list_previous, prune_previous
from appliance.backup.restore import (
    RestoreOptions,
    RestoreReport,
    admission,
    recover_before_start,
    restore_offline,
    with_store,
)
from appliance.backup.sealed import unseal_to_file
from appliance.config import Settings
from appliance.local_api import api_base, api_verify
from appliance.privacy.keys import Keys, load_keys
from appliance.privacy.rotation import KeyMismatch
from appliance.progress import ProgressBar
from appliance.store.access import daemon_store_running, redis_client
from appliance.store.client import RedisClient
from appliance.store.sealing import KeyRing, SealError

UPLOAD_PREFIX: Final = ".restore-upload-"
# A restore inside the daemon verifies and extracts the whole archive; be patient.
RESTORE_HTTP_TIMEOUT: Final = 3600.0


def _error(message: str) -> None:
    print(f"appliance: {message}", file=sys.stderr)


def _passphrase(args: argparse.Namespace) -> bytes | None:
    path: Path | None = getattr(args, "passphrase_file", None)
    return read_passphrase_file(path) if path is not None else None


def _age(created: datetime.datetime) -> str:
    seconds = int((datetime.datetime.now(datetime.UTC) - created).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _ring(keys: Keys) -> KeyRing:
    if keys.ring is None:  # load_keys always makes one
        raise BackupError("no SECRET_KEY is configured; backups need one")
    return keys.ring


def _previous_entry(item: PreviousData) -> dict[str, Any]:
    return {
        "name": item.name,
        "path": str(item.path),
        "size": item.size,
        "created": item.created.isoformat(),
    }


def _entry(info: BackupInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "path": str(info.path),
        "size": info.size,
        "created": info.created.isoformat(),
        "sealed": info.sealed,
        "verified_at": info.verified_at.isoformat() if info.verified_at else None,
    }


async def backup_now(
    settings: Settings,
    *,
    with_models: bool = False,
    passphrase: bytes | None = None,
    progress: ProgressBar | None = None,
) -> BackupInfo:
    """A backup from the command line: the daemon's store if it runs, else one started."""
    require_embedded_store(settings)
    keys = await trio.to_thread.run_sync(load_keys, settings)
    if not await daemon_store_running(settings):
        await trio.to_thread.run_sync(recover_before_start, settings)
    async with redis_client(settings) as client:
        return await make_backup(
            settings,
            client,
            keys=_ring(keys),
            with_models=with_models,
            passphrase=passphrase,
            progress=progress,
        )


async def _backup(settings: Settings, args: argparse.Namespace) -> int:
    info = await backup_now(
        settings,
        with_models=args.with_models,
        passphrase=_passphrase(args),
        progress=ProgressBar("backing up"),
    )
    print(f"wrote {info.path} ({info.size / 1e6:.1f} MB)")
    return 0


def _list(settings: Settings, args: argparse.Namespace) -> int:
    found = list_backups(Path(settings.backup_dir))
    previous = list_previous(settings)
    if args.json:
        body = {
            "backups": [_entry(info) for info in found],
            "previous_data": [_previous_entry(item) for item in previous],
        }
        print(json.dumps(body, indent=2))
        return 0
    if not found:
        print(f"no backups in {settings.backup_dir}")
    else:
        print(f"{'NAME':<44} {'SIZE':>10} {'AGE':>6}  VERIFIED")
        for info in found:
            verified = info.verified_at.strftime("%Y-%m-%d %H:%M") if info.verified_at else "no"
            print(f"{info.name:<44} {info.size / 1e6:>8.1f}MB {_age(info.created):>6}  {verified}")
    if previous:
        total = sum(item.size for item in previous)
        print(
            f"\ndata moved aside by restores ({len(previous)} of at most "
            f"{settings.restore_previous_keep}, {total / 1e6:.1f} MB; remove with: "
            f"{PRUNE_COMMAND}):"
        )
        for item in previous:
            print(f"{item.name:<44} {item.size / 1e6:>8.1f}MB {_age(item.created):>6}")
    return 0


def _prune_previous(settings: Settings, args: argparse.Namespace) -> int:
    if args.keep < 0:
        raise BackupError(f"--keep is {args.keep}; give 0 or more")
    with exclusive(settings):
        removed = prune_previous(settings, args.keep)
    for item in removed:
        print(f"removed {item.name} ({item.size / 1e6:.1f} MB)")
    if not removed:
        print("no data moved aside by restores to remove")
    return 0


def _verify(settings: Settings, args: argparse.Namespace) -> int:
    path: Path = args.file
    keys = load_keys(settings)
    checked = verify_archive(
        path, keys=_ring(keys), passphrase=_passphrase(args), progress=ProgressBar("verifying")
    )
    manifest = checked.manifest
    size = sum(member.size for member in manifest.members)
    intact = (
        f"{len(manifest.members)} members, {size / 1e6:.1f} MB, made {manifest.created_utc} "
        f"by appliance {manifest.appliance_version}"
    )
    if checked.authenticity.for_this_box:
        print(f"{path.name}: OK — {intact}; {checked.authenticity.describe()}")
        return 0
    _error(
        f"{path.name}: every member matches the manifest ({intact}), but the archive is "
        f"{checked.authenticity.describe()}; a restore refuses it"
    )
    return 1


async def _restore(settings: Settings, args: argparse.Namespace) -> int:
    require_embedded_store(settings)
    archive: Path = args.file
    passphrase = _passphrase(args)
    options = RestoreOptions(unauthenticated=args.unauthenticated)
    if not await trio.to_thread.run_sync(archive.is_file):
        raise BackupError(f"{archive} is not a file")
    keys = await trio.to_thread.run_sync(load_keys, settings)
    if args.from_other_box is not None:
        report = await _restore_from_other_box(settings, args, keys, passphrase)
    elif await daemon_store_running(settings):
        token = await operator_key(settings)
        report = await trio.to_thread.run_sync(
            _restore_through_daemon, settings, archive, _ring(keys), options, passphrase, token
        )
    else:
        report = await restore_offline(
            settings,
            archive,
            keys.codec,
            _ring(keys),
            options=options,
            passphrase=passphrase,
            progress=ProgressBar("restoring"),
        )
    if args.json:
        print(json.dumps(msgspec.to_builtins(report), indent=2))
    else:
        _print_report(report)
    return 0


async def _restore_from_other_box(
    settings: Settings, args: argparse.Namespace, keys: Keys, passphrase: bytes | None
) -> RestoreReport:
    """Another box's backup, deliberately: see appliance.backup.other_box."""
    if args.unauthenticated:
        raise BackupError(
            "--from-other-box takes authenticated backups only; it cannot be combined with "
            "--unauthenticated"
        )
    if await daemon_store_running(settings):
        raise BackupError(
            "another box's backup is restored with the daemon stopped: run systemctl stop "
            "appliance, then this command again"
        )
    path: Path = args.from_other_box
    other = await trio.to_thread.run_sync(read_other_box, path, settings, _ring(keys))
    await trio.to_thread.run_sync(recover_before_start, settings)
    kept = await with_store(settings, keep_this_box)

    async def prepare(client: RedisClient) -> None:
        await carry_over(client, settings, kept, other)

    report = await restore_offline(
        settings,
        args.file,
        keys.codec,
        other.ring,
        passphrase=passphrase,
        progress=ProgressBar("restoring"),
        prepare=prepare,
    )
    return msgspec.structs.replace(
        report,
        authenticity=(
            f"another box's backup, authenticated under its key id {report.key_id}; "
            "re-sealed under this box's key, this box's API keys kept"
        ),
    )


def _print_report(report: RestoreReport) -> None:
    print(
        f"restored {report.archive} (made {report.created_utc}; {report.authenticity}): "
        f"{report.conversations} conversations, {report.keys} keys"
    )
    print(
        f"the previous data is kept in {report.previous_data} (list: appliance backups; "
        f"remove: {PRUNE_COMMAND})"
    )
    if report.models_missing:
        print(
            "models the backup's installation had that are not here (import them with "
            f"`appliance models import`): {', '.join(report.models_missing)}"
        )


def _restore_through_daemon(
    settings: Settings,
    archive: Path,
    keys: KeyRing,
    options: RestoreOptions,
    passphrase: bytes | None,
    token: str,
) -> RestoreReport:
    """Verify and admit here, hand the daemon a plain copy inside its backup dir, let it
    restore (it checks everything again)."""
    plans: list[Plan] = []
    verify_archive(
        archive,
        keys=keys,
        admit=admission(settings, options, plans),
        passphrase=passphrase,
        progress=ProgressBar("verifying"),
        record=False,
    )
    backup_dir = Path(settings.backup_dir)
    inside = archive.resolve().parent == backup_dir.resolve()
    upload: Path | None = None
    if inside and passphrase is None and not archive.name.endswith(".sealed"):
        name = archive.name
    else:
        backup_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        upload = backup_dir / f"{UPLOAD_PREFIX}{secrets.token_hex(8)}.tar.gz"
        if passphrase is not None:
            unseal_to_file(archive, upload, passphrase)
        else:
            shutil.copyfile(archive, upload)
        os.chmod(upload, 0o600)
        name = upload.name
    try:
        return _ask_daemon(settings, name, options, token)
    finally:
        if upload is not None:
            upload.unlink(missing_ok=True)


def _ask_daemon(
    settings: Settings, name: str, options: RestoreOptions, token: str
) -> RestoreReport:
    url = f"{api_base(settings)}/api/v1/admin/restore"
    headers = {"Authorization": f"Bearer {token}"}
    verify = api_verify(settings)
    try:
        with httpx.Client(
            timeout=RESTORE_HTTP_TIMEOUT, headers=headers, trust_env=False, verify=verify
        ) as client:
            body = {"archive": name, "unauthenticated": options.unauthenticated}
            response = client.post(url, json=body)
    except httpx.TransportError:
        raise BackupError(
            f"the daemon's store is running but its API does not answer on {settings.bind}; "
            "stop the daemon (systemctl stop appliance) and run the restore again"
        ) from None
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {response.status_code}"
        raise BackupError(f"the daemon refused the restore: {message}")
    return msgspec.convert(response.json(), RestoreReport)


def run_backup_command(settings: Settings, args: argparse.Namespace) -> int:
    try:
        if args.command == "backups":
            if getattr(args, "backups_command", None) == "prune-previous":
                return _prune_previous(settings, args)
            return _list(settings, args)
        if args.command == "restore":
            return trio.run(_restore, settings, args)
        if getattr(args, "backup_command", None) == "verify":
            return _verify(settings, args)
        return trio.run(_backup, settings, args)
    except (BackupError, KeyMismatch, SealError) as exc:
        _error(str(exc))
        return 1
    except coredis.exceptions.RedisError as exc:
        _error(f"the store is not reachable ({type(exc).__name__})")
        return 1
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        _error(f"{exc.strerror or type(exc).__name__}{where}")
        return 1
