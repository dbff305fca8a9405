"""The catalog of models that suit a household, and what fits this machine.

``catalog.json`` (shipped inside the package) lists chat models (onnxruntime-genai
folders with ``genai_config.json``), ONNX embedding models and Piper voices (kind
``tts``, for text to speech) published on the Hugging Face hub, each with the size it
takes on disk and the memory it needs when serving a household's requests.
:func:`recommend` says which of them fit a machine and which chat and embedding model
to pull first (voices are listed, never recommended: which voice is a household's
choice).

The machine probes (:func:`total_memory_bytes`, :func:`available_memory_bytes`,
:func:`cpu_cores`, :func:`free_disk_bytes`) take their sources as arguments so
tests need no real machine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Final

KINDS: Final = ("chat", "embedding", "tts")
VOICE: Final = "tts"  # a Piper voice: no context (context_length 0), no tools

# Share of the memory given to recommend() that the recommended chat and embedding
# models may use together; the rest is left to the operating system, page cache,
# request buffers and whatever else runs on the machine.
MEMORY_HEADROOM: Final = 0.8

# On machines with fewer cores than this, a model above SMALL_MODEL_B parameters
# decodes too slowly for a voice assistant; a smaller one is preferred when it fits.
FEW_CORES: Final = 4
SMALL_MODEL_B: Final = 2.0

_SOURCE_RE = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)"
    r"(?::(?P<subfolder>[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*))?$"
)
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9.-]*$")

_FIELDS: Final[Mapping[str, tuple[type, ...]]] = {
    "id": (str,),
    "name": (str,),
    "source": (str,),
    "kind": (str,),
    "parameters_b": (int, float),
    "disk_bytes": (int,),
    "memory_bytes": (int,),
    "context_length": (int,),
    "license": (str,),
    "tool_calling": (bool,),
    "checked": (str,),
}


class CatalogError(ValueError):
    """The catalog file is malformed (names the entry and the field)."""


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    id: str
    name: str
    source: str  # "owner/name" or "owner/name:sub/folder"
    kind: str  # "chat" | "embedding" | "tts"
    parameters_b: float
    disk_bytes: int
    memory_bytes: int
    context_length: int
    license: str
    tool_calling: bool
    checked: str

    @property
    def repo(self) -> str:
        return split_source(self.source)[0]

    @property
    def subfolder(self) -> str | None:
        return split_source(self.source)[1]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Recommendation:
    entry: CatalogEntry
    fits_memory: bool
    fits_disk: bool
    recommended: bool
    reason: str

    @property
    def fits(self) -> bool:
        return self.fits_memory and self.fits_disk

    def to_json(self) -> dict[str, Any]:
        """The entry's fields plus ``fits``, ``recommended`` and ``reason``."""
        data = self.entry.to_json()
        data.update(
            fits=self.fits,
            fits_memory=self.fits_memory,
            fits_disk=self.fits_disk,
            recommended=self.recommended,
            reason=self.reason,
        )
        return data


def split_source(source: str) -> tuple[str, str | None]:
    """``"owner/name:sub/folder"`` -> ``("owner/name", "sub/folder")``; ValueError if malformed."""
    match = _SOURCE_RE.match(source)
    if match is None or ".." in source.split(":", 1)[-1].split("/"):
        raise ValueError(f"not a hub source (owner/name[:subfolder]): {source!r}")
    return match["repo"], match["subfolder"]


def _entry(raw: Any, index: int) -> CatalogEntry:
    if not isinstance(raw, dict):
        raise CatalogError(f"catalog entry {index} is not an object")
    label = f"catalog entry {index} ({raw.get('id', '?')})"
    missing = [field for field in _FIELDS if field not in raw]
    if missing:
        raise CatalogError(f"{label} lacks {', '.join(missing)}")
    extra = sorted(set(raw) - set(_FIELDS))
    if extra:
        raise CatalogError(f"{label} has unknown fields {', '.join(extra)}")
    for field, types in _FIELDS.items():
        value = raw[field]
        # bool is an int in Python: only tool_calling may be one.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise CatalogError(f"{label}: {field} must be {' or '.join(t.__name__ for t in types)}")
        if isinstance(value, str) and not value.strip():
            raise CatalogError(f"{label}: {field} is empty")
    if not _ID_RE.match(raw["id"]):
        raise CatalogError(f"{label}: id must be a lowercase slug")
    try:
        split_source(raw["source"])
    except ValueError as err:
        raise CatalogError(f"{label}: {err}") from None
    if raw["kind"] not in KINDS:
        raise CatalogError(f"{label}: kind must be one of {', '.join(KINDS)}")
    for field in ("parameters_b", "disk_bytes", "memory_bytes", "context_length"):
        if field == "context_length" and raw["kind"] == VOICE:
            continue
        if not raw[field] > 0:
            raise CatalogError(f"{label}: {field} must be positive")
    if raw["kind"] == VOICE and (raw["context_length"] != 0 or raw["tool_calling"]):
        raise CatalogError(f"{label}: a voice has context_length 0 and no tool_calling")
    if raw["memory_bytes"] < raw["disk_bytes"] // 2:
        raise CatalogError(f"{label}: memory_bytes is less than half of disk_bytes")
    return CatalogEntry(
        id=raw["id"],
        name=raw["name"],
        source=raw["source"],
        kind=raw["kind"],
        parameters_b=float(raw["parameters_b"]),
        disk_bytes=raw["disk_bytes"],
        memory_bytes=raw["memory_bytes"],
        context_length=raw["context_length"],
        license=raw["license"],
        tool_calling=raw["tool_calling"],
        checked=raw["checked"],
    )


