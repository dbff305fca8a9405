"""Three workers on three hosts: discovered over real mDNS, paired, then one dies, one is cut off.

Each worker runs `hearth-worker serve` in its own network namespace on a private
virtual LAN (tests/netns.py). This test process joins the LAN through one veth
(`VirtualLan.connect_here`) and browses `_hearth._tcp.local.` there with a real
python-zeroconf browser; each service it resolves is turned into Home Assistant's
own `ZeroconfServiceInfo` (`zeroconf.info_from_service`) and handed to Home
Assistant's discovery flow, as Home Assistant's zeroconf component does (that
component is mocked by the test harness and would browse every interface).
Pairing goes through the config flow with the code each worker prints.

Then, with the coordinators polling every second: a worker is SIGKILLed right
after its first text reached Home Assistant (nobody saw it yet, so hearth.ask is
answered whole by another host), a second one loses its link mid-answer
(`ip link del`; Assist gets what came plus the note after the between-tokens
timeout), and the third answers the next request whole. Every request ends within
its bound, and the sensors tell the truth.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_socket
from homeassistant.components import conversation
from homeassistant.components.zeroconf import info_from_service
from homeassistant.config_entries import SOURCE_ZEROCONF
from homeassistant.const import STATE_OFF, STATE_ON, STATE_UNAVAILABLE
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers import discovery_flow
from homeassistant.helpers import entity_registry as er
from netns import NetnsHost, VirtualLan, unavailable_reason
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from custom_components.hearth import coordinator as coordinator_module
from custom_components.hearth.client import StreamTimeouts
from custom_components.hearth.const import (
    CONF_CODE,
    CONF_LLM_HASS_API,
    CONF_MAX_TOKENS,
    DOMAIN,
)
from custom_components.hearth.household import Household

from .conftest import Tap
from .test_failover import CUT_OFF, LONG_STORY

pytestmark = pytest.mark.slow

SERVICE_TYPE = "_hearth._tcp.local."
PORT = 8765
NAMES = ("Attic", "Bedroom", "Cellar")
TIMEOUTS = StreamTimeouts(connect=2, first_token=10, between_tokens=2, total=60)
CODE = re.compile(r"Pairing code: (\S+)")


@pytest.fixture
def lan() -> Iterator[VirtualLan]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with VirtualLan(subnet=90 + (time.monotonic_ns() // 1000) % 100) as network:
        yield network  # closing ends the workers and deletes every namespace and link


@pytest.fixture
def allow_hosts() -> Iterator[Any]:
    """Widen the harness's connect guard (127.0.0.1) for this test; narrowed again after."""
    yield pytest_socket.socket_allow_hosts
    pytest_socket.socket_allow_hosts(["127.0.0.1"])


