"""The web console in a real headless Chromium against the real daemon.

The chat page streams from the real llama.cpp worker (Gemma 3 270M, so that tokens arrive
over seconds and a stream can be stopped half-way), the operator page reads and changes the
real daemon through the admin API, and every page is checked for its security headers and
for requests that would leave loopback. Screenshots land in build/screenshots/.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

import httpx
import pytest
import trio

from appliance.store.client import Store
from appliance.store.conversations import Conversations, new_id
from appliance.store.sealing import KeyRing
from tests import browser
from tests.harness import install_tiny_model, running_daemon, short_tempdir
from tests.real_model import install_smollm2

SECRETS: Final = {
    "SECRET_KEY": "console-test-secret-key-0123456789abcdef",
    "PRIVACY_SALT": "console-test-salt",
}
WRONG_KEY: Final = "ak-0123456789abcdef.thisisnotarealkeythisisnotarealkey"
PAYLOAD_ANSWER: Final = """Here: <img src=x onerror="window.__pwned='img'"> and \
<script>window.__pwned='script'</script> done.

[click me](javascript:window.__pwned='link') and [the docs](https://example.org/docs)

```html
<b>not bold</b>
```

**strong** and `inline <i>code</i>`
"""
PAYLOAD_QUESTION: Final = (
    "<img src=x onerror=\"window.__pwned='user'\"><script>window.__pwned='u2'</script>"
)

pytestmark = pytest.mark.usefixtures("browser_available")


@pytest.fixture
def browser_available() -> None:
    browser.require_browser()


def key_id(token: str) -> str:
    return token[3:].split(".", 1)[0]


def in_browser(scenario: Callable[..., None], *args: Any) -> Any:
    """Selenium blocks: run the scenario in a thread so the test's event loop stays free."""
    return trio.to_thread.run_sync(scenario, *args)


def sign_in(driver: Any, base: str, key: str, page: str = "/") -> None:
    from selenium.webdriver.common.by import By

    driver.get(base + page)
    browser.wait_until(driver, lambda d: d.execute_script("return document.body.dataset.ready"))
    if driver.find_element(By.ID, "sign-in").is_displayed():
        field = driver.find_element(By.ID, "key")
        field.clear()
        field.send_keys(key)
        driver.find_element(By.CSS_SELECTOR, "#sign-in-form button[type=submit]").click()


def assert_stayed_on_loopback(driver: Any) -> None:
    outside = browser.off_loopback(browser.requested_urls(driver))
    assert outside == [], f"the page asked for something off the box: {outside}"
    refused = [
        entry["message"]
        for entry in driver.get_log("browser")
        if "Content Security Policy" in entry["message"]
    ]
    assert refused == [], f"the page needed something its CSP refuses: {refused}"


# ---- the chat page --------------------------------------------------------------------------

WATCH_ANSWER: Final = """
window.__seen = [];
const list = document.getElementById('messages');
new MutationObserver(() => {
  const last = list.querySelector('li.message.assistant:last-child');
  if (last) window.__seen.push(
    [last.classList.contains('pending'), last.querySelector('.body').textContent.length]);
}).observe(list, {subtree: true, childList: true, characterData: true, attributes: true});
"""


def _chat_scenario(base: str, user_key: str, admin_key: str, tight_key: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {user_key}"}, timeout=30)
    admin = httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {admin_key}"}, timeout=30
    )
    with browser.chromium() as driver, api, admin:
        find = driver.find_element

        # A wrong key is refused with a message, and nothing is kept.
        sign_in(driver, base, WRONG_KEY)
        browser.wait_until(driver, lambda d: "refused" in find(By.ID, "sign-in-error").text)
        assert driver.execute_script("return sessionStorage.getItem('appliance.key')") is None

        # The right key opens the chat; the model picker lists the models.
        sign_in(driver, base, user_key)
        browser.wait_until(driver, lambda d: find(By.ID, "app").is_displayed())
        picker = Select(find(By.ID, "model"))
        browser.wait_until(driver, lambda d: len(picker.options) >= 3)
        assert {o.get_attribute("value") for o in picker.options} >= {"", "smollm2", "tiny"}
        picker.select_by_value("smollm2")

        # Shift+Enter is a new line, Enter sends; tokens show before the answer is complete.
        box = find(By.ID, "input")
        box.send_keys("Once upon a time", Keys.SHIFT, Keys.ENTER, "there was a lighthouse")
        assert "\n" in box.get_attribute("value")
        assert not driver.find_elements(By.CSS_SELECTOR, "li.message")
        driver.execute_script(WATCH_ANSWER)
        box.send_keys(Keys.ENTER)
        browser.wait_until(driver, lambda d: find(By.ID, "send").is_displayed(), timeout=120)
        seen = driver.execute_script("return window.__seen")
        while_streaming = {length for pending, length in seen if pending and length > 0}
        assert len(while_streaming) >= 2, f"no tokens shown while streaming: {seen}"
        answer = find(By.CSS_SELECTOR, "li.message.assistant:last-child .body").text
        assert answer.strip()

        conversations = api.get("/api/v1/conversations").json()["conversations"]
        assert len(conversations) == 1 and conversations[0]["model"] == "smollm2"
        first = conversations[0]["id"]
        assert conversations[0]["message_count"] == 2
        browser.wait_until(
            driver, lambda d: d.find_elements(By.CSS_SELECTOR, f"li[data-id='{first}'].current")
        )

        # Stop: the browser lets go of the stream and the generation ends on the server.
        box.send_keys("Tell me a very long story about the sea.", Keys.ENTER)
        browser.wait_until(
            driver,
            lambda d: d.find_element(
                By.CSS_SELECTOR, "li.message.assistant.pending:last-child .body"
            ).text.strip(),
            timeout=120,
        )
        find(By.ID, "stop").click()
        browser.wait_until(
            driver, lambda d: "(stopped)" in find(By.CSS_SELECTOR, "li.message:last-child").text
        )
        browser.wait_until(
            driver,
            lambda d: admin.get("/api/v1/health/metrics").json()["llm"]["running"] == 0,
            timeout=20,
            every=0.25,
        )
        # The stopped exchange was not stored; the conversation is as it was.
        assert api.get(f"/api/v1/conversations/{first}").json()["message_count"] == 2

        # After a reload the conversation is in the list; open it and go on with it.
        driver.refresh()
        browser.wait_until(
            driver, lambda d: d.find_elements(By.CSS_SELECTOR, f"li[data-id='{first}']")
        )
        item = find(By.CSS_SELECTOR, f"li[data-id='{first}']")
        assert "Once upon a time" in item.text
        assert re.search(r"just now|\d+ (min|h|d) ago", item.text), item.text
        item.find_element(By.CSS_SELECTOR, "button.open").click()
        browser.wait_until(
            driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "li.message")) == 2
        )
        find(By.ID, "input").send_keys("And then?", Keys.ENTER)
        browser.wait_until(
            driver,
            lambda d: api.get(f"/api/v1/conversations/{first}").json()["message_count"] == 4,
            timeout=120,
            every=0.5,
        )
        browser.wait_until(driver, lambda d: find(By.ID, "send").is_displayed(), timeout=60)
        browser.screenshot(driver, "chat-desktop")
        driver.set_window_size(*browser.PHONE)
        browser.screenshot(driver, "chat-phone")
        driver.set_window_size(*browser.DESKTOP)

        # Delete it: gone from the page and from the API.
        find(By.CSS_SELECTOR, f"li[data-id='{first}'] button.delete").click()
        driver.switch_to.alert.accept()
        browser.wait_until(
            driver, lambda d: not d.find_elements(By.CSS_SELECTOR, f"li[data-id='{first}']")
        )
        assert api.get(f"/api/v1/conversations/{first}").status_code == 404
        assert not driver.find_elements(By.CSS_SELECTOR, "li.message")

        # A key out of budget gets a 429: the page says so and says how long to wait.
        find(By.ID, "sign-out").click()
        sign_in(driver, base, tight_key)
        browser.wait_until(driver, lambda d: find(By.ID, "app").is_displayed())
        find(By.ID, "input").send_keys("hello", Keys.ENTER)
        browser.wait_until(driver, lambda d: find(By.ID, "notice").is_displayed())
        notice = find(By.ID, "notice").text
        assert "token budget" in notice and re.search(r"Try again in \d+ (s|min|h)", notice), notice

        # Sign out forgets the key.
        find(By.ID, "sign-out").click()
        browser.wait_until(driver, lambda d: find(By.ID, "sign-in").is_displayed())
        assert driver.execute_script("return sessionStorage.getItem('appliance.key')") is None
        assert_stayed_on_loopback(driver)