def parse_catalog(data: Any) -> list[CatalogEntry]:
    """Validate the decoded catalog file: ``{"notes": ..., "models": [entry, ...]}``."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise CatalogError('the catalog must be an object with a "models" list')
    entries = [_entry(raw, index) for index, raw in enumerate(data["models"])]
    seen: set[str] = set()
    for entry in entries:
        if entry.id in seen:
            raise CatalogError(f"catalog id {entry.id} appears twice")
        seen.add(entry.id)
    sources = [entry.source for entry in entries]
    if len(set(sources)) != len(sources):
        raise CatalogError("a source appears twice in the catalog")
    return entries


def catalog_text() -> str:
    """The shipped catalog.json."""
    return resources.files(__package__).joinpath("catalog.json").read_text(encoding="utf-8")


@cache
def _shipped() -> tuple[CatalogEntry, ...]:
    return tuple(parse_catalog(json.loads(catalog_text())))


def load_catalog(path: Path | None = None) -> list[CatalogEntry]:
    """The entries of ``path``, or of the catalog shipped with the worker."""
    if path is None:
        return list(_shipped())
    return parse_catalog(json.loads(path.read_text(encoding="utf-8")))


def _gb(value: int) -> str:
    return f"{value / 1e9:.1f} GB"


def _rank(entry: CatalogEntry, index: int, small: bool) -> tuple[bool, bool, float, int]:
    """A chat model's rank, higher is better: tool calling, then (on few cores) small
    enough, then size, then the earlier place in the file."""
    return (
        entry.tool_calling,
        not small or entry.parameters_b <= SMALL_MODEL_B,
        entry.parameters_b,
        -index,
    )


def recommend(
    memory_bytes: int,
    cores: int,
    free_disk_bytes: int,
    *,
    catalog: Sequence[CatalogEntry] | None = None,
) -> list[Recommendation]:
    """Every catalog entry with whether it fits this machine, and the ones to pull first.

    ``memory_bytes`` is the memory the models may use (free memory of the machine),
    ``free_disk_bytes`` the free space where models are stored. An entry fits when its
    memory and its disk size each fit. Recommended: the best chat model (tool calling
    first; on fewer than ``FEW_CORES`` cores one of at most ``SMALL_MODEL_B`` billion
    parameters if any fits; then the largest) that leaves room, together with the
    recommended embedding model, within ``MEMORY_HEADROOM`` of the memory and within
    the free disk; then the first embedding model in the catalog (they are listed in
    order of preference) that fits in what is left.
    """
    entries = list(load_catalog() if catalog is None else catalog)
    budget = int(memory_bytes * MEMORY_HEADROOM)
    small = cores < FEW_CORES
    chat = [(i, e) for i, e in enumerate(entries) if e.kind == "chat"]
    embedding = [(i, e) for i, e in enumerate(entries) if e.kind == "embedding"]

    def fitting(
        candidates: Iterable[tuple[int, CatalogEntry]], memory: int, disk: int
    ) -> list[tuple[int, CatalogEntry]]:
        return [(i, e) for i, e in candidates if e.memory_bytes <= memory and e.disk_bytes <= disk]

    # The smallest embedding model is kept aside while choosing the chat model, so the
    # household gets both when both can fit.
    embed_reserve = min(
        (e for _, e in fitting(embedding, budget, free_disk_bytes)),
        key=lambda e: (e.memory_bytes, e.disk_bytes),
        default=None,
    )
    reserve_mem = embed_reserve.memory_bytes if embed_reserve else 0
    reserve_disk = embed_reserve.disk_bytes if embed_reserve else 0
    chat_fit = fitting(chat, budget - reserve_mem, free_disk_bytes - reserve_disk)
    if not chat_fit:  # room for a chat model alone is better than nothing
        chat_fit = fitting(chat, budget, free_disk_bytes)
    best_chat = max(chat_fit, key=lambda p: _rank(p[1], p[0], small), default=None)
    used_mem = best_chat[1].memory_bytes if best_chat else 0
    used_disk = best_chat[1].disk_bytes if best_chat else 0
    embed_fit = fitting(embedding, budget - used_mem, free_disk_bytes - used_disk)
    # Embedding models: the catalog lists them in order of preference.
    best_embed = min(embed_fit, key=lambda p: p[0], default=None)
    chosen = {p[1].id for p in (best_chat, best_embed) if p is not None}

    results = []
    for entry in entries:
        fits_memory = entry.memory_bytes <= memory_bytes
        fits_disk = entry.disk_bytes <= free_disk_bytes
        reason = _reason(
            entry,
            fits_memory,
            fits_disk,
            entry.id in chosen,
            memory_bytes,
            free_disk_bytes,
            budget,
            small,
        )
        results.append(
            Recommendation(
                entry=entry,
                fits_memory=fits_memory,
                fits_disk=fits_disk,
                recommended=entry.id in chosen,
                reason=reason,
            )
        )
    return results


def _reason(
    entry: CatalogEntry,
    fits_memory: bool,
    fits_disk: bool,
    chosen: bool,
    memory_bytes: int,
    free_disk_bytes: int,
    budget: int,
    small: bool,
) -> str:
    needs = []
    if not fits_memory:
        needs.append(f"needs {_gb(entry.memory_bytes)} of memory, {_gb(memory_bytes)} free")
    if not fits_disk:
        needs.append(f"needs {_gb(entry.disk_bytes)} of disk, {_gb(free_disk_bytes)} free")
    if needs:
        return "; ".join(needs)
    if entry.kind == VOICE:
        return "fits; a voice for text to speech (pull the one your household likes)"
    if chosen:
        if entry.kind == "embedding":
            return "recommended: the best embedding model that fits beside the chat model"
        parts = ["recommended: the best chat model that fits with room to spare"]
        if entry.tool_calling:
            parts.append("calls tools")
        if small and entry.parameters_b <= SMALL_MODEL_B:
            parts.append("small enough to answer quickly on few cores")
        return ", ".join(parts)
    if entry.memory_bytes > budget:
        return "fits, but leaves little memory for anything else"
    if entry.kind == "chat" and not entry.tool_calling:
        return "fits; cannot call tools (no device control)"
    if small and entry.kind == "chat" and entry.parameters_b > SMALL_MODEL_B:
        return "fits; slow with so few cores"
    return "fits"


# --------------------------------------------------------------------------- machine


def _meminfo_field(text: str, field: str) -> int | None:
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == field:
            parts = rest.split()
            if parts and parts[0].isdigit():
                scale = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
                return int(parts[0]) * scale
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None


def _sysconf_total(sysconf: Callable[[str], int]) -> int | None:
    try:
        pages, size = sysconf("SC_PHYS_PAGES"), sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None
    return pages * size if pages > 0 and size > 0 else None


def total_memory_bytes(
    meminfo: Path = Path("/proc/meminfo"),
    sysconf: Callable[[str], int] = os.sysconf,
) -> int:
    """The machine's memory: MemTotal from meminfo, else sysconf; 0 if neither answers."""
    text = _read(meminfo)
    value = _meminfo_field(text, "MemTotal") if text is not None else None
    return value if value is not None else (_sysconf_total(sysconf) or 0)


