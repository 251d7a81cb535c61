"""Behind a real reverse proxy: Debian's nginx, started here as a child process with the
recipe of systemd/nginx.conf.example (HTTPS on a certificate made here), in front of the
real daemon with APPLIANCE_TRUSTED_PROXIES.

Clients come from different loopback addresses. 127.0.0.5 plays a load balancer in front
of nginx (trusted too), which forwards two clients from the internet; 127.0.0.2 reaches
nginx directly, and 127.0.0.3 reaches the daemon directly; both untrusted, both lying in
X-Forwarded-For.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from appliance.auth.gate import FAILURES_ALLOWED
from tests.certs import self_signed, trusting
from tests.harness import Daemon, free_port, running_daemon, short_tempdir
from tests.test_failed_attempts import BAD, access_clients, client_hashes

RECIPE = Path(__file__).parent.parent / "systemd" / "nginx.conf.example"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
LOAD_BALANCER = "127.0.0.5"
ALICE, BOB = "198.51.100.7", "198.51.100.8"


def _site(daemon_port: int, https_port: int, http_port: int, cert: Path, key: Path) -> str:
    """The recipe with this test's ports and certificate (and no IPv6 listeners)."""
    text = RECIPE.read_text()
    replacements = {
        "listen 443 ssl;": f"listen 127.0.0.1:{https_port} ssl;",
        "listen [::]:443 ssl;": "",
        "listen 80;": f"listen 127.0.0.1:{http_port};",
        "listen [::]:80;": "",
        "/etc/nginx/appliance/fullchain.pem": str(cert),
        "/etc/nginx/appliance/privkey.pem": str(key),
        "proxy_pass http://127.0.0.1:8000;": f"proxy_pass http://127.0.0.1:{daemon_port};",
    }
    for old, new in replacements.items():
        assert old in text, f"the recipe changed: {old!r} is not in {RECIPE.name}"
        text = text.replace(old, new)
    return text


@asynccontextmanager
async def running_nginx(daemon: Daemon) -> AsyncIterator[tuple[str, str, str]]:
    """nginx in front of `daemon`: yields its https:// and http:// URLs and the
    certificate to trust."""
    assert NGINX is not None
    folder = short_tempdir("ngx")
    cert, key = self_signed(folder)
    https_port, http_port = free_port(), free_port()
    daemon_port = int(daemon.url.rsplit(":", 1)[1])
    (folder / "site.conf").write_text(_site(daemon_port, https_port, http_port, cert, key))
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (folder / name).mkdir()
    (folder / "nginx.conf").write_text(
        f"""daemon off;
master_process off;
pid {folder}/nginx.pid;
error_log {folder}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    include {folder}/site.conf;
}}
"""
    )
    process = await trio.lowlevel.open_process(
        [
            NGINX,
            "-p",
            str(folder),
            "-c",
            str(folder / "nginx.conf"),
            "-e",
            str(folder / "error.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(30):
            while True:
                assert process.poll() is None, (folder / "error.log").read_text()
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", https_port)).aclose()
                    break
                except OSError:
                    await trio.sleep(0.05)
        yield f"https://127.0.0.1:{https_port}", f"http://127.0.0.1:{http_port}", str(cert)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.send_signal(signal.SIGQUIT)
                with trio.move_on_after(10):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()


def via(url: str, local: str, cert: str | None = None) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(
        local_address=local, verify=trusting(Path(cert)) if cert else True
    )
    return httpx.AsyncClient(base_url=url, transport=transport, timeout=10)


def headers(request_id: str, forwarded: str | None = None, key: str = "") -> dict[str, str]:
    found = {"X-Request-ID": request_id}
    found.update({"Authorization": f"Bearer {key}"} if key else BAD)
    if forwarded is not None:
        found["X-Forwarded-For"] = forwarded
    return found


@pytest.mark.skipif(
    NGINX is None,
    reason="NGINX IS NOT INSTALLED: the reverse-proxy test needs Debian's nginx "
    "(apt-get install -y nginx; .ci/run installs it, so CI never skips this)",
)
async def test_behind_nginx_bad_clients_cannot_lock_out_others_and_each_client_is_itself() -> None:
    env = {"APPLIANCE_TRUSTED_PROXIES": f"127.0.0.1, {LOAD_BALANCER}"}
    path = "/api/v1/conversations"
    with trio.fail_after(180):
        async with running_daemon(env) as daemon, running_nginx(daemon) as (url, plain_url, cert):
            alice_key = await daemon.create_key("alice")
            bob_key = await daemon.create_key("bob")
            async with via(url, LOAD_BALANCER, cert) as balancer:
                # 20 bad requests from one client: limited (401 x 10, then 429)...
                codes = [
                    (await balancer.get(path, headers=headers(f"px-alice-{i}", ALICE))).status_code
                    for i in range(20)
                ]
                assert codes == [401] * FAILURES_ALLOWED + [429] * (20 - FAILURES_ALLOWED)
                # ...and never against a valid key: another client's, or even its own.
                bob = await balancer.get(path, headers=headers("px-bobok-0", BOB, bob_key))
                assert bob.status_code == 200, bob.text
                alice = await balancer.get(path, headers=headers("px-aliceok-0", ALICE, alice_key))
                assert alice.status_code == 200, alice.text
                # Another client behind the same proxies has its own limit.
                bob_bad = await balancer.get(path, headers=headers("px-bob-0", BOB))
                assert bob_bad.status_code == 401
            # Untrusted peers lie about being Bob: through nginx (nginx appends their real
            # address, which the daemon takes) and straight to the daemon (header ignored).
            async with via(url, "127.0.0.2", cert) as liar:
                for i in range(FAILURES_ALLOWED + 2):
                    await liar.get(path, headers=headers(f"px-liar-{i}", BOB))
            async with via(daemon.url, "127.0.0.3") as direct:
                for i in range(FAILURES_ALLOWED + 2):
                    await direct.get(path, headers=headers(f"px-direct-{i}", BOB))
            async with via(url, LOAD_BALANCER, cert) as balancer:
                # Bob's allowance is untouched by 24 requests that claimed to be him.
                bob_bad = await balancer.get(path, headers=headers("px-bob-1", BOB))
                assert bob_bad.status_code == 401, bob_bad.text
            # Plain HTTP on the proxy only redirects to HTTPS.
            async with via(plain_url, LOAD_BALANCER) as plain:
                redirect = await plain.get(path)
                assert redirect.status_code == 308
                assert redirect.headers["location"].startswith("https://127.0.0.1/")
            await daemon.stop()
        hashes = await client_hashes(daemon, ALICE, BOB, "127.0.0.1", "127.0.0.2", "127.0.0.3")
        seen = access_clients(daemon, "px-")
        assert seen["px-alice"] == seen["px-aliceok"] == {hashes[ALICE]}
        assert seen["px-bob"] == seen["px-bobok"] == {hashes[BOB]}
        assert seen["px-liar"] == {hashes["127.0.0.2"]}
        assert seen["px-direct"] == {hashes["127.0.0.3"]}
        # The proxy's own address is nobody's identity.
        assert hashes["127.0.0.1"] not in set().union(*seen.values())
        [warning] = [
            line
            for line in daemon.log_lines()
            if "failed-attempt limit" in str(line.get("message", ""))
            and line.get("client") == hashes[ALICE]
        ]
        assert warning["level"] == "WARNING"