async def test_chat_page_streams_stops_lists_continues_and_deletes() -> None:
    state = short_tempdir()
    # The instruct model writes answers long enough to be seen streaming, and stopped.
    install_smollm2(state / "models", "smollm2")
    install_tiny_model(state / "models")
    env = {**SECRETS, "APPLIANCE_DEFAULT_MODEL": "tiny", "APPLIANCE_DEFAULT_MAX_TOKENS": "300"}
    with trio.fail_after(420):
        async with running_daemon(env, state_dir=state) as daemon:
            user = await daemon.create_key("browser-user")
            tight = await daemon.create_key("browser-tight", tokens_per_day=1)
            await in_browser(_chat_scenario, daemon.url, user, daemon.api_key, tight)


# ---- text from models and people stays text ----------------------------------------------------


async def _plant_conversation(url: str, owner: str) -> str:
    """A stored exchange whose answer carries HTML and script, written by the product's own
    store code (a model could write the same)."""
    codec = await trio.to_thread.run_sync(KeyRing, SECRETS["SECRET_KEY"], SECRETS["PRIVACY_SALT"])
    conversation_id = new_id()
    async with trio.open_nursery() as nursery:
        store = Store(url)
        await nursery.start(store.run)
        conversations = Conversations(store, codec, retention_seconds=7 * 86400)
        await conversations.record_exchange(
            conversation_id,
            owner=owner,
            model="tiny",
            question="show me some markup",
            answer=PAYLOAD_ANSWER,
            prompt_tokens=1,
            completion_tokens=1,
        )
        nursery.cancel_scope.cancel()
    return conversation_id


