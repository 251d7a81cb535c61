"""Backup archives on real files: round trips, tar compatibility, damage, hostile archives,
sealing, atomic writes and the backup directory's bookkeeping."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import pytest

from appliance.backup import archive as archives
from appliance.backup.archive import (
    FORMAT_VERSION,
    BackupError,
    Manifest,
    MemberEntry,
    Source,
    archive_name,
    list_backups,
    prune_backups,
    read_passphrase_file,
    remove_partials,
)
from appliance.backup.manifest import UNAUTHENTICATED_VERSION
from appliance.backup.sealed import CHUNK_BYTES, HEADER_BYTES, unseal_to_file
from appliance.store.sealing import KeyRing

REPO = Path(__file__).resolve().parent.parent
WHEN = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
PASSPHRASE = b"correct horse battery staple"
DAMAGED = "truncated or damaged"
# Random bytes big enough for several compression blocks and sealed chunks.
BIG = 9 * 1024 * 1024 + 123
# The box whose key authenticates the archives written here (Argon2id: made once).
KEYS_ARGS = ("archive-test-secret-" + "k" * 20, "archive-test-salt")
KEYS = KeyRing(*KEYS_ARGS)


def write_archive(*args: Any, **kwargs: Any) -> Path:
    return archives.write_archive(*args, keys=KEYS, **kwargs)


def verify_archive(path: Path, **kwargs: Any) -> Manifest:
    return archives.verify_archive(path, keys=KEYS, **kwargs).manifest


def extract_archive(path: Path, dest: Path, **kwargs: Any) -> Manifest:
    return archives.extract_archive(path, dest, keys=KEYS, **kwargs).manifest


def make_state(root: Path) -> list[Source]:
    """A small state dir: text, random bytes, an empty file, nested folders, odd modes."""
    files = {
        "redis/dump.rdb": (os.urandom(BIG), 0o600),
        "state/models.json": (b'{"models": []}\n' * 5000, 0o644),
        "state/deep/er/notes.txt": ("héllo wörld\n".encode() * 100, 0o640),
        "empty": (b"", 0o400),
        "run.sh": (b"#!/bin/sh\necho hi\n", 0o755),
    }
    sources = []
    for name, (data, mode) in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
        sources.append(Source(name, path))
    return sources


@pytest.fixture
def state(tmp_path: Path) -> list[Source]:
    return make_state(tmp_path / "src")


@pytest.fixture
def backup_dir(tmp_path: Path) -> Path:
    path = tmp_path / "backups"
    path.mkdir()
    return path


def assert_restored(dest: Path, sources: list[Source]) -> None:
    for source in sources:
        restored = dest / source.arcname
        assert restored.read_bytes() == source.path.read_bytes(), source.arcname
        assert restored.stat().st_mode & 0o7777 == source.path.stat().st_mode & 0o777
    names = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    assert names == {source.arcname for source in sources}


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


# --- round trips and compatibility --------------------------------------------------------


def test_round_trip(tmp_path: Path, state: list[Source], backup_dir: Path) -> None:
    seen: list[tuple[int, int]] = []
    path = write_archive(
        backup_dir, state, {"host": "box1"}, when=WHEN, progress=lambda d, t: seen.append((d, t))
    )
    assert path == backup_dir / "data-backup-20250304-050607.tar.gz"
    assert path.stat().st_mode & 0o777 == 0o600
    total = sum(s.path.stat().st_size for s in state)
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)

    manifest = verify_archive(path, record=False)
    assert manifest.format_version == FORMAT_VERSION
    assert manifest.meta == {"host": "box1"}
    assert manifest.created == WHEN.timestamp()
    assert manifest.created_utc == "2025-03-04T05:06:07Z"
    assert [m.name for m in manifest.members] == [s.arcname for s in state]
    for member, source in zip(manifest.members, state, strict=True):
        data = source.path.read_bytes()
        assert (member.size, member.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert member.mode == source.path.stat().st_mode & 0o777

    checked: list[tuple[int, int]] = []
    verify_archive(path, record=False, progress=lambda d, t: checked.append((d, t)))
    assert checked[0] == (0, total) and checked[-1] == (total, total)

    dest = tmp_path / "restored"
    assert extract_archive(path, dest) == manifest
    assert dest.stat().st_mode & 0o777 == 0o700
    assert_restored(dest, state)


def test_tar_and_python_read_it(tmp_path: Path, state: list[Source], backup_dir: Path) -> None:
    path = write_archive(backup_dir, state, {}, when=WHEN)
    listing = subprocess.run(
        ["tar", "tzf", str(path)], check=True, capture_output=True, text=True
    ).stdout.split()
    assert listing == ["manifest.json", "manifest.auth", *(s.arcname for s in state)]
    dest = tmp_path / "by-tar"
    dest.mkdir()
    subprocess.run(["tar", "xzf", str(path), "-C", str(dest)], check=True)
    manifest = msgspec.json.decode((dest / "manifest.json").read_bytes(), type=Manifest)
    assert len(manifest.members) == len(state)
    (dest / "manifest.json").unlink()
    (dest / "manifest.auth").unlink()
    assert_restored(dest, state)
    # Several gzip members, one valid stream; ownership normalized.
    assert gzip.decompress(path.read_bytes())[:512].startswith(b"manifest.json")
    with tarfile.open(path) as archive:
        for info in archive.getmembers():
            assert info.isreg()
            assert (info.uid, info.gid, info.uname, info.gname) == (0, 0, "", "")


def test_plain_archive_with_a_passphrase_reads(
    tmp_path: Path, state: list[Source], backup_dir: Path
) -> None:
    path = write_archive(backup_dir, state, {}, when=WHEN)
    verify_archive(path, passphrase=b"unused", record=False)
    extract_archive(path, tmp_path / "out", passphrase=b"unused")
    assert_restored(tmp_path / "out", state)


def test_extract_into_an_empty_dir(tmp_path: Path, state: list[Source], backup_dir: Path) -> None:
    path = write_archive(backup_dir, state, {}, when=WHEN)
    dest = tmp_path / "empty"
    dest.mkdir()
    extract_archive(path, dest)
    assert_restored(dest, state)


def test_extract_refuses_a_non_empty_dest(
    tmp_path: Path, state: list[Source], backup_dir: Path
) -> None:
    path = write_archive(backup_dir, state, {}, when=WHEN)
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep").write_text("mine")
    with pytest.raises(BackupError, match="not an empty directory"):
        extract_archive(path, dest)
    assert [p.name for p in dest.iterdir()] == ["keep"]


# --- damage -------------------------------------------------------------------------------


def test_flipped_byte_is_refused(tmp_path: Path, state: list[Source], backup_dir: Path) -> None:
    path = write_archive(backup_dir, state, {}, when=WHEN)
    flip_byte(path, path.stat().st_size // 2)
    with pytest.raises(BackupError, match="damaged") as info:
        verify_archive(path)
    assert str(info.value).startswith(path.name + ": ")
    assert not path.with_name(path.name + ".verified").exists()
    dest = tmp_path / "dest"
    with pytest.raises(BackupError, match="damaged"):
        extract_archive(path, dest)
    assert not dest.exists()
    dest.mkdir()
    with pytest.raises(BackupError, match="damaged"):
        extract_archive(path, dest)
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("keep", [0.5, 0.999, 10])
def test_truncated_archive_is_refused(
    tmp_path: Path, state: list[Source], backup_dir: Path, keep: float
) -> None:
    path = write_archive(backup_dir, state, {}, when=WHEN)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[: int(keep)])
    with pytest.raises(BackupError, match=DAMAGED):
        verify_archive(path)
    dest = tmp_path / "dest"
    with pytest.raises(BackupError, match=DAMAGED):
        extract_archive(path, dest)
    assert not dest.exists()


def test_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "data-backup-20250101-000000.tar.gz"
    path.write_bytes(b"hello, this is text")
    with pytest.raises(BackupError, match="not gzip"):
        verify_archive(path)
    path.write_bytes(b"")
    with pytest.raises(BackupError, match="empty"):
        verify_archive(path)
    with pytest.raises(BackupError, match="cannot read"):
        verify_archive(tmp_path / "missing.tar.gz")


# --- hostile and foreign archives ---------------------------------------------------------

Member = tuple[tarfile.TarInfo, bytes]


def regular(name: str, data: bytes = b"data\n", mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, b""


def entry(name: str, data: bytes = b"data\n", mode: int = 0o644) -> MemberEntry:
    return MemberEntry(name, len(data), hashlib.sha256(data).hexdigest(), mode)


def manifest_bytes(entries: list[MemberEntry], version: int = UNAUTHENTICATED_VERSION) -> bytes:
    # Format 1 (no authentication): these archives test the tar and manifest checks alone.
    manifest = Manifest(version, "0.1.0", WHEN.timestamp(), "2025-03-04T05:06:07Z", entries, {})
    return msgspec.json.encode(manifest)


def craft(
    path: Path,
    members: list[Member],
    manifest: bytes,
    *,
    manifest_at: int = 0,
    form: int = tarfile.GNU_FORMAT,
) -> Path:
    members = list(members)
    members.insert(manifest_at, regular("manifest.json", manifest, 0o600))
    with tarfile.open(path, "w:gz", format=form) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


LONG = "d/" * 2100 + "f"
HOSTILE: dict[str, tuple[Callable[[], tuple[list[Member], bytes, int]], str]] = {
    "dotdot": (lambda: ([regular("../evil")], manifest_bytes([entry("a")]), 0), "contains '..'"),
    "inner dotdot": (
        lambda: ([regular("a/../../evil")], manifest_bytes([entry("a")]), 0),
        "contains '..'",
    ),
    "absolute": (lambda: ([regular("/abs")], manifest_bytes([entry("a")]), 0), "absolute"),
    "backslash": (lambda: ([regular("a\\b")], manifest_bytes([entry("a")]), 0), "backslash"),
    "empty part": (lambda: ([regular("a//b")], manifest_bytes([entry("a")]), 0), "normalized"),
    "dot part": (lambda: ([regular("./a")], manifest_bytes([entry("a")]), 0), "normalized"),
    "symlink": (
        lambda: ([special("link", tarfile.SYMTYPE, "/etc")], manifest_bytes([]), 0),
        "symlink",
    ),
    "symlink then file through it": (
        lambda: (
            [special("link", tarfile.SYMTYPE, ".."), regular("link/escaped")],
            manifest_bytes([entry("link/escaped")]),
            0,
        ),
        "symlink",
    ),
    "hardlink": (
        lambda: (
            [regular("a"), special("b", tarfile.LNKTYPE, "a")],
            manifest_bytes([entry("a")]),
            0,
        ),
        "hardlink",
    ),
    "char device": (
        lambda: ([special("null", tarfile.CHRTYPE)], manifest_bytes([]), 0),
        "device",
    ),
    "block device": (lambda: ([special("sda", tarfile.BLKTYPE)], manifest_bytes([]), 0), "device"),
    "fifo": (lambda: ([special("pipe", tarfile.FIFOTYPE)], manifest_bytes([]), 0), "fifo"),
    "directory": (lambda: ([special("dir", tarfile.DIRTYPE)], manifest_bytes([]), 0), "directory"),
    "not in manifest": (
        lambda: ([regular("a"), regular("extra")], manifest_bytes([entry("a")]), 0),
        "'extra' is not in the manifest",
    ),
    "missing from archive": (
        lambda: ([regular("a")], manifest_bytes([entry("a"), entry("gone")]), 0),
        "lists 'gone', which the archive lacks",
    ),
    "duplicate": (
        lambda: ([regular("a"), regular("a")], manifest_bytes([entry("a")]), 0),
        "'a' appears twice",
    ),
    "second manifest": (
        lambda: ([regular("manifest.json")], manifest_bytes([]), 0),
        "appears twice",
    ),
    "duplicate in manifest": (
        lambda: ([regular("a")], manifest_bytes([entry("a"), entry("a")]), 0),
        "listed twice",
    ),
    "newer format": (
        lambda: ([regular("a")], manifest_bytes([entry("a")], version=3), 0),
        "made by a newer appliance, format 3; this one reads formats 1 and 2",
    ),
    "older format": (
        lambda: ([regular("a")], manifest_bytes([entry("a")], version=0), 0),
        "made by a older appliance, format 0; this one reads formats 1 and 2",
    ),
    "manifest not first": (
        lambda: ([regular("a")], manifest_bytes([entry("a")]), 1),
        "first member is 'a', not manifest.json",
    ),
    "unreadable manifest": (lambda: ([regular("a")], b"{not json", 0), "manifest is unreadable"),
    "size mismatch": (
        lambda: ([regular("a", b"longer data\n")], manifest_bytes([entry("a")]), 0),
        "'a' is 12 bytes but the manifest says 5",
    ),
    "checksum mismatch": (
        lambda: ([regular("a", b"DATA\n")], manifest_bytes([entry("a")]), 0),
        "'a' does not match its SHA-256",
    ),
    "setuid in manifest": (
        lambda: ([regular("a")], manifest_bytes([entry("a", mode=0o4755)]), 0),
        "more than permission bits",
    ),
    "huge name": (
        lambda: ([regular(LONG)], manifest_bytes([entry("a")]), 0),
        "longer than 4096 bytes",
    ),
    "file then dir of that name": (
        lambda: (
            [regular("a"), regular("a/b")],
            manifest_bytes([entry("a"), entry("a/b")]),
            0,
        ),
        "has 'a' as a file and as a directory",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_archive_is_refused(tmp_path: Path, case: str) -> None:
    build, message = HOSTILE[case]
    members, manifest, manifest_at = build()
    path = craft(tmp_path / "hostile.tar.gz", members, manifest, manifest_at=manifest_at)
    with pytest.raises(BackupError, match=message) as info:
        verify_archive(path)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400
    dest = tmp_path / "x" / "dest"
    dest.parent.mkdir()
    with pytest.raises(BackupError, match=message):
        extract_archive(path, dest)
    assert list(dest.parent.iterdir()) == []  # dest removed, nothing written beside it
    assert not (tmp_path / "evil").exists() and not (tmp_path / "x" / "escaped").exists()


def test_pax_header_is_refused(tmp_path: Path) -> None:
    # A pax header can rename the member after our name check; such archives are refused.
    path = craft(
        tmp_path / "pax.tar.gz",
        [regular("ünïcode")],
        manifest_bytes([entry("ünïcode")]),
        form=tarfile.PAX_FORMAT,
    )
    with pytest.raises(BackupError, match="pax extended header"):
        verify_archive(path)


def test_negative_size_is_refused(tmp_path: Path) -> None:
    raw = tmp_path / "a.tar"
    craft(raw, [regular("a")], manifest_bytes([entry("a")]))
    header = bytearray(gzip.decompress(raw.read_bytes())[:512])
    header[124:136] = b"\xff" * 12  # base-256 encoding of -1
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    data = bytes(header) + gzip.decompress(raw.read_bytes())[512:]
    path = tmp_path / "negative.tar.gz"
    path.write_bytes(gzip.compress(data))
    with pytest.raises(BackupError, match="negative size"):
        verify_archive(path)


def test_data_after_the_end_is_refused(tmp_path: Path) -> None:
    path = craft(tmp_path / "a.tar.gz", [regular("a")], manifest_bytes([entry("a")]))
    path.write_bytes(path.read_bytes() + gzip.compress(b"\0" * 2048 + b"surprise"))
    with pytest.raises(BackupError, match="after the end"):
        verify_archive(path)


# --- sealing ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Source]]:
    """One sealed archive for the module: Argon2id at its real cost is ~0.3 s a key."""
    root = tmp_path_factory.mktemp("sealed")
    sources = make_state(root / "src")
    (root / "backups").mkdir()
    path = write_archive(root / "backups", sources, {}, when=WHEN, passphrase=PASSPHRASE)
    return path, sources


def test_sealed_round_trip(tmp_path: Path, sealed: tuple[Path, list[Source]]) -> None:
    path, sources = sealed
    assert path.name == "data-backup-20250304-050607.tar.gz.sealed"
    data = path.read_bytes()
    assert not data.startswith(b"\x1f\x8b")
    assert b"models" not in data and sources[0].path.read_bytes()[:4096] not in data
    verify_archive(path, passphrase=PASSPHRASE, record=False)
    extract_archive(path, tmp_path / "out", passphrase=PASSPHRASE)
    assert_restored(tmp_path / "out", sources)
    (info,) = list_backups(path.parent)
    assert info.sealed and info.name == path.name


def test_sealed_wrong_passphrase(tmp_path: Path, sealed: tuple[Path, list[Source]]) -> None:
    path, _ = sealed
    with pytest.raises(BackupError, match="the passphrase is wrong or the archive is damaged"):
        verify_archive(path, passphrase=b"wrong", record=False)
    dest = tmp_path / "dest"
    with pytest.raises(BackupError, match="passphrase is wrong"):
        extract_archive(path, dest, passphrase=b"wrong")
    assert not dest.exists()


def test_sealed_needs_a_passphrase(sealed: tuple[Path, list[Source]]) -> None:
    with pytest.raises(BackupError, match="a passphrase file is needed"):
        verify_archive(sealed[0], record=False)


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        (HEADER_BYTES - 1, "sealed header is incomplete"),
        (HEADER_BYTES + 2 * (CHUNK_BYTES + 17), "ends before its final chunk"),
        (HEADER_BYTES + CHUNK_BYTES + 1000, "truncated or damaged"),
        (-1, "truncated or damaged"),
    ],
)
def test_sealed_truncated(
    tmp_path: Path, sealed: tuple[Path, list[Source]], cut: int, message: str
) -> None:
    cut_path = tmp_path / sealed[0].name
    cut_path.write_bytes(sealed[0].read_bytes()[:cut])
    with pytest.raises(BackupError, match=message):
        verify_archive(cut_path, passphrase=PASSPHRASE)


@pytest.mark.parametrize("where", ["header", "middle"])
def test_sealed_tampered(tmp_path: Path, sealed: tuple[Path, list[Source]], where: str) -> None:
    path = tmp_path / sealed[0].name
    path.write_bytes(sealed[0].read_bytes())
    flip_byte(path, HEADER_BYTES - 3 if where == "header" else path.stat().st_size // 2)
    with pytest.raises(BackupError, match="the passphrase is wrong or the archive is damaged"):
        verify_archive(path, passphrase=PASSPHRASE)


def test_unseal_to_file(tmp_path: Path, sealed: tuple[Path, list[Source]]) -> None:
    plain = tmp_path / "plain.tar.gz"
    unseal_to_file(sealed[0], plain, PASSPHRASE)
    assert plain.stat().st_mode & 0o777 == 0o600
    verify_archive(plain, record=False)
    with pytest.raises(BackupError, match="passphrase is wrong"):
        unseal_to_file(sealed[0], tmp_path / "other.tar.gz", b"wrong")
    assert not (tmp_path / "other.tar.gz").exists()


# --- writing: sources, atomicity, crashes ---------------------------------------------------


@pytest.mark.parametrize("change", ["rewritten", "grown", "shrunk"])
def test_source_changed_during_backup(
    tmp_path: Path, state: list[Source], backup_dir: Path, change: str
) -> None:
    first, victim = state[0], state[1]
    original = victim.path.read_bytes()
    replacement = {
        "rewritten": original.upper(),
        "grown": original + b"more",
        "shrunk": original[:-1],
    }[change]

    def meddle(done: int, total: int) -> None:
        if done >= first.path.stat().st_size and victim.path.read_bytes() == original:
            victim.path.write_bytes(replacement)

    with pytest.raises(BackupError, match=r"state/models\.json changed while it was being backed"):
        write_archive(backup_dir, state, {}, when=WHEN, progress=meddle)
    assert list(backup_dir.iterdir()) == []


def test_killed_backup_leaves_only_a_partial(tmp_path: Path, backup_dir: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(24 * 1024 * 1024))
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from datetime import datetime, UTC
        from pathlib import Path
        from appliance.backup.archive import Source, write_archive
        from appliance.store.sealing import KeyRing

        def die(done, total):
            if done > 12 * 1024 * 1024:
                os.kill(os.getpid(), signal.SIGKILL)

        write_archive(Path({str(backup_dir)!r}), [Source("big.bin", Path({str(source)!r}))],
                      {{}}, keys=KeyRing("k" * 40, "s"), when=datetime.now(UTC), progress=die)
        """
    )
    process = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=60)
    assert process.returncode == -signal.SIGKILL
    (partial,) = backup_dir.iterdir()
    assert partial.name.startswith(".data-backup-") and ".partial-" in partial.name
    assert list_backups(backup_dir) == []
    assert remove_partials(backup_dir) == [partial]
    assert list(backup_dir.iterdir()) == []


