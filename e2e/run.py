"""`make e2e`: the .deb installed on a box run by a real systemd, and operated there.

The box is a Debian bookworm container booted with systemd-nspawn (see e2e/container.py).
Inside it the test installs dist/appliance_<version>_amd64.deb, starts the unit, talks to
the API through the OpenAI client, reads the journal, and then does to the service what
happens to one on a real box: a hung main process (watchdog), killed children, restarts and
stops, a good and a broken update, `systemd-analyze security`, remove and purge.

Each step prints one PASS or FAIL line with its evidence; the first failure prints the
unit's journal and ends the run with exit status 1. The container is powered off and its
root deleted on every exit. The commands of docs/operations.md's "Install on a box" section are
run verbatim (`sh -c LINE` in the folder with the .deb and the model), and the run fails if
one of them was not run, so that section stays what the test does.

Run as root: `make e2e` (or `.venv/bin/python e2e/run.py` once `make deb` is done).
`APPLIANCE_E2E_KEEP=1` leaves the container running at the end, to look around in it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any, Final

HERE: Final = Path(__file__).resolve().parent
REPO: Final = HERE.parent
sys.path.insert(0, str(REPO))

from e2e.container import (  # noqa: E402  (the repository root goes on sys.path first)
    CACHE,
    Container,
    ContainerError,
    ensure_host_tools,
    fresh_root,
    pristine_root,
    remove_root,
    sweep_stale_runs,
)

VERSION: Final = installed_version("appliance")
DEB_NAME: Final = f"appliance_{VERSION}_amd64.deb"
DIST: Final = REPO / "dist"
GUIDE: Final = REPO / "docs" / "operations.md"
GUIDE_SECTION: Final = "## Install on a box"
CLIENT: Final = HERE / "client.py"
# The client runs with this very Python (the project venv's, which has the openai client).
PYTHON: Final = Path(sys.executable)
# Where the files a box owner downloads are, inside the container (a read-only bind).
FILES: Final = "/e2e"
UNIT: Final = "appliance"
INSTALL_DIR: Final = "/usr/lib/appliance"
MAX_SECURITY_EXPOSURE: Final = 1.5
# How long a restarted service may take to be ready again (the default model loads in about
# a second).
READY_TIMEOUT: Final = 120.0
KEY_PATTERN: Final = re.compile(r"\bak-[A-Za-z0-9_.-]+")
# The default model, as README's box install has it (the file `make run` fetched).
MODEL: Final = "smollm2-135m-instruct"
# Its worker among the services.
WORKER: Final = f"worker:{MODEL}"
# systemd's own words for a stop that had to kill.
KILL_MARKERS: Final = ("SIGKILL", "timed out", "Killing process")


class Failure(Exception):
    """A check did not hold; the message is the evidence."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Failure(message)


# -- the install guide -------------------------------------------------------------------


