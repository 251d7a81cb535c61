"""Pulling models from a real HTTP server on loopback (tests/file_server.py): complete,
cut off and resumed, redirected, missing, refused (checksum, hostile header, not a model,
size, outbound policy), through the CLI, the registry's puller and the daemon's endpoint.

Whatever happens, nothing half-downloaded is listed, and what a refusal leaves behind is
nothing at all (a cut-off download keeps its hidden partial file, for the next pull).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from appliance.llm.pull import (
    MAX_ATTEMPTS,
    PULL_PREFIX,
    PullCancelled,
    Puller,
    PullError,
    PullRefused,
)
from appliance.llm.registry import ModelExists, ModelRegistry
from tests.file_server import FileServer, file_server, hostile_gguf, sha256_of
from tests.harness import daemon_environment, running_daemon, short_tempdir
from tests.tiny_gguf import write_tiny_llama

MB = 1024 * 1024


@pytest.fixture
def model_file() -> Path:
    # Large enough that a cut half-way leaves a real partial file (a few MB).
    return write_tiny_llama(short_tempdir("pf") / "source.gguf", n_embd=256, n_layer=4)


@pytest.fixture
def server() -> Any:
    with file_server() as running:
        yield running


def registry() -> ModelRegistry:
    return ModelRegistry(short_tempdir("pm") / "models")


def puller(models: ModelRegistry, **kwargs: Any) -> Puller:
    return Puller(models, allowed_hosts=(), max_bytes=kwargs.pop("max_bytes", 64 * MB), **kwargs)


def leftovers(models: ModelRegistry) -> list[str]:
    """Partial or refused downloads left in the models dir."""
    if not models.models_dir.exists():
        return []
    return sorted(p.name for p in models.models_dir.iterdir() if PULL_PREFIX in p.name)


def test_a_complete_pull_is_checked_recorded_and_listed(
    server: FileServer, model_file: Path
) -> None:
    url = server.serve("/org/repo/resolve/main/tiny-q8.gguf", model_file)
    models = registry()
    seen: list[tuple[int, int]] = []
    record = puller(models, progress=lambda done, total: seen.append((done, total))).pull(
        url, sha256=sha256_of(model_file).upper()
    )
    assert record.name == "tiny-q8"
    assert record.sha256 == sha256_of(model_file)
    assert record.source == url
    assert record.state == "ok"
    assert (models.models_dir / "tiny-q8.gguf").read_bytes() == model_file.read_bytes()
    assert [r.name for r in models.list()] == ["tiny-q8"]
    assert seen[-1] == (model_file.stat().st_size, model_file.stat().st_size)
    assert leftovers(models) == []
    # Without --sha256 the checksum is still computed and recorded.
    again = puller(models).pull(url, name="copy")
    assert again.sha256 == record.sha256
    with pytest.raises(ModelExists, match="already installed"):
        puller(models).pull(url)


def test_a_pull_cut_half_way_resumes_with_a_range_request(
    server: FileServer, model_file: Path
) -> None:
    size = model_file.stat().st_size
    path = "/cut/tiny.gguf"
    url = server.serve(path, model_file, cut_at=size // 2, cuts=1)
    models = registry()
    pulling = puller(models)
    record = pulling.pull(url, sha256=sha256_of(model_file))
    assert record.sha256 == sha256_of(model_file)
    assert (models.models_dir / "tiny.gguf").read_bytes() == model_file.read_bytes()
    assert pulling.attempts == 2
    ranges = server.ranges_asked(path)
    assert ranges[0] is None
    assert ranges[1] == f"bytes={size // 2}-"
    assert leftovers(models) == []


def test_a_pull_that_keeps_being_cut_is_resumed_by_the_next_pull(
    server: FileServer, model_file: Path
) -> None:
    size = model_file.stat().st_size
    path = "/flaky/tiny.gguf"
    url = server.serve(path, model_file, cut_at=size // 2, cuts=MAX_ATTEMPTS)
    models = registry()
    with pytest.raises(PullError, match="run the same pull again to resume"):
        puller(models).pull(url)
    # Nothing half-downloaded is listed; the part is kept, hidden, for the next pull.
    assert models.list() == []
    assert len(leftovers(models)) == 2  # the part and its validator
    assert not any(p.suffix == ".gguf" for p in models.models_dir.iterdir())
    second = puller(models)
    record = second.pull(url)
    assert second.resumed_from == size // 2
    assert server.ranges_asked(path)[-1] == f"bytes={size // 2}-"
    assert record.sha256 == sha256_of(model_file)
    assert leftovers(models) == []


def test_a_file_that_changed_between_two_pulls_starts_over(
    server: FileServer, model_file: Path
) -> None:
    size = model_file.stat().st_size
    path = "/changing/tiny.gguf"
    url = server.serve(path, model_file, cut_at=size // 2, cuts=MAX_ATTEMPTS)
    models = registry()
    with pytest.raises(PullError):
        puller(models).pull(url)
    # A new file at the same URL: the server answers the If-Range with the whole file.
    newer = write_tiny_llama(short_tempdir("pn") / "newer.gguf", n_embd=256, n_layer=4, seed=7)
    server.serve(path, newer)
    record = puller(models).pull(url)
    assert record.sha256 == sha256_of(newer)
    assert (models.models_dir / "tiny.gguf").read_bytes() == newer.read_bytes()


def test_a_wrong_sha256_is_refused_and_nothing_stays(server: FileServer, model_file: Path) -> None:
    url = server.serve("/tiny.gguf", model_file)
    models = registry()
    with pytest.raises(PullRefused) as refused:
        puller(models).pull(url, sha256="0" * 64)
    assert sha256_of(model_file) in str(refused.value)
    assert "it was deleted" in str(refused.value)
    assert models.list() == []
    assert leftovers(models) == []
    assert list(models.models_dir.glob("*.gguf")) == []


def test_a_hostile_file_is_refused_by_the_bounded_header_check(server: FileServer) -> None:
    url = server.serve("/hostile.gguf", hostile_gguf(short_tempdir("ph") / "hostile.gguf"))
    models = registry()
    with pytest.raises(PullRefused) as refused:
        puller(models).pull(url)
    assert "tensor count" in str(refused.value)
    assert "deleted" in str(refused.value)
    assert models.list() == []
    assert leftovers(models) == []


def test_a_page_that_is_not_a_model_is_refused_at_its_first_bytes(server: FileServer) -> None:
    page = short_tempdir("pp") / "page.gguf"
    page.write_text("<html>" + "x" * (4 * MB) + "</html>")
    path = "/login/page.gguf"
    url = server.serve(path, page)
    models = registry()
    with pytest.raises(PullRefused, match="not a GGUF file"):
        puller(models).pull(url)
    assert leftovers(models) == []


def test_redirect_chains_are_followed_and_bounded(server: FileServer, model_file: Path) -> None:
    server.serve("/files/tiny.gguf", model_file)
    models = registry()
    record = puller(models).pull(server.url("/redirect/3/files/tiny.gguf"))
    assert record.name == "tiny"
    assert record.sha256 == sha256_of(model_file)
    with pytest.raises(PullError, match="redirects more than 10 times"):
        puller(models).pull(server.url("/redirect/11/files/tiny.gguf"), name="other")
    assert [r.name for r in models.list()] == ["tiny"]


def test_a_missing_file_is_a_404_saying_so(server: FileServer) -> None:
    models = registry()
    with pytest.raises(PullError, match=r"is not there \(HTTP 404\); check the URL"):
        puller(models).pull(server.url("/nothing/here.gguf"))
    assert models.list() == []
    assert leftovers(models) == []


def test_a_redirect_off_the_box_obeys_the_outbound_policy(
    server: FileServer, model_file: Path
) -> None:
    server.redirects["/away/tiny.gguf"] = "https://downloads.example.com/tiny.gguf"
    models = registry()
    with pytest.raises(PullRefused, match="APPLIANCE_PULL_HOSTS"):
        puller(models).pull(server.url("/away/tiny.gguf"))
    server.redirects["/plain/tiny.gguf"] = "http://downloads.example.com/tiny.gguf"
    allowing = Puller(models, allowed_hosts=("downloads.example.com",), max_bytes=64 * MB)
    with pytest.raises(PullRefused, match="https:// only"):
        allowing.pull(server.url("/plain/tiny.gguf"))
    assert models.list() == []


def test_a_file_over_the_size_limit_is_refused(server: FileServer, model_file: Path) -> None:
    url = server.serve("/big.gguf", model_file)
    models = registry()
    with pytest.raises(PullRefused, match="APPLIANCE_PULL_MAX_BYTES"):
        puller(models, max_bytes=1024).pull(url)
    assert leftovers(models) == []


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "models", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_cli_pulls_and_says_what_it_did(server: FileServer, model_file: Path) -> None:
    url = server.serve("/m/tiny.gguf", model_file)
    state = short_tempdir("pc")
    env = daemon_environment(state, {})
    done = _cli(env, "pull", url, "--sha256", sha256_of(model_file), "--name", "pulled")
    assert done.returncode == 0, done.stderr
    assert "pulled pulled (" in done.stdout
    assert sha256_of(model_file) in done.stdout
    listed = json.loads(_cli(env, "list", "--json").stdout)
    assert [(m["name"], m["sha256"], m["source"]) for m in listed] == [
        ("pulled", sha256_of(model_file), url)
    ]
    refused = _cli(env, "pull", "https://example.com/m.gguf")
    assert refused.returncode == 1
    assert "APPLIANCE_PULL_HOSTS" in refused.stderr
    wrong = _cli(env, "pull", url, "--sha256", "1" * 64, "--name", "other")
    assert wrong.returncode == 1
    assert "it was deleted" in wrong.stderr
    assert not (state / "models" / "other.gguf").exists()


async def test_the_daemon_pulls_in_the_background_with_progress(model_file: Path) -> None:
    size = len(await trio.Path(model_file).read_bytes())
    with file_server() as files, trio.fail_after(90):
        url = files.serve("/m/pulled.gguf", model_file, cut_at=size // 2, cuts=1)
        async with running_daemon() as daemon, daemon.client() as client:
            started = await client.post(
                "/api/v1/models/pull", json={"url": url, "sha256": sha256_of(model_file)}
            )
            assert started.status_code == 202, started.text
            job = started.json()
            assert job["name"] == "pulled" and job["state"] == "downloading"
            while job["state"] == "downloading":
                await trio.sleep(0.05)
                job = (await client.get(f"/api/v1/models/pulls/{job['id']}")).json()
            assert job["state"] == "done", job
            assert job["done_bytes"] == job["total_bytes"] == size
            assert job["sha256"] == sha256_of(model_file)
            listing = (await client.get("/api/v1/models/pulls")).json()["pulls"]
            assert [p["id"] for p in listing] == [job["id"]]
            models = {m["name"]: m for m in (await client.get("/api/v1/models")).json()["models"]}
            assert models["pulled"]["sha256"] == sha256_of(model_file)
            assert models["pulled"]["source"] == url
            answer = await client.post(
                "/v1/completions", json={"model": "pulled", "prompt": "the", "max_tokens": 4}
            )
            assert answer.status_code == 200, answer.text

            taken = await client.post("/api/v1/models/pull", json={"url": url})
            assert taken.status_code == 409
            assert "already installed" in taken.json()["error"]["message"]
            away = await client.post(
                "/api/v1/models/pull", json={"url": "https://example.com/x.gguf"}
            )
            assert away.status_code == 422
            assert away.json()["error"]["code"] == "pull_refused"
            assert "APPLIANCE_PULL_HOSTS" in away.json()["error"]["message"]
            missing = await client.post(
                "/api/v1/models/pull", json={"url": files.url("/none.gguf"), "name": "none"}
            )
            assert missing.status_code == 202
            failed = missing.json()
            while failed["state"] == "downloading":
                await trio.sleep(0.05)
                failed = (await client.get(f"/api/v1/models/pulls/{failed['id']}")).json()
            assert failed["state"] == "failed"
            assert "HTTP 404" in failed["error"]
            names = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
            assert "none" not in names
            user = await daemon.create_key("someone")
            refused = await client.post(
                "/api/v1/models/pull",
                json={"url": url, "name": "x"},
                headers={"Authorization": f"Bearer {user}"},
            )
            assert refused.status_code == 403
    assert not any(PULL_PREFIX in name for name in os.listdir(daemon.state_dir / "models"))


# A child that pulls with its file size limit (RLIMIT_FSIZE) at `limit` bytes, as a disk
# that fills up: the write that crosses it is short, the next fails with EFBIG. The limit
# is lifted when the pull logs the cut-off, so the same pull resumes and completes.
_FULL_DISK_PULL = """
import logging, resource, sys
from pathlib import Path
from appliance.llm.pull import Puller
from appliance.llm.registry import ModelRegistry

