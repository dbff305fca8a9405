"""The checks a HACS and Home Assistant reviewer runs, as tests.

* ``hacs.json`` against HACS's own schema (hacs/integration, utils/validate.py).
* ``manifest.json`` as hassfest validates a custom integration: schema, key order
  (domain, name, then alphabetical), version, imports of other integrations.
* ``strings.json`` / ``translations/en.json``: en.json is strings.json with its
  ``[%key:...%]`` references resolved (custom integrations are served en.json as
  is); every config-flow step, error and abort, every entity translation key,
  exception, repair issue and action found in the code has its strings; hassfest's
  rules for translation values.
* ``icons.json`` covers the actions and the entity translation keys; the brand icon.

Everything is derived from the code (ast) and the files, not from a hand list,
so a new step, error, entity or action without strings fails here.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import homeassistant
import pytest
import voluptuous as vol
import yaml
from awesomeversion import AwesomeVersion, AwesomeVersionException, AwesomeVersionStrategy
from homeassistant.const import Platform
from homeassistant.core import HomeAssistant
from homeassistant.helpers import config_validation as cv
from homeassistant.helpers import entity_registry as er
from homeassistant.loader import async_get_integration
from homeassistant.setup import async_setup_component
from worker_process import WorkerProcess

from .conftest import entry_for, setup_entry

REPO = Path(__file__).resolve().parents[2]
COMPONENT = REPO / "custom_components" / "hearth"
HA_ROOT = Path(homeassistant.__file__).parent
DOMAIN = "hearth"
PUBLIC_URL = "https://github.com/hearth-assistant/hearth"


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def parse(name: str) -> ast.Module:
    return ast.parse((COMPONENT / name).read_text(encoding="utf-8"), filename=name)


def module(name: str) -> Any:
    package = "custom_components.hearth"
    return importlib.import_module(package if name == "__init__" else f"{package}.{name}")


def python_files() -> list[Path]:
    return sorted(COMPONENT.glob("*.py"))


STRINGS: dict[str, Any] = load_json(COMPONENT / "strings.json")
EN: dict[str, Any] = load_json(COMPONENT / "translations" / "en.json")
MANIFEST: dict[str, Any] = json.loads(
    (COMPONENT / "manifest.json").read_text(encoding="utf-8"),
    object_pairs_hook=dict,  # keeps the file's key order
)


# --- hacs.json -------------------------------------------------------------------

# HACS's schema (hacs/integration, custom_components/hacs/utils/validate.py).
HACS_LOCALES = {"NO", "SE", "DK", "FI", "DE", "GB", "US", "NL", "FR", "IT", "ES", "PL"}


def _country(values: Any) -> list[str]:
    countries = [values] if isinstance(values, str) else values
    if not isinstance(countries, list) or not all(isinstance(c, str) for c in countries):
        raise vol.Invalid(f"{values!r} is not a string or a list of strings")
    return [c.upper() for c in countries]


HACS_MANIFEST_JSON_SCHEMA = vol.Schema(
    {
        vol.Optional("content_in_root"): bool,
        vol.Optional("country"): _country,
        vol.Optional("filename"): str,
        vol.Optional("hacs"): vol.Coerce(AwesomeVersion),
        vol.Optional("hide_default_branch"): bool,
        vol.Optional("homeassistant"): vol.Coerce(AwesomeVersion),
        vol.Optional("persistent_directory"): str,
        vol.Optional("render_readme"): bool,
        vol.Optional("zip_release"): bool,
        vol.Required("name"): str,
    },
    extra=vol.PREVENT_EXTRA,
)
# What HACS requires of an integration's manifest.json.
HACS_INTEGRATION_MANIFEST_SCHEMA = vol.Schema(
    {
        vol.Required("codeowners"): list,
        vol.Required("documentation"): cv.url,
        vol.Required("domain"): str,
        vol.Required("issue_tracker"): cv.url,
        vol.Required("name"): str,
        vol.Required("version"): vol.Coerce(AwesomeVersion),
    },
    extra=vol.ALLOW_EXTRA,
)


def oldest_tested_ha() -> str:
    """The oldest Home Assistant the tests run against (the .venv leg's pin)."""
    pins = (REPO / "scripts" / "requirements" / "dev.txt").read_text(encoding="utf-8")
    match = re.search(r"^homeassistant==(\S+)$", pins, re.MULTILINE)
    assert match, "scripts/requirements/dev.txt pins no homeassistant"
    return match.group(1)


def test_hacs_json_validates() -> None:
    data = load_json(REPO / "hacs.json")
    HACS_MANIFEST_JSON_SCHEMA(data)
    assert not data.get("zip_release") or data.get("filename"), "zip_release needs filename"
    assert not data.get("content_in_root"), "the integration lives in custom_components/"
    # HACS manages one integration per repository: the first folder found.
    assert [p.name for p in (REPO / "custom_components").iterdir() if p.is_dir()] == [DOMAIN]


def test_hacs_minimum_is_the_tested_home_assistant() -> None:
    minimum = AwesomeVersion(load_json(REPO / "hacs.json")["homeassistant"])
    assert minimum == AwesomeVersion(oldest_tested_ha()), (
        "hacs.json's homeassistant minimum must be the oldest version the tests run on"
    )
    assert AwesomeVersion(homeassistant.const.__version__) >= minimum


def test_hacs_accepts_the_manifest() -> None:
    HACS_INTEGRATION_MANIFEST_SCHEMA(MANIFEST)


def test_repository_urls_agree() -> None:
    repository = yaml.safe_load((REPO / "repository.yaml").read_text(encoding="utf-8"))
    for key in ("name", "url", "maintainer"):
        assert isinstance(repository.get(key), str) and repository[key]
    assert repository["url"] == PUBLIC_URL
    assert MANIFEST["documentation"].startswith(PUBLIC_URL)
    assert MANIFEST["issue_tracker"] == f"{PUBLIC_URL}/issues"


# --- manifest.json like hassfest --------------------------------------------------


def _lowercase(value: str) -> str:
    if value.lower() != value:
        raise vol.Invalid("needs to be lowercase")
    return value


def _version(value: str) -> str:
    try:
        AwesomeVersion(
            value,
            ensure_strategy=[
                AwesomeVersionStrategy.CALVER,
                AwesomeVersionStrategy.SEMVER,
                AwesomeVersionStrategy.SIMPLEVER,
                AwesomeVersionStrategy.BUILDVER,
                AwesomeVersionStrategy.PEP440,
            ],
        )
    except AwesomeVersionException as err:
        raise vol.Invalid(f"{value!r} is not a valid version") from err
    return value


def _https(value: str) -> str:
    if not value.startswith("https://"):
        raise vol.Invalid("documentation url is not prefixed with https")
    return value


# hassfest's CUSTOM_INTEGRATION_MANIFEST_SCHEMA (script/hassfest/manifest.py), with the
# discovery matchers Hearth could use.
CUSTOM_INTEGRATION_MANIFEST_SCHEMA = vol.Schema(
    {
        vol.Required("domain"): str,
        vol.Required("name"): str,
        vol.Optional("integration_type"): vol.In(
            ["device", "entity", "hardware", "helper", "hub", "service", "system"]
        ),
        vol.Optional("config_flow"): bool,
        vol.Optional("zeroconf"): [
            vol.Any(
                str,
                vol.Schema(
                    {
                        vol.Required("type"): str,
                        vol.Optional("name"): vol.All(str, _lowercase),
                        vol.Optional("properties"): vol.Schema({str: _lowercase}),
                    }
                ),
            )
        ],
        vol.Optional("dhcp"): [dict],
        vol.Optional("ssdp"): [dict],
        vol.Optional("usb"): [dict],
        vol.Optional("bluetooth"): [dict],
        vol.Optional("homekit"): dict,
        vol.Optional("mqtt"): [str],
        vol.Required("documentation"): vol.All(cv.url, _https),
        vol.Optional("issue_tracker"): cv.url,
        vol.Optional("quality_scale"): vol.In(["bronze", "silver", "gold", "platinum"]),
        vol.Optional("requirements"): [str],
        vol.Optional("dependencies"): [str],
        vol.Optional("after_dependencies"): [str],
        vol.Required("codeowners"): [str],
        vol.Optional("loggers"): [str],
        vol.Optional("disabled"): str,
        vol.Optional("iot_class"): vol.In(
            [
                "assumed_state",
                "calculated",
                "cloud_polling",
                "cloud_push",
                "local_polling",
                "local_push",
            ]
        ),
        vol.Optional("single_config_entry"): bool,
        vol.Optional("version"): vol.All(str, _version),
        vol.Optional("import_executor"): bool,
    }
)


def test_manifest_validates_like_hassfest() -> None:
    CUSTOM_INTEGRATION_MANIFEST_SCHEMA(MANIFEST)
    assert MANIFEST["domain"] == COMPONENT.name
    assert not (HA_ROOT / "components" / DOMAIN).exists(), "domain collides with a core one"


def test_manifest_key_order() -> None:
    keys = list(MANIFEST)
    expected = ["domain", "name", *sorted(k for k in keys if k not in ("domain", "name"))]
    assert keys == expected, "hassfest: domain, name, then alphabetical order"


def test_manifest_has_what_hearth_needs() -> None:
    for key in (
        "codeowners",
        "dependencies",
        "documentation",
        "integration_type",
        "iot_class",
        "issue_tracker",
        "requirements",
        "version",
    ):
        assert key in MANIFEST, f"manifest.json lacks {key}"
    assert MANIFEST["config_flow"] is True
    assert MANIFEST["iot_class"] == "local_polling"  # the coordinator polls /v1/capacity
    assert MANIFEST["zeroconf"] == ["_hearth._tcp.local."]
    assert all(owner.startswith("@") for owner in MANIFEST["codeowners"])


def test_manifest_version_is_the_workers() -> None:
    """Integration and add-on ship from one repository, one release."""
    pyproject = (REPO / "addon" / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE)
    assert match
    assert MANIFEST["version"] == match.group(1)


def test_zeroconf_type_is_what_the_worker_advertises() -> None:
    from hearth_worker import discovery

    assert f"{MANIFEST['zeroconf'][0]}" in ast.unparse(
        ast.parse(Path(discovery.__file__).read_text(encoding="utf-8"))
    )


def _referenced_components() -> dict[str, set[str]]:
    """Other integrations the code imports (hassfest's dependencies check)."""
    found: dict[str, set[str]] = {}
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "homeassistant.components":
                    names = [alias.name for alias in node.names]
                elif node.module.startswith("homeassistant.components."):
                    names = [node.module.split(".")[2]]
            elif isinstance(node, ast.Import):
                names = [
                    alias.name.split(".")[2]
                    for alias in node.names
                    if alias.name.startswith("homeassistant.components.")
                ]
            elif (
                # importlib.import_module("homeassistant.components.x") and find_spec
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and (m := re.fullmatch(r"homeassistant\.components\.(\w+)", node.value))
            ):
                names = [m.group(1)]
            for name in names:
                found.setdefault(name, set()).add(path.name)
    return found


# hassfest's ALLOWED_USED_COMPONENTS besides the entity platforms.
HASSFEST_ALLOWED = {
    "alert",
    "automation",
    "conversation",
    "default_config",
    "device_automation",
    "frontend",
    "group",
    "homeassistant",
    "input_boolean",
    "input_button",
    "input_datetime",
    "input_number",
    "input_select",
    "input_text",
    "media_source",
    "onboarding",
    "panel_custom",
    "persistent_notification",
    "person",
    "script",
    "shopping_list",
    "sun",
    "system_health",
    "system_log",
    "timer",
    "webhook",
    "websocket_api",
    "zone",
}


def test_dependencies_cover_imported_components() -> None:
    dependencies = set(MANIFEST.get("dependencies", []))
    after = set(MANIFEST.get("after_dependencies", []))
    assert not dependencies & after, "a dependency is also an after_dependency"
    allowed = (
        dependencies
        | after
        | HASSFEST_ALLOWED
        | {p.value for p in Platform}
        | {"ai_task"}  # an entity platform (Platform.AI_TASK from 2025.8 on)
        | ({"zeroconf"} if "zeroconf" in MANIFEST else set())
    )
    missing = {
        name: sorted(files)
        for name, files in _referenced_components().items()
        if name not in allowed and not (COMPONENT / f"{name}.py").is_file()
    }
    assert not missing, f"imported but not in dependencies/after_dependencies: {missing}"
    for name in dependencies | after:
        assert (HA_ROOT / "components" / name).is_dir(), f"no integration {name}"


async def test_home_assistant_loads_the_manifest(hass: HomeAssistant) -> None:
    """Home Assistant refuses a custom integration without a valid version."""
    integration = await async_get_integration(hass, DOMAIN)
    assert not integration.is_built_in
    assert str(integration.version) == MANIFEST["version"]
    assert integration.config_flow is True
    assert integration.dependencies == MANIFEST["dependencies"]


# --- brand ------------------------------------------------------------------------


def test_brand_icon() -> None:
    data = (COMPONENT / "brand" / "icon.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) in {(256, 256), (512, 512)}, f"icon.png is {width}x{height}"
    for optional in ("icon@2x.png", "logo.png", "logo@2x.png"):
        path = COMPONENT / "brand" / optional
        if path.exists():
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- translations: the files ------------------------------------------------------

REFERENCE = re.compile(r"\[%key:([a-z0-9_]+(?:::[a-z0-9_]+)+)%\]")


def _lookup(tree: Any, parts: list[str]) -> Any:
    for part in parts:
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def resolve(value: str) -> str:
    """Replace `[%key:...%]` references as Home Assistant's translation build does."""

    def replace(match: re.Match[str]) -> str:
        parts = match.group(1).split("::")
        if parts[0] == "common":
            found = _lookup(load_json(HA_ROOT / "strings.json"), parts)
        elif parts[:2] == ["component", DOMAIN]:
            found = _lookup(STRINGS, parts[2:])
        elif parts[0] == "component":
            found = _lookup(
                load_json(HA_ROOT / "components" / parts[1] / "translations" / "en.json"),
                parts[2:],
            )
        else:
            found = None
        assert isinstance(found, str), f"unresolvable reference {match.group(0)}"
        return resolve(found)

    return REFERENCE.sub(replace, value)


def leaves(tree: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from leaves(value, f"{path}.{key}" if path else key)
    else:
        yield path, tree


def test_en_json_is_strings_json_resolved() -> None:
    """Custom integrations are served translations/en.json as is: it must be complete."""
    strings = dict(leaves(STRINGS))
    english = dict(leaves(EN))
    assert sorted(set(strings) - set(english)) == [], "keys missing from en.json"
    assert sorted(set(english) - set(strings)) == [], "keys in en.json, not in strings.json"
    differ = {k: (english[k], resolve(v)) for k, v in strings.items() if english[k] != resolve(v)}
    assert not differ, f"en.json differs from strings.json: {differ}"


PLACEHOLDER = re.compile(r"\{(\w+)\}")
URL = re.compile(r"https?://")


def test_translation_values_follow_hassfest_rules() -> None:
    bad = []
    for path, value in leaves(STRINGS):
        if not isinstance(value, str) or not value:
            bad.append(f"{path}: not a non-empty string")
            continue
        try:
            cv.string_with_no_html(value)
        except vol.Invalid:
            bad.append(f"{path}: contains HTML")
        if URL.search(value):
            bad.append(f"{path}: contains a URL (use a placeholder)")
        if re.search(r"'\{\w+\}'", value):
            bad.append(f"{path}: single-quoted placeholder")
        if value != value.strip(" "):
            bad.append(f"{path}: leading or trailing spaces")
    assert not bad, "\n".join(bad)


# --- translations: what the code uses ---------------------------------------------


def _call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ""


def _kw(node: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in node.keywords if k.arg == name), None)


def _str(node: ast.expr | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _str_values(node: ast.expr | None, path: Path) -> set[str]:
    """The strings an expression may be: a literal, either branch of `a if c else b`,
    a module constant or a local variable assigned one of those."""
    if node is None:
        return set()
    if (literal := _str(node)) is not None:
        return {literal}
    if isinstance(node, ast.IfExp):
        return _str_values(node.body, path) | _str_values(node.orelse, path)
    if isinstance(node, ast.Name):
        value = getattr(module(path.stem), node.id, None)
        if isinstance(value, str):
            return {value}
        # A local variable: whatever the file assigns to that name.
        found: set[str] = set()
        for assign in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(assign, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == node.id for t in assign.targets)
                and not isinstance(assign.value, ast.Name)
            ):
                found |= _str_values(assign.value, path)
        return found
    return set()


def _dict_keys(node: ast.expr | None) -> set[str] | None:
    """Literal keys of a dict display; None when it is not one."""
    if not isinstance(node, ast.Dict):
        return None
    return {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}


class FlowFacts:
    """What one flow handler class asks of strings.json."""

    def __init__(self, flow_module: Any, tree: ast.Module, cls: ast.ClassDef) -> None:
        self.steps: dict[str, set[str]] = {}  # step id -> schema keys
        self.placeholders: dict[str, set[str]] = {}  # step id -> description placeholders
        self.menus: dict[str, set[str]] = {}  # menu step id -> its options
        self.progress: dict[str, set[str]] = {}  # progress action -> placeholders
        self.abort_placeholders: dict[str, set[str]] = {}  # abort reason -> placeholders
        self.errors: set[str] = set()
        self.aborts: set[str] = set()
        self.title_placeholders: set[str] = set()
        schemas = self._module_schemas(flow_module, tree)
        for node in ast.walk(cls):
            if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef):
                self._method(flow_module, node, schemas)
            elif isinstance(node, ast.Assign):
                self._assign(node)
        for assign in tree.body:  # module-level error tables: FOO_ERRORS = {...}
            if (
                isinstance(assign, ast.Assign)
                and isinstance(assign.targets[0], ast.Name)
                and assign.targets[0].id.endswith("_ERRORS")
                and isinstance(assign.value, ast.Dict)
                and self._uses(cls, assign.targets[0].id)
            ):
                self.errors |= {v for v in map(_str, assign.value.values) if v}
                for call in ast.walk(cls):
                    if (
                        isinstance(call, ast.Call)
                        and isinstance(call.func, ast.Attribute)
                        and call.func.attr == "get"
                        and isinstance(call.func.value, ast.Name)
                        and call.func.value.id == assign.targets[0].id
                        and len(call.args) == 2
                        and (default := _str(call.args[1]))
                    ):
                        self.errors.add(default)

    @staticmethod
    def _uses(flow: ast.ClassDef, name: str) -> bool:
        return any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(flow))

    @staticmethod
    def _schema_keys(flow_module: Any, node: ast.AST) -> set[str]:
        keys: set[str] = set()
        for call in ast.walk(node):
            if (
                isinstance(call, ast.Call)
                and _call_name(call) in ("Required", "Optional")
                and call.args
            ):
                arg = call.args[0]
                if (literal := _str(arg)) is not None:
                    keys.add(literal)
                elif isinstance(arg, ast.Name):
                    keys.add(str(getattr(flow_module, arg.id)))
        return keys

    def _module_schemas(self, flow_module: Any, tree: ast.Module) -> dict[str, set[str]]:
        """Schema keys of module-level schemas and schema-building functions."""
        found: dict[str, set[str]] = {}
        for node in tree.body:
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                found[node.targets[0].id] = self._schema_keys(flow_module, node.value)
            elif isinstance(node, ast.FunctionDef):
                found[node.name] = self._schema_keys(flow_module, node)
        return {name: keys for name, keys in found.items() if keys}

    def _method(
        self,
        flow_module: Any,
        method: ast.AsyncFunctionDef | ast.FunctionDef,
        schemas: dict[str, set[str]],
    ) -> None:
        for node in ast.walk(method):
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            if name == "async_show_form":
                step = _str(_kw(node, "step_id"))
                assert step, f"{method.name}: async_show_form without a literal step_id"
                keys = self._schema_keys(flow_module, method)
                for ref in ast.walk(method):
                    if isinstance(ref, ast.Name) and ref.id in schemas:
                        keys |= schemas[ref.id]
                self.steps.setdefault(step, set()).update(keys)
                placeholders = _dict_keys(_kw(node, "description_placeholders"))
                self.placeholders.setdefault(step, set()).update(placeholders or set())
            elif name == "async_show_menu":
                step = _str(_kw(node, "step_id"))
                assert step, f"{method.name}: async_show_menu without a literal step_id"
                self.steps.setdefault(step, set())
                placeholders = _dict_keys(_kw(node, "description_placeholders"))
                self.placeholders.setdefault(step, set()).update(placeholders or set())
                options = self._list_strings(method, _kw(node, "menu_options"))
                assert options, f"{method.name}: menu options not found"
                self.menus.setdefault(step, set()).update(options)
            elif name == "async_show_progress":
                action = _str(_kw(node, "progress_action"))
                assert action, f"{method.name}: async_show_progress without a literal action"
                placeholders = _dict_keys(_kw(node, "description_placeholders")) or set()
                self.progress.setdefault(action, set()).update(placeholders)
                if step := _str(_kw(node, "step_id")):
                    self.steps.setdefault(step, set())
                    self.placeholders.setdefault(step, set()).update(placeholders)
            elif name in ("async_abort", "_abort_if_unique_id_mismatch"):
                reason = _str(_kw(node, "reason"))
                self.aborts.add(reason or "unique_id_mismatch")
                placeholders = _dict_keys(_kw(node, "description_placeholders")) or set()
                self.abort_placeholders.setdefault(reason or "", set()).update(placeholders)
            elif name == "_abort_if_unique_id_configured":
                self.aborts.add("already_configured")
            elif name == "async_set_unique_id":
                progress = _kw(node, "raise_on_progress")
                if not (isinstance(progress, ast.Constant) and progress.value is False):
                    self.aborts.add("already_in_progress")
            elif name == "async_update_reload_and_abort":
                reason = _str(_kw(node, "reason"))
                if reason is None:
                    kind = "reauth" if "reauth" in method.name else "reconfigure"
                    reason = f"{kind}_successful"
                self.aborts.add(reason)
        for node in ast.walk(method):
            if isinstance(node, ast.Dict):  # {"base": "cannot_connect"}
                for key, value in zip(node.keys, node.values, strict=True):
                    if key is not None and _str(key) == "base" and (error := _str(value)):
                        self.errors.add(error)

    @staticmethod
    def _list_strings(method: ast.AST, node: ast.expr | None) -> set[str]:
        """The strings of a list display, or of the lists a local name is given."""
        if isinstance(node, ast.List | ast.Tuple):
            return {v for v in map(_str, node.elts) if v}
        found: set[str] = set()
        if isinstance(node, ast.Name):
            for assign in ast.walk(method):
                if isinstance(assign, ast.Assign | ast.AugAssign):
                    targets = assign.targets if isinstance(assign, ast.Assign) else [assign.target]
                    if any(isinstance(t, ast.Name) and t.id == node.id for t in targets):
                        found |= FlowFacts._list_strings(method, assign.value)
        return found

    def _assign(self, node: ast.Assign) -> None:
        target = node.targets[0]
        if (
            isinstance(target, ast.Subscript)
            and isinstance(target.value, ast.Name)
            and target.value.id == "errors"
        ):
            # errors["base"] = "cannot_connect", or "a" if ... else "b"
            values = (
                [node.value.body, node.value.orelse]
                if isinstance(node.value, ast.IfExp)
                else [node.value]
            )
            self.errors |= {v for v in map(_str, values) if v}
        if (
            isinstance(target, ast.Subscript)
            and _str(target.slice) == "title_placeholders"
            and (keys := _dict_keys(node.value)) is not None
        ):
            self.title_placeholders |= keys


