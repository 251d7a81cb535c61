"""A Debian bookworm container with a real systemd as PID 1, for the end-to-end test.

The machines this runs on (CI, developers' boxes) do not run systemd as PID 1, so the
package is installed into a container booted with `systemd-nspawn --boot`. A pristine root
made by debootstrap is cached outside the repository and outside /tmp (the cache key is a
hash of what goes into it); each run boots a fresh copy of it, so no run sees another's
leftovers. Commands run inside through `nsenter` into the container's init's namespaces.

Never boot /lib/systemd/systemd directly in an unshared namespace on the machine itself:
its boot runs tmpfiles and empties the machine's shared /tmp. nspawn gives it a tree of its
own.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

CACHE: Final = Path(os.environ.get("APPLIANCE_E2E_CACHE", "/var/cache/appliance-e2e"))
SUITE: Final = "bookworm"
VARIANT: Final = "minbase"
# What the root needs besides Debian's required packages (minbase: apt, dpkg, passwd,
# util-linux, findutils...): systemd as init. The appliance binary bundles its own Python,
# and HTTP requests come from the host's venv run in the container's network namespace.
INCLUDE: Final = ("systemd", "systemd-sysv", "dbus")
# Bump when _prepare() changes, so that a root prepared the old way is not reused.
PREPARED: Final = 1
HOST_PACKAGES: Final = ("systemd-container", "debootstrap")
HOST_TOOLS: Final = ("systemd-nspawn", "debootstrap", "nsenter")
BOX_ENV: Final = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root",
    "LANG=C.UTF-8",
)
DEFAULT_MIRROR: Final = "http://deb.debian.org/debian"
APT_SOURCES: Final = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
BOOT_TIMEOUT: Final = 90.0
POWEROFF_TIMEOUT: Final = 30.0


class ContainerError(RuntimeError):
    """The container could not be prepared, booted or reached; the message says why."""


def ensure_host_tools() -> None:
    """Install systemd-nspawn and debootstrap when missing (CI starts from a bare machine)."""
    if all(shutil.which(tool) for tool in HOST_TOOLS):
        return
    print(f"installing {' '.join(HOST_PACKAGES)} on this machine", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", *HOST_PACKAGES], check=True, env=env)


def cache_key() -> str:
    recipe = f"{SUITE} {VARIANT} {','.join(INCLUDE)} prepared-{PREPARED}"
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    """One debootstrap at a time, even with two e2e runs on one machine."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def pristine_root() -> Path:
    """The cached debootstrap tree, made (about a minute) when missing."""
    root = CACHE / f"root-{cache_key()}"
    with _cache_lock():
        if (root / ".complete").is_file():
            return root
        # Roots of other recipes (an older include list) are of no use any more.
        for old in CACHE.glob("root-*"):
            shutil.rmtree(old, ignore_errors=True)
        partial = root.with_name(root.name + ".partial")
        print(f"debootstrap {SUITE} into {root} (cached for the next runs)", flush=True)
        started = time.monotonic()
        command = ["debootstrap", f"--variant={VARIANT}", f"--include={','.join(INCLUDE)}"]
        done = subprocess.run(
            [*command, SUITE, str(partial), debian_mirror()],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
            raise ContainerError(f"debootstrap failed (exit {done.returncode}):\n{tail}")
        _prepare(partial)
        (partial / ".complete").write_text(cache_key() + "\n")
        partial.rename(root)
        print(f"root ready in {time.monotonic() - started:.0f} s", flush=True)
        return root


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (CI may reach only its own), else Debian's."""
    files: list[Path] = []
    for source in APT_SOURCES:
        files += sorted(source.glob("*")) if source.is_dir() else [source]
    for path in files:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = path.read_text()
            # deb822 (`URIs: ...`) or one-line (`deb [options] URI suite ...`) entries.
            found: list[str] = re.findall(r"^URIs:\s*(\S+)", text, flags=re.MULTILINE)
            found += re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S", text, flags=re.MULTILINE)
            for uri in found:
                if "debian" in uri and "security" not in uri and uri.startswith("http"):
                    return uri
    return DEFAULT_MIRROR


def sweep_stale_runs() -> None:
    """Remove the roots and files of runs whose driver died without cleaning up (kill -9)."""
    runs = CACHE / "runs"
    if not runs.is_dir():
        return
    for entry in runs.iterdir():
        pid = entry.name.rsplit("-", 1)[-1].split(".")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _prepare(root: Path) -> None:
    """Settings of the root that every run wants: a quiet, quick boot."""
    (root / "etc/hostname").write_text("appliance-e2e\n")
    # No login prompt on the console: nothing reads it, and getty spins on a pipe.
    for unit in ("getty.target", "console-getty.service"):
        (root / "etc/systemd/system" / unit).unlink(missing_ok=True)
        (root / "etc/systemd/system" / unit).symlink_to("/dev/null")


def fresh_root(pristine: Path) -> Path:
    """A copy of the pristine root for this run only (removed by `remove_root`)."""
    work = CACHE / "runs" / f"root-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", "--reflink=auto", str(pristine), str(work)], check=True)
    (work / ".complete").unlink()
    return work