INERT: Final = """
const messages = document.getElementById('messages');
return {
  pwned: window.__pwned === undefined ? null : window.__pwned,
  elements: messages.querySelectorAll('img, script, iframe, object, embed, b, i').length,
  scriptLinks: messages.querySelectorAll('a[href^="javascript"]').length,
  links: [...messages.querySelectorAll('a')].map(a => [a.href, a.rel, a.target]),
  code: [...messages.querySelectorAll('pre code')].map(c => c.textContent),
  strong: messages.querySelectorAll('strong').length,
  text: messages.textContent,
};
"""


def _hostile_scenario(base: str, user_key: str, planted: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    with browser.chromium() as driver:
        sign_in(driver, base, user_key)
        item = f"li[data-id='{planted}'] button.open"
        browser.wait_until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, item))
        driver.find_element(By.CSS_SELECTOR, item).click()
        browser.wait_until(
            driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "li.message")) == 2
        )
        found = driver.execute_script(INERT)
        assert found["pwned"] is None and found["elements"] == 0 and found["scriptLinks"] == 0
        # Markdown still works: a safe link, a code block, bold, all as text.
        assert found["links"] == [["https://example.org/docs", "noopener noreferrer", "_blank"]]
        assert found["code"] == ["<b>not bold</b>"]
        assert found["strong"] == 1
        assert "<img src=x onerror=" in found["text"] and "<script>" in found["text"]
        assert "[click me](javascript:" in found["text"]

        # What a person types is shown as typed, in the page and after a reload.
        driver.find_element(By.ID, "new-chat").click()
        driver.find_element(By.ID, "input").send_keys(PAYLOAD_QUESTION, Keys.ENTER)
        browser.wait_until(driver, lambda d: d.find_element(By.ID, "send").is_displayed(), 60)
        found = driver.execute_script(INERT)
        assert found["pwned"] is None and found["elements"] == 0
        assert PAYLOAD_QUESTION in found["text"]
        driver.refresh()
        browser.wait_until(
            driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "li[data-id]")) == 2
        )
        driver.find_elements(By.CSS_SELECTOR, "li[data-id] button.open")[0].click()
        browser.wait_until(
            driver, lambda d: PAYLOAD_QUESTION in d.find_element(By.ID, "messages").text
        )
        found = driver.execute_script(INERT)
        assert found["pwned"] is None and found["elements"] == 0
        assert_stayed_on_loopback(driver)


async def test_model_and_user_text_render_inert() -> None:
    with trio.fail_after(240):
        async with running_daemon(SECRETS) as daemon:
            user = await daemon.create_key("browser-hostile")
            planted = await _plant_conversation(_store_url(daemon.env), key_id(user))
            await in_browser(_hostile_scenario, daemon.url, user, planted)


def _store_url(env: dict[str, str]) -> str:
    from appliance.config import load_settings
    from appliance.store.access import store_url

    return store_url(load_settings(environ=env))


# ---- the operator page ------------------------------------------------------------------------


