"""The Home Assistant UI in Debian's headless Chromium (selenium): log in, see the discovered
worker, its device page with sensors, and Hearth answering in the Assist dialog.

Screenshots go to the test's tmp dir; with HEARTH_UPDATE_SCREENSHOTS=1 they are also
copied to docs/screenshots/ (shown in the README). Chromium reaches 127.0.0.1 only: every
other host name resolves to nothing and any other address goes to a dead proxy.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from scripts import develop

from .home_assistant import OWNER, HomeAssistant

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "docs" / "screenshots"
TIMEOUT = 60.0

# Every element matching a CSS selector, through all shadow roots (within the elements
# matching a second selector, if given).
DEEP_QUERY = """
const [selector, within] = arguments;
const walk = (root, sel, found) => {
  root.querySelectorAll(sel).forEach((e) => found.push(e));
  root.querySelectorAll('*').forEach((e) => { if (e.shadowRoot) walk(e.shadowRoot, sel, found); });
  return found;
};
if (!within) return walk(document, selector, []);
const found = [];
for (const host of walk(document, within, [])) {
  walk(host.shadowRoot || host, selector, found);
}
return found;
"""
# The page's visible text, through all shadow roots.
DEEP_TEXT = """
const parts = [];
const walk = (node) => {
  if (node.nodeType === Node.TEXT_NODE) { parts.push(node.textContent); return; }
  if (node.shadowRoot) walk(node.shadowRoot);
  node.childNodes.forEach(walk);
};
walk(document.body);
return parts.join(' ').replace(/\\s+/g, ' ');
"""


class Browser:
    """A thin layer over selenium for Home Assistant's shadow-DOM frontend."""

    def __init__(self, driver: Any, url: str, shots: Path) -> None:
        self.driver = driver
        self.url = url
        self.shots = shots

    def open(self, path: str) -> None:
        self.driver.get(self.url + path)

    def query(self, selector: str, within: str | None = None) -> list[Any]:
        return list(self.driver.execute_script(DEEP_QUERY, selector, within))

    def text(self) -> str:
        return str(self.driver.execute_script(DEEP_TEXT))

    def wait_for_text(self, *texts: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not all(t in (page := self.text()) for t in texts):
            if time.monotonic() > deadline:
                self.screenshot("timeout")
                raise TimeoutError(f"{texts} not on {self.driver.current_url}: {page[-2000:]}")
            time.sleep(0.25)

    def wait_for(
        self, selector: str, within: str | None = None, timeout: float = TIMEOUT
    ) -> list[Any]:
        deadline = time.monotonic() + timeout
        while not (found := self.query(selector, within)):
            if time.monotonic() > deadline:
                self.screenshot("timeout")
                raise TimeoutError(f"no {selector} on {self.driver.current_url}")
            time.sleep(0.25)
        return found

    def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        time.sleep(1.0)  # let animations (dialogs, ripples) settle
        assert self.driver.save_screenshot(str(path))
        return path

    def log_in(self, username: str, password: str) -> None:
        """The real login form (Home Assistant redirects there)."""
        from selenium.webdriver.common.keys import Keys

        self.open("/")
        self.wait_for('input[autocomplete="username"]')[0].send_keys(username)
        password_field = self.wait_for('input[type="password"]')[0]
        password_field.send_keys(password)
        password_field.send_keys(Keys.ENTER)
        deadline = time.monotonic() + TIMEOUT
        while "/auth/authorize" in self.driver.current_url or not self.query("home-assistant"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"still not logged in at {self.driver.current_url}")
            time.sleep(0.25)


@pytest.fixture
def chromium() -> Iterator[Any]:
    """Debian's chromium and chromium-driver (`scripts/setup system` installs them)."""
    binary = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.fail(
            "the browser test needs Debian's chromium and chromium-driver: run "
            "`scripts/setup system` as root (or `apt-get install chromium chromium-driver`)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
        "--force-device-scale-factor=1",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-sync",
        "--disable-extensions",
        "--no-pings",
        # 127.0.0.1 only: no other host name resolves, no other address is reachable.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--proxy-server=http://127.0.0.1:9",
        "--proxy-bypass-list=127.0.0.1",
        "--lang=en-US",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


async def test_ui_screenshots(
    stack: develop.Stack, http: aiohttp.ClientSession, chromium: Any, tmp_path: Path
) -> None:
    ha = HomeAssistant(http, stack.ha_url)
    await ha.onboard()
    # Onboarding adds Google Translate, whose package this environment does not install
    # (Home Assistant runs with --skip-pip here): remove it so the pages show Hearth only.
    for entry in await ha.rest("GET", "/api/config/config_entries/entry"):
        if entry["domain"] == "google_translate":
            await ha.rest("DELETE", f"/api/config/config_entries/entry/{entry['entry_id']}")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    ui = Browser(chromium, stack.ha_url, shots)
    ui.log_in(OWNER["username"], OWNER["password"])
    # Plain http to 127.0.0.1 is a secure context: Assist's microphone may listen here
    # (README, Try it, step 6; it checks window.isSecureContext before it listens).
    assert chromium.execute_script("return window.isSecureContext") is True

    # Settings > Devices & services: the worker waits under "Discovered".
    async with ha.websocket():
        flow = await ha.discovered_flow("hearth", stack.node_id)
        # Other workers advertised on this machine (another scripts/develop, other tests)
        # are discovered too: ignore them, as a user would, so the page shows this one.
        for other in await ha.ws("config_entries/flow/progress"):
            if other["flow_id"] != flow["flow_id"]:
                await ha.ws(
                    "config_entries/ignore_flow",
                    flow_id=other["flow_id"],
                    title=other["context"].get("title_placeholders", {}).get("name", "other"),
                )
    ui.open("/config/integrations/dashboard")
    ui.wait_for_text("Discovered", flow["context"]["title_placeholders"]["name"], "Hearth")
    taken = [ui.screenshot("discovered")]

    # Pair it (the REST calls the Add dialog makes; tests/e2e/test_develop.py checks them).
    async with ha.websocket():
        entry = await ha.pair(flow["flow_id"], stack.pairing_code)
        await ha.set_options(
            entry["entry_id"],
            llm_hass_api=["assist"],
            max_tokens=64,
            temperature=0,
        )
        await ha.use_conversation_agent("conversation.hearth")
        devices = await ha.ws("config/device_registry/list")
    device = next(d for d in devices if ["hearth", stack.node_id] in d["identifiers"])

    # The worker's device page with its sensors.
    ui.open(f"/config/devices/device/{device['id']}")
    ui.wait_for_text(develop.WORKER_NAME, "Sensors", "Queued requests", "Decode speed")
    taken.append(ui.screenshot("device"))

    # Assist (the "a" shortcut), answered by Hearth's model through its tools.
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    ui.open("/lovelace/0")
    ui.wait_for("hui-view")
    ActionChains(chromium).send_keys("a").perform()
    ui.wait_for("ha-voice-command-dialog")
    for text, answer in (
        ("turn on the kitchen light", "The kitchen light is on."),
        ("hello", "Hello from Hearth!"),
    ):
        field = ui.wait_for("input", within="ha-assist-chat")[0]
        field.send_keys(text)
        field.send_keys(Keys.ENTER)
        ui.wait_for_text(answer, timeout=120)
    assert await ha.state("light.kitchen_light") == "on"
    taken.append(ui.screenshot("assist"))

    for path in taken:
        assert path.stat().st_size > 10_000, path  # a page, not a blank
    if os.environ.get("HEARTH_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for path in taken:
            shutil.copyfile(path, SCREENSHOTS / path.name)