def available_memory_bytes(
    meminfo: Path = Path("/proc/meminfo"),
    sysconf: Callable[[str], int] = os.sysconf,
) -> int:
    """Memory available to new work: MemAvailable (or MemFree + Cached), else the total."""
    text = _read(meminfo)
    if text is not None:
        available = _meminfo_field(text, "MemAvailable")
        if available is not None:
            return available
        free = _meminfo_field(text, "MemFree")
        if free is not None:
            return free + (_meminfo_field(text, "Cached") or 0)
    return total_memory_bytes(meminfo, sysconf)


def cpu_cores(
    affinity: Callable[[], Iterable[int]] | None = None,
    count: Callable[[], int | None] = os.cpu_count,
) -> int:
    """Cores this process may run on (sched_getaffinity), else os.cpu_count(); at least 1."""
    if affinity is None and hasattr(os, "sched_getaffinity"):
        affinity = lambda: os.sched_getaffinity(0)  # noqa: E731
    if affinity is not None:
        try:
            cores = len(set(affinity()))
        except OSError:
            cores = 0
        if cores > 0:
            return cores
    return max(1, count() or 1)


def free_disk_bytes(path: Path, disk_usage: Callable[[Path], Any] = shutil.disk_usage) -> int:
    """Free bytes on the file system that holds ``path`` (its nearest existing parent);
    0 when it cannot be read (nothing is then said to fit the disk)."""
    probe = path.absolute()
    try:
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        return max(0, int(disk_usage(probe).free))
    except OSError:
        return 0


