"""`appliance models ...` from the command line, on real files."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from tests.tiny_gguf import write_tiny_llama


def _models(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env_file = state / "test.env"
    env_file.touch()
    env.update({"APPLIANCE_STATE_DIR": str(state), "APPLIANCE_ENV_FILE": str(env_file)})
    return subprocess.run(
        [sys.executable, "-m", "appliance", "models", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_import_list_verify_remove(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    source = write_tiny_llama(tmp_path / "my-model.gguf")
    empty = _models(state, "list")
    assert empty.returncode == 0
    assert "appliance models import" in empty.stdout

    imported = _models(state, "import", str(source))
    assert imported.returncode == 0, imported.stderr
    assert "imported my-model" in imported.stdout
    assert (state / "models" / "my-model.gguf").read_bytes() == source.read_bytes()

    listed = json.loads(_models(state, "list", "--json").stdout)
    assert [(m["name"], m["state"]) for m in listed] == [("my-model", "ok")]
    assert "my-model" in _models(state, "list").stdout

    again = _models(state, "import", str(source))
    assert again.returncode == 1
    assert "my-model" in again.stderr and "Traceback" not in again.stderr

    assert _models(state, "verify").returncode == 0
    model_file = state / "models" / "my-model.gguf"
    data = bytearray(model_file.read_bytes())
    data[-1] ^= 0xFF
    model_file.write_bytes(bytes(data))
    tampered = _models(state, "verify", "my-model")
    assert tampered.returncode == 1
    assert "FAILED" in tampered.stdout

    removed = _models(state, "remove", "my-model")
    assert removed.returncode == 0
    assert not model_file.exists()
    assert _models(state, "remove", "my-model").returncode == 1


def test_import_refuses_a_malformed_file_and_leaves_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF")
    done = _models(state, "import", str(bad))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert str(tmp_path) not in done.stderr
    assert not any(p.suffix == ".gguf" for p in (state / "models").iterdir())
    assert not [p for p in (state / "models").iterdir() if p.name.startswith(".bad")]
    invalid_name = _models(state, "import", str(bad), "--name", "../escape")
    assert invalid_name.returncode == 1


def test_import_never_echoes_a_file_outside_the_models_dir(tmp_path: Path) -> None:
    """`models import` of a symlink to another file (/etc/passwd, say) used to print its
    first bytes (`bad magic b'root'`); names read from a GGUF-looking file were echoed too.
    The refusal says what is wrong in general terms, and nothing of the file."""
    state = tmp_path / "state"
    state.mkdir()
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:SECRET-CONTENT:/root:/bin/bash\n")
    link = tmp_path / "innocent.gguf"
    link.symlink_to(secret)
    # Starts like a GGUF, then a metadata key whose name is someone's secret.
    named = tmp_path / "named.gguf"
    key = b"root:SECRET-NAME"
    named.write_bytes(
        b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, len(key)) + key + struct.pack("<I", 99) + bytes(64)
    )
    for path, secret_words in ((link, ("root", "SECRET-CONTENT")), (named, ("SECRET-NAME",))):
        done = _models(state, "import", str(path))
        assert done.returncode == 1, done.stdout
        assert "Traceback" not in done.stderr
        for word in secret_words:
            assert word not in done.stdout + done.stderr, (path.name, done.stdout, done.stderr)
        assert str(tmp_path) not in done.stdout + done.stderr
    refused = _models(state, "import", str(link))
    assert "innocent.gguf is a symlink: importing the file it points to" in refused.stdout
    assert "not a GGUF file" in refused.stderr
    assert "a name in the file" in _models(state, "import", str(named)).stderr
    assert [p.name for p in (state / "models").iterdir() if p.suffix == ".gguf"] == []
