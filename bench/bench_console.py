"""The web console's own cost, in a real headless Chromium against the real daemon.

- navigation to an interactive chat page (the page's own `appliance:interactive` mark: models
  and conversations loaded, the input focused), with the key already in the tab;
- Enter to the first token on screen (`appliance:send` to the frame after the first words
  are in the page), against the first token through the API for the same prompt and model
  (a streamed POST /api/v1/chat/send read by Python), taking turns in the same run.

Goal: the page adds at most 50 ms to the API's first token. Gemma 3 270M; medians.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from typing import Any, Final

from harness import LOOPBACK, Daemon, install_gemma, note, result, short_tempdir

NAME: Final = "console"
CHROMIUM: Final = "/usr/bin/chromium"
CHROMEDRIVER: Final = "/usr/bin/chromedriver"
PROMPT: Final = "Write a short poem about the sea."
MAX_TOKENS: Final = 16
ADDED_GOAL_MS: Final = 50.0
ENV: Final = {
    "SECRET_KEY": "bench-secret-key-" + "k" * 40,
    "PRIVACY_SALT": "bench-privacy-salt",
    "APPLIANCE_DEFAULT_MAX_TOKENS": str(MAX_TOKENS),
}


def run(quick: bool) -> Iterator[dict[str, Any]]:
    if not shutil.which(CHROMIUM) or not shutil.which(CHROMEDRIVER):
        note(f"{NAME}: skipped: needs chromium and chromium-driver (apt-get install -y ...)")
        return
    rounds = 3 if quick else 7
    with contextlib.ExitStack() as stack:
        state = stack.enter_context(short_tempdir())
        install_gemma(state / "models")
        daemon = stack.enter_context(Daemon(state, log_level="WARNING", env=ENV))
        daemon.start()
        daemon.wait_ready(timeout=120)
        key = daemon.api_key()
        driver = stack.enter_context(_chromium())
        driver.get(daemon.base_url + "/")
        driver.execute_script("sessionStorage.setItem('appliance.key', arguments[0])", key)
        interactive = [_interactive_ms(driver, daemon.base_url) for _ in range(rounds)]
        yield result(
            NAME,
            "navigation_to_interactive_chat",
            round(statistics.median(interactive), 1),
            "ms",
            rounds=rounds,
            samples=[round(x, 1) for x in interactive],
        )
        # One of each first, so the model is loaded and both paths are warm.
        _page_first_token_ms(driver, daemon.base_url)
        _api_first_token_ms(daemon.port, key)
        page, api = [], []
        for round_ in range(rounds):
            order = ("page", "api") if round_ % 2 == 0 else ("api", "page")
            for runner in order:
                if runner == "page":
                    page.append(_page_first_token_ms(driver, daemon.base_url))
                else:
                    api.append(_api_first_token_ms(daemon.port, key))
            note(
                f"{NAME} round {round_ + 1}/{rounds}: page {page[-1]:.1f} ms, api {api[-1]:.1f} ms"
            )
        page_ms, api_ms = statistics.median(page), statistics.median(api)
        yield result(
            NAME,
            "enter_to_first_token_on_screen_added",
            round(page_ms - api_ms, 1),
            "ms",
            page_ms=round(page_ms, 1),
            api_ms=round(api_ms, 1),
            goal_ms=ADDED_GOAL_MS,
            met=page_ms - api_ms <= ADDED_GOAL_MS,
            rounds=rounds,
            page_samples=[round(x, 1) for x in page],
            api_samples=[round(x, 1) for x in api],
        )


@contextlib.contextmanager
def _chromium() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1280,860",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _mark(driver: Any, name: str, timeout: float = 60.0) -> float:
    """The page's performance mark `name` (ms since the navigation started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = driver.execute_script(
            "const m = performance.getEntriesByName(arguments[0]); "
            "return m.length ? m[m.length - 1].startTime : null;",
            name,
        )
        if found is not None:
            return float(found)
        time.sleep(0.01)
    raise TimeoutError(f"the page never set {name}")


def _interactive_ms(driver: Any, base: str) -> float:
    driver.get(base + "/")
    return _mark(driver, "appliance:interactive")


def _page_first_token_ms(driver: Any, base: str) -> float:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(base + "/")
    _mark(driver, "appliance:interactive")
    driver.find_element(By.ID, "input").send_keys(PROMPT, Keys.ENTER)
    shown = _mark(driver, "appliance:first-token-shown")
    sent = _mark(driver, "appliance:send")
    # Let the answer finish, so the next run starts on an idle model.
    deadline = time.monotonic() + 60
    while not driver.find_element(By.ID, "send").is_displayed():
        if time.monotonic() > deadline:
            raise TimeoutError("the answer never finished")
        time.sleep(0.02)
    return shown - sent


def _api_first_token_ms(port: int, key: str) -> float:
    body = json.dumps({"message": PROMPT, "stream": True, "max_tokens": MAX_TOKENS})
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=60)
    try:
        started = time.perf_counter()
        connection.request(
            "POST",
            "/api/v1/chat/send",
            body=body,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"chat/send answered {response.status}: {response.read()[:200]!r}")
        first = None
        for line in response:
            if first is None and line.startswith(b"event: token"):
                first = (time.perf_counter() - started) * 1000
        if first is None:
            raise RuntimeError("the stream had no token")
        return first
    finally:
        connection.close()
