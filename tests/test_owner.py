"""Commands run by root on a box leave the daemon's data owned by the daemon's user."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.harness import daemon_environment, install_tiny_model, short_tempdir

SERVICE_UID = 4321


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as an operator on a box has")
def test_data_commands_run_by_root_hand_what_they_made_back_to_the_data_owner() -> None:
    state = short_tempdir("ow")
    os.chown(state, SERVICE_UID, SERVICE_UID)
    env = daemon_environment(state, {})
    source = install_tiny_model(short_tempdir("om"))

    def appliance(*args: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "appliance", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr

    # With the daemon stopped these start redis-server themselves, as root.
    appliance("keys", "create", "--name", "ops", "--scope", "user")
    appliance("models", "import", str(source))
    appliance("backup")
    made = [path for path in [state, *state.rglob("*")] if not path.is_symlink()]
    assert any(path.name.endswith(".tar.gz") for path in made)
    assert any(path.suffix == ".gguf" for path in made)
    assert {path: path.stat().st_uid for path in made if path.stat().st_uid != SERVICE_UID} == {}
    # The operator's own file stays the operator's.
    assert source.stat().st_uid == 0