@pytest.fixture
def fast_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Coordinators poll every second (two while a worker is gone)."""
    monkeypatch.setattr(coordinator_module, "SCAN_INTERVAL", timedelta(seconds=1))
    monkeypatch.setattr(coordinator_module, "MAX_SCAN_INTERVAL", timedelta(seconds=2))


class Host:
    """One worker host: its namespace, the worker process and its log."""

    def __init__(self, host: NetnsHost, name: str, workdir: Path, model: Path) -> None:
        self.host = host
        self.name = name
        self.log_path = workdir / f"{name}.log"
        with self.log_path.open("w") as log:
            self.process = host.popen(
                sys.executable, "-m", "hearth_worker", "--state-dir", str(workdir / name),
                "serve", "--host", "0.0.0.0", "--port", str(PORT), "--name", name,
                "--max-running", "1", "--no-warmup", "--model", str(model),
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pairing_code(self) -> str:
        match = CODE.search(self.log())
        assert match, self.log()
        return match.group(1)


class Browser:
    """A real mDNS browser on this process's LAN address feeding Home Assistant's flows."""

    def __init__(self, hass: HomeAssistant, address: str) -> None:
        self.hass = hass
        self.network = address.rsplit(".", 1)[0] + "."
        self.aiozc = AsyncZeroconf(interfaces=[address], ip_version=IPVersion.V4Only)
        self.seen: dict[str, dict[str, Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.browser = AsyncServiceBrowser(
            self.aiozc.zeroconf, [SERVICE_TYPE], handlers=[self._on_change]
        )

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            return
        task = asyncio.get_running_loop().create_task(self._discovered(service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _discovered(self, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self.aiozc.zeroconf, 3000):
            return
        service_info = info_from_service(info)
        if service_info is None or not str(service_info.host).startswith(self.network):
            # Only the LAN's workers: the listening socket also hears multicast that
            # other programs on this machine (a developer's worker) send on loopback.
            return
        self.seen[name] = {"host": service_info.host, "id": service_info.properties.get("id")}
        # What Home Assistant's zeroconf component does for a matching manifest entry.
        discovery_flow.async_create_flow(
            self.hass, DOMAIN, {"source": SOURCE_ZEROCONF}, service_info
        )

    async def close(self) -> None:
        await self.browser.async_cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.aiozc.async_close()


@pytest.fixture
async def browser(hass: HomeAssistant, lan: VirtualLan) -> AsyncIterator[Browser]:
    found = Browser(hass, lan.connect_here())
    yield found
    await found.close()


async def wait_for(what: str, check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def entity_states(hass: HomeAssistant, entry_id: str) -> dict[str, str]:
    """translation key (online, running, queued, ...) -> state, for one worker."""
    registry = er.async_get(hass)
    states = {}
    for entity in er.async_entries_for_config_entry(registry, entry_id):
        state = hass.states.get(entity.entity_id)
        if entity.translation_key and state is not None:
            states[entity.translation_key] = state.state
    return states


# Closing the TLS connection to the unplugged host leaves asyncio's SSL shutdown
# timer (30 s) running: nothing answers there any more. The harness cancels it.
@pytest.mark.parametrize("expected_lingering_timers", [True])
async def test_three_hosts_one_killed_one_cut_off(
    hass: HomeAssistant,
    lan: VirtualLan,
    browser: Browser,
    fast_polling: None,
    allow_hosts: Any,
    tiny_chat_model: Path,
    tmp_path: Path,
) -> None:
    hosts = {
        name: Host(lan.add_host(f"w{index}"), name, tmp_path, tiny_chat_model)
        for index, name in enumerate(NAMES, 1)
    }
    # The LAN reaches nothing beyond itself.
    assert hosts["Attic"].host.run("ip", "route", "get", "192.0.2.1", check=False).returncode
    # The test harness lets sockets connect to 127.0.0.1 only; add the LAN's hosts.
    allow_hosts(["127.0.0.1", *(host.host.address for host in hosts.values())])

    # --- discovered over mDNS, paired through the config flow ---------------------
    def flows() -> list[Any]:
        return hass.config_entries.flow.async_progress_by_handler(DOMAIN)

    # Workers start slowly on a busy 2-core machine (three at once).
    await wait_for("three discovery flows", lambda: len(flows()) == 3, 120)
    by_address = {host.host.address: host for host in hosts.values()}
    assert sorted(seen["host"] for seen in browser.seen.values()) == sorted(by_address)
    for flow in flows():
        assert flow["step_id"] == "pair"
        assert flow["context"]["source"] == SOURCE_ZEROCONF
        name = flow["context"]["title_placeholders"]["name"]
        result = await hass.config_entries.flow.async_configure(
            flow["flow_id"], {CONF_CODE: hosts[name].pairing_code()}
        )
        assert result["type"] == "create_entry", result
        assert result["title"] == name
    await hass.async_block_till_done()
    entries = {entry.title: entry for entry in hass.config_entries.async_entries(DOMAIN)}
    assert set(entries) == set(NAMES)
    for name, entry in entries.items():
        assert entry.data["host"] == hosts[name].host.address
    await wait_for(
        "every worker online",
        lambda: all(
            entity_states(hass, entry.entry_id).get("online") == STATE_ON
            for entry in entries.values()
        ),
        30,
    )

    household: Household = Household.get(hass)
    await household.async_update_settings(
        {
            **household.settings,
            CONF_LLM_HASS_API: [],
            CONF_MAX_TOKENS: 4000,
        }
    )
    household.timeouts = TIMEOUTS
    tap = Tap(household)
    # Bound of one request: every worker may take its first-token time, plus one answer.
    bound = len(NAMES) * TIMEOUTS.first_token + TIMEOUTS.total

    # --- 1. killed mid-answer: nobody saw it yet, so hearth.ask asks another host ---
    killed_once: list[str] = []

    def kill_first(name: str) -> None:
        if not killed_once:
            killed_once.append(name)
            hosts[name].process.send_signal(signal.SIGKILL)

    tap.after_first_text = kill_first
    async with asyncio.timeout(bound):
        response = await hass.services.async_call(
            DOMAIN, "ask", {"prompt": LONG_STORY}, blocking=True, return_response=True
        )
    assert response is not None
    (killed,) = killed_once
    assert tap.first_text[0] == killed
    assert response["worker"] != killed  # answered whole by a host still alive
    assert response["finish_reason"] in ("stop", "length")  # answered to the end
    assert response["answer"]
    assert hosts[killed].process.wait(5) == -signal.SIGKILL

    # --- 2. link removed mid-answer: Assist speaks what came, then the note ---------
    def cut(name: str) -> None:
        lan.cut(hosts[name].host)

    tap.after_first_text = cut
    tap.first_text.clear()  # the host that answered step 1 may be the one cut now
    started = time.monotonic()
    async with asyncio.timeout(bound):
        result = await conversation.async_converse(
            hass, LONG_STORY, None, Context(), language="en", agent_id="conversation.hearth"
        )
    cut_off = tap.first_text[-1]
    assert cut_off != killed
    speech = result.response.speech["plain"]["speech"]
    assert speech.endswith("\n\n" + CUT_OFF.format(name=cut_off))
    assert len(speech) > len(CUT_OFF)
    # Nothing arrives after the cut: the between-tokens bound ends the wait.
    assert time.monotonic() - started >= TIMEOUTS.between_tokens

    # --- 3. the third worker answers whole ------------------------------------------
    tap.after_first_text = None
    (survivor,) = set(NAMES) - {killed, cut_off}
    async with asyncio.timeout(bound):
        response = await hass.services.async_call(
            DOMAIN, "ask", {"prompt": "hi", "max_tokens": 8}, blocking=True, return_response=True
        )
    assert response is not None
    assert response["worker"] == survivor
    assert response["finish_reason"] in ("stop", "length")  # answered to the end

    # --- the sensors tell the truth -----------------------------------------------
    def truthful() -> bool:
        gone = [entity_states(hass, entries[name].entry_id) for name in (killed, cut_off)]
        alive = entity_states(hass, entries[survivor].entry_id)
        return (
            all(s.get("online") == STATE_OFF for s in gone)
            and all(s.get("running") == STATE_UNAVAILABLE for s in gone)
            and all(s.get("queued") == STATE_UNAVAILABLE for s in gone)
            and alive.get("online") == STATE_ON
            and alive.get("running") == "0"
            and alive.get("queued") == "0"
        )

    await wait_for("the sensors to tell the truth", truthful, 30)
    # The cut-off host is unreachable from here; the killed one refuses at once.
    assert hosts[cut_off].process.poll() is None  # still running, just unreachable
