"""The model registry over a real models directory, with real (tiny) GGUF files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from appliance.llm.gguf_header import GGUFHeaderError, check_gguf_header
from appliance.llm.registry import (
    CHECKSUM_CHANGED,
    MANIFEST_NAME,
    ImportRefused,
    InvalidModelName,
    ModelExists,
    ModelRegistry,
    ModelUnavailable,
    RegistryError,
    UnknownModel,
    validate_model_name,
)
from tests.tiny_gguf import write_tiny_llama

TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny model written once; tests copy it so each gets its own file."""
    return write_tiny_llama(tmp_path_factory.mktemp("src") / "tiny.gguf", chat_template=TEMPLATE)


@pytest.fixture
def models(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def registry(models: Path) -> ModelRegistry:
    return ModelRegistry(models)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def install(tiny: Path, models: Path, name: str) -> Path:
    target = models / f"{name}.gguf"
    shutil.copyfile(tiny, target)
    return target


def flip_byte(path: Path, *, keep_mtime: bool) -> None:
    """Flip one byte of tensor data (the header stays valid), like bit rot on the disk."""
    before = path.stat()
    with path.open("r+b") as file:
        file.seek(before.st_size - 100)
        value = file.read(1)[0]
        file.seek(before.st_size - 100)
        file.write(bytes([value ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def leftovers(models: Path) -> list[str]:
    return sorted(p.name for p in models.iterdir() if ".importing-" in p.name)


def test_scan_records_hash_and_header_fields(tiny: Path, models: Path) -> None:
    path = install(tiny, models, "tiny")
    [record] = ModelRegistry(models).list()
    assert record.name == "tiny"
    assert record.file == "tiny.gguf"
    assert record.state == "ok" and record.ok and record.reason is None
    assert record.sha256 == sha256_of(path)
    assert record.size == path.stat().st_size
    assert record.mtime == path.stat().st_mtime
    assert record.architecture == "llama"
    assert record.context_length == 512
    assert record.has_chat_template is True

    manifest = json.loads((models / MANIFEST_NAME).read_text())
    assert [entry["name"] for entry in manifest["models"]] == ["tiny"]
    assert manifest["models"][0]["sha256"] == record.sha256


def test_scan_reuses_records_of_unchanged_files(tiny: Path, models: Path) -> None:
    install(tiny, models, "tiny")
    first = ModelRegistry(models).get("tiny")
    again = ModelRegistry(models).get("tiny")
    assert again.checked_at == first.checked_at  # not re-read: size and mtime match


def test_model_without_chat_template(tmp_path: Path, models: Path) -> None:
    write_tiny_llama(models / "plain.gguf")
    assert ModelRegistry(models).get("plain").has_chat_template is False


def test_garbage_files_are_listed_failed_without_breaking_the_scan(
    tiny: Path, models: Path, registry: ModelRegistry
) -> None:
    install(tiny, models, "good")
    (models / "garbage.gguf").write_bytes(b"this is not a GGUF file at all\n" * 100)
    (models / "empty.gguf").write_bytes(b"")
    records = {record.name: record for record in registry.list()}
    assert sorted(records) == ["empty", "garbage", "good"]
    assert records["good"].ok
    for name in ("garbage", "empty"):
        assert records[name].state == "failed"
        assert records[name].reason
        assert records[name].sha256 == ""  # refused before hashing
        assert records[name].architecture is None
    with pytest.raises(ModelUnavailable, match="appliance models verify garbage"):
        registry.usable("garbage")


def test_special_files_are_listed_failed_and_never_opened(
    models: Path, registry: ModelRegistry
) -> None:
    os.mkfifo(models / "fifo.gguf")  # opening it for reading would block the scan
    (models / "dir.gguf").mkdir()
    records = {record.name: record for record in registry.list()}
    assert records["fifo"].state == "failed"
    assert records["fifo"].reason == "it is not a regular file"
    assert records["dir"].reason == "it is not a regular file"


def test_hidden_temp_and_misnamed_files_are_ignored(tiny: Path, models: Path) -> None:
    install(tiny, models, "tiny")
    shutil.copyfile(tiny, models / ".tiny2.gguf.importing-abc123")
    shutil.copyfile(tiny, models / ".hidden.gguf")
    shutil.copyfile(tiny, models / "has space.gguf")
    shutil.copyfile(tiny, models / "other.bin")
    assert [record.name for record in ModelRegistry(models).list()] == ["tiny"]


def test_missing_models_dir_lists_nothing(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "absent")
    assert registry.list() == []
    assert registry.default_name(None) is None
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize(
    "name", ["../x", "/abs", "a/b", ".hidden", "-dash", "x..y", "", "a" * 65, "modèle", "a b"]
)
def test_invalid_names_are_refused(name: str, registry: ModelRegistry) -> None:
    with pytest.raises(InvalidModelName, match="A-Z a-z 0-9") as caught:
        validate_model_name(name)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, RegistryError)
    assert "/abs" not in str(caught.value)
    with pytest.raises(InvalidModelName):
        registry.get(name)


@pytest.mark.parametrize("name", ["a", "gemma-3-270m", "Qwen2.5_0.5B.Q4_K_M", "x" * 64])
def test_valid_names(name: str) -> None:
    assert validate_model_name(name) == name


def test_symlink_out_of_the_directory_is_refused(
    tiny: Path, tmp_path: Path, models: Path, registry: ModelRegistry
) -> None:
    (models / "evil.gguf").symlink_to(tiny)
    [record] = registry.list()
    assert record.name == "evil" and record.state == "failed"
    assert record.reason is not None and "outside the models directory" in record.reason
    assert record.sha256 == ""  # never opened
    with pytest.raises(ModelUnavailable, match="outside the models directory") as caught:
        registry.usable("evil")
    assert str(tmp_path) not in str(caught.value)
    with pytest.raises(ModelUnavailable, match="outside"):
        registry.path_of(record)


def test_symlink_inside_the_directory_is_followed(tiny: Path, models: Path) -> None:
    (models / "store").mkdir()
    real = install(tiny, models / "store", "real")
    (models / "alias.gguf").symlink_to(Path("store") / "real.gguf")
    registry = ModelRegistry(models)
    record = registry.usable("alias")
    assert record.sha256 == sha256_of(real)
    assert registry.path_of(record) == Path(os.path.realpath(real))


def test_import_copies_atomically(tmp_path: Path, models: Path, registry: ModelRegistry) -> None:
    # Several MiB, so the copy takes several chunks and progress is seen mid-way.
    source = write_tiny_llama(tmp_path / "My-Model.Q8.gguf", n_embd=256)
    seen: list[tuple[int, int]] = []
    listed_during: list[list[str]] = []
    temp_files_during: list[list[str]] = []

    def progress(done: int, total: int) -> None:
        seen.append((done, total))
        if 0 < done < total:
            temp_files_during.append(leftovers(models))
            listed_during.append([record.name for record in ModelRegistry(models).list()])

    record = registry.import_file(source, progress=progress)

    assert record.name == "My-Model.Q8" and record.ok
    assert record.sha256 == sha256_of(source) == sha256_of(models / "My-Model.Q8.gguf")
    size = source.stat().st_size
    assert seen[0] == (0, size) and seen[-1] == (size, size)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert temp_files_during and all(len(names) == 1 for names in temp_files_during)
    assert listed_during and all(names == [] for names in listed_during)
    assert leftovers(models) == []
    assert registry.get("My-Model.Q8") == record
    assert ModelRegistry(models).get("My-Model.Q8").sha256 == record.sha256


def test_import_with_explicit_name(tiny: Path, registry: ModelRegistry) -> None:
    assert registry.import_file(tiny, name="chat").name == "chat"
    assert [record.name for record in registry.list()] == ["chat"]


def test_import_refuses_invalid_gguf_and_leaves_nothing(
    tmp_path: Path, models: Path, registry: ModelRegistry
) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 200)
    with pytest.raises(GGUFHeaderError) as header_error:
        check_gguf_header(bad)
    with pytest.raises(ImportRefused) as caught:
        registry.import_file(bad)
    assert str(header_error.value) in str(caught.value)
    assert str(tmp_path) not in str(caught.value)
    assert leftovers(models) == []
    assert registry.list() == []


def test_import_refuses_missing_source_and_bad_default_name(
    tmp_path: Path, tiny: Path, registry: ModelRegistry
) -> None:
    with pytest.raises(ImportRefused, match=r"cannot read 'nope\.gguf'") as caught:
        registry.import_file(tmp_path / "nope.gguf")
    assert str(tmp_path) not in str(caught.value)
    spaced = tmp_path / "has space.gguf"
    shutil.copyfile(tiny, spaced)
    with pytest.raises(InvalidModelName):
        registry.import_file(spaced)
    assert registry.import_file(spaced, name="spaced").ok


def test_import_refuses_duplicates(tiny: Path, models: Path, registry: ModelRegistry) -> None:
    first = registry.import_file(tiny)
    with pytest.raises(ModelExists, match="appliance models remove tiny"):
        registry.import_file(tiny)
    with pytest.raises(ModelExists):
        registry.import_file(tiny, name="tiny")
    assert registry.list() == [first]
    assert leftovers(models) == []


def test_interrupted_import_removes_the_temp_file(
    tmp_path: Path, models: Path, registry: ModelRegistry
) -> None:
    source = write_tiny_llama(tmp_path / "big.gguf", n_embd=256)

    def interrupt(done: int, total: int) -> None:
        if done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        registry.import_file(source, progress=interrupt)
    assert leftovers(models) == []
    assert registry.list() == []


def test_remove(tiny: Path, models: Path, registry: ModelRegistry) -> None:
    registry.import_file(tiny, name="a")
    registry.import_file(tiny, name="b")
    registry.remove("a")
    assert not (models / "a.gguf").exists()
    assert [record.name for record in ModelRegistry(models).list()] == ["b"]
    manifest = json.loads((models / MANIFEST_NAME).read_text())
    assert [entry["name"] for entry in manifest["models"]] == ["b"]
    with pytest.raises(UnknownModel, match="model 'a' is not installed; installed: b"):
        registry.remove("a")


def test_unknown_model_messages(tiny: Path, models: Path, registry: ModelRegistry) -> None:
    with pytest.raises(UnknownModel, match="no models are installed; import one with: appliance"):
        registry.get("x")
    install(tiny, models, "b")
    install(tiny, models, "a")
    with pytest.raises(UnknownModel, match=r"^model 'x' is not installed; installed: a, b$"):
        registry.usable("x")
    with pytest.raises(LookupError):
        registry.get("x")


def test_vanished_files_are_dropped(tiny: Path, models: Path, registry: ModelRegistry) -> None:
    install(tiny, models, "a")
    install(tiny, models, "b")
    assert len(registry.list()) == 2
    (models / "a.gguf").unlink()
    assert [record.name for record in registry.list()] == ["b"]
    manifest = json.loads((models / MANIFEST_NAME).read_text())
    assert [entry["name"] for entry in manifest["models"]] == ["b"]


def test_mark_failed_persists_until_verified(tiny: Path, models: Path) -> None:
    install(tiny, models, "tiny")
    ModelRegistry(models).mark_failed("tiny", "the worker died\nwhile loading it (SIGSEGV)")

    fresh = ModelRegistry(models)
    record = fresh.get("tiny")
    assert record.state == "failed"
    assert record.reason == "the worker died while loading it (SIGSEGV)"
    with pytest.raises(ModelUnavailable) as caught:
        fresh.usable("tiny")
    message = str(caught.value)
    assert "SIGSEGV" in message and "appliance models verify tiny" in message
    assert "\n" not in message
    assert fresh.default_name(None) is None

    [result] = fresh.verify("tiny")
    assert result.ok and result.previous_state == "failed"
    assert ModelRegistry(models).usable("tiny").ok


def test_mark_failed_unknown_model(registry: ModelRegistry) -> None:
    with pytest.raises(UnknownModel):
        registry.mark_failed("ghost", "crashed")


def test_verify_detects_a_flipped_byte_and_clears_when_good(tiny: Path, models: Path) -> None:
    path = install(tiny, models, "tiny")
    install(tiny, models, "other")
    registry = ModelRegistry(models)
    original = registry.get("tiny").sha256

    flip_byte(path, keep_mtime=True)  # bit rot: size and mtime unchanged, so scan trusts it
    assert registry.usable("tiny").ok
    seen: list[tuple[int, int]] = []
    results = {r.name: r for r in registry.verify(progress=lambda *step: seen.append(step))}
    assert results["tiny"].state == "failed" and results["tiny"].reason == CHECKSUM_CHANGED
    assert results["tiny"].previous_state == "ok"
    assert results["other"].ok
    total = 2 * tiny.stat().st_size
    assert seen[-1] == (total, total)
    assert [done for done, _ in seen] == sorted({done for done, _ in seen})  # each value once
    with pytest.raises(ModelUnavailable, match=CHECKSUM_CHANGED):
        ModelRegistry(models).usable("tiny")
    assert registry.get("tiny").sha256 == original  # the reference is kept

    flip_byte(path, keep_mtime=True)  # restored
    [result] = registry.verify("tiny")
    assert result.ok and result.previous_state == "failed"
    assert registry.usable("tiny").sha256 == original


def test_scan_catches_a_file_changed_in_place(tiny: Path, models: Path) -> None:
    path = install(tiny, models, "tiny")
    registry = ModelRegistry(models)
    registry.get("tiny")
    flip_byte(path, keep_mtime=False)
    os.utime(path, (path.stat().st_atime, path.stat().st_mtime + 10))
    record = registry.get("tiny")
    assert record.state == "failed" and record.reason == CHECKSUM_CHANGED


def test_verify_unknown_and_broken(tiny: Path, models: Path, registry: ModelRegistry) -> None:
    with pytest.raises(UnknownModel):
        registry.verify("ghost")
    (models / "broken.gguf").write_bytes(b"nope")
    [result] = registry.verify()
    assert result.state == "failed" and result.reason


def test_manifest_is_rebuilt_when_deleted(tiny: Path, models: Path) -> None:
    install(tiny, models, "tiny")
    before = ModelRegistry(models).get("tiny")
    (models / MANIFEST_NAME).unlink()
    after = ModelRegistry(models).get("tiny")
    assert after.sha256 == before.sha256 and after.ok
    assert (models / MANIFEST_NAME).exists()


@pytest.mark.parametrize(
    "content", [b"{not json", b'{"version": 1, "models": [{"name": 3}]}', b"\x00\xff"]
)
def test_corrupt_manifest_is_rebuilt_with_a_warning(
    tiny: Path, models: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = install(tiny, models, "tiny")
    ModelRegistry(models).list()
    (models / MANIFEST_NAME).write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="appliance.llm"):
        [record] = ModelRegistry(models).list()
    assert record.ok and record.sha256 == sha256_of(path)
    assert any("manifest" in entry.getMessage() for entry in caplog.records)
    json.loads((models / MANIFEST_NAME).read_text())  # rewritten whole


def test_corrupt_manifest_without_models_is_rewritten_once(
    models: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (models / MANIFEST_NAME).write_bytes(b"{not json")
    with caplog.at_level(logging.WARNING, logger="appliance.llm"):
        assert ModelRegistry(models).list() == []
        assert ModelRegistry(models).list() == []
    assert len([r for r in caplog.records if "manifest" in r.getMessage()]) == 1
    assert json.loads((models / MANIFEST_NAME).read_text())["models"] == []


def test_default_name_rules(tiny: Path, models: Path, registry: ModelRegistry) -> None:
    assert registry.default_name(None) is None
    install(tiny, models, "zeta")
    assert registry.default_name(None) == "zeta"
    install(tiny, models, "beta")
    install(tiny, models, "alpha")
    registry.mark_failed("alpha", "crashed")
    assert registry.default_name(None) == "beta"
    assert registry.default_name("") == "beta"
    assert registry.default_name("zeta") == "zeta"
    assert registry.default_name("not-installed") == "not-installed"  # usable() says why
    with pytest.raises(InvalidModelName):
        registry.default_name("../etc")


def test_error_messages_never_show_absolute_paths(
    tiny: Path, tmp_path: Path, models: Path, registry: ModelRegistry
) -> None:
    (models / "garbage.gguf").write_bytes(b"GGUF\x09\x00\x00\x00" + b"\x00" * 64)
    (models / "away.gguf").symlink_to(tiny)
    messages = [record.reason or "" for record in registry.list()]
    for name in ("garbage", "away", "ghost"):
        with pytest.raises(RegistryError) as caught:
            registry.usable(name)
        messages.append(str(caught.value))
    assert all(messages)
    for message in messages:
        assert str(tmp_path) not in message and "\n" not in message


def test_recent_defaults_are_those_of_the_latest_scan_and_only_while_fresh(
    tiny: Path, models: Path
) -> None:
    install(tiny, models, "tiny")
    registry = ModelRegistry(models)
    assert registry.recent_defaults("tiny", max_age=60) is None  # nothing scanned yet
    registry.set_defaults("tiny", {"temperature": 0.3})
    registry.usable("tiny")
    recent = registry.recent_defaults("tiny", max_age=60)
    assert recent is not None and recent.temperature == 0.3
    assert registry.recent_defaults("other", max_age=60) is None
    # A change through another registry (another process) shows after the next scan.
    ModelRegistry(models).set_defaults("tiny", {"temperature": 0.9})
    recent = registry.recent_defaults("tiny", max_age=60)
    assert recent is not None and recent.temperature == 0.3
    registry.usable("tiny")
    recent = registry.recent_defaults("tiny", max_age=60)
    assert recent is not None and recent.temperature == 0.9
    assert registry.recent_defaults("tiny", max_age=0) is None  # too old
