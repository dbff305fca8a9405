"""mDNS advertisement between two network-namespace hosts on a private virtual LAN.

Host ``a`` runs the worker's Advertiser, host ``b`` a zeroconf browser, each a small
subprocess printing JSON lines. No packet leaves the test's own namespaces.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hearth_worker.discovery import (
    SERVICE_TYPE,
    Advertiser,
    host_label,
    instance_name,
)
from netns import OutputLines, VirtualLan, unavailable_reason

ADVERTISER = """
import asyncio, json, signal, sys
from hearth_worker.discovery import Advertiser

async def main() -> None:
    advertiser = Advertiser(**json.loads(sys.argv[1]))
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    updates = []

    def paired() -> None:
        async def update() -> None:
            await advertiser.update(paired=True)
            print(json.dumps({"event": "updated"}), flush=True)
        updates.append(loop.create_task(update()))

    loop.add_signal_handler(signal.SIGTERM, done.set)
    loop.add_signal_handler(signal.SIGUSR1, paired)
    await advertiser.start()
    print(json.dumps({"event": "started", "name": advertiser.service_name}), flush=True)
    await done.wait()
    await asyncio.gather(*updates)
    await advertiser.stop()
    print(json.dumps({"event": "stopped"}), flush=True)

asyncio.run(main())
"""

BROWSER = """
import asyncio, json, signal, sys
from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

async def main() -> None:
    service_type = sys.argv[1]
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    zc = AsyncZeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)
    tasks = []

    async def report(state: str, name: str) -> None:
        event = {"event": state, "name": name}
        if state != "removed":
            info = AsyncServiceInfo(service_type, name)
            if await info.async_request(zc.zeroconf, 3000):
                event.update(
                    properties=info.decoded_properties,
                    addresses=info.parsed_addresses(),
                    port=info.port,
                    server=info.server,
                )
        print(json.dumps(event), flush=True)

    def on_change(zeroconf, service_type, name, state_change) -> None:
        state = {
            ServiceStateChange.Added: "added",
            ServiceStateChange.Updated: "updated",
            ServiceStateChange.Removed: "removed",
        }[state_change]
        tasks.append(loop.create_task(report(state, name)))

    browser = AsyncServiceBrowser(zc.zeroconf, [service_type], handlers=[on_change])
    print(json.dumps({"event": "ready"}), flush=True)
    await done.wait()
    await browser.async_cancel()
    await zc.async_close()

