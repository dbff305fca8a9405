"""The worker's settings: one dataclass with their defaults, and the `serve` flags built from it.

Each field of ``WorkerSettings`` is one setting; its metadata names its command-line flag
and help, and its type says how argparse reads it (``bool``: a switch, ``list[...]``: a
flag given once per item, ``X | None``: an X or nothing). ``add_arguments`` adds the
flags to a parser, ``WorkerSettings.from_args`` reads the parsed values back, so a
setting is declared once, as ``llama_cpp/server/settings.py`` does with pydantic.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from .connections import ConnectionLimits
from .prompt_cache import DEFAULT_BUDGET_MB
from .pull import default_models_dir

_LIMITS = ConnectionLimits()


def default_state_dir() -> Path:
    """``$HEARTH_STATE_DIR``, else ``$XDG_STATE_HOME/hearth-worker`` (``~/.local/state``)."""
    if env := os.environ.get("HEARTH_STATE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "hearth-worker"


def _flag(
    flag: str,
    help: str | None,
    *,
    top_level: bool = False,
    **argparse_kwargs: Any,
) -> dict[str, Any]:
    """A setting's metadata: its flag and help (``%(default)s`` works), and any further
    argparse keywords (``choices``, ``metavar``). ``top_level``: the flag belongs to the
    command, before the sub-command (``--state-dir``)."""
    return {"flag": flag, "help": help, "top_level": top_level, "argparse": argparse_kwargs}


@dataclass
class WorkerSettings:
    """Everything `hearth-worker serve` can be told, with the defaults it starts with."""

    state_dir: Path = field(
        default_factory=default_state_dir,
        metadata=_flag(
            "--state-dir",
            "where the node id, pairing code and token hashes live (default: %(default)s)",
            top_level=True,
        ),
    )
    model_dirs: list[Path] = field(
        default_factory=list,
        metadata=_flag(
            "--model",
            "also serve this model folder (made by scripts/export_model; repeat for several); "
            "it cannot be removed through the API",
        ),
    )
    # None in the dataclass: no models directory (no pulls); the command fills in its
    # default, <state-dir>/models (``with_default_models_dir``).
    models_dir: Path | None = field(
        default=None,
        metadata=_flag(
            "--models-dir",
            "serve every model folder in this folder; pulled models land here "
            "(default: <state-dir>/models)",
        ),
    )
    pulls: list[str] = field(
        default_factory=list,
        metadata=_flag(
            "--pull",
            "pull this model (owner/name or owner/name:sub/folder) into --models-dir unless "
            "it is there, while serving what is (repeat for several; progress in the log)",
            metavar="SOURCE",
        ),
    )
    host: str = field(
        default="0.0.0.0",  # noqa: S104 - a worker serves the network
        metadata=_flag("--host", "address to listen on"),
    )
    port: int = field(default=8765, metadata=_flag("--port", "0 picks a free port"))
    name: str = field(
        default_factory=socket.gethostname, metadata=_flag("--name", "name shown in Home Assistant")
    )
    max_running: int = field(default=1, metadata=_flag("--max-running", "concurrent generations"))
    max_queued: int = field(
        default=8, metadata=_flag("--max-queued", "requests waiting beyond those")
    )
    prompt_cache_mb: int = field(
        default=DEFAULT_BUDGET_MB,
        metadata=_flag(
            "--prompt-cache-mb",
            "memory for the prompt cache (KV caches of recent prompts, reused by later "
            f"turns and conversations; 0 turns it off; default {DEFAULT_BUDGET_MB})",
        ),
    )
    threads: int | None = field(
        default=None, metadata=_flag("--threads", "threads per model (all cores)")
    )
    warmup: bool = field(default=True, metadata=_flag("--no-warmup", "skip the warm-up generation"))
    advertise: bool = field(
        default=True, metadata=_flag("--no-advertise", "do not advertise over mDNS (zeroconf)")
    )
    advertise_addresses: list[str] | None = field(
        default=None,
        metadata=_flag(
            "--advertise-address", "address to advertise (default: the host's addresses)"
        ),
    )
    supervisor_discovery: bool = field(
        default=False,
        metadata=_flag(
            "--supervisor-discovery",
            "inside the Home Assistant add-on: announce this worker through the Supervisor",
        ),
    )
    discovery_host: str = field(
        default_factory=socket.gethostname,
        metadata=_flag(
            "--discovery-host",
            "host name Home Assistant uses to reach the add-on (default: %(default)s)",
        ),
    )
    plain_http: bool = field(
        default=False,
        metadata=_flag(
            "--plain-http",
            "serve plain, unencrypted HTTP instead of HTTPS (only on a network you trust)",
        ),
    )
    header_timeout_s: float = field(
        default=_LIMITS.header_timeout_s,
        metadata=_flag(
            "--header-timeout",
            "seconds a new connection has for its TLS handshake and first request's headers "
            "(default: %(default)s)",
        ),
    )
    keepalive_timeout_s: float = field(
        default=_LIMITS.keepalive_timeout_s,
        metadata=_flag(
            "--keepalive-timeout", "seconds an idle connection is kept open (default: %(default)s)"
        ),
    )
    max_connections: int = field(
        default=_LIMITS.max_connections,
        metadata=_flag(
            "--max-connections", "connections held at once, in total (default: %(default)s)"
        ),
    )
    max_connections_per_client: int = field(
        default=_LIMITS.max_per_client,
        metadata=_flag(
            "--max-connections-per-client",
            "connections held at once from one address (default: %(default)s)",
        ),
    )
    log_level: str = field(
        default="info", metadata=_flag("--log-level", None, choices=["debug", "info", "warning"])
    )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        """The settings a parser made by ``add_arguments`` read (every field, by name)."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    def with_default_models_dir(self) -> Self:
        """These settings, the models directory defaulting to ``<state-dir>/models``."""
        if self.models_dir is not None:
            return self
        return dataclasses.replace(self, models_dir=default_models_dir(self.state_dir))

    def connection_limits(self) -> ConnectionLimits:
        """The listener's limits; ValueError when they make no sense."""
        return ConnectionLimits(
            header_timeout_s=self.header_timeout_s,
            keepalive_timeout_s=self.keepalive_timeout_s,
            max_connections=self.max_connections,
            max_per_client=self.max_connections_per_client,
        )


def add_arguments(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """Add the flags of the settings to ``parser``: those of the command itself
    (``top_level``) or those of its ``serve`` sub-command (the others)."""
    hints = typing.get_type_hints(WorkerSettings)
    for f in dataclasses.fields(WorkerSettings):
        if f.metadata["top_level"] != top_level:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        flag = f.metadata["flag"]
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": default,
            "help": f.metadata["help"],
            **f.metadata["argparse"],
        }
        kind = hints[f.name]
        if kind is bool:
            kwargs["action"] = "store_false" if default else "store_true"
        else:
            if "choices" not in kwargs:  # named after the flag, as argparse would without a dest
                kwargs.setdefault("metavar", flag.lstrip("-").replace("-", "_").upper())
            kind = _without_none(kind)
            if typing.get_origin(kind) is list:
                kwargs["action"] = "append"
                (kind,) = typing.get_args(kind)
            if kind is not str:
                kwargs["type"] = kind
        parser.add_argument(flag, **kwargs)


def _without_none(kind: Any) -> Any:
    """X for ``X | None``; anything else as it is."""
    if isinstance(kind, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind
