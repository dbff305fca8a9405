"""The model catalog: the shipped file validates, recommend() picks what fits, the CLI prints it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from collections import namedtuple
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hearth_worker import catalog
from hearth_worker.catalog import (
    KINDS,
    MEMORY_HEADROOM,
    CatalogEntry,
    CatalogError,
    Machine,
    load_catalog,
    parse_catalog,
    recommend,
    split_source,
)
from hearth_worker.pull import parse_source

GIB = 1024**3
GB = 10**9
REPO = Path(__file__).resolve().parents[2]
CATALOG_JSON = REPO / "addon" / "hearth_worker" / "catalog.json"


def _raw(**changes: Any) -> dict[str, Any]:
    entry = {
        "id": "tiny",
        "name": "Tiny",
        "source": "owner/tiny-onnx:cpu/int4",
        "kind": "chat",
        "parameters_b": 0.5,
        "disk_bytes": 800_000_000,
        "memory_bytes": 1_300_000_000,
        "context_length": 4096,
        "license": "MIT",
        "tool_calling": True,
        "checked": "https://example.invalid/tree/main (2026-11-29)",
    }
    entry.update(changes)
    return entry


def _entry(
    id_: str, kind: str, params: float, disk: float, memory: float, tools: bool
) -> CatalogEntry:
    return CatalogEntry(
        id=id_,
        name=id_,
        source=f"owner/{id_}",
        kind=kind,
        parameters_b=params,
        disk_bytes=int(disk * GB),
        memory_bytes=int(memory * GIB),
        context_length=4096,
        license="MIT",
        tool_calling=tools,
        checked="test",
    )


# A catalog with known sizes, so picks do not change when catalog.json is updated.
SYNTHETIC = [
    _entry("big-tools", "chat", 3.8, 4.9, 6.1, True),
    _entry("mid-tools", "chat", 3.2, 3.7, 4.8, True),
    _entry("mid-no-tools", "chat", 3.8, 2.8, 4.5, False),
    _entry("small-tools", "chat", 1.2, 1.8, 2.4, True),
    _entry("tiny-tools", "chat", 0.5, 0.8, 1.4, True),
    _entry("embed-big", "embedding", 0.03, 0.13, 0.37, False),
    _entry("embed-small", "embedding", 0.02, 0.09, 0.33, False),
]


def _picked(recs: list[catalog.Recommendation]) -> dict[str, str]:
    return {r.entry.kind: r.entry.id for r in recs if r.recommended}


# --------------------------------------------------------------------------- the file


def test_shipped_catalog_validates_every_field() -> None:
    entries = load_catalog()
    raw = json.loads(CATALOG_JSON.read_text(encoding="utf-8"))
    assert raw["notes"], "the file says how sizes and memory were estimated"
    assert "KV cache" in " ".join(raw["notes"])
    assert len(entries) == len(raw["models"])
    assert len({e.id for e in entries}) == len(entries)
    assert len({e.source for e in entries}) == len(entries)
    assert {e.kind for e in entries} == set(KINDS)
    for item in raw["models"]:
        assert set(item) == set(catalog._FIELDS), item["id"]
    for entry in entries:
        repo, subfolder = split_source(entry.source)
        owner, name = repo.split("/")
        assert owner and name and subfolder != ""
        assert entry.name.strip() and entry.license.strip()
        assert entry.disk_bytes > 0 and entry.memory_bytes > entry.disk_bytes
        assert re.search(r"2026-11-(29|30)", entry.checked), entry.id
        assert "huggingface.co/" in entry.checked
        if entry.kind == "tts":  # a Piper voice: no context, no tools
            assert entry.context_length == 0 and not entry.tool_calling
            assert entry.parameters_b < 0.1 and entry.disk_bytes < 200_000_000
            continue
        assert entry.context_length >= 256
        if entry.kind == "chat":
            assert 0.5 <= entry.parameters_b <= 4.0, entry.id
            assert entry.context_length >= 4096
        else:
            assert entry.parameters_b < 1 and not entry.tool_calling
    assert any(e.tool_calling for e in entries if e.kind == "chat")


def test_every_source_is_one_pull_takes() -> None:
    for entry in load_catalog():
        hub = parse_source(entry.source)
        assert (hub.repo_id, hub.subfolder or None) == split_source(entry.source)


def test_catalog_json_ships_in_the_package() -> None:
    pyproject = tomllib.loads((REPO / "addon" / "pyproject.toml").read_text(encoding="utf-8"))
    assert "catalog.json" in pyproject["tool"]["setuptools"]["package-data"]["hearth_worker"]
    assert catalog.catalog_text() == CATALOG_JSON.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("owner/name", ("owner/name", None)),
        (
            "microsoft/Phi-4-mini-instruct-onnx:cpu_and_mobile/cpu-int4",
            ("microsoft/Phi-4-mini-instruct-onnx", "cpu_and_mobile/cpu-int4"),
        ),
        ("BAAI/bge-small-en-v1.5:onnx", ("BAAI/bge-small-en-v1.5", "onnx")),
    ],
)
def test_split_source(source: str, expected: tuple[str, str | None]) -> None:
    assert split_source(source) == expected


@pytest.mark.parametrize(
    "source",
    [
        "",
        "owner",
        "owner/",
        "/name",
        "owner/name/extra",
        "owner/name:",
        "owner/name:../up",
        "owner/name:a//b",
        "owner/name:/abs",
        "own er/name",
        "https://huggingface.co/o/n",
    ],
)
def test_split_source_refuses_malformed(source: str) -> None:
    with pytest.raises(ValueError, match="not a hub source"):
        split_source(source)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "vision"}, "kind must be one of"),
        ({"source": "not a repo"}, "not a hub source"),
        ({"disk_bytes": 0}, "disk_bytes must be positive"),
        ({"memory_bytes": -1}, "memory_bytes must be positive"),
        ({"parameters_b": 0}, "parameters_b must be positive"),
        ({"context_length": 0}, "context_length must be positive"),
        ({"disk_bytes": 1.5}, "disk_bytes must be int"),
        ({"disk_bytes": True}, "disk_bytes must be int"),
        ({"tool_calling": "yes"}, "tool_calling must be bool"),
        ({"checked": " "}, "checked is empty"),
        ({"id": "Has Spaces"}, "id must be a lowercase slug"),
        ({"extra": 1}, "unknown fields extra"),
        ({"memory_bytes": 100}, "memory_bytes is less than half of disk_bytes"),
    ],
)
def test_parse_refuses_bad_entries(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(CatalogError, match=message):
        parse_catalog({"models": [_raw(**changes)]})


def test_a_voice_has_no_context_and_no_tools() -> None:
    voice = _raw(kind="tts", context_length=0, tool_calling=False)
    assert parse_catalog({"models": [voice]})[0].kind == "tts"
    for changes in ({"context_length": 4096}, {"tool_calling": True}):
        with pytest.raises(CatalogError, match="a voice has context_length 0"):
            parse_catalog({"models": [{**voice, **changes}]})
    with pytest.raises(CatalogError, match="context_length must be positive"):
        parse_catalog({"models": [_raw(kind="embedding", context_length=0)]})


def test_the_shipped_voice_is_the_real_piper_voice_the_tests_speak_with() -> None:
    """The catalog's voice is rhasspy/piper-voices' joe (medium): the same two files as
    the wheel the tests use (model_fixtures.piper_voice()), so its size is exact."""
    import model_fixtures

    entry = next(e for e in load_catalog() if e.kind == "tts")
    assert entry.source == "rhasspy/piper-voices:en/en_US/joe/medium"
    manifest = json.loads((model_fixtures.piper_voice() / "hearth-model.json").read_text())
    assert entry.disk_bytes == manifest["size_bytes"]
    for f in manifest["files"]:
        assert f["sha256"][:8] in entry.checked and f"{f['size_bytes']:,}" in entry.checked


def test_a_voice_is_listed_never_recommended() -> None:
    voice = CatalogEntry(
        id="voice",
        name="voice",
        source="owner/voices:en/joe",
        kind="tts",
        parameters_b=0.016,
        disk_bytes=63_206_088,
        memory_bytes=256 * 2**20,
        context_length=0,
        license="MIT",
        tool_calling=False,
        checked="test",
    )
    for memory_gib in (1, 8, 64):
        recs = recommend(memory_gib * GIB, 8, 500 * GB, catalog=[*SYNTHETIC, voice])
        assert _picked(recs) == _picked(recommend(memory_gib * GIB, 8, 500 * GB, catalog=SYNTHETIC))
        rec = next(r for r in recs if r.entry.id == "voice")
        assert rec.fits and not rec.recommended and "voice" in rec.reason
    alone = recommend(8 * GIB, 8, 500 * GB, catalog=[voice])
    assert alone[0].fits and not alone[0].recommended


def test_parse_refuses_missing_fields_duplicates_and_bad_shapes() -> None:
    entry = _raw()
    del entry["checked"]
    with pytest.raises(CatalogError, match="lacks checked"):
        parse_catalog({"models": [entry]})
    with pytest.raises(CatalogError, match="appears twice"):
        parse_catalog({"models": [_raw(), _raw(source="owner/other")]})
    with pytest.raises(CatalogError, match="source appears twice"):
        parse_catalog({"models": [_raw(), _raw(id="other")]})
    with pytest.raises(CatalogError, match='"models" list'):
        parse_catalog([_raw()])
    with pytest.raises(CatalogError, match="not an object"):
        parse_catalog({"models": ["tiny"]})
    assert parse_catalog({"models": [_raw()]})[0].subfolder == "cpu/int4"


def test_load_catalog_from_a_path(tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"models": [_raw()]}), encoding="utf-8")
    (entry,) = load_catalog(path)
    assert entry.id == "tiny" and entry.repo == "owner/tiny-onnx"
    assert entry.to_json() == _raw()


# --------------------------------------------------------------------------- recommend


@pytest.mark.parametrize(
    ("memory_gib", "expected_chat", "expected_embedding"),
    [
        (4, "small-tools", "embed-big"),  # budget 3.2 GiB: 2.4 + 0.37 fits, 4.8 does not
        (8, "mid-tools", "embed-big"),  # budget 6.4 GiB: 6.1 + 0.33 does not, 4.8 + 0.37 does
        (32, "big-tools", "embed-big"),
    ],
)
def test_recommend_picks_by_memory(
    memory_gib: int, expected_chat: str, expected_embedding: str
) -> None:
    recs = recommend(memory_gib * GIB, 8, 500 * GB, catalog=SYNTHETIC)
    assert [r.entry.id for r in recs] == [e.id for e in SYNTHETIC]  # every entry, in order
    assert _picked(recs) == {"chat": expected_chat, "embedding": expected_embedding}
    chosen = [r.entry for r in recs if r.recommended]
    assert sum(e.memory_bytes for e in chosen) <= memory_gib * GIB * MEMORY_HEADROOM
    for rec in recs:
        assert rec.fits == (rec.entry.memory_bytes <= memory_gib * GIB)
        assert rec.reason
        if rec.recommended:
            assert rec.reason.startswith("recommended")


def test_recommend_prefers_tool_calling() -> None:
    # At 8 GiB mid-no-tools (3.8B) fits and is larger than mid-tools (3.2B), but cannot
    # call tools, so it cannot control the house.
    recs = recommend(8 * GIB, 8, 500 * GB, catalog=SYNTHETIC)
    assert _picked(recs)["chat"] == "mid-tools"
    no_tools = next(r for r in recs if r.entry.id == "mid-no-tools")
    assert no_tools.fits and not no_tools.recommended
    assert "cannot call tools" in no_tools.reason
    # Among models that cannot call tools, the largest that fits.
    without_tools = [replace(e, tool_calling=False) for e in SYNTHETIC]
    assert _picked(recommend(8 * GIB, 8, 500 * GB, catalog=without_tools))["chat"] == "mid-no-tools"


def test_recommend_takes_embedding_models_in_catalog_order() -> None:
    swapped = [e for e in SYNTHETIC if e.kind == "chat"] + [SYNTHETIC[-1], SYNTHETIC[-2]]
    assert _picked(recommend(8 * GIB, 8, 500 * GB, catalog=swapped))["embedding"] == "embed-small"
    # The first in order that fits what the chat model leaves: 4 GiB, budget 3.2 GiB,
    # small-tools takes 2.4, and an embedding model of 0.9 GiB listed first does not fit.
    heavy = _entry("embed-heavy", "embedding", 0.3, 0.5, 0.9, False)
    recs = recommend(4 * GIB, 8, 500 * GB, catalog=[*SYNTHETIC[:5], heavy, *SYNTHETIC[5:]])
    assert _picked(recs) == {"chat": "small-tools", "embedding": "embed-big"}


def test_recommend_prefers_a_small_model_on_few_cores() -> None:
    recs = recommend(32 * GIB, 2, 500 * GB, catalog=SYNTHETIC)
    assert _picked(recs)["chat"] == "small-tools"
    big = next(r for r in recs if r.entry.id == "big-tools")
    assert big.fits and not big.recommended and "cores" in big.reason
    # With nothing small enough that fits, a larger model is still better than none.
    larger_only = [e for e in SYNTHETIC if e.parameters_b > 2 or e.kind == "embedding"]
    assert _picked(recommend(32 * GIB, 2, 500 * GB, catalog=larger_only))["chat"] == "big-tools"


def test_recommend_refuses_what_does_not_fit_the_disk() -> None:
    # Plenty of memory, 4 GB of disk: the 4.9 GB model does not fit, nor the 3.7 GB one
    # together with an embedding model... 3.7 + 0.13 = 3.83 GB does fit.
    recs = recommend(32 * GIB, 8, 4 * GB, catalog=SYNTHETIC)
    big = next(r for r in recs if r.entry.id == "big-tools")
    assert not big.fits and big.fits_memory and not big.fits_disk
    assert not big.recommended and "disk" in big.reason
    assert _picked(recs) == {"chat": "mid-tools", "embedding": "embed-big"}
    chosen = [r.entry for r in recs if r.recommended]
    assert sum(e.disk_bytes for e in chosen) <= 4 * GB

    # 1 GB of disk: only the tiny chat model and the embedding models fit.
    recs = recommend(32 * GIB, 8, 1 * GB, catalog=SYNTHETIC)
    assert _picked(recs) == {"chat": "tiny-tools", "embedding": "embed-big"}
    assert [r.entry.id for r in recs if r.fits] == ["tiny-tools", "embed-big", "embed-small"]

    # No disk at all: nothing fits, nothing is recommended, and each says why.
    recs = recommend(32 * GIB, 8, 0, catalog=SYNTHETIC)
    assert not any(r.fits or r.recommended for r in recs)
    assert all("of disk" in r.reason for r in recs)


def test_recommend_with_too_little_memory_recommends_nothing_that_does_not_fit() -> None:
    recs = recommend(int(0.5 * GIB), 8, 500 * GB, catalog=SYNTHETIC)
    chosen = [r for r in recs if r.recommended]
    assert [r.entry.id for r in chosen] == ["embed-big"]  # 0.37 GiB within 0.4 GiB
    assert all(r.fits for r in chosen)
    tiny = next(r for r in recs if r.entry.id == "tiny-tools")
    assert not tiny.fits_memory and "of memory" in tiny.reason


def test_recommend_on_the_shipped_catalog() -> None:
    entries = load_catalog()
    for memory_gib in (4, 8, 32):
        recs = recommend(memory_gib * GIB, 8, 500 * GB)
        assert len(recs) == len(entries)
        chosen = [r.entry for r in recs if r.recommended]
        assert sorted(e.kind for e in chosen) == ["chat", "embedding"], memory_gib
        assert sum(e.memory_bytes for e in chosen) <= memory_gib * GIB * MEMORY_HEADROOM
        chat = next(e for e in chosen if e.kind == "chat")
        assert chat.tool_calling
        # No larger tool-calling chat model would have fit beside the embedding model.
        embed = next(e for e in chosen if e.kind == "embedding")
        room = memory_gib * GIB * MEMORY_HEADROOM - embed.memory_bytes
        assert not any(
            e.kind == "chat"
            and e.tool_calling
            and e.parameters_b > chat.parameters_b
            and e.memory_bytes <= room
            for e in entries
        )
    small = _picked(recommend(4 * GIB, 8, 500 * GB))["chat"]
    large = _picked(recommend(32 * GIB, 8, 500 * GB))["chat"]
    by_id = {e.id: e for e in entries}
    assert by_id[small].memory_bytes < by_id[large].memory_bytes


# --------------------------------------------------------------------------- machine


def test_memory_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        "MemTotal:        8000000 kB\nMemFree:          500000 kB\n"
        "MemAvailable:    6000000 kB\nCached:          1000000 kB\n",
        encoding="ascii",
    )
    no_sysconf = _sysconf({})
    assert catalog.total_memory_bytes(meminfo, no_sysconf) == 8_000_000 * 1024
    assert catalog.available_memory_bytes(meminfo, no_sysconf) == 6_000_000 * 1024
    # An old kernel without MemAvailable: free + cached.
    meminfo.write_text("MemTotal: 8000000 kB\nMemFree: 500000 kB\nCached: 1000000 kB\n")
    assert catalog.available_memory_bytes(meminfo, no_sysconf) == 1_500_000 * 1024


def _sysconf(values: dict[str, int]) -> Any:
    def sysconf(name: str) -> int:
        if name not in values:
            raise ValueError(name)
        return values[name]

    return sysconf


def test_memory_without_meminfo_falls_back_to_sysconf(tmp_path: Path) -> None:
    missing = tmp_path / "no-meminfo"
    sysconf = _sysconf({"SC_PHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096})
    assert catalog.total_memory_bytes(missing, sysconf) == 4_096_000
    assert catalog.available_memory_bytes(missing, sysconf) == 4_096_000
    assert catalog.total_memory_bytes(missing, _sysconf({})) == 0


def test_cpu_cores() -> None:
    assert catalog.cpu_cores(lambda: {0, 1, 4}, lambda: 64) == 3

    def failing() -> set[int]:
        raise OSError

    assert catalog.cpu_cores(failing, lambda: 6) == 6
    assert catalog.cpu_cores(set, lambda: None) == 1
    assert catalog.cpu_cores() >= 1  # the real machine


def test_free_disk_of_a_path_that_does_not_exist_yet(tmp_path: Path) -> None:
    Usage = namedtuple("Usage", "total used free")
    seen: list[Path] = []

    def disk_usage(path: Path) -> Any:
        seen.append(path)
        return Usage(100, 40, 60)

    assert catalog.free_disk_bytes(tmp_path / "models" / "deeper", disk_usage) == 60
    assert seen == [tmp_path]
    assert catalog.free_disk_bytes(tmp_path) > 0  # the real file system

    def unreadable(path: Path) -> Any:
        raise PermissionError(path)

    assert catalog.free_disk_bytes(tmp_path / "models", unreadable) == 0


# --------------------------------------------------------------------------- CLI


MACHINE = Machine(
    total_memory_bytes=8 * GIB, available_memory_bytes=8 * GIB, cores=8, free_disk_bytes=500 * GB
)


def test_table_lists_every_model_and_the_pull_commands(tmp_path: Path) -> None:
    text = catalog.run_recommend(tmp_path, machine=MACHINE)
    entries = load_catalog()
    for entry in entries:
        assert entry.id in text
    picked = _picked(recommend(8 * GIB, 8, 500 * GB))
    by_id = {e.id: e for e in entries}
    for model_id in picked.values():
        assert f"hearth-worker pull {by_id[model_id].source}" in text
    assert "--models-dir" not in text
    explicit = catalog.run_recommend(tmp_path, machine=MACHINE, explicit_dir=True)
    assert f"hearth-worker pull --models-dir {tmp_path} " in explicit
    nothing = catalog.run_recommend(tmp_path, machine=replace(MACHINE, free_disk_bytes=0))
    assert "No catalog model fits" in nothing and "hearth-worker pull" not in nothing


def _cli(*args: str, state_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HEARTH_STATE_DIR": str(state_dir)}
    return subprocess.run(
        [sys.executable, "-m", "hearth_worker", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_cli_recommend_prints_a_table_and_json(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    result = _cli("recommend", "--models-dir", str(models_dir), state_dir=tmp_path / "state")
    assert result.returncode == 0, result.stderr
    assert "This machine:" in result.stdout and "MODEL" in result.stdout
    assert str(models_dir) in result.stdout
    assert ("hearth-worker pull --models-dir" in result.stdout) or (
        "No catalog model fits" in result.stdout
    )

    result = _cli("recommend", "--json", state_dir=tmp_path / "state")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["models_dir"] == str(tmp_path / "state" / "models")
    assert set(data["machine"]) == {
        "total_memory_bytes",
        "available_memory_bytes",
        "cores",
        "free_disk_bytes",
    }
    assert data["machine"]["cores"] >= 1
    assert [m["id"] for m in data["models"]] == [e.id for e in load_catalog()]
    for model in data["models"]:
        assert isinstance(model["fits"], bool) and isinstance(model["recommended"], bool)
        assert model["reason"]
    recommended = [m for m in data["models"] if m["recommended"]]
    assert data["suggested"] == [f"hearth-worker pull {m['source']}" for m in recommended]
    assert all(m["fits"] for m in recommended)
    assert not (tmp_path / "state").exists()  # recommend changes nothing on the machine
