"""One appliance per state dir: an exclusive flock on `<state>/.appliance.lock`.

Whoever runs redis-server on a state dir holds the lock: the daemon for its whole life, a
CLI command (with the daemon stopped) while it runs. The holder writes who it is into the
file (pid, `serve` or the command, its Redis socket and bind), so that a second daemon
refuses naming the pid and a command run while the daemon is up uses the daemon's Redis.

The kernel drops a flock when its process dies, so a killed holder never leaves a stale
lock. The file itself is never removed (a process may have just opened it), and its name
starts with a dot: backups leave it out and restores never move it (a held lock must stay
on the same inode).
"""

from __future__ import annotations

import fcntl
import os
import re
import sys
import time
from pathlib import Path
from typing import Final

import msgspec
import psutil

LOCK_NAME: Final = ".appliance.lock"
SERVE: Final = "serve"
_WORD: Final = re.compile(r"[a-z]{2,16}")


class StateDirBusy(RuntimeError):
    """Another process holds the state dir (or this one may not take it); the message names
    it and says what to do."""


class StoreElsewhere(RuntimeError):
    """A command's settings do not lead to the store of the daemon that is running (or to
    any store yet); the message says which settings to give it."""


class Holder(msgspec.Struct, frozen=True):
    """Who holds a state dir's lock, as its holder wrote it."""

    pid: int
    # "serve", or the CLI command ("keys create").
    command: str
    # The embedded Redis's unix socket; empty when the store is APPLIANCE_REDIS_URL.
    socket: str
    bind: str
    since: float

    @property
    def is_daemon(self) -> bool:
        return self.command == SERVE

    def describe(self) -> str:
        if self.is_daemon:
            return f"appliance serve (pid {self.pid}, APPLIANCE_BIND {self.bind})"
        return f"`appliance {self.command}` (pid {self.pid})"

    def alive(self) -> bool:
        try:
            return psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


class StateLock:
    """The lock of one state dir, and whether this object holds it."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except PermissionError:
            raise StateDirBusy(
                f"cannot open {self.path}: permission denied (run the command as root or as "
                "the user the daemon runs as)"
            ) from None

    def try_acquire(self, holder: Holder) -> bool:
        """Take the lock without waiting and write `holder` into it; False when it is held
        by another process (or by another StateLock of this one)."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this object")
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        data = msgspec.json.encode(holder) + b"\n"
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        self._fd = fd
        return True

    def release(self) -> None:
        """Drop the lock. The file is emptied first, so that nobody reads a holder that has
        let go; it is not removed."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)

    def holder(self) -> Holder | None:
        """The live process holding the lock, or None: free, or taken a moment ago by a
        process that has not written its name yet (ask again)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, PermissionError):
            return None
        try:
            try:
                # A shared lock is refused while anyone holds the exclusive one.
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                return None
            data = os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
        try:
            found = msgspec.json.decode(data, type=Holder)
        except msgspec.DecodeError:
            return None
        return found if found.alive() else None

    def wait_for_holder(self, timeout: float = 2.0) -> Holder | None:
        """The holder, asking again for a moment while a new holder writes its name; None
        when the lock is free."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.holder()
            if found is not None or not self.busy() or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def busy(self) -> bool:
        """Whether some process (or another StateLock of this one) holds the lock now."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, PermissionError):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


def running_command(argv: list[str] | None = None) -> str:
    """This process's command words (`keys create`), for others to read in the lock."""
    words: list[str] = []
    arguments = iter((sys.argv if argv is None else argv)[1:])
    for word in arguments:
        if word == "--env-file":
            next(arguments, None)
        elif word.startswith("--env-file="):
            continue
        elif word.startswith("-") or not _WORD.fullmatch(word) or len(words) == 2:
            break
        else:
            words.append(word)
    return " ".join(words) or "store"


def holder_for(command: str, *, socket: str, bind: str) -> Holder:
    """This process, as it writes itself into the lock."""
    return Holder(pid=os.getpid(), command=command, socket=socket, bind=bind, since=time.time())
