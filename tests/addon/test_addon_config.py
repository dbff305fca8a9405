"""Checks of the Home Assistant add-on's files and the repository metadata.

The add-on's config.yaml is validated against the project's own copy of the
Supervisor's add-on options, ``tests/addon/addon-config.schema.json`` (written from
the Supervisor's documentation and validator, see its ``$comment``); keys set to the
Supervisor's default are refused (the add-on linter refuses them too). No Docker
engine runs here, so the hardening (AppArmor profile, unprivileged worker, no port
on the LAN by default, pinned base image and Python packages) is checked in the files.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import struct
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

THIS_FILE = Path(__file__).resolve()
REPO = THIS_FILE.parents[2]
ADDON = REPO / "addon"
SCHEMA = Path(__file__).resolve().parent / "addon-config.schema.json"
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
    data = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_schema_is_the_projects_own(schema: dict[str, Any]) -> None:
    assert SCHEMA.is_relative_to(REPO)
    assert "Supervisor" in schema["$comment"]
    assert "developers.home-assistant.io" in schema["$comment"]
    jsonschema.Draft7Validator.check_schema(schema)
    # The options this add-on relies on are described.
    for key in ("ports", "apparmor", "map", "discovery", "init", "schema", "options"):
        assert key in schema["properties"], key
    # A disabled host port (null) is valid, as the Supervisor documents.
    assert {"type": "null"} in schema["properties"]["ports"]["additionalProperties"]["anyOf"]


def test_nothing_reads_outside_the_repository() -> None:
    """tests/, scripts/ and .ci/ name no path beside the repository (no sibling folder
    such as the workplace's `shared`): a fresh clone has nothing there."""
    outside = re.compile(r"\.\./shared|parent\s*/\s*[\"']shared|\bREPO\.parent\b|/work/shared")
    found = []
    for name in repository_files():
        if name.split("/", 1)[0] not in {"tests", "scripts", ".ci"}:
            continue
        path = REPO / name
        if not path.is_file() or path.suffix in {".onnx", ".data", ".png"}:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        found += [f"{name}:{m.group(0)}" for m in outside.finditer(text) if path != THIS_FILE]
    assert not found, f"paths outside the repository: {found}"


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
    # Declared, but not published on the host: see test_api_port_not_on_the_lan_by_default.
    assert config["ports"] == {"8765/tcp": None}
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
    assert "exec s6-setuidgid hearth /opt/hearth/bin/hearth-worker --state-dir /data serve" in run
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


# --- hardening --------------------------------------------------------------------

APPARMOR = ADDON / "apparmor.txt"
WORKER_PROGRAM = "/opt/hearth/bin/hearth-worker"
# The Supervisor takes the one line starting with "profile " as the profile's name
# (supervisor/utils/apparmor.py, get_profile_name) and renames it to the add-on slug.
PROFILE_LINE = re.compile(r"^profile ([^ ]+).*$")


def _profile_blocks(text: str) -> dict[str, str]:
    """{profile name: its body} for the profiles in an AppArmor file (nested too)."""
    blocks: dict[str, str] = {}
    for match in re.finditer(r"^\s*profile\s+(\S+)[^{\n]*\{", text, re.MULTILINE):
        depth, start = 1, match.end()
        for index in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            if depth == 0:
                blocks[match.group(1)] = text[start:index]
                break
        else:
            pytest.fail(f"profile {match.group(1)} is not closed")
    return blocks


def _rules(body: str) -> list[str]:
    """A profile body's own rules (without nested profiles and comments)."""
    code = "\n".join(line for line in body.splitlines() if not line.strip().startswith("#"))
    flat = re.sub(
        r"^\s*profile\s+\S+[^{\n]*\{(?:[^{}]|\{[^{}]*\})*\}", "", code, flags=re.MULTILINE
    )
    return [line.strip().rstrip(",") for line in flat.splitlines() if line.strip()]


def test_apparmor_profile(config: dict[str, Any]) -> None:
    # Shipped beside config.yaml, and not switched off there ("apparmor: false").
    assert config.get("apparmor", True) is True
    text = APPARMOR.read_text(encoding="utf-8")
    assert text.startswith("#include <tunables/global>\n")
    assert text.count("{") == text.count("}")
    names = [m.group(1) for line in text.splitlines() if (m := PROFILE_LINE.match(line))]
    assert names == [config["slug"]], "exactly one top-level profile, named after the slug"
    blocks = _profile_blocks(text)
    assert set(blocks) == {"hearth", "hearth_worker"}
    for name in blocks:
        header = re.search(rf"profile {name}\b([^{{\n]*)\{{", text)
        assert header is not None
        assert "complain" not in header.group(1), "the profile must enforce"
    outer, worker = _rules(blocks["hearth"]), _rules(blocks["hearth_worker"])
    # The program the service runs switches to the worker's own profile.
    assert f"{WORKER_PROGRAM} cx -> hearth_worker" in outer
    run = (S6 / "hearth" / "run").read_text(encoding="utf-8")
    assert f"s6-setuidgid hearth {WORKER_PROGRAM} " in run
    wrapper = (ADDON / "rootfs" / "usr" / "local" / "bin" / "hearth-worker").read_text()
    assert f"exec /command/s6-setuidgid hearth {WORKER_PROGRAM} " in wrapper
    # The worker: no capabilities, no blanket file access, stops on s6's signals.
    assert not [r for r in worker if r.startswith("capability")], worker
    assert "file" not in worker
    assert "signal (receive) peer=*_hearth" in worker
    # Its state in /data (files it owns); its own models in /data/models, which it pulls
    # and removes (files it owns only); the share read-only.
    assert "owner /data/ rw" in worker
    assert "owner /data/{,.}* rwk" in worker
    assert "owner /data/models/ rw" in worker
    assert "owner /data/models/** rwkm" in worker
    assert not [r for r in worker if r.startswith("/data/models")], "models: owner rules only"
    share = [r for r in worker if r.startswith("/share")]
    assert share, "the share's models must be readable"
    for rule in share:
        assert set(rule.split()[-1]) <= {"r", "m"}, f"not read-only: {rule}"
    assert not [r for r in worker if r.startswith("/share") and "hearth" not in r]
    # The network it serves on.
    assert "network inet stream" in worker


def test_apparmor_profile_parses() -> None:
    """apparmor_parser accepts the profile (scripts/setup installs Debian's apparmor)."""
    parser = shutil.which("apparmor_parser") or shutil.which(
        "apparmor_parser", path="/usr/sbin:/sbin"
    )
    assert parser is not None, "no apparmor_parser: run scripts/setup (apt-get install apparmor)"
    done = subprocess.run(
        [parser, "--skip-kernel-load", "--skip-cache", "--quiet", str(APPARMOR)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_worker_runs_unprivileged() -> None:
    dockerfile = (ADDON / "Dockerfile").read_text(encoding="utf-8")
    joined = " ".join(dockerfile.replace("\\\n", " ").split())
    assert re.search(r"useradd --system --gid hearth [^&]*--shell \S+ hearth\b", joined)
    assert "groupadd --system hearth" in dockerfile
    # s6-overlay's init needs root; the service drops privileges in its run script.
    assert not re.search(r"^USER\b", dockerfile, re.MULTILINE)
    run = (S6 / "hearth" / "run").read_text(encoding="utf-8")
    lines = [line.strip() for line in run.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("exec "))
    assert lines[start].startswith("exec s6-setuidgid hearth "), lines[start]
    assert "hearth-worker" in lines[start]
    # /data (the worker's state) is handed to that user before the worker starts.
    chown = next(i for i, line in enumerate(lines) if line == "chown hearth:hearth /data")
    assert chown < start
    assert any("-exec chown -R hearth:hearth" in line for line in lines[chown:start])
    # `docker exec ... hearth-worker pair` goes through the wrapper, as the same user.
    wrapper = ADDON / "rootfs" / "usr" / "local" / "bin" / "hearth-worker"
    assert os.access(wrapper, os.X_OK)
    text = wrapper.read_text(encoding="utf-8")
    assert text.startswith("#!/bin/sh\n")
    assert 'if [ "$(id -u)" -eq 0 ]; then' in text
    assert "/usr/local/bin/hearth-worker" in dockerfile  # made executable
    assert "ENV PATH" not in dockerfile, "the venv stays off PATH: the wrapper is the command"


def test_api_port_not_on_the_lan_by_default(config: dict[str, Any]) -> None:
    """Home Assistant reaches the add-on on the internal network; the host port is off
    until the user sets one under Network."""
    assert config["ports"] == {"8765/tcp": None}
    assert set(config["ports_description"]) == set(config["ports"])
    assert "host_network" not in config
    translations = load_yaml(ADDON / "translations" / "en.yaml")
    assert "disabled" in translations["network"]["8765/tcp"].lower()
    docs = (ADDON / "DOCS.md").read_text(encoding="utf-8")
    assert "not published" in docs.lower()


def test_base_image_pinned(config: dict[str, Any]) -> None:
    build_from = load_yaml(ADDON / "build.yaml")["build_from"]
    tags = set()
    for arch, image in build_from.items():
        match = re.fullmatch(
            rf"ghcr\.io/home-assistant/{arch}-base-debian:(trixie-\d{{4}}\.\d{{2}}\.\d+)", image
        )
        assert match, f"{arch}: {image} is not a dated release tag"
        tags.add(match.group(1))
    assert len(tags) == 1, f"one base release for every arch: {tags}"


def _requirements() -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in (ADDON / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+!-]*)", line)
        assert match, f"addon/requirements.txt: not an exact pin: {raw!r}"
        pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def test_python_dependencies_pinned() -> None:
    pins = _requirements()
    with (ADDON / "pyproject.toml").open("rb") as handle:
        project = tomllib.load(handle)
    wanted = [
        *project["project"]["dependencies"],
        *project["build-system"]["requires"],
    ]
    for text in wanted:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not pinned in addon/requirements.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} does not satisfy pyproject.toml's {text!r}"
        )
    # What the pinned packages need is pinned too (as far as this environment knows them).
    environment = {"sys_platform": "linux", "platform_system": "Linux", "python_version": "3.13"}
    for name, version in pins.items():
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if dist.version != version:
            continue
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate({**environment, "extra": ""}):
                continue
            assert canonicalize_name(requirement.name) in pins, (
                f"{name} needs {requirement.name}, which addon/requirements.txt does not pin"
            )