asyncio.run(main())
"""


@pytest.fixture
def lan() -> Iterator[VirtualLan]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with VirtualLan(subnet=7) as network:
        yield network


def _event(kind: str, **fields: Any) -> Any:
    return lambda item: (
        item.get("event") == kind and all(item.get(key) == value for key, value in fields.items())
    )


def test_advertiser_seen_updated_and_removed_across_hosts(lan: VirtualLan) -> None:
    started = time.monotonic()
    a = lan.add_host("a")
    b = lan.add_host("b")
    # The LAN reaches nothing beyond itself (no packet is sent by this check).
    assert b.run("ip", "route", "get", "192.0.2.1", check=False).returncode != 0

    browser = OutputLines(b.python(BROWSER, SERVICE_TYPE, stdout=subprocess.PIPE))
    advertiser: OutputLines | None = None
    try:
        browser.expect(_event("ready"), 10, "the browser to start")
        config = {
            "node_id": "node-7f3a",
            "name": "Kitchen PC",
            "port": 8787,
            "version": "0.1.0",
            "api_version": 1,
            "paired": False,
            "addresses": None,  # all of a's non-loopback IPv4 addresses
        }
        advertiser = OutputLines(a.python(ADVERTISER, json.dumps(config), stdout=subprocess.PIPE))
        registered = advertiser.expect(_event("started"), 10, "the advertiser to start")
        full_name = f"Kitchen PC.{SERVICE_TYPE}"
        assert registered["name"] == full_name

        added = browser.expect(_event("added", name=full_name), 10, "the service on b")
        assert added["properties"] == {
            "txtvers": "1",
            "id": "node-7f3a",
            "version": "0.1.0",
            "api": "1",
            "paired": "false",
            "scheme": "https",
        }
        assert added["addresses"] == [a.address]
        assert added["port"] == 8787
        assert added["server"] == "hearth-node-7f3a.local."

        advertiser.process.send_signal(signal.SIGUSR1)  # -> update(paired=True)
        advertiser.expect(_event("updated"), 5, "the advertiser to re-announce")
        updated = browser.expect(
            lambda item: (
                item.get("event") in {"added", "updated"}
                and (item.get("properties") or {}).get("paired") == "true"
            ),
            10,
            "paired=true on b",
        )
        assert updated["name"] == full_name
        assert updated["properties"]["id"] == "node-7f3a"

        advertiser.process.send_signal(signal.SIGTERM)  # -> stop(): goodbye packets
        advertiser.expect(_event("stopped"), 10, "the advertiser to stop")
        assert advertiser.process.wait(10) == 0
        browser.expect(_event("removed", name=full_name), 10, "the service to go away on b")
    finally:
        if advertiser is not None:
            advertiser.close()
        browser.close()
    assert time.monotonic() - started < 20


def test_same_name_on_two_hosts_gets_a_free_instance_name(lan: VirtualLan) -> None:
    hosts = [lan.add_host("a"), lan.add_host("c")]
    running: list[OutputLines] = []
    try:
        names = []
        for index, host in enumerate(hosts):
            config = {
                "node_id": f"node-{index}",
                "name": "Kitchen PC",
                "port": 8787,
                "version": "0.1.0",
                "api_version": 1,
                "paired": False,
                "addresses": [host.address],
            }
            lines = OutputLines(host.python(ADVERTISER, json.dumps(config), stdout=subprocess.PIPE))
            running.append(lines)
            names.append(lines.expect(_event("started"), 10, f"advertiser {index}")["name"])
        assert names == [f"Kitchen PC.{SERVICE_TYPE}", f"Kitchen PC-2.{SERVICE_TYPE}"]
    finally:
        for lines in running:
            lines.close()


def test_instance_and_host_names() -> None:
    assert instance_name("Kitchen PC") == "Kitchen PC"
    assert instance_name("  office.lan\t box\n") == "office-lan box"
    assert instance_name("") == "Hearth worker"
    assert instance_name("\x00\x01") == "Hearth worker"
    long = instance_name("ü" * 100)
    assert len(long.encode()) <= 56
    assert long == "ü" * 28
    assert host_label("3F2A9C1B-uuid") == "hearth-3f2a9c1b-uuid"
    assert host_label("!!!").startswith("hearth-")
    assert len(host_label("x" * 200)) <= 63


def test_txt_record_and_arguments() -> None:
    advertiser = Advertiser(
        node_id="n1", name="Box", port=8787, version="0.1.0", api_version=1, paired=True
    )
    assert advertiser.properties() == {
        "txtvers": "1",
        "id": "n1",
        "version": "0.1.0",
        "api": "1",
        "paired": "true",
        "scheme": "https",
    }
    assert advertiser.properties()["scheme"] == "https"
    plain = Advertiser(
        node_id="n1", name="Box", port=1, version="1", api_version=1, paired=True, scheme="http"
    )
    assert plain.properties()["scheme"] == "http"
    assert advertiser.service_name is None
    assert not advertiser.running
    with pytest.raises(ValueError, match="port"):
        Advertiser(node_id="n", name="x", port=0, version="1", api_version=1, paired=False)
    with pytest.raises(ValueError):
        Advertiser(
            node_id="n",
            name="x",
            port=1,
            version="1",
            api_version=1,
            paired=False,
            addresses=["not-an-ip"],
        )
    with pytest.raises(ValueError, match="TXT"):
        Advertiser(node_id="n" * 300, name="x", port=1, version="1", api_version=1, paired=False)


async def test_update_and_stop_before_start_are_harmless() -> None:
    advertiser = Advertiser(
        node_id="n1", name="Box", port=8787, version="0.1.0", api_version=1, paired=False
    )
    await advertiser.update(paired=True)
    assert advertiser.properties()["paired"] == "true"
    await advertiser.stop()
    assert not advertiser.running


PAIR_FROM_B = """
import json, sys
from hearth_worker.pairing import pair_remote
paired = pair_remote(sys.argv[1], sys.argv[2], "host b")
print(json.dumps({"event": "paired", "node_id": paired.node_id}), flush=True)
"""


def test_serving_worker_is_discovered_and_paired_across_hosts(
    lan: VirtualLan, tiny_chat_model: Any, tmp_path: Any
) -> None:
    """The real `hearth-worker serve` on host a, found and paired from host b."""
    import re
    import sys

    a = lan.add_host("a")
    b = lan.add_host("b")
    browser = OutputLines(b.python(BROWSER, SERVICE_TYPE, stdout=subprocess.PIPE))
    log_path = tmp_path / "worker.log"
    worker: subprocess.Popen[str] | None = None
    try:
        browser.expect(_event("ready"), 10, "the browser to start")
        with log_path.open("w") as log:
            worker = a.popen(
                sys.executable, "-m", "hearth_worker", "--state-dir", str(tmp_path / "state"),
                "serve", "--host", "0.0.0.0", "--port", "8765", "--name", "Study laptop",
                "--no-warmup", "--model", str(tiny_chat_model),
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        added = browser.expect(_event("added"), 30, "the worker on b")
        assert added["name"] == f"Study laptop.{SERVICE_TYPE}"
        assert added["addresses"] == [a.address]
        assert added["port"] == 8765
        assert added["properties"]["paired"] == "false"
        code = re.search(r"Pairing code: (\S+)", log_path.read_text())
        assert code, log_path.read_text()

        url = f"https://{a.address}:8765"
        pair = OutputLines(b.python(PAIR_FROM_B, url, code.group(1), stdout=subprocess.PIPE))
        paired = pair.expect(_event("paired"), 10, "pairing from b")
        pair.close()
        assert paired["node_id"] == added["properties"]["id"]
        browser.expect(
            lambda item: (item.get("properties") or {}).get("paired") == "true",
            10,
            "paired=true on b",
        )
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(10) == 0, log_path.read_text()
        browser.expect(_event("removed"), 10, "the worker to go away on b")
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        browser.close()