def test_remove_partials_only_removes_partials(backup_dir: Path, state: list[Source]) -> None:
    path = write_archive(backup_dir, state, {}, when=WHEN)
    verify_archive(path)
    partials = [
        backup_dir / ".data-backup-20250101-000000.tar.gz.partial-4242",
        backup_dir / ".data-backup-20250101-000000.tar.gz.sealed.partial-17",
        backup_dir / ".data-backup-20250101-000000.tar.gz.verified.partial-9",
    ]
    others = [backup_dir / "notes.txt", backup_dir / ".data-backup-x.partial-1"]
    for extra in partials + others:
        extra.write_bytes(b"x")
    assert [i.name for i in list_backups(backup_dir)] == [path.name]
    assert sorted(remove_partials(backup_dir)) == sorted(partials)
    left = {p.name for p in backup_dir.iterdir()}
    assert left == {path.name, path.name + ".verified", *(o.name for o in others)}


def test_write_errors_name_the_backup_not_the_source(tmp_path: Path, backup_dir: Path) -> None:
    """A file size limit (a real EFBIG from the kernel) stands in for a full disk."""
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(4 * 1024 * 1024))
    plain = backup_dir / "plain"
    plain.mkdir()
    archive = write_archive(plain, [Source("big.bin", source)], {}, when=WHEN)
    script = textwrap.dedent(
        f"""
        import resource, signal
        from datetime import datetime, UTC
        from pathlib import Path
        from appliance.backup.archive import BackupError, Source, extract_archive, write_archive
        from appliance.store.sealing import KeyRing

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024, 1024 * 1024))
        keys = KeyRing({KEYS_ARGS[0]!r}, {KEYS_ARGS[1]!r})
        try:
            write_archive(Path({str(backup_dir)!r}), [Source("big.bin", Path({str(source)!r}))],
                          {{}}, keys=keys, when=datetime.now(UTC))
        except BackupError as exc:
            print(exc)
        try:
            extract_archive(Path({str(archive)!r}), Path({str(tmp_path / "dest")!r}), keys=keys)
        except BackupError as exc:
            print(exc)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, timeout=60, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    wrote, extracted = out.stdout.splitlines()
    assert wrote.startswith("cannot write data-backup-") and "File too large" in wrote
    assert "check the free space" in wrote
    assert extracted.startswith(f"cannot extract {archive.name} into ")
    assert extracted.endswith("File too large")
    assert sorted(p.name for p in backup_dir.iterdir()) == ["plain"]
    assert not (tmp_path / "dest").exists()


def test_extract_refuses_what_cannot_fit(tmp_path: Path) -> None:
    huge = MemberEntry("a", 1 << 60, "0" * 64, 0o600)
    path = craft(tmp_path / "huge.tar.gz", [regular("a")], manifest_bytes([huge]))
    with pytest.raises(BackupError, match="free some space"):
        extract_archive(path, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_existing_name_is_never_overwritten(backup_dir: Path, state: list[Source]) -> None:
    taken = backup_dir / archive_name(WHEN, sealed=False)
    taken.write_bytes(b"precious")
    with pytest.raises(BackupError, match="already exists"):
        write_archive(backup_dir, state, {}, when=WHEN)
    assert taken.read_bytes() == b"precious"
    assert [p.name for p in backup_dir.iterdir()] == [taken.name]


def test_bad_sources(tmp_path: Path, backup_dir: Path, state: list[Source]) -> None:
    for arcname in ("../x", "/x", "a//b", "manifest.json", ""):
        with pytest.raises(ValueError, match="source"):
            write_archive(backup_dir, [Source(arcname, state[0].path)], {}, when=WHEN)
    with pytest.raises(ValueError, match="twice"):
        write_archive(backup_dir, [state[0], state[0]], {}, when=WHEN)
    with pytest.raises(ValueError, match="'state' is a file and a directory"):
        write_archive(backup_dir, [Source("state", state[0].path), state[1]], {}, when=WHEN)
    with pytest.raises(BackupError, match="cannot read gone"):
        write_archive(backup_dir, [Source("gone", tmp_path / "gone")], {}, when=WHEN)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(BackupError, match="pipe is not a regular file"):
        write_archive(backup_dir, [Source("pipe", fifo)], {}, when=WHEN)
    assert list(backup_dir.iterdir()) == []


def test_archive_name() -> None:
    assert archive_name(WHEN, sealed=True) == "data-backup-20250304-050607.tar.gz.sealed"
    plus_two = WHEN.astimezone(timezone(timedelta(hours=2)))
    assert archive_name(plus_two, sealed=False) == "data-backup-20250304-050607.tar.gz"
    with pytest.raises(ValueError, match="timezone"):
        archive_name(datetime(2025, 1, 1), sealed=False)


# --- the backup directory -------------------------------------------------------------------


def test_prune_keeps_the_newest(backup_dir: Path, state: list[Source]) -> None:
    made = [
        write_archive(backup_dir, state[3:], {}, when=WHEN + timedelta(days=day))
        for day in (3, 0, 4, 1, 2)
    ]
    for path in made:
        verify_archive(path)
    (backup_dir / "unrelated.txt").write_text("keep me")
    with pytest.raises(ValueError, match="at least 1"):
        prune_backups(backup_dir, 0)
    deleted = prune_backups(backup_dir, 2)
    assert sorted(p.name for p in deleted) == sorted(
        archive_name(WHEN + timedelta(days=day), sealed=False) for day in (0, 1, 2)
    )
    assert [info.created for info in list_backups(backup_dir)] == [
        WHEN + timedelta(days=4),
        WHEN + timedelta(days=3),
    ]
    left = sorted(p.name for p in backup_dir.iterdir())
    assert len(left) == 5 and "unrelated.txt" in left  # two archives, two sidecars
    assert prune_backups(backup_dir, 2) == []


def test_list_backups_and_verified_at(backup_dir: Path, state: list[Source]) -> None:
    older = write_archive(backup_dir, state[3:], {}, when=WHEN)
    newer = write_archive(backup_dir, state[3:], {}, when=WHEN + timedelta(seconds=1))
    (backup_dir / "data-backup-20251399-000000.tar.gz").write_bytes(b"bad date")
    (backup_dir / "data-backup-20250304-050607.tar.gz.orig").write_bytes(b"other")
    (backup_dir / "data-backup-20250101-000000.tar.gz").mkdir()
    infos = list_backups(backup_dir)
    assert [i.path for i in infos] == [newer, older]
    assert all(i.verified_at is None and not i.sealed for i in infos)
    assert infos[0].size == newer.stat().st_size
    assert infos[0].created == WHEN + timedelta(seconds=1)

    before = datetime.now(UTC)
    verify_archive(older)
    verify_archive(newer, record=False)
    infos = list_backups(backup_dir)
    assert infos[1].verified_at is not None and infos[1].verified_at >= before - timedelta(1)
    assert infos[0].verified_at is None

    stat = older.stat()
    os.utime(older, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert list_backups(backup_dir)[1].verified_at is None
    assert list_backups(backup_dir / "missing") == []


def test_read_passphrase_file(tmp_path: Path) -> None:
    path = tmp_path / "passphrase"
    for content, expected in (
        (b"secret\n", b"secret"),
        (b"secret\r\n", b"secret"),
        (b"secret\n\n", b"secret\n"),
        (b"no newline", b"no newline"),
    ):
        path.write_bytes(content)
        path.chmod(0o600)
        assert read_passphrase_file(path) == expected
    path.write_bytes(b"\n")
    with pytest.raises(BackupError, match="is empty"):
        read_passphrase_file(path)
    path.write_bytes(b"secret")
    path.chmod(0o644)
    with pytest.raises(BackupError, match="chmod 600"):
        read_passphrase_file(path)
    with pytest.raises(BackupError, match="cannot read the passphrase file"):
        read_passphrase_file(tmp_path / "missing")