def _needs(names: set[str], pins: dict[str, str]) -> set[str]:
    """`names` and every pinned package they need, as this environment knows them."""
    environment = {"sys_platform": "linux", "platform_system": "Linux", "python_version": "3.13"}
    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for text in importlib.metadata.distribution(name).requires or []:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate({**environment, "extra": ""}):
                continue
            if canonicalize_name(requirement.name) in pins:
                todo.append(canonicalize_name(requirement.name))
    return seen


def test_speech_adds_at_most_70_mb_of_python_packages() -> None:
    """Issue 12: speech grows the worker's image by at most ~70 MB of Python packages.
    Whisper runs on onnxruntime-genai and numpy, which chat already needs; the Piper
    voices need piper-tts (a child process, GPL: see addon/DOCS.md) and what it brings.
    What the add-on pins beyond the worker's own dependencies is speech's share, and
    its installed size here (the same wheels the image installs) is counted."""
    pins = _requirements()
    with (ADDON / "pyproject.toml").open("rb") as handle:
        project = tomllib.load(handle)
    base = _needs({Requirement(t).name for t in project["project"]["dependencies"]}, pins)
    extra = (
        set(pins)
        - base
        - {canonicalize_name(Requirement(t).name) for t in project["build-system"]["requires"]}
    )
    assert extra == _needs({"piper-tts"}, pins) - base, extra
    size = 0
    for name in extra:
        dist = importlib.metadata.distribution(name)
        assert dist.version == pins[name], f"{name}: this environment has {dist.version}"
        size += sum(Path(str(dist.locate_file(f))).stat().st_size for f in dist.files or [])
    assert size <= 70 * 1024 * 1024, f"speech's packages {sorted(extra)}: {size / 1e6:.1f} MB"


def test_dockerfile_installs_only_pinned_packages() -> None:
    dockerfile = (ADDON / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    assert re.search(r"^COPY requirements\.txt ", dockerfile, re.MULTILINE)
    installs = [
        " ".join(step.split())
        for line in dockerfile.splitlines()
        if line.startswith("RUN ")
        for step in line[4:].split("&&")
        if "pip install" in step
    ]
    assert len(installs) == 2, installs
    constraint = "PIP_CONSTRAINT=/usr/src/hearth/requirements.txt"
    for step in installs:
        assert step.startswith(constraint + " "), f"unconstrained: {step}"
        assert "--upgrade" not in step and " -U " not in step, step
        assert "-r /usr/src/hearth/requirements.txt" in step or "--no-deps" in step, step
    assert "--only-binary=:all:" in installs[0]
    assert installs[1].endswith("--no-deps /usr/src/hearth")
    assert "pip check" in dockerfile
