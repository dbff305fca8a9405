"""How the worker starts and fails to start, as a real process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def serve(tmp_path: Path, model: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "hearth_worker",
            "--state-dir",
            str(tmp_path / "state"),
            "serve",
            "--no-advertise",
            "--no-warmup",
            "--model",
            str(model),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )


def test_port_taken_is_one_clear_line(tiny_chat_model: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve(tmp_path, tiny_chat_model, "--host", "127.0.0.1", "--port", str(port))
    output = (done.stdout + done.stderr).strip()
    assert done.returncode != 0
    assert "Traceback" not in output
    lines = output.splitlines()
    assert len(lines) == 1, output
    assert "127.0.0.1" in lines[0]
    assert str(port) in lines[0]
    assert "already in use" in lines[0]


def test_address_not_here_is_one_clear_line(tiny_chat_model: Path, tmp_path: Path) -> None:
    # 192.0.2.1 (TEST-NET-1) is never an address of this machine; binding sends nothing.
    done = serve(tmp_path, tiny_chat_model, "--host", "192.0.2.1", "--port", "0")
    output = (done.stdout + done.stderr).strip()
    assert done.returncode != 0
    assert "Traceback" not in output
    assert len(output.splitlines()) == 1, output
    assert "192.0.2.1" in output