def _operator_scenario(base: str, admin_key: str, user_key: str) -> None:
    from selenium.webdriver.common.by import By

    with browser.chromium() as driver:
        find = driver.find_element

        # A user key gets the page's reason, not a broken page.
        sign_in(driver, base, user_key, "/operator")
        browser.wait_until(
            driver, lambda d: "needs an admin key" in find(By.ID, "sign-in-error").text
        )

        sign_in(driver, base, admin_key, "/operator")
        browser.wait_until(driver, lambda d: find(By.ID, "ready-state").text == "ready")
        # The page loads its parts side by side: wait for the last ones.
        for part in ("figures", "processes", "service-rows", "model-rows", "key-rows"):
            browser.wait_until(driver, lambda d, part=part: find(By.ID, part).text.strip())
        checks = {
            row.text.split()[0] for row in driver.find_elements(By.CSS_SELECTOR, "#checks tr")
        }
        assert {"redis", "disk", "models", "services"} <= checks
        figures = find(By.ID, "figures").text
        for label in ("CPU", "Memory", "Disk free", "Tokens/s", "Queue", "Loaded model"):
            assert label in figures
        processes = find(By.ID, "processes").text
        assert "redis" in processes and "MB" in processes
        assert "redis" in find(By.ID, "service-rows").text
        assert "tiny" in find(By.ID, "model-rows").text

        # Backups: make one, verify it.
        find(By.ID, "backup-now").click()
        browser.wait_until(
            driver, lambda d: "Made data-backup-" in find(By.ID, "backup-status").text, 120
        )
        row = find(By.CSS_SELECTOR, "#backup-rows tr")
        assert "not verified" in row.text
        row.find_element(By.TAG_NAME, "button").click()
        browser.wait_until(driver, lambda d: "is good" in find(By.ID, "backup-status").text, 60)
        assert "not verified" not in find(By.CSS_SELECTOR, "#backup-rows tr").text

        # Keys: create one (shown once, and it works), then revoke it (and it stops working).
        find(By.ID, "key-name").send_keys("made-in-browser")
        find(By.ID, "key-day").send_keys("5000")
        find(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
        browser.wait_until(driver, lambda d: find(By.ID, "new-key").is_displayed())
        token = find(By.ID, "new-key-token").text
        assert token.startswith("ak-")
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as made:
            usage = made.get("/api/v1/usage")
            assert usage.status_code == 200 and usage.json()["local"]["tokens_per_day"] == 5000
            browser.wait_until(driver, lambda d: "made-in-browser" in find(By.ID, "key-rows").text)
            browser.screenshot(driver, "operator-desktop")
            driver.set_window_size(*browser.PHONE)
            browser.screenshot(driver, "operator-phone")
            driver.set_window_size(*browser.DESKTOP)
            find(By.CSS_SELECTOR, "button[data-key='made-in-browser']").click()
            driver.switch_to.alert.accept()
            browser.wait_until(
                driver, lambda d: "made-in-browser" not in find(By.ID, "key-rows").text
            )
            assert made.get("/api/v1/usage").status_code == 401
        assert_stayed_on_loopback(driver)


async def test_operator_page_shows_health_and_manages_backups_and_keys() -> None:
    with trio.fail_after(300):
        async with running_daemon(SECRETS) as daemon:
            user = await daemon.create_key("operator-page-user")
            await in_browser(_operator_scenario, daemon.url, daemon.api_key, user)


# ---- what the daemon sends ----------------------------------------------------------------------

CSP_NEEDS: Final = (
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "frame-ancestors 'none'",
    "object-src 'none'",
)


async def test_console_pages_and_assets_headers_size_and_switch() -> None:
    with trio.fail_after(120):
        async with (
            running_daemon(with_model=False) as daemon,
            httpx.AsyncClient(base_url=daemon.url) as client,
        ):
            total = 0
            for page in ("/", "/operator"):
                answer = await client.get(page, headers={"Accept-Encoding": "gzip"})
                assert answer.status_code == 200
                assert answer.headers["content-type"].startswith("text/html")
                assert answer.headers["cache-control"] == "no-cache"
                assets = re.findall(r'(?:src|href)="(/assets/[^"]+)"', answer.text)
                assert assets, answer.text
                for url in [page, *assets]:
                    raw = await client.get(url, headers={"Accept-Encoding": "gzip"})
                    policy = raw.headers["content-security-policy"]
                    assert all(part in policy for part in CSP_NEEDS), policy
                    assert "unsafe" not in policy
                    assert raw.headers["x-content-type-options"] == "nosniff"
                    assert raw.headers["referrer-policy"] == "no-referrer"
                    assert raw.headers["content-encoding"] == "gzip"
                    total += int(raw.headers["content-length"])
                    if url.startswith("/assets/"):
                        assert re.fullmatch(r"/assets/[a-z]+\.[0-9a-f]{12}\.(js|css|svg)", url)
                        assert "immutable" in raw.headers["cache-control"]
                # A client without gzip gets the same bytes, plain.
                plain = await client.get(assets[0], headers={"Accept-Encoding": "identity"})
                assert "content-encoding" not in plain.headers
                packed = await client.get(assets[0], headers={"Accept-Encoding": "gzip"})
                # httpx undoes the gzip: the same bytes, fewer of them on the wire.
                assert packed.content == plain.content
                assert int(packed.headers["content-length"]) < len(plain.content)
            assert total < 300 * 1024
            missing = await client.get("/assets/chat.000000000000.js")
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"

    with trio.fail_after(120):
        async with (
            running_daemon({"APPLIANCE_CONSOLE": "false"}, with_model=False) as daemon,
            httpx.AsyncClient(base_url=daemon.url) as client,
        ):
            for page in ("/", "/operator"):
                answer = await client.get(page)
                assert answer.status_code == 404
                assert answer.json()["error"]["type"] == "not_found_error"
