"""Checks of the Home Assistant add-on's files and the repository metadata.

The add-on's config.yaml is validated against the Supervisor's schema kept in
``shared/data/addon-config.schema.json``; keys set to the Supervisor's default
are refused (the add-on linter refuses them too).
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ADDON = REPO / "addon"
SCHEMA_NAME = "addon-config.schema.json"
SCHEMA_CANDIDATES = (
    REPO.parent / "shared" / "data" / SCHEMA_NAME,
    REPO / "shared" / "data" / SCHEMA_NAME,
)
S6 = ADDON / "rootfs" / "etc" / "s6-overlay" / "s6-rc.d"
# Every key hacs.json may have (https://hacs.xyz/docs/publish/start/#hacsjson).
HACS_KEYS = {
    "name",
    "content_in_root",
    "zip_release",
    "filename",
    "hide_default_branch",
    "country",
    "homeassistant",
    "hacs",
    "persistent_directory",
    "render_readme",
}


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    data = load_yaml(ADDON / "config.yaml")
    assert isinstance(data, dict), "addon/config.yaml must be a mapping"
    return data


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    for path in SCHEMA_CANDIDATES:
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            assert isinstance(data, dict)
            return data
    pytest.fail(
        f"The Supervisor's add-on config schema ({SCHEMA_NAME}) is missing: looked for "
        + " and ".join(str(p) for p in SCHEMA_CANDIDATES)
    )


def test_config_matches_schema(config: dict[str, Any], schema: dict[str, Any]) -> None:
    validator = jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())
    errors = [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(config)
    ]
    assert not errors, "addon/config.yaml does not match the schema:\n" + "\n".join(errors)


def test_config_sets_no_key_to_its_default(config: dict[str, Any], schema: dict[str, Any]) -> None:
    properties: dict[str, Any] = schema["properties"]
    redundant = [
        f"{key}: {value!r}"
        for key, value in config.items()
        if "default" in properties.get(key, {})
        # type() too: in Python False == 0 and True == 1.
        and type(value) is type(properties[key]["default"])
        and value == properties[key]["default"]
    ]
    assert not redundant, "addon/config.yaml sets keys to their default value: " + ", ".join(
        redundant
    )


def test_config_essentials(config: dict[str, Any]) -> None:
    assert config["name"] == "Hearth worker"
    assert config["slug"] == "hearth"
    assert sorted(config["arch"]) == ["aarch64", "amd64"]
    assert config["init"] is False  # s6-overlay v3 runs the service
    assert config["discovery"] == ["hearth"]
    assert config["ports"] == {"8765/tcp": 8765}
    # The Supervisor's discovery endpoint is open to every add-on listing the
    # service: no Supervisor API access is asked for.
    assert "hassio_api" not in config
    shares = [
        entry
        for entry in config["map"]
        if (entry["type"] if isinstance(entry, dict) else entry.split(":")[0]) == "share"
    ]
    assert len(shares) == 1, "models are read from /share: map it"
    # Read-only is the Supervisor's default for a mapped folder.
    share = shares[0]
    read_only = share.get("read_only", True) if isinstance(share, dict) else share != "share:rw"
    assert read_only, "the worker only reads models: map share read-only"


def test_version_matches_package(config: dict[str, Any]) -> None:
    with (ADDON / "pyproject.toml").open("rb") as handle:
        package_version = tomllib.load(handle)["project"]["version"]
    assert isinstance(config["version"], str), "quote the version in config.yaml"
    assert config["version"] == package_version, (
        f"addon/config.yaml version {config['version']} != addon/pyproject.toml "
        f"version {package_version}"
    )
    changelog = (ADDON / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## {package_version}" in changelog, "CHANGELOG.md has no entry for this version"


def test_options_and_schema_agree(config: dict[str, Any]) -> None:
    options, option_schema = config["options"], config["schema"]
    assert set(options) == set(option_schema)
    assert set(options) == {
        "models",
        "max_running",
        "max_queued",
        "log_level",
        "advertise",
        "plain_http",
    }
    assert options["plain_http"] is False  # HTTPS unless explicitly turned off
    assert options["models"] == []
    assert option_schema["models"] == ["str"]
    assert options["log_level"] in option_schema["log_level"]


def test_translations_cover_options(config: dict[str, Any]) -> None:
    translations = load_yaml(ADDON / "translations" / "en.yaml")
    described = translations["configuration"]
    missing = set(config["schema"]) - set(described)
    assert not missing, f"addon/translations/en.yaml lacks options: {sorted(missing)}"
    unknown = set(described) - set(config["schema"])
    assert not unknown, f"addon/translations/en.yaml describes unknown options: {sorted(unknown)}"
    for key, entry in described.items():
        assert entry.get("name") and entry.get("description"), f"{key}: name and description"
    assert set(translations["network"]) == set(config["ports"])


def test_docs_mention_every_option(config: dict[str, Any]) -> None:
    docs = (ADDON / "DOCS.md").read_text(encoding="utf-8")
    for key in config["schema"]:
        assert f"### `{key}`" in docs, f"DOCS.md has no section for option {key}"


def test_build_yaml_covers_every_arch(config: dict[str, Any]) -> None:
    build = load_yaml(ADDON / "build.yaml")
    assert set(build["build_from"]) == set(config["arch"])
    dockerfile = (ADDON / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^ARG BUILD_FROM\s*$", dockerfile, re.MULTILINE)
    assert re.search(r"^FROM \$\{?BUILD_FROM\}?\s*$", dockerfile, re.MULTILINE)
    # The build context is addon/: everything the Dockerfile copies is there.
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ADDON / source).exists(), f"Dockerfile copies missing {source}"


def test_s6_service() -> None:
    service = S6 / "hearth"
    assert (service / "type").read_text(encoding="utf-8").strip() == "longrun"
    assert (S6 / "user" / "contents.d" / "hearth").is_file()
    for script in ("run", "finish"):
        path = service / script
        assert path.read_text(encoding="utf-8").startswith("#!/command/with-contenv bashio\n")
        assert os.access(path, os.X_OK), f"{path} must be executable"
    run = (service / "run").read_text(encoding="utf-8")
    assert "exec hearth-worker --state-dir /data serve" in run
    for flag in ("--host 0.0.0.0", "--port 8765", "--supervisor-discovery"):
        assert flag in run


def test_run_script_reads_every_option(config: dict[str, Any]) -> None:
    run = (S6 / "hearth" / "run").read_text(encoding="utf-8")
    for key in config["schema"]:
        assert f"'{key}'" in run, f"the run script ignores option {key}"


def repository_files() -> list[str]:
    """Tracked files and untracked ones git does not ignore (what a clone holds)."""
    done = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    return [name for name in done.stdout.split("\0") if name]


def test_no_other_addon_config_in_repository() -> None:
    # The Supervisor takes every config.{json,yaml,yml} outside dot folders and
    # rootfs/ for an add-on (supervisor/store/data.py, _find_addon_configs).
    stray = []
    for name in repository_files():
        parts = Path(name).parts
        if (
            Path(name).stem == "config"
            and Path(name).suffix in {".json", ".yaml", ".yml"}
            and not any(part.startswith(".") or part == "rootfs" for part in parts)
            and name != "addon/config.yaml"
        ):
            stray.append(name)
    assert not stray, f"the Supervisor would read these as add-ons: {stray}"


def test_repository_yaml() -> None:
    data = load_yaml(REPO / "repository.yaml")
    for key in ("name", "url", "maintainer"):
        assert isinstance(data.get(key), str) and data[key], f"repository.yaml needs {key}"


def test_hacs_json() -> None:
    data = json.loads((REPO / "hacs.json").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    assert data.get("name") == "Hearth"
    unknown = set(data) - HACS_KEYS
    assert not unknown, f"hacs.json has unknown keys: {sorted(unknown)}"
    assert data["render_readme"] is True
    assert re.fullmatch(r"\d{4}\.\d{1,2}\.\d+", data["homeassistant"])
    assert data["homeassistant"] == "2025.4.4"
    assert (REPO / "custom_components" / "hearth").is_dir()


@pytest.mark.parametrize(("name", "size"), [("icon.png", (128, 128)), ("logo.png", (250, 100))])
def test_images(name: str, size: tuple[int, int]) -> None:
    data = (ADDON / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"
    assert data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == size