class ReadmeCommands:
    """The command lines of docs/operations.md's "Install on a box" section, run verbatim."""

    def __init__(self, text: str) -> None:
        section = text.split(f"\n{GUIDE_SECTION}\n", 1)
        if len(section) != 2:
            raise Failure(f"docs/operations.md has no {GUIDE_SECTION!r} section")
        body = re.split(r"\n## ", section[1], maxsplit=1)[0]
        blocks = re.findall(r"```sh\n(.*?)```", body, flags=re.DOTALL)
        self.lines: list[str] = [
            line.strip()
            for block in blocks
            for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
        self.used: set[str] = set()

    def take(self, prefix: str) -> str:
        """The one line that starts with `prefix`; it counts as run."""
        found = [line for line in self.lines if line.startswith(prefix)]
        if len(found) != 1:
            raise Failure(
                f"docs/operations.md {GUIDE_SECTION!r} should have one `{prefix} ...` line: {found}"
            )
        self.used.add(found[0])
        return found[0]

    def unused(self) -> list[str]:
        return [line for line in self.lines if line not in self.used]


# -- the box --------------------------------------------------------------------------------


@dataclass
class Box:
    """The container with the appliance in it, and what the steps learnt so far."""

    container: Container
    readme: ReadmeCommands
    admin_key: str = ""
    user_key: str = ""
    request_id: str = ""
    conversations: list[str] = field(default_factory=list)

    def sh(
        self, line: str, env: Mapping[str, str] | None = None, timeout: float = 300.0
    ) -> subprocess.CompletedProcess[str]:
        """A shell line inside, as root, in the folder with the downloaded files."""
        return self.container.run(self.sh_command(line, env), check=False, timeout=timeout)

    @staticmethod
    def sh_command(line: str, env: Mapping[str, str] | None = None) -> list[str]:
        assignments = [f"{name}={value}" for name, value in (env or {}).items()]
        return ["env", *assignments, "sh", "-c", f"cd {FILES} && {line}"]

    def must(self, line: str, env: Mapping[str, str] | None = None, timeout: float = 300.0) -> str:
        done = self.sh(line, env, timeout)
        output = (done.stdout + done.stderr).strip()
        check(done.returncode == 0, f"`{line}` exited {done.returncode}:\n{output}")
        return output

    def show(self, *properties: str) -> dict[str, str]:
        done = self.container.run(["systemctl", "show", UNIT, *(f"-p{p}" for p in properties)])
        return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)

    def is_active(self) -> str:
        return self.container.run(["systemctl", "is-active", UNIT], check=False).stdout.strip()

    def api(
        self,
        method: str,
        path: str,
        *,
        key: str | None = None,
        body: Any = None,
        repeat: int = 1,
    ) -> list[dict[str, Any]]:
        """HTTP requests from the venv's httpx, in the container's network namespace."""
        command = [str(PYTHON), str(CLIENT), "request", method, path, "--repeat", str(repeat)]
        if key:
            command += ["--key", key]
        if body is not None:
            command += ["--body", json.dumps(body)]
        done = self.container.run_host_program(command)
        return [json.loads(line) for line in done.stdout.splitlines()]

    def ready_status(self) -> int:
        return int(self.api("GET", "/api/v1/health/ready")[0]["status"])

    def services(self) -> dict[str, dict[str, Any]]:
        answer = self.api("GET", "/api/v1/health/services", key=self.admin_key)[0]
        check(answer["status"] == 200, f"/api/v1/health/services answered {answer}")
        return {service["name"]: service for service in answer["body"]["services"]}

    def conversation(self, conversation_id: str) -> dict[str, Any]:
        path = f"/api/v1/conversations/{conversation_id}"
        return self.api("GET", path, key=self.user_key)[0]

    def send(self, message: str, repeat: int = 1) -> list[str]:
        """New conversations through /api/v1/chat/send; their ids once acknowledged."""
        body = {"message": message, "max_tokens": 4}
        answers = self.api("POST", "/api/v1/chat/send", key=self.user_key, body=body, repeat=repeat)
        for answer in answers:
            check(answer["status"] == 200, f"/api/v1/chat/send answered {answer}")
        return [answer["body"]["conversation_id"] for answer in answers]

    def all_conversations_there(self) -> str:
        """Every conversation written so far reads back whole (question and answer)."""
        for conversation_id in self.conversations:
            answer = self.conversation(conversation_id)
            messages = answer["body"].get("messages", []) if answer["status"] == 200 else []
            check(
                len(messages) == 2,
                f"conversation {conversation_id} is not whole: {str(answer)[:300]}",
            )
        return f"{len(self.conversations)} conversations read back whole"

    def journal_cursor(self) -> str:
        done = self.container.run(["journalctl", "-u", UNIT, "-n", "0", "--show-cursor"])
        return done.stdout.strip().rsplit("cursor: ", 1)[-1]

    def journal_after(self, cursor: str) -> list[dict[str, Any]]:
        command = ["journalctl", "-u", UNIT, f"--after-cursor={cursor}", "-o", "json"]
        done = self.container.run([*command, "--no-pager"])
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]

    def wait_active_and_ready(self, timeout: float = READY_TIMEOUT) -> str:
        """Poll `is-active` and /ready together until both say so; `active` must imply 200.

        systemd says active only after READY=1, and the daemon sends READY=1 only once it
        serves, so a sample of `active` with a /ready that is not 200 is a failure.
        """
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while time.monotonic() < deadline:
            state = self.is_active()
            ready = self.ready_status()
            seen.append(f"{state}/{ready}")
            if state == "active":
                check(ready == 200, f"systemd says active but /ready answers {ready}: {seen}")
                return "is-active/ready samples: " + " ".join(_squeeze(seen))
            # `inactive` only until the start job is queued; `deactivating` while a hung
            # daemon is being killed.
            starting = state == "inactive" and not any(s.startswith("activ") for s in seen[:-1])
            check(
                starting or state in ("activating", "deactivating", "reloading"),
                f"the unit is {state}: {_squeeze(seen)}",
            )
            time.sleep(0.3)
        raise Failure(f"not active and ready within {timeout:.0f} s: {_squeeze(seen)}")

    def unit_seconds(self, setting: str) -> float:
        """A time setting of the installed unit (WatchdogSec=30s, TimeoutStopSec=90)."""
        text = self.container.run(["systemctl", "cat", UNIT]).stdout
        found = re.findall(rf"^{setting}=(\S+)", text, flags=re.MULTILINE)
        check(bool(found), f"the installed unit has no {setting}=")
        return _seconds(found[-1])