def flow_facts() -> dict[str, FlowFacts]:
    """{"config": ..., "options": ...} from config_flow.py's handler classes."""
    tree = parse("config_flow.py")
    flow_module = module("config_flow")
    found: dict[str, FlowFacts] = {}
    for cls in tree.body:
        if not isinstance(cls, ast.ClassDef):
            continue
        bases = {ast.unparse(base) for base in cls.bases}
        if any(b.endswith("OptionsFlow") or b.endswith("OptionsFlowWithReload") for b in bases):
            kind = "options"
        elif any(b.endswith("ConfigFlow") for b in bases):
            kind = "config"
        else:
            continue
        assert kind not in found, f"two {kind} flow handlers"
        found[kind] = FlowFacts(flow_module, tree, cls)
    assert set(found) == {"config", "options"}
    return found


@pytest.mark.parametrize("kind", ["config", "options"])
def test_flow_strings_cover_the_code(kind: str) -> None:
    facts = flow_facts()[kind]
    section = STRINGS[kind]
    assert facts.steps, "no steps found: the ast walk is broken"
    problems = []
    for step, keys in sorted(facts.steps.items()):
        strings = section["step"].get(step)
        if strings is None:
            problems.append(f"step {step}: no strings")
            continue
        if not strings.get("title") and not strings.get("description"):
            problems.append(f"step {step}: neither title nor description")
        data = strings.get("data", {})
        problems += [f"step {step}: field {k} has no label" for k in sorted(keys - set(data))]
        problems += [f"step {step}: label for unknown field {k}" for k in set(data) - keys]
        described = set(strings.get("data_description", {}))
        problems += [f"step {step}: description of unknown field {k}" for k in described - keys]
        used = set(PLACEHOLDER.findall(strings.get("title", "") + strings.get("description", "")))
        problems += [
            f"step {step}: placeholder {{{p}}} never given"
            for p in sorted(used - facts.placeholders[step])
        ]
    unused_steps = set(section["step"]) - set(facts.steps)
    problems += [f"strings for step {s}, which the code never shows" for s in unused_steps]
    errors = section.get("error", {})
    problems += [f"error {e}: no string" for e in sorted(facts.errors - set(errors))]
    problems += [f"error {e}: never raised" for e in sorted(set(errors) - facts.errors)]
    all_placeholders = set().union(*facts.placeholders.values())
    for error, text in errors.items():
        problems += [
            f"error {error}: placeholder {{{p}}} given by no step"
            for p in sorted(set(PLACEHOLDER.findall(text)) - all_placeholders)
        ]
    aborts = section.get("abort", {})
    problems += [f"abort {a}: no string" for a in sorted(facts.aborts - set(aborts))]
    problems += [f"abort {a}: never raised" for a in sorted(set(aborts) - facts.aborts)]
    for reason, text in aborts.items():
        given = facts.abort_placeholders.get(reason, set())
        problems += [
            f"abort {reason}: placeholder {{{p}}} never given"
            for p in sorted(set(PLACEHOLDER.findall(text)) - given)
        ]
    for step, options in sorted(facts.menus.items()):
        labels = set(section["step"].get(step, {}).get("menu_options", {}))
        problems += [f"menu {step}: option {o} has no label" for o in sorted(options - labels)]
        problems += [f"menu {step}: label for unknown option {o}" for o in labels - options]
    progress = section.get("progress", {})
    problems += [f"progress {a}: no string" for a in sorted(set(facts.progress) - set(progress))]
    problems += [f"progress {a}: never shown" for a in sorted(set(progress) - set(facts.progress))]
    for action, text in progress.items():
        problems += [
            f"progress {action}: placeholder {{{p}}} never given"
            for p in sorted(set(PLACEHOLDER.findall(text)) - facts.progress.get(action, set()))
        ]
    if title := section.get("flow_title"):
        problems += [
            f"flow_title placeholder {{{p}}} never set"
            for p in sorted(set(PLACEHOLDER.findall(title)) - facts.title_placeholders)
        ]
    assert not problems, "\n".join(problems)


