"""The integration's pure modules load and work in a Python without Home Assistant.

`router.py`, the worker client (`client.py`, `worker_api.py`, `addresses.py`,
`pairing.py`) and `const.py` import only each other (relatively), the standard
library and aiohttp. Importing them as `custom_components.hearth.<module>` runs the
package's `__init__`, which imports Home Assistant; so a subprocess loads them by
path as the submodules of a bare package that stands for the integration's folder
(its `__init__` never runs), with `homeassistant` made unimportable, and uses them.
A pure module that imported Home Assistant, or a sibling that does, fails here.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

INTEGRATION = Path(__file__).parents[2] / "custom_components" / "hearth"
PURE_MODULES = ("const", "worker_api", "addresses", "pairing", "client", "router")

SCRIPT = textwrap.dedent(
    """
    import asyncio
    import importlib.util
    import json
    import sys
    import types
    from pathlib import Path

    sys.modules["homeassistant"] = None  # any `import homeassistant...` now fails
    folder = Path(sys.argv[1])
    package = types.ModuleType("hearth_pure")
    package.__path__ = [str(folder)]  # relative imports resolve to the sibling files
    sys.modules["hearth_pure"] = package


    def load(name):
        spec = importlib.util.spec_from_file_location(f"hearth_pure.{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module


    modules = {name: load(name) for name in sys.argv[3:]}
    router, client = modules["router"], modules["client"]
    worker_api, addresses, pairing = modules["worker_api"], modules["addresses"], modules["pairing"]

    # The routing policy ranks two workers: the idle one first.
    def state(worker_id, running):
        rates = {"m": router.ModelRate()}
        return router.WorkerState(worker_id, rates, running=running, max_queued=4)

    ranked = router.Router(clock=lambda: 0.0).rank(
        [state("busy", 1), state("idle", 0)],
        router.RouteRequest(prompt_tokens=100, max_new_tokens=10),
    )
    assert [c.worker_id for c in ranked] == ["idle", "busy"], ranked

    # The address policy, and a host resolved through it.
    assert addresses.address_allowed("192.168.1.20")
    assert not addresses.address_allowed("8.8.8.8")
    assert asyncio.run(addresses.async_resolve("127.0.0.1", 8765)) == "127.0.0.1"

    # A capacity answer parsed; a bad one raises the API's error.
    capacity = worker_api.parse_capacity(
        {"node_id": "n", "running": 0, "queued": 0, "max_running": 1, "max_queued": 4,
         "memory_free_mb": 1, "memory_total_mb": 2}
    )
    assert capacity.node_id == "n"
    try:
        worker_api.parse_capacity({})
    except worker_api.HearthConnectionError:
        pass
    else:
        raise AssertionError("a bad capacity answer was accepted")

    # The pairing proof of the first shared vector.
    vector = json.loads(Path(sys.argv[2]).read_text())["vectors"][0]
    given = vector["input"]
    salt, fingerprint, nonce = (bytes.fromhex(given[k]) for k in ("salt", "fingerprint", "nonce"))
    key = pairing.pairing_key(given["code"], salt, fingerprint, nonce)
    assert pairing.client_proof(key, fingerprint, nonce).hex() == vector["output"]["client_proof"]

    # The HTTP client: its URL, and a request refused before anything is sent.
    async def refused():
        import aiohttp

        async with aiohttp.ClientSession() as session:
            worker = client.HearthClient(session, "8.8.8.8", 8765, "t", fingerprint="00" * 32)
            assert worker.base_url == "https://8.8.8.8:8765"
            try:
                await worker.info()
            except worker_api.HearthAddressError:
                return
            raise AssertionError("a public address was asked")

    asyncio.run(refused())
    loaded = sorted(name for name in sys.modules if name.split(".")[0] == "homeassistant")
    print("ok", loaded)
    """
)


def test_pure_modules_work_without_home_assistant() -> None:
    vectors = Path(__file__).parents[1] / "pairing_vectors.json"
    done = subprocess.run(
        [sys.executable, "-I", "-c", SCRIPT, str(INTEGRATION), str(vectors), *PURE_MODULES],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok ['homeassistant']", done.stdout


def test_the_check_fails_for_a_module_that_needs_home_assistant() -> None:
    """The same loader refuses a module that imports Home Assistant (the check bites)."""
    done = subprocess.run(
        [sys.executable, "-I", "-c", SCRIPT, str(INTEGRATION), "-", "coordinator"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert "homeassistant" in done.stderr
