"""Admin endpoints: make and list backups (and the data restores moved aside); restore one
(what `appliance restore` uses while the daemon runs). Access control for admin scope comes
with API keys."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Final

import msgspec
import trio
from quart import Blueprint, Response, request

from appliance.backup.archive import BackupError, BackupInfo, verify_archive
from appliance.backup.jobs import BUSY_MESSAGE, ExternalStore
from appliance.backup.previous import PreviousData, PreviousDataFull
from appliance.backup.restore import RestoreOptions, RestoreReport
from appliance.http.bodies import parse_body
from appliance.http.context import runtime
from appliance.http.errors import ApiError
from appliance.http.openapi_doc import (
    document_request,
    document_response,
    errors,
    optional_body,
)
from appliance.http.responses import json_response

blueprint = Blueprint("admin", __name__, url_prefix="/api/v1/admin")

# Restore takes a file name inside APPLIANCE_BACKUP_DIR, never a path: a backup made here,
# or a copy that `appliance restore` placed there for the daemon.
RESTORABLE: Final = re.compile(
    r"^(data-backup-\d{8}-\d{6}\.tar\.gz|\.restore-upload-[A-Za-z0-9_-]{1,64}\.tar\.gz)$"
)


class BackupRequest(msgspec.Struct, forbid_unknown_fields=True):
    """What to back up; the models too only when asked (they can be large)."""

    with_models: bool = False


class RestoreRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The file name of a backup in APPLIANCE_BACKUP_DIR (never a path). `unauthenticated`
    also accepts a format 1 backup, made before backups were authenticated."""

    archive: Annotated[str, msgspec.Meta(extra_json_schema={"pattern": RESTORABLE.pattern})]
    unauthenticated: bool = False


class Backup(msgspec.Struct):
    """One backup archive (times in ISO 8601)."""

    name: str
    size: int
    created: str
    sealed: bool
    verified_at: str | None


class Previous(msgspec.Struct):
    """A dir of data that a restore moved aside (kept until pruned or expired)."""

    name: str
    size: int
    created: str


class BackupList(msgspec.Struct):
    """The backups and the data restores moved aside, newest first, and the last results
    (`status`)."""

    backups: list[Backup]
    previous_data: list[Previous]
    status: dict[str, Any]


def describe(info: BackupInfo) -> Backup:
    return Backup(
        name=info.name,
        size=info.size,
        created=info.created.isoformat(),
        sealed=info.sealed,
        verified_at=info.verified_at.isoformat() if info.verified_at else None,
    )


def describe_previous(item: PreviousData) -> Previous:
    return Previous(name=item.name, size=item.size, created=item.created.isoformat())


def _refusal(exc: BackupError) -> ApiError:
    if str(exc) == BUSY_MESSAGE:
        return ApiError(409, "busy", str(exc))
    if isinstance(exc, ExternalStore):
        return ApiError(409, "external_store", str(exc))
    return ApiError(500, "backup_failed", str(exc))


@blueprint.get("/backups")
@document_response(BackupList)
async def list_backups() -> Response:
    """Backups, the data restores moved aside (each with its size) and the last results."""
    backups = runtime().backups
    try:
        found = await trio.to_thread.run_sync(backups.listing)
        previous = await trio.to_thread.run_sync(backups.refresh_previous)
    except BackupError as exc:
        raise ApiError(500, "backup_dir_unreadable", str(exc)) from None
    return json_response(
        BackupList(
            backups=[describe(info) for info in found],
            previous_data=[describe_previous(item) for item in previous],
            status=backups.metrics(),
        )
    )


@blueprint.post("/backups")
@optional_body
@document_request(BackupRequest)
@document_response(Backup, 201)
@errors(409)
async def create_backup() -> Response:
    """Make a backup now and answer when it is written (201 with its entry)."""
    body = await parse_body(BackupRequest) if await _has_body() else BackupRequest()
    try:
        info = await runtime().backups.backup(with_models=body.with_models)
    except BackupError as exc:
        raise _refusal(exc) from None
    return json_response(describe(info), status=201)


class VerifyRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The file name of a backup in APPLIANCE_BACKUP_DIR (never a path)."""

    archive: Annotated[str, msgspec.Meta(extra_json_schema={"pattern": RESTORABLE.pattern})]


@blueprint.post("/backups/verify")
@document_request(VerifyRequest)
@document_response(Backup)
@errors(404)
async def verify_backup() -> Response:
    """Read a backup through and check every member against its manifest; touches no live
    data. 200 with its entry (`verified_at` set) or 422 saying what is wrong with it."""
    state = runtime()
    body = await parse_body(VerifyRequest)
    path = _archive_path(body.archive)
    if not await trio.to_thread.run_sync(path.is_file):
        raise ApiError(404, "not_found", f"there is no backup named {body.archive}")
    try:
        checked = await trio.to_thread.run_sync(
            partial(verify_archive, path, keys=state.backups.ring)
        )
    except BackupError as exc:
        raise ApiError(422, "archive_refused", str(exc)) from None
    if not checked.authenticity.for_this_box:
        raise ApiError(
            422,
            "archive_refused",
            f"{body.archive}: every member matches its manifest, but the archive is "
            f"{checked.authenticity.describe()}; a restore refuses it",
        )
    for info in await trio.to_thread.run_sync(state.backups.listing):
        if info.name == body.archive:
            return json_response(describe(info))
    raise ApiError(404, "not_found", f"there is no backup named {body.archive}")


def _archive_path(archive: str) -> Path:
    if not RESTORABLE.fullmatch(archive):
        raise ApiError(
            422,
            "invalid_field",
            "archive must be the file name of a backup in APPLIANCE_BACKUP_DIR "
            "(data-backup-YYYYMMDD-HHMMSS.tar.gz), not a path",
            param="archive",
        )
    return Path(runtime().settings.backup_dir) / archive


@blueprint.post("/restore")
@document_request(RestoreRequest)
@document_response(RestoreReport)
@errors(404, 409)
async def restore() -> Response:
    """Restore an archive from the backup dir into the running daemon."""
    state = runtime()
    body = await parse_body(RestoreRequest)
    path = _archive_path(body.archive)
    if not await trio.to_thread.run_sync(path.is_file):
        raise ApiError(404, "not_found", f"there is no backup named {body.archive}")
    try:
        options = RestoreOptions(unauthenticated=body.unauthenticated)
        report = await state.backups.restore(path, options)
    except BackupError as exc:
        if str(exc) == BUSY_MESSAGE:
            raise ApiError(409, "busy", str(exc)) from None
        if isinstance(exc, PreviousDataFull):
            raise ApiError(409, "previous_data_full", str(exc)) from None
        if str(exc).startswith("the restored data did not load"):
            raise ApiError(500, "restore_failed", str(exc)) from None
        raise ApiError(422, "archive_refused", str(exc)) from None
    return json_response(msgspec.to_builtins(report))


async def _has_body() -> bool:
    return bool(request.content_length)