def test_flow_ast_walk_finds_the_known_paths() -> None:
    """Guards the walk above against finding nothing (a weak check passing silently)."""
    config = flow_facts()["config"]
    assert {"user", "pair", "reauth_confirm", "reconfigure", "hassio_confirm"} <= set(config.steps)
    assert {"host", "port"} <= config.steps["user"]
    assert {"code"} <= config.steps["pair"]
    assert {"cannot_connect", "wrong_code", "rate_limited"} <= config.errors
    assert {"already_configured", "reauth_successful", "wrong_worker"} <= config.aborts
    options = flow_facts()["options"]
    assert "init" in options.steps
    assert {"household", "worker", "add_model", "remove_model"} <= options.menus["init"]
    assert {"household", "worker", "add_model", "pull", "remove_model"} <= set(options.steps)
    assert "pull" in options.progress
    assert {"unknown_repo", "no_space", "pull_failed", "pull_lost"} <= options.errors
    assert {"model_added", "model_removed"} <= options.aborts


def translated_exceptions() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(exceptions, repair issues): translation key -> placeholder keys given in the code."""
    exceptions: dict[str, set[str]] = {}
    issues: dict[str, set[str]] = {}
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            given = _dict_keys(_kw(node, "translation_placeholders")) or set()
            for key in _str_values(_kw(node, "translation_key"), path):
                if _call_name(node) == "async_create_issue":
                    issues.setdefault(key, set()).update(given)
                elif _kw(node, "translation_domain") is not None:
                    exceptions.setdefault(key, set()).update(given)
    return exceptions, issues


def test_exceptions_and_issues_have_strings() -> None:
    exceptions, issues = translated_exceptions()
    assert "no_worker" in exceptions and "worker_unreachable" in issues  # the walk works
    problems = []
    for section, used, field in (
        ("exceptions", exceptions, "message"),
        ("issues", issues, "title"),
        ("issues", issues, "description"),
    ):
        strings = STRINGS.get(section, {})
        for key, given in sorted(used.items()):
            text = strings.get(key, {}).get(field)
            if not text:
                problems.append(f"{section}.{key}.{field}: missing")
                continue
            needed = set(PLACEHOLDER.findall(text))
            problems += [f"{section}.{key}: {{{p}}} not given" for p in sorted(needed - given)]
        problems += [f"{section}.{k}: never raised" for k in sorted(set(strings) - set(used))]
    assert not problems, "\n".join(problems)


def static_entity_keys() -> dict[str, set[str]]:
    """Platform -> translation keys the platform modules give their entities."""
    entity_py = ast.unparse(parse("entity.py"))
    # The worker entities' convention: the key is the translation key.
    assert "self._attr_translation_key = key" in entity_py
    platforms = {p.value for p in Platform} | {"ai_task"}
    found: dict[str, set[str]] = {}
    for path in python_files():
        if path.stem not in platforms:
            continue
        keys = found.setdefault(path.stem, set())
        tree = ast.parse(path.read_text(encoding="utf-8"))
        worker_classes = {
            cls.name
            for cls in ast.walk(tree)
            if isinstance(cls, ast.ClassDef)
            and any(ast.unparse(b) == "HearthWorkerEntity" for b in cls.bases)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = _call_name(node)
                if (key := _str(_kw(node, "translation_key"))) and _kw(
                    node, "translation_domain"
                ) is None:
                    keys.add(key)
                # Worker entities: the description's key is the translation key.
                is_description = name.endswith("Description") and _kw(node, "key") is not None
                if (
                    is_description
                    and (key := _str(_kw(node, "key")))
                    and _kw(node, "translation_key") is None
                ):
                    keys.add(key)
                if name in worker_classes and len(node.args) > 1 and (key := _str(node.args[1])):
                    keys.add(key)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    if (
                        isinstance(target, ast.Name | ast.Attribute)
                        and ast.unparse(target).endswith("_attr_translation_key")
                        and (key := _str(node.value))
                    ):
                        keys.add(key)
    return {platform: keys for platform, keys in found.items() if keys}


def test_entity_strings_cover_the_code() -> None:
    used = static_entity_keys()
    assert used.get("sensor") and used.get("binary_sensor")  # the walk works
    strings = STRINGS.get("entity", {})
    problems = [
        f"entity.{platform}.{key}: no name"
        for platform, keys in sorted(used.items())
        for key in sorted(keys)
        if not strings.get(platform, {}).get(key, {}).get("name")
    ]
    problems += [
        f"entity.{platform}.{key}: no entity uses it"
        for platform, keys in strings.items()
        for key in keys
        if key not in used.get(platform, set())
    ]
    assert not problems, "\n".join(problems)


async def registered_services(hass: HomeAssistant) -> dict[str, Any]:
    """Action name -> its voluptuous schema, as Home Assistant holds them once Hearth is set up."""
    assert await async_setup_component(hass, DOMAIN, {})
    services = hass.services.async_services_for_domain(DOMAIN)
    assert services, "Hearth registered no actions"
    return {name: service.schema for name, service in services.items()}


def yaml_fields(description: dict[str, Any] | None) -> set[str]:
    """Field names of one services.yaml entry (fields inside sections included)."""
    found: set[str] = set()
    for name, field in ((description or {}).get("fields") or {}).items():
        if isinstance(field, dict) and "fields" in field:  # a collapsible section
            found |= set(field["fields"])
        else:
            found.add(name)
    return found


async def test_services_yaml_and_strings_cover_every_action(hass: HomeAssistant) -> None:
    services = await registered_services(hass)
    assert "ask" in services
    described = yaml.safe_load((COMPONENT / "services.yaml").read_text(encoding="utf-8"))
    assert set(described) == set(services), "services.yaml vs. registered actions"
    strings = STRINGS["services"]
    assert set(strings) == set(services), "strings.json services vs. registered actions"
    problems = []
    for name, schema in sorted(services.items()):
        fields = yaml_fields(described[name])
        if isinstance(schema, vol.Schema) and isinstance(schema.schema, dict):
            in_schema = {str(key) for key in schema.schema}
            if fields != in_schema:
                problems.append(f"{name}: services.yaml fields {fields} != schema {in_schema}")
        if not (strings[name].get("name") and strings[name].get("description")):
            problems.append(f"{name}: no name or description")
        described_fields = set(strings[name].get("fields", {}))
        if described_fields != fields:
            problems.append(f"{name}: field strings {described_fields} != fields {fields}")
        for field, text in strings[name].get("fields", {}).items():
            if not (text.get("name") and text.get("description")):
                problems.append(f"{name}.{field}: no name or description")
    assert not problems, "\n".join(problems)


ICON = re.compile(r"mdi:[a-z0-9]+(?:-[a-z0-9]+)*")


async def test_icons_cover_actions_and_entities(hass: HomeAssistant) -> None:
    icons = load_json(COMPONENT / "icons.json")
    assert set(icons.get("services", {})) == set(await registered_services(hass))
    for name, icon in icons["services"].items():
        assert ICON.fullmatch(icon["service"]), f"services.{name}"
    entity_strings = STRINGS.get("entity", {})
    entity_icons = icons.get("entity", {})
    assert {p: set(k) for p, k in entity_icons.items()} == {
        p: set(k) for p, k in entity_strings.items()
    }, "icons.json entity keys vs. strings.json"
    for platform, keys in entity_icons.items():
        for key, icon in keys.items():
            assert set(icon) <= {"default", "state", "range", "state_attributes"}
            assert ICON.fullmatch(icon["default"]), f"{platform}.{key}"
            for state_icon in (icon.get("state") or {}).values():
                assert ICON.fullmatch(state_icon), f"{platform}.{key}"


async def test_loaded_entities_have_strings_and_icons(
    hass: HomeAssistant, chat_worker: WorkerProcess
) -> None:
    """The entities a real worker entry creates: every translation key is translated."""
    entry = entry_for(chat_worker)
    await setup_entry(hass, entry)
    icons = load_json(COMPONENT / "icons.json")
    registry = er.async_get(hass)
    entities = [e for e in registry.entities.values() if e.platform == DOMAIN]
    assert len(entities) >= 6
    keyed = [e for e in entities if e.translation_key]
    assert {e.translation_key for e in keyed} >= static_entity_keys()["sensor"]
    for entity in keyed:
        platform = entity.domain
        assert STRINGS["entity"][platform][entity.translation_key]["name"], entity.entity_id
        assert icons["entity"][platform][entity.translation_key], entity.entity_id
        state = hass.states.get(entity.entity_id)
        assert state is not None
        assert state.attributes.get("friendly_name", "").endswith(
            STRINGS["entity"][platform][entity.translation_key]["name"]
        )
    assert await hass.config_entries.async_unload(entry.entry_id)


# --- user documentation -------------------------------------------------------------

GUIDE = REPO / "docs" / "USER_GUIDE.md"


def _serve_flags() -> set[str]:
    """Every option of `hearth-worker serve` and the top-level command, from its parser."""
    import argparse

    from hearth_worker import cli

    parser = cli._parser()
    flags = {f for action in parser._actions for f in action.option_strings}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            flags |= {
                f for sub in action.choices.values() for a in sub._actions for f in a.option_strings
            }
    return flags - {"-h", "--help", "--version"}


def test_user_guide_documents_every_option() -> None:
    """Each set-up field, option and worker flag in the code has its line in the guide."""
    guide = GUIDE.read_text(encoding="utf-8")
    missing = [f"worker flag {flag}" for flag in sorted(_serve_flags()) if f"`{flag}" not in guide]
    for kind, facts in flow_facts().items():
        for step, keys in facts.steps.items():
            labels = STRINGS[kind]["step"].get(step, {}).get("data", {})
            missing += [
                f"{kind} step {step}: {labels.get(key, key)}"
                for key in sorted(keys)
                if f"**{labels.get(key, key)}**" not in guide
            ]
    assert not missing, "docs/USER_GUIDE.md does not describe:\n" + "\n".join(missing)


def test_quality_scale_docs_rules_point_at_the_guide() -> None:
    """A docs-* rule marked done names a section of the guide that exists."""
    rules = yaml.safe_load((COMPONENT / "quality_scale.yaml").read_text(encoding="utf-8"))["rules"]
    text = (COMPONENT / "quality_scale.yaml").read_text(encoding="utf-8")
    headings = set(re.findall(r"^#+ (.+)$", GUIDE.read_text(encoding="utf-8"), re.MULTILINE))
    for rule, value in rules.items():
        status = value["status"] if isinstance(value, dict) else value
        assert status in ("done", "todo", "exempt"), rule
        if not rule.startswith("docs-") or status != "done":
            continue
        line = next(line for line in text.splitlines() if line.strip().startswith(f"{rule}:"))
        sections = re.findall(r'"([^"]+)"', line)
        assert "docs/USER_GUIDE.md" in line and sections, f"{rule}: which section?"
        for section in sections:
            if section in ("hearth.ask",):
                continue
            assert any(section in heading for heading in headings), f"{rule}: no {section!r}"