def _squeeze(samples: list[str]) -> list[str]:
    """Runs of equal samples as `sample x N`."""
    out: list[str] = []
    for sample in samples:
        if out and out[-1].split(" x")[0] == sample:
            count = int(out[-1].split(" x")[1]) + 1 if " x" in out[-1] else 2
            out[-1] = f"{sample} x{count}"
        else:
            out.append(sample)
    return out


def _seconds(span: str) -> float:
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "ms": 0.001, "h": 3600.0}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", span)
    if match is None or match[2] not in units:
        raise Failure(f"cannot read the time span {span!r}")
    return float(match[1]) * units[match[2]]


def _messages(entries: list[dict[str, Any]]) -> list[str]:
    return [str(entry.get("MESSAGE", "")) for entry in entries]


# -- the steps ------------------------------------------------------------------------------


def step_install(box: Box) -> str:
    output = box.must(box.readme.take("apt install"))
    keys = KEY_PATTERN.findall(output)
    check(len(keys) == 1, f"the install should print the first admin key once:\n{output}")
    box.admin_key = keys[0]
    mode = box.must("stat -c '%a %U:%G' /etc/appliance/appliance.env")
    check(mode == "600 appliance:appliance", f"env file is {mode}")
    box.must(box.readme.take("appliance models import"))
    enabled = box.readme.take("systemctl enable --now")
    # Start it from this machine's side in the background, and watch `is-active` and
    # /ready meanwhile: systemd must not say active before the daemon is ready.
    started = time.monotonic()
    with subprocess.Popen(
        box.container.inside(box.sh_command(enabled)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as starting:
        try:
            samples = box.wait_active_and_ready()
            output, _ = starting.communicate(timeout=READY_TIMEOUT)
        finally:
            starting.kill()  # only if it still runs: a failed check must not leave it
    check(starting.returncode == 0, f"`{enabled}` exited {starting.returncode}: {output}")
    state = box.must(box.readme.take("systemctl is-active"))
    check(state == "active", f"is-active says {state}")
    status = box.must(box.readme.take("appliance status"))
    # The first line says ready; the services table is only there when the command reached
    # the daemon's own store (it makes itself a key there).
    ready_line = f"appliance {VERSION} on 127.0.0.1:8000: ready"
    check(ready_line in status and WORKER in status, f"status says:\n{status}")
    check(box.ready_status() == 200, "/api/v1/health/ready is not 200")
    created = box.must(box.readme.take("appliance keys create"))
    keys = KEY_PATTERN.findall(created)
    check(len(keys) == 1, f"`keys create` should print one key:\n{created}")
    box.user_key = keys[0]
    enabled_state = box.must("systemctl is-enabled appliance")
    return (
        f"installed, active and ready {time.monotonic() - started:.1f} s after enable --now "
        f"({samples}); {enabled_state}; admin and user keys made"
    )


def step_chat(box: Box) -> str:
    box.request_id = f"e2e-{os.getpid()}-chat"
    command = [str(PYTHON), str(CLIENT), "openai-chat", "--key", box.user_key]
    command += ["--request-id", box.request_id, "--message", "Hello from the e2e test"]
    done = box.container.run_host_program(command, check=False)
    check(done.returncode == 0, f"the OpenAI client failed:\n{done.stdout}{done.stderr}")
    answer = json.loads(done.stdout)
    check(answer["request_id"] == box.request_id, f"X-Request-ID not echoed: {answer}")
    check(bool(answer["content"]), f"empty completion: {answer}")
    refused = box.api("POST", "/v1/chat/completions", body={"model": MODEL, "messages": []})[0]
    check(refused["status"] == 401, f"a request without a key got {refused['status']}")
    box.conversations += box.send("Remember this conversation, please")
    stored = box.all_conversations_there()
    return (
        f"OpenAI client: {answer['completion_tokens']} tokens ({answer['finish_reason']}), "
        f"X-Request-ID {box.request_id} echoed; no key: 401; chat/send stored "
        f"{box.conversations[0]} ({stored})"
    )


def step_logs(box: Box) -> str:
    env = {"REQUEST_ID": box.request_id}
    raw = box.must(box.readme.take("journalctl -u appliance REQUEST_ID="), env)
    entries = [json.loads(line) for line in raw.splitlines() if line.startswith("{")]
    access = [e for e in entries if e.get("ENDPOINT") and e.get("STATUS")]
    check(len(access) == 1, f"expected one access entry for {box.request_id}:\n{raw[:2000]}")
    entry = access[0]
    for name in ("METHOD", "STATUS", "DURATION_MS", "LOGGER", "PRIORITY"):
        check(name in entry, f"the access entry has no {name}: {entry}")
    check(entry["STATUS"] == "200", f"STATUS is {entry['STATUS']}")
    shown = box.must(box.readme.take("appliance logs --request-id"), env)
    check(box.request_id in shown, f"`appliance logs` does not show the request:\n{shown}")
    as_json = box.must(f"appliance logs --request-id {shlex.quote(box.request_id)} --json")
    lines = [json.loads(line) for line in as_json.splitlines() if line.startswith("{")]
    same = [line for line in lines if line.get("endpoint") == entry["ENDPOINT"]]
    check(
        len(same) == 1 and str(same[0].get("status")) == entry["STATUS"],
        f"`appliance logs --json` differs from the journal:\n{as_json}",
    )
    fields = {k: entry[k] for k in ("METHOD", "ENDPOINT", "STATUS", "DURATION_MS")}
    return f"journal entry {fields}; `appliance logs` shows the same"


def step_watchdog(box: Box) -> str:
    watchdog = box.unit_seconds("WatchdogSec")
    before = box.show("MainPID", "NRestarts")
    cursor = box.journal_cursor()
    stopped_at = time.time()
    box.must(f"kill -STOP {before['MainPID']}")
    # systemd must notice within WatchdogSec (the last ping was up to half of it ago).
    deadline = time.monotonic() + watchdog + 15
    noticed: dict[str, Any] | None = None
    while noticed is None and time.monotonic() < deadline:
        time.sleep(1)
        found = [e for e in box.journal_after(cursor) if "Watchdog timeout" in e.get("MESSAGE", "")]
        noticed = found[0] if found else None
    check(noticed is not None, f"no watchdog timeout in the journal {watchdog + 15:.0f} s later")
    assert noticed is not None
    delay = int(noticed["__REALTIME_TIMESTAMP"]) / 1e6 - stopped_at
    check(delay <= watchdog + 1, f"the watchdog fired {delay:.1f} s after SIGSTOP (> {watchdog})")
    samples = box.wait_active_and_ready(timeout=READY_TIMEOUT)
    after = box.show("MainPID", "NRestarts")
    check(after["MainPID"] != before["MainPID"], "the main PID did not change")
    check(
        int(after["NRestarts"]) == int(before["NRestarts"]) + 1,
        f"NRestarts {before['NRestarts']} -> {after['NRestarts']}",
    )
    messages = _messages(box.journal_after(cursor))
    for expected in ("Failed with result 'watchdog'", "Scheduled restart job"):
        check(any(expected in m for m in messages), f"no {expected!r}: {messages[-20:]}")
    killed = [m for m in messages if "with signal" in m][:1]
    return (
        f"SIGSTOP of {before['MainPID']}: watchdog fired after {delay:.1f} s (WatchdogSec="
        f"{watchdog:.0f}), {killed}; restarted as {after['MainPID']} ({samples}); "
        f"{box.all_conversations_there()}"
    )


def step_kill_children(box: Box) -> str:
    unit_before = box.show("MainPID", "NRestarts")
    before = box.services()
    check({"redis", WORKER} <= before.keys(), f"services: {sorted(before)}")
    # Acknowledged writes, then at once a kill -9 of redis-server: none may be lost.
    box.conversations += box.send("Written just before redis-server is killed", repeat=5)
    box.must(f"kill -9 {before['redis']['pid']}")
    redis = _wait_replaced(box, "redis", before["redis"]["pid"])
    kept = box.all_conversations_there()
    box.must(f"kill -9 {before[WORKER]['pid']}")
    worker = _wait_replaced(box, WORKER, before[WORKER]["pid"])
    box.conversations += box.send("Answered by the restarted worker")
    kept = box.all_conversations_there()
    unit_after = box.show("MainPID", "NRestarts", "ActiveState")
    check(
        unit_after["ActiveState"] == "active" and unit_after["MainPID"] == unit_before["MainPID"],
        f"the unit did not stay up: {unit_before} -> {unit_after}",
    )
    check(unit_after["NRestarts"] == unit_before["NRestarts"], "systemd restarted the unit")
    return (
        f"redis-server {before['redis']['pid']} -> {redis}, worker {before[WORKER]['pid']} "
        f"-> {worker}; unit stayed active (MainPID {unit_after['MainPID']}); {kept}; "
        "the new worker answers"
    )


def _wait_replaced(box: Box, name: str, old_pid: int) -> int:
    """The new pid of service `name` once it runs healthy again and /ready is 200."""
    deadline = time.monotonic() + READY_TIMEOUT
    service: dict[str, Any] = {}
    while time.monotonic() < deadline:
        time.sleep(0.5)
        answer = box.api("GET", "/api/v1/health/services", key=box.admin_key)[0]
        if answer["status"] != 200:
            continue
        service = {s["name"]: s for s in answer["body"]["services"]}[name]
        replaced = service["pid"] not in (None, old_pid) and service["healthy"]
        if replaced and box.ready_status() == 200:
            return int(service["pid"])
    raise Failure(f"{name} did not come back within {READY_TIMEOUT:.0f} s: {service}")


def step_restart_stop(box: Box) -> str:
    stop_limit = box.unit_seconds("TimeoutStopSec")
    cursor = box.journal_cursor()
    old_pid = box.show("MainPID")["MainPID"]
    took = _timed(lambda: box.must("systemctl restart appliance"))
    check(box.ready_status() == 200, "not ready right after `systemctl restart` returned")
    restarted = box.journal_after(cursor)
    _check_clean_stop(_messages(restarted), "restart")
    check(box.show("MainPID")["MainPID"] != old_pid, "restart kept the old main PID")
    cursor = box.journal_cursor()
    stop_took = _timed(lambda: box.must("systemctl stop appliance"))
    check(stop_took < stop_limit, f"stop took {stop_took:.1f} s (TimeoutStopSec={stop_limit})")
    _check_clean_stop(_messages(box.journal_after(cursor)), "stop")
    result = box.show("Result", "ExecMainCode", "ExecMainStatus", "ActiveState")
    expected = {"Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0"}
    expected["ActiveState"] = "inactive"
    check(result == expected, f"after stop: {result} (ExecMainCode 1 is 'exited')")
    leftovers = [cmd for _, cmd in box.container.processes() if _ours(cmd)]
    check(not leftovers, f"processes left after stop: {leftovers}")
    files = box.must(
        "find /tmp /var/tmp /run -maxdepth 2 \\( -name '_MEI*' -o -name '*appliance.service*' "
        "-o -path /run/appliance \\) -print"
    )
    check(not files, f"files left after stop:\n{files}")
    box.must("systemctl start appliance")
    kept = box.all_conversations_there()
    return (
        f"restart {took:.1f} s, stop {stop_took:.1f} s (TimeoutStopSec={stop_limit:.0f}), no "
        f"SIGKILL, exit status 0, no processes, unpacked or runtime files left; started "
        f"again: {kept}"
    )


def _timed(action: Callable[[], object]) -> float:
    started = time.monotonic()
    action()
    return time.monotonic() - started


def _ours(cmdline: str) -> bool:
    return "appliance" in cmdline.split(" ")[0] or "redis-server" in cmdline


def _check_clean_stop(messages: list[str], what: str) -> None:
    killed = [m for m in messages if any(marker in m for marker in KILL_MARKERS)]
    check(not killed, f"{what}: systemd had to kill: {killed}")
    check(
        any("Deactivated successfully" in m for m in messages),
        f"{what}: no 'Deactivated successfully' from systemd: {messages[-15:]}",
    )
    check(any(m == "stopped" for m in messages), f"{what}: the daemon did not log 'stopped'")


def step_update(box: Box) -> str:
    old_pid = box.show("MainPID")["MainPID"]
    good = box.must(box.readme.take("appliance update"))
    check(f"appliance {VERSION} is ready" in good, f"update said:\n{good}")
    check(box.show("MainPID")["MainPID"] != old_pid, "the update did not restart the daemon")
    check(box.ready_status() == 200, "not ready after the update")
    box.must(f"test -x {INSTALL_DIR}.previous/appliance")
    kept = box.all_conversations_there()
    # The backup taken before the update must be the daemon's like any other: listed, and
    # its backup dir still writable by the daemon's user (the update runs as root).
    taken = re.search(r"backed up to \S*/(\S+)", good)
    check(taken is not None, f"the update took no backup:\n{good}")
    assert taken is not None
    listing = box.api("GET", "/api/v1/admin/backups", key=box.admin_key)[0]
    names = [b.get("name") for b in listing["body"].get("backups", [])]
    check(
        listing["status"] == 200 and taken[1] in names,
        f"the daemon cannot see the update's backup {taken[1]}: {str(listing)[:400]}",
    )

    broken = box.sh("appliance update ./appliance-broken/ --timeout 60")
    said = (broken.stdout + broken.stderr).strip()
    check(broken.returncode != 0, f"the broken update exited 0:\n{said}")
    check("rolled back" in said and "serving again" in said, f"the update said:\n{said}")
    check(box.ready_status() == 200, "not ready after the rollback")
    live = box.api("GET", "/api/v1/health/live")[0]
    check(live["body"].get("version") == VERSION, f"serving {live} after the rollback")
    box.must(f"test -x {INSTALL_DIR}.failed/appliance")
    check(box.must("appliance --version") == f"appliance {VERSION}", "the broken build stayed")
    return (
        f"good build: serving {VERSION} again, {kept}, its backup {taken[1]} listed by the "
        f"daemon; broken build: exit "
        f"{broken.returncode}, {said.splitlines()[-1]!r}; {box.all_conversations_there()}"
    )


def step_security(box: Box) -> str:
    analyze = "systemd-analyze security --no-pager"
    online = _exposure(box.must(f"{analyze} appliance"))
    inside = _exposure(box.must(f"{analyze} --offline=true /lib/systemd/system/{UNIT}.service"))
    # The unit file of the repository, rated here, on this machine, without loading it.
    unit_file = REPO / "systemd" / f"{UNIT}.service"
    host = subprocess.run(
        [*analyze.split(), "--offline=true", str(unit_file)], capture_output=True, text=True
    )
    offline = _exposure(host.stdout + host.stderr)
    check(online == inside == offline, f"scores differ: {online=} {inside=} {offline=}")
    check(online <= MAX_SECURITY_EXPOSURE, f"exposure {online} > {MAX_SECURITY_EXPOSURE}")
    return f"exposure {online} (running unit) = {inside} (offline, inside) = {offline} (offline)"


def _exposure(report: str) -> float:
    found = re.search(r"Overall exposure level for appliance\.service: (\d+\.\d+)", report)
    if found is None:
        raise Failure(f"no overall exposure in:\n{report[-1500:]}")
    return float(found[1])


def step_remove_purge(box: Box) -> str:
    box.must(box.readme.take("apt remove"))
    check(box.is_active() == "inactive", "still running after apt remove")
    check(box.show("LoadState")["LoadState"] == "not-found", "the unit is still there")
    box.must("test ! -e /etc/systemd/system/multi-user.target.wants/appliance.service")
    box.must("test -f /etc/appliance/appliance.env && test -d /var/lib/appliance")
    box.must("getent passwd appliance >/dev/null")
    box.must(box.readme.take("apt purge"))
    leftovers = box.must(
        "for p in /etc/appliance /var/lib/appliance /usr/bin/appliance /usr/lib/appliance* "
        "/usr/lib/.appliance* /lib/systemd/system/appliance.service "
        '/usr/lib/sysusers.d/appliance.conf; do [ -e "$p" ] && echo "$p"; done; true'
    )
    check(not leftovers, f"left after purge:\n{leftovers}")
    user = box.sh("getent passwd appliance; getent group appliance; true")
    check(not user.stdout.strip(), f"the user or group is still there: {user.stdout.strip()}")
    package = box.sh("dpkg-query -W -f '${Status}' appliance")
    check(package.returncode != 0 or "not-installed" in package.stdout, package.stdout)
    check(not [cmd for _, cmd in box.container.processes() if _ours(cmd)], "processes left")
    return (
        "remove: unit gone, settings and data kept; purge: settings, data, program, "
        "unit and user gone"
    )


STEPS: Final[list[tuple[str, Callable[[Box], str]]]] = [
    ("install and start", step_install),
    ("chat through the OpenAI client", step_chat),
    ("journal fields and appliance logs", step_logs),
    ("watchdog restarts a hung daemon", step_watchdog),
    ("kill -9 of redis-server and the worker", step_kill_children),
    ("restart and stop are clean", step_restart_stop),
    ("update: good build, broken build", step_update),
    ("systemd-analyze security", step_security),
    ("remove and purge", step_remove_purge),
]


# -- running it -----------------------------------------------------------------------------


def stage_files(where: Path) -> list[tuple[Path, str]]:
    """What the box owner downloaded: the .deb, a model, a new build and a broken one."""
    deb = DIST / DEB_NAME
    if not deb.is_file():
        raise Failure(f"{deb} is missing: run `make deb` first")
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    shutil.copyfile(deb, where / DEB_NAME)
    # The default model, fetched once and checked by its SHA-256 (what `make run` does).
    from tests.real_model import smollm2_path

    shutil.copyfile(smollm2_path(), where / f"{MODEL}.gguf")
    # The new build is dist/appliance itself (bound over this empty folder).
    (where / "appliance-new").mkdir()
    broken = where / "appliance-broken"
    broken.mkdir()
    (broken / "appliance").write_text(
        "#!/bin/sh\n"
        "# A build that names a version but cannot serve: `appliance update` must roll back.\n"
        f'[ "$1" = --version ] && echo "appliance {VERSION}-broken" && exit 0\n'
        'echo "this build is broken on purpose" >&2\n'
        "exit 1\n"
    )
    (broken / "appliance").chmod(0o755)
    return [(where, FILES), (DIST / "appliance", f"{FILES}/appliance-new")]


def dump_journal(box: Box) -> None:
    done = box.container.run(
        ["journalctl", "-u", UNIT, "-n", "80", "--no-pager"], check=False, timeout=30
    )
    print("---- journalctl -u appliance (last 80 entries) ----")
    print(done.stdout.rstrip() or done.stderr.rstrip())
    print("----")


def run_steps(box: Box) -> bool:
    for number, (name, step) in enumerate(STEPS, 1):
        started = time.monotonic()
        try:
            evidence = step(box)
        except (Failure, ContainerError, subprocess.TimeoutExpired, KeyError, ValueError) as exc:
            print(f"FAIL {number} {name} ({time.monotonic() - started:.1f} s): {exc}", flush=True)
            dump_journal(box)
            return False
        print(f"PASS {number} {name} ({time.monotonic() - started:.1f} s): {evidence}", flush=True)
    unused = box.readme.unused()
    if unused:
        print(f"FAIL docs/operations.md {GUIDE_SECTION!r}: lines the test did not run: {unused}")
        return False
    print(
        f"PASS docs/operations.md {GUIDE_SECTION!r}: "
        f"all {len(box.readme.lines)} command lines were run"
    )
    return True


@contextlib.contextmanager
def booted(keep: bool) -> Iterator[Container]:
    """A fresh container with the files staged; powered off and deleted on every exit
    (left running with `keep`, to look around after a failure)."""
    ensure_host_tools()
    sweep_stale_runs()
    staged = CACHE / "runs" / f"files-{os.getpid()}"
    binds = stage_files(staged)
    root = fresh_root(pristine_root())
    container = Container(root, binds, CACHE / "runs" / f"nspawn-{os.getpid()}.log")
    try:
        container.boot()
        yield container
    finally:
        if keep and container.nspawn is not None and container.nspawn.poll() is None:
            print(f"kept running: {' '.join(container.inside(['bash']))}")
            print(f"to end it: kill {container.nspawn.pid}; rm -rf {root} {staged}")
        else:
            container.poweroff()
            remove_root(root)
            shutil.rmtree(staged, ignore_errors=True)
            container.log.unlink(missing_ok=True)


def main() -> int:
    if os.geteuid() != 0:
        print("make e2e boots a container with systemd-nspawn: run it as root", file=sys.stderr)
        return 2
    # SIGTERM (a CI timeout) unwinds like Ctrl-C, so the container is always cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    readme = ReadmeCommands(GUIDE.read_text())
    try:
        with booted(keep=os.environ.get("APPLIANCE_E2E_KEEP") == "1") as container:
            print(f"container booted ({container.root})", flush=True)
            passed = run_steps(Box(container, readme))
    except (ContainerError, Failure) as exc:
        print(f"FAIL setup: {exc}", flush=True)
        passed = False
    except KeyboardInterrupt:
        print("interrupted; the container was powered off", flush=True)
        return 130
    verdict = "PASSED" if passed else "FAILED"
    print(f"e2e {verdict} in {time.monotonic() - started:.0f} s", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
