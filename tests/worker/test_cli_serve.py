"""`hearth-worker serve` in this process: settings from flags, and starting and stopping.

Each start in ``cli._serve`` is paired with its stop on one exit stack: stopping runs the
stops in reverse order, and a start that fails stops what started before it. The
listener, the app and the Supervisor calls are real (a fake Supervisor on 127.0.0.1);
the mDNS advertiser only records (it would send multicast).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hearth_worker import cli
from hearth_worker.auth import AuthStore
from hearth_worker.connections import BindError, ConnectionLimits, Listener
from hearth_worker.server import Worker
from hearth_worker.settings import WorkerSettings
from hearth_worker.supervisor import SupervisorError
from worker_process import fake_supervisor

# Every flag of `serve`, as the worker has always had them (the docs and the add-on use them).
SERVE_FLAGS = {
    "--model",
    "--models-dir",
    "--pull",
    "--host",
    "--port",
    "--name",
    "--max-running",
    "--max-queued",
    "--prompt-cache-mb",
    "--threads",
    "--no-warmup",
    "--no-advertise",
    "--advertise-address",
    "--supervisor-discovery",
    "--discovery-host",
    "--plain-http",
    "--header-timeout",
    "--keepalive-timeout",
    "--max-connections",
    "--max-connections-per-client",
    "--log-level",
}


def serve_settings(argv: list[str]) -> WorkerSettings:
    return WorkerSettings.from_args(cli._parser().parse_args(argv))


def test_serve_flags_are_the_settings() -> None:
    parser = cli._parser()
    serve = next(
        action.choices["serve"]
        for action in parser._actions
        if isinstance(action, cli.argparse._SubParsersAction)
    )
    flags = {f for action in serve._actions for f in action.option_strings} - {"-h", "--help"}
    assert flags == SERVE_FLAGS
    assert {f for a in parser._actions for f in a.option_strings} >= {"--state-dir"}


def test_no_flags_give_the_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HEARTH_STATE_DIR", str(tmp_path))
    settings = serve_settings(["serve"])
    assert settings == WorkerSettings()
    assert settings.state_dir == tmp_path
    assert settings.model_dirs == [] and settings.pulls == []
    assert (settings.host, settings.port) == ("0.0.0.0", 8765)
    assert settings.name == socket.gethostname() == settings.discovery_host
    assert (settings.max_running, settings.max_queued, settings.threads) == (1, 8, None)
    assert settings.warmup and settings.advertise
    assert not settings.supervisor_discovery and not settings.plain_http
    assert settings.connection_limits() == ConnectionLimits()
    assert settings.models_dir is None
    assert settings.with_default_models_dir().models_dir == tmp_path / "models"


def test_every_flag_reaches_its_setting(tmp_path: Path) -> None:
    settings = serve_settings(
        [
            *("--state-dir", str(tmp_path), "serve"),
            *("--model", "a", "--model", "b", "--models-dir", "m"),
            *("--pull", "owner/one", "--pull", "owner/two:sub"),
            *("--host", "127.0.0.1", "--port", "0", "--name", "Kitchen"),
            *("--max-running", "2", "--max-queued", "3", "--prompt-cache-mb", "0"),
            *("--threads", "4", "--no-warmup", "--no-advertise"),
            *("--advertise-address", "10.0.0.1", "--advertise-address", "10.0.0.2"),
            *("--supervisor-discovery", "--discovery-host", "local-hearth", "--plain-http"),
            *("--header-timeout", "1.5", "--keepalive-timeout", "2.5"),
            *("--max-connections", "9", "--max-connections-per-client", "3"),
            *("--log-level", "debug"),
        ]
    )
    assert settings == WorkerSettings(
        state_dir=tmp_path,
        model_dirs=[Path("a"), Path("b")],
        models_dir=Path("m"),
        pulls=["owner/one", "owner/two:sub"],
        host="127.0.0.1",
        port=0,
        name="Kitchen",
        max_running=2,
        max_queued=3,
        prompt_cache_mb=0,
        threads=4,
        warmup=False,
        advertise=False,
        advertise_addresses=["10.0.0.1", "10.0.0.2"],
        supervisor_discovery=True,
        discovery_host="local-hearth",
        plain_http=True,
        header_timeout_s=1.5,
        keepalive_timeout_s=2.5,
        max_connections=9,
        max_connections_per_client=3,
        log_level="debug",
    )
    assert settings.connection_limits() == ConnectionLimits(
        header_timeout_s=1.5, keepalive_timeout_s=2.5, max_connections=9, max_per_client=3
    )
    assert settings.with_default_models_dir() is settings  # given: kept


def test_settings_defaults_are_not_shared() -> None:
    first, second = WorkerSettings(), WorkerSettings()
    first.model_dirs.append(Path("x"))
    assert second.model_dirs == []


async def test_bad_connection_limits_are_refused_before_anything_starts(
    tmp_path: Path,
) -> None:
    settings = WorkerSettings(
        state_dir=tmp_path, max_connections=1, max_connections_per_client=2, advertise=False
    )
    with pytest.raises(BindError, match="bad connection limits"):
        await cli._serve(settings, AuthStore(tmp_path))


# -- starting and stopping ------------------------------------------------------------


class Recorder:
    """What started and stopped, in order, from spies on the real parts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, events: list[str]) -> None:
        self.events = events
        self.ports: list[int] = []
        recorder = self

        class SpyListener(Listener):
            def start(self) -> None:
                super().start()
                recorder.ports.append(self.port)
                recorder.events.append("listener started")

            async def close(self) -> None:
                await super().close()
                recorder.events.append("listener closed")

        class SpyWorker(Worker):
            def build_app(self) -> web.Application:
                app = super().build_app()

                async def cleaned(app: web.Application) -> None:
                    recorder.events.append("app cleaned up")

                app.on_cleanup.append(cleaned)
                return app

        class FakeAdvertiser:
            def __init__(self, **kwargs: Any) -> None:
                self.kwargs = kwargs

            async def start(self) -> None:
                recorder.events.append("advertising")

            async def stop(self) -> None:
                recorder.events.append("advertising stopped")

            async def update(self, **changes: Any) -> None:
                recorder.events.append(f"advertised {changes}")

        monkeypatch.setattr(cli, "Listener", SpyListener)
        monkeypatch.setattr(cli, "Worker", SpyWorker)
        monkeypatch.setattr(cli, "Advertiser", FakeAdvertiser)

    @property
    def port(self) -> int:
        return self.ports[0]