@dataclass(frozen=True, slots=True)
class Machine:
    total_memory_bytes: int
    available_memory_bytes: int
    cores: int
    free_disk_bytes: int


def probe_machine(models_dir: Path) -> Machine:
    """This machine's memory, cores and the free disk where models are stored."""
    return Machine(
        total_memory_bytes=total_memory_bytes(),
        available_memory_bytes=available_memory_bytes(),
        cores=cpu_cores(),
        free_disk_bytes=free_disk_bytes(models_dir),
    )


# --------------------------------------------------------------------------- CLI


def pull_command(entry: CatalogEntry, models_dir: Path | None = None) -> str:
    """The command that installs ``entry`` (with ``--models-dir`` when one was given)."""
    where = f" --models-dir {shlex.quote(str(models_dir))}" if models_dir is not None else ""
    return f"hearth-worker pull{where} {shlex.quote(entry.source)}"


def report(
    machine: Machine,
    models_dir: Path,
    recommendations: Sequence[Recommendation],
    *,
    explicit_dir: bool = False,
) -> dict[str, Any]:
    """What ``hearth-worker recommend --json`` prints."""
    pull_dir = models_dir if explicit_dir else None
    return {
        "machine": asdict(machine),
        "models_dir": str(models_dir),
        "models": [rec.to_json() for rec in recommendations],
        "suggested": [
            pull_command(rec.entry, pull_dir) for rec in recommendations if rec.recommended
        ],
    }


def format_table(
    machine: Machine,
    models_dir: Path,
    recommendations: Sequence[Recommendation],
    *,
    explicit_dir: bool = False,
) -> str:
    """A table a person reads: every catalog model, whether it fits, and what to pull."""
    lines = [
        f"This machine: {_gb(machine.available_memory_bytes)} of memory free "
        f"(of {_gb(machine.total_memory_bytes)}), {machine.cores} cores, "
        f"{_gb(machine.free_disk_bytes)} free disk in {models_dir}",
        "",
    ]
    header = ("", "MODEL", "KIND", "PARAMS", "DISK", "MEMORY", "TOOLS", "FITS", "")
    rows = [header]
    order = sorted(
        recommendations, key=lambda r: (r.entry.kind != "chat", not r.recommended, not r.fits)
    )
    for rec in order:
        e = rec.entry
        rows.append(
            (
                "*" if rec.recommended else "",
                e.id,
                e.kind,
                f"{e.parameters_b:g}B",
                _gb(e.disk_bytes),
                _gb(e.memory_bytes),
                "yes" if e.tool_calling else "no" if e.kind == "chat" else "-",
                "yes" if rec.fits else "no",
                rec.reason,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    chosen = [rec for rec in order if rec.recommended]
    lines.append("")
    if chosen:
        lines.append("* recommended. To install them:")
        pull_dir = models_dir if explicit_dir else None
        lines.extend(f"  {pull_command(rec.entry, pull_dir)}" for rec in chosen)
    else:
        lines.append("No catalog model fits this machine's free memory and disk.")
    return "\n".join(lines)


def run_recommend(
    models_dir: Path,
    *,
    as_json: bool = False,
    explicit_dir: bool = False,
    machine: Machine | None = None,
) -> str:
    """The output of ``hearth-worker recommend`` for this machine (or ``machine``)."""
    machine = machine or probe_machine(models_dir)
    recommendations = recommend(
        machine.available_memory_bytes, machine.cores, machine.free_disk_bytes
    )
    if as_json:
        data = report(machine, models_dir, recommendations, explicit_dir=explicit_dir)
        return json.dumps(data, indent=2)
    return format_table(machine, models_dir, recommendations, explicit_dir=explicit_dir)