url, models, sha256, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

class Lift(logging.Handler):
    def emit(self, record):
        if "cut off" in record.getMessage():
            print("cut:", record.getMessage(), file=sys.stderr)
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)

logging.getLogger("appliance.llm").addHandler(Lift())
logging.getLogger("appliance.llm").setLevel(logging.INFO)
pulling = Puller(ModelRegistry(Path(models)), allowed_hosts=(), max_bytes=1 << 30)
print(pulling.pull(url, sha256=sha256).sha256, pulling.attempts)
"""


def test_a_write_that_fails_part_way_is_resumed_with_the_right_checksum(
    server: FileServer, model_file: Path
) -> None:
    # The limit falls inside a receive buffer: the bytes written before the failure are in
    # the file and must be in the checksum too, or the resumed pull has the wrong sha256.
    limit = 3 * MB // 2 + 123
    url = server.serve("/full/tiny.gguf", model_file)
    models = short_tempdir("pw") / "models"
    argv = [url, str(models), sha256_of(model_file), str(limit)]
    done = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_PULL, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"cut off at {limit} bytes (OSError)" in done.stderr
    assert done.stdout.split() == [sha256_of(model_file), "2"]
    assert (models / "tiny.gguf").read_bytes() == model_file.read_bytes()
    assert server.ranges_asked("/full/tiny.gguf")[1] == f"bytes={limit}-"


def test_a_cancelled_pull_keeps_what_it_reported_and_the_next_resumes(
    server: FileServer, model_file: Path
) -> None:
    url = server.serve("/cancel/tiny.gguf", model_file)
    models = registry()
    seen: list[int] = []
    stopping = puller(
        models,
        progress=lambda done, total: seen.append(done),
        cancelled=lambda: seen[-1] >= 3 * MB,
    )
    with pytest.raises(PullCancelled, match="the next pull resumes it"):
        stopping.pull(url)
    assert models.list() == []
    # Every byte reported as received was written: the next pull goes on from there.
    resuming = puller(models)
    record = resuming.pull(url, sha256=sha256_of(model_file))
    assert resuming.resumed_from == seen[-1] >= 3 * MB
    assert record.sha256 == sha256_of(model_file)
    assert leftovers(models) == []