def remove_root(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)


class Container:
    """A booted systemd-nspawn container; `run` executes inside it, as root."""

    def __init__(self, root: Path, binds: Sequence[tuple[Path, str]], log: Path) -> None:
        self.root = root
        self.binds = binds
        self.log = log
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.init_pid = 0

    def boot(self) -> None:
        # No system bus on the host (hence --register=no --keep-unit); a private network
        # namespace with only loopback, where the appliance listens on 127.0.0.1.
        command = ["systemd-nspawn", "-D", str(self.root), "--boot", "--register=no"]
        command += ["--keep-unit", "--console=pipe", "--private-network", "--quiet"]
        command += [f"--bind-ro={source}:{target}" for source, target in self.binds]
        with self.log.open("wb") as log:
            self.nspawn = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise ContainerError(
                    f"systemd-nspawn exited ({self.nspawn.returncode}); see {self.log}"
                )
            self.init_pid = self.init_pid or _first_child(self.nspawn.pid)
            if self.init_pid and self._system_state() in ("running", "degraded"):
                return
            time.sleep(0.3)
        raise ContainerError(f"the container did not boot in {BOOT_TIMEOUT:.0f} s; see {self.log}")

    def _system_state(self) -> str:
        done = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
        return done.stdout.strip()

    def nsenter(self, *namespaces: str) -> list[str]:
        return ["nsenter", "-t", str(self.init_pid), *namespaces, "--"]

    def run(
        self,
        command: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 120.0,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """A command inside the container (its mounts, pids, network, hostname, IPC)."""
        return _run(self.inside(command), check=check, timeout=timeout, stdin=stdin)

    def inside(self, command: Sequence[str]) -> list[str]:
        """The command line that runs `command` inside the container, as root."""
        # The environment of a root login there, not this machine's (SSL_CERT_FILE and
        # the like name files that the container does not have).
        return [*self.nsenter("-m", "-u", "-i", "-n", "-p"), "env", "-i", *BOX_ENV, *command]

    def run_host_program(
        self, command: Sequence[str], *, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """A program of this machine (e.g. the venv's Python) in the container's network."""
        return _run([*self.nsenter("-n"), *command], check=check, timeout=timeout, stdin=None)

    def processes(self) -> list[tuple[int, str]]:
        """(pid on this machine, command line) of every process in the container."""
        ours = os.readlink(f"/proc/{self.init_pid}/ns/pid")
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns/pid") != ours:
                    continue
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                found.append((int(entry.name), cmdline))
        return found

    def poweroff(self) -> None:
        """`systemctl poweroff` inside; kill nspawn if the container does not end in time."""
        if self.nspawn is None or self.nspawn.poll() is not None:
            return
        if self.init_pid:
            self.run(["systemctl", "poweroff"], check=False, timeout=15)
        try:
            self.nspawn.wait(timeout=POWEROFF_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"the container did not power off in {POWEROFF_TIMEOUT:.0f} s; killing it")
            self.nspawn.send_signal(signal.SIGKILL)
            self.nspawn.wait(timeout=10)


def _first_child(pid: int) -> int:
    """The container's init: nspawn's child (nspawn runs it in a new pid namespace)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0
    return int(children[0]) if children else 0


def _run(
    command: Sequence[str], *, check: bool, timeout: float, stdin: str | None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, input=stdin, check=False
    )
    if check and done.returncode != 0:
        output = (done.stdout + done.stderr).strip()
        raise ContainerError(f"`{' '.join(command)}` exited {done.returncode}:\n{output}")
    return done