@pytest.fixture
async def supervisor(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[list[str], dict[str, int]]]:
    """A fake Supervisor on 127.0.0.1: the calls it got, and the status it answers with."""
    calls: list[str] = []
    answer = {"status": 200}

    async def discovery(request: web.Request) -> web.Response:
        calls.append(f"{request.method} {request.path}")
        if answer["status"] != 200:
            return web.json_response({"result": "error", "message": "no"}, status=500)
        return web.json_response({"result": "ok", "data": {"uuid": "uuid1"}})

    async with fake_supervisor(discovery) as supervisor_url:
        monkeypatch.setenv("SUPERVISOR_URL", supervisor_url)
        monkeypatch.setenv("SUPERVISOR_TOKEN", "supervisor-secret")
        yield calls, answer


def settings_for(model: Path, state_dir: Path) -> WorkerSettings:
    return WorkerSettings(
        state_dir=state_dir,
        model_dirs=[model],
        host="127.0.0.1",
        port=0,
        warmup=False,
        plain_http=True,
        supervisor_discovery=True,
        advertise_addresses=["127.0.0.1"],
    )


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def test_a_start_that_fails_stops_what_started_before_it(
    tiny_chat_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    supervisor: tuple[list[str], dict[str, int]],
) -> None:
    calls, answer = supervisor
    answer["status"] = 500  # the announcement, the last start, fails
    recorder = Recorder(monkeypatch, calls)
    with pytest.raises(SupervisorError, match="HTTP 500"):
        await cli._serve(settings_for(tiny_chat_model, tmp_path), AuthStore(tmp_path))
    assert calls == [
        "listener started",
        "advertising",
        "POST /discovery",  # refused: nothing announced, nothing to withdraw
        "advertising stopped",
        "listener closed",
        "app cleaned up",
    ]
    assert await refused(recorder.port)


async def test_serving_then_stopping_in_reverse_order(
    tiny_chat_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    supervisor: tuple[list[str], dict[str, int]],
) -> None:
    calls, _ = supervisor
    recorder = Recorder(monkeypatch, calls)
    settings = settings_for(tiny_chat_model, tmp_path)
    stop = asyncio.Event()
    serving = asyncio.create_task(cli._serve(settings, AuthStore(tmp_path), stop))
    async with asyncio.timeout(120):
        while "POST /discovery" not in calls and not serving.done():
            await asyncio.sleep(0.05)
    assert not serving.done(), serving.exception()
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{recorder.port}/v1/health") as resp,
    ):
        assert resp.status == 200
    stop.set()
    await asyncio.wait_for(serving, 60)
    assert calls == [
        "listener started",
        "advertising",
        "POST /discovery",
        "DELETE /discovery/uuid1",
        "advertising stopped",
        "listener closed",
        "app cleaned up",
    ]
    assert await refused(recorder.port)
    assert settings.models_dir is None  # the default models dir was not written into it
