"""Config flow: zeroconf, Supervisor (add-on) discovery, manual host/port; reauth, reconfigure.

Every pairing pins the worker's certificate (entry data `fingerprint`), proven by
the pairing exchange (client.py). Plain HTTP and addresses outside the home network
are explicit options of the manual step, off by default.
"""

from __future__ import annotations

import asyncio
import hmac
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import voluptuous as vol
from homeassistant.config_entries import (
    ConfigEntry,
    ConfigEntryState,
    ConfigFlow,
    ConfigFlowResult,
    OptionsFlow,
)
from homeassistant.const import CONF_HOST, CONF_PORT, CONF_TOKEN
from homeassistant.core import HomeAssistant, callback
from homeassistant.helpers import llm
from homeassistant.helpers import selector as sel
from homeassistant.helpers.aiohttp_client import async_get_clientsession
from homeassistant.helpers.service_info.hassio import HassioServiceInfo
from homeassistant.helpers.service_info.zeroconf import ZeroconfServiceInfo

from . import HearthRuntimeData
from .client import HearthClient
from .const import (
    CLIENT_NAME,
    CONF_ADDON,
    CONF_ALLOW_PUBLIC,
    CONF_CHAT_MODEL,
    CONF_CODE,
    CONF_EMBEDDING_MODEL,
    CONF_FINGERPRINT,
    CONF_LLM_HASS_API,
    CONF_MAX_TOKENS,
    CONF_NODE_ID,
    CONF_NOT_ON_BATTERY,
    CONF_ONLY_WHEN_IDLE,
    CONF_PLAIN_HTTP,
    CONF_PROMPT,
    CONF_TEMPERATURE,
    CONF_TOKEN_ID,
    DEFAULT_PORT,
    DOMAIN,
    HOUSEHOLD_API_ID,
    LOGGER,
)
from .coordinator import addon_url
from .household import Household
from .worker_api import (
    PULL_DONE,
    CatalogEntry,
    HearthAddressError,
    HearthAdminRequiredError,
    HearthAuthError,
    HearthCertificateError,
    HearthConnectionError,
    HearthError,
    HearthPairingError,
    HearthRequestError,
    PairResult,
    PullJob,
    WorkerInfo,
)

PAIRING_ERRORS = {
    "wrong_code": "wrong_code",
    "expired": "expired_code",
    "no_code": "no_code",
    "rate_limited": "rate_limited",
    "not_proven": "not_proven",
}

CODE_SCHEMA = vol.Schema({vol.Required(CONF_CODE): sel.TextSelector()})


def _host_schema(host: str = "", port: int = DEFAULT_PORT) -> vol.Schema:
    return vol.Schema(
        {
            vol.Required(CONF_HOST, default=host): sel.TextSelector(),
            vol.Required(CONF_PORT, default=port): vol.All(
                sel.NumberSelector(
                    sel.NumberSelectorConfig(min=1, max=65535, mode=sel.NumberSelectorMode.BOX)
                ),
                vol.Coerce(int),
            ),
        }
    )


def _manual_schema() -> vol.Schema:
    """Host and port, and the explicit transport opt-outs, off by default (PRIVACY.md)."""
    return vol.Schema(
        {
            vol.Required(CONF_HOST, default=""): sel.TextSelector(),
            vol.Required(CONF_PORT, default=DEFAULT_PORT): vol.All(
                sel.NumberSelector(
                    sel.NumberSelectorConfig(min=1, max=65535, mode=sel.NumberSelectorMode.BOX)
                ),
                vol.Coerce(int),
            ),
            vol.Optional(CONF_PLAIN_HTTP, default=False): sel.BooleanSelector(),
            vol.Optional(CONF_ALLOW_PUBLIC, default=False): sel.BooleanSelector(),
        }
    )


class HearthConfigFlow(ConfigFlow, domain=DOMAIN):
    """Pair Home Assistant with a Hearth worker."""

    VERSION = 1

    def __init__(self) -> None:
        self._host = ""
        self._port = DEFAULT_PORT
        self._name: str | None = None
        self._hassio: dict[str, Any] | None = None
        self._slug = ""  # the add-on's, from the Supervisor's discovery
        self._plain_http = False
        self._allow_public = False

    @staticmethod
    @callback
    def async_get_options_flow(config_entry: ConfigEntry) -> HearthOptionsFlow:
        return HearthOptionsFlow()

    def _client(self, token: str | None = None, fingerprint: str | None = None) -> HearthClient:
        return HearthClient(
            async_get_clientsession(self.hass),
            self._host,
            self._port,
            token,
            fingerprint=fingerprint,
            plain_http=self._plain_http,
            allow_public=self._allow_public,
        )

    def _transport(self, data: Mapping[str, Any]) -> None:
        self._plain_http = bool(data.get(CONF_PLAIN_HTTP, False))
        self._allow_public = bool(data.get(CONF_ALLOW_PUBLIC, False))

    async def _async_pair(self, code: str) -> tuple[PairResult | None, dict[str, str], str]:
        """Pair; returns (result, errors, retry-after text)."""
        try:
            return await self._client().pair(code.strip(), CLIENT_NAME), {}, ""
        except HearthPairingError as err:
            retry = str(round(err.retry_after)) if err.retry_after else "60"
            return None, {"base": PAIRING_ERRORS.get(err.reason, "wrong_code")}, retry
        except HearthAddressError:
            return None, {"base": "address_not_allowed"}, ""
        except HearthConnectionError:
            return None, {"base": "cannot_connect"}, ""
        except Exception:
            LOGGER.exception("Unexpected error while pairing")
            return None, {"base": "unknown"}, ""

    def _entry_data(self, paired: PairResult) -> dict[str, Any]:
        return {
            CONF_HOST: self._host,
            CONF_PORT: self._port,
            CONF_TOKEN: paired.token,
            CONF_TOKEN_ID: paired.token_id,
            CONF_NODE_ID: paired.node_id,
            CONF_FINGERPRINT: paired.fingerprint,
            CONF_PLAIN_HTTP: self._plain_http,
            CONF_ALLOW_PUBLIC: self._allow_public,
        }

    async def _async_revoke(self, paired: PairResult) -> None:
        """Give back a token pairing just made and the flow does not keep."""
        try:
            await self._client(paired.token, paired.fingerprint).revoke_token()
        except HearthError as err:
            LOGGER.debug("Could not revoke the token of %s: %s", paired.node_id, err)

    async def _async_title(self, paired: PairResult, fallback: str) -> str:
        try:
            info = await self._client(paired.token, paired.fingerprint).info()
        except HearthError:
            return fallback
        return info.name

    # --- manual -------------------------------------------------------------

    async def async_step_user(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        errors: dict[str, str] = {}
        if user_input is not None:
            self._host = str(user_input[CONF_HOST]).strip()
            self._port = int(user_input[CONF_PORT])
            self._transport(user_input)
            try:
                await self._client().health()
            except HearthAddressError:
                errors["base"] = "address_not_allowed"
            except HearthError:
                errors["base"] = "cannot_connect"
            else:
                return await self.async_step_pair()
        return self.async_show_form(
            step_id="user",
            data_schema=self.add_suggested_values_to_schema(
                _manual_schema(),
                {
                    CONF_HOST: self._host,
                    CONF_PORT: self._port,
                    CONF_PLAIN_HTTP: self._plain_http,
                    CONF_ALLOW_PUBLIC: self._allow_public,
                },
            ),
            errors=errors,
        )

    async def async_step_pair(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Ask for the pairing code the worker shows (`hearth-worker pair`)."""
        errors: dict[str, str] = {}
        retry = ""
        if user_input is not None:
            paired, errors, retry = await self._async_pair(user_input[CONF_CODE])
            if paired is not None:
                await self.async_set_unique_id(paired.node_id, raise_on_progress=False)
                data = self._entry_data(paired)
                self._abort_if_unique_id_configured(updates=data)
                title = await self._async_title(paired, self._name or self._host)
                return self.async_create_entry(title=title, data=data)
        return self.async_show_form(
            step_id="pair",
            data_schema=CODE_SCHEMA,
            errors=errors,
            description_placeholders={
                "url": self._client().base_url,
                "name": self._name or self._host,
                "retry_after": retry,
            },
        )

    # --- zeroconf -----------------------------------------------------------

    async def async_step_zeroconf(self, discovery_info: ZeroconfServiceInfo) -> ConfigFlowResult:
        properties = discovery_info.properties
        node_id = properties.get("id")
        if not node_id:
            return self.async_abort(reason="not_hearth")
        self._host = str(discovery_info.host)
        self._port = int(discovery_info.port or DEFAULT_PORT)
        self._name = discovery_info.name.split(".", 1)[0] or self._host
        if entry := await self.async_set_unique_id(node_id):
            await self._async_rediscovered(entry)
        if properties.get("scheme", "https") != "https":
            # Never a silent downgrade: plain HTTP only when set up by hand with that option.
            return self.async_abort(reason="plain_http_discovered")
        self.context["title_placeholders"] = {"name": self._name}
        return await self.async_step_pair()

    async def _async_rediscovered(self, entry: ConfigEntry) -> None:
        """A paired worker announced itself: poll it now; follow it if it moved.

        The announcement is unauthenticated (anyone can send one with any `id`): the
        entry takes the new address only if the worker there presents the pinned
        certificate (the TLS handshake proves it holds its key). Always aborts.
        """
        updates: dict[str, Any] | None = None
        if (entry.data[CONF_HOST], entry.data[CONF_PORT]) == (self._host, self._port):
            if entry.state is ConfigEntryState.LOADED:
                entry.runtime_data.coordinator.async_poll_now()
        elif await self._async_presents_pin(entry):
            updates = {CONF_HOST: self._host, CONF_PORT: self._port}
        else:
            LOGGER.debug(
                "Ignoring an announcement of %s at %s:%s: not the paired certificate there",
                entry.title,
                self._host,
                self._port,
            )
        # Also reloads an entry waiting to retry its set-up (Home Assistant does that).
        self._abort_if_unique_id_configured(updates=updates)

    async def _async_presents_pin(self, entry: ConfigEntry) -> bool:
        """Whether the worker at the announced address presents the entry's certificate."""
        pinned = entry.data.get(CONF_FINGERPRINT)
        if not pinned or entry.data.get(CONF_PLAIN_HTTP):
            return False  # nothing to check against: only a new pairing moves it
        self._allow_public = bool(entry.data.get(CONF_ALLOW_PUBLIC, False))
        try:
            seen = await self._client().peer_fingerprint()
        except HearthError:
            return False
        return hmac.compare_digest(seen, str(pinned))

    # --- Supervisor add-on --------------------------------------------------

    async def async_step_hassio(self, discovery_info: HassioServiceInfo) -> ConfigFlowResult:
        config = discovery_info.config
        # The Supervisor channel is trusted: the add-on hands over its token and the
        # certificate to pin ("scheme": "http" only when its plain_http option is on).
        try:
            self._host = str(config["host"])
            self._port = int(config["port"])
            self._plain_http = config.get("scheme") == "http"
            fingerprint = None if self._plain_http else bytes.fromhex(config["fingerprint"]).hex()
            self._hassio = {
                "token": str(config["token"]),
                "node_id": str(config["node_id"]),
                "fingerprint": fingerprint,
            }
        except (KeyError, TypeError, ValueError):
            return self.async_abort(reason="not_hearth")
        self._name = discovery_info.name
        self._slug = discovery_info.slug
        await self.async_set_unique_id(self._hassio["node_id"])
        self._abort_if_unique_id_configured(
            updates={
                CONF_HOST: self._host,
                CONF_PORT: self._port,
                CONF_TOKEN: self._hassio["token"],
                CONF_FINGERPRINT: fingerprint,
                CONF_PLAIN_HTTP: self._plain_http,
                CONF_ADDON: self._slug,
            }
        )
        self.context["title_placeholders"] = {"name": self._name}
        # The discovery card links the add-on's page, as core's wyoming does.
        self.context["configuration_url"] = addon_url(self._slug)
        return await self.async_step_hassio_confirm()

    async def async_step_hassio_confirm(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        assert self._hassio is not None
        if user_input is None:
            return self.async_show_form(
                step_id="hassio_confirm", description_placeholders={"name": str(self._name)}
            )
        try:
            info = await self._client(self._hassio["token"], self._hassio["fingerprint"]).info()
        except HearthAuthError:
            return self.async_abort(reason="invalid_auth")
        except HearthError:
            return self.async_abort(reason="cannot_connect")
        if info.node_id != self._hassio["node_id"]:
            # The add-on announced one worker and another answers at its address.
            return self.async_abort(
                reason="wrong_worker",
                description_placeholders={
                    "name": str(self._name),
                    "expected_id": self._hassio["node_id"],
                    "answered": info.name,
                    "answered_id": info.node_id,
                    "url": self._client().base_url,
                },
            )
        return self.async_create_entry(
            title=info.name,
            data={
                CONF_HOST: self._host,
                CONF_PORT: self._port,
                CONF_TOKEN: self._hassio["token"],
                CONF_TOKEN_ID: None,
                CONF_NODE_ID: info.node_id,
                CONF_FINGERPRINT: self._hassio["fingerprint"],
                CONF_PLAIN_HTTP: self._plain_http,
                CONF_ADDON: self._slug,
            },
        )

    # --- reauth -------------------------------------------------------------

    async def async_step_reauth(self, entry_data: Mapping[str, Any]) -> ConfigFlowResult:
        self._host = entry_data[CONF_HOST]
        self._port = entry_data[CONF_PORT]
        self._transport(entry_data)
        return await self.async_step_reauth_confirm()

    async def async_step_reauth_confirm(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """The token was rejected: pair again with a new code."""
        entry = self._get_reauth_entry()
        errors: dict[str, str] = {}
        retry = ""
        if user_input is not None:
            paired, errors, retry = await self._async_pair(user_input[CONF_CODE])
            if paired is not None and paired.node_id != entry.unique_id:
                # Another worker took the code: say which; its new token is not kept.
                answered = await self._async_title(paired, paired.node_id)
                await self._async_revoke(paired)
                return self.async_abort(
                    reason="wrong_worker",
                    description_placeholders={
                        "name": entry.title,
                        "expected_id": str(entry.unique_id),
                        "answered": answered,
                        "answered_id": paired.node_id,
                        "url": self._client().base_url,
                    },
                )
            if paired is not None:
                return self.async_update_reload_and_abort(
                    entry, data_updates=self._entry_data(paired)
                )
        return self.async_show_form(
            step_id="reauth_confirm",
            data_schema=CODE_SCHEMA,
            errors=errors,
            description_placeholders={
                "name": entry.title,
                "url": self._client().base_url,
                "retry_after": retry,
            },
        )

    # --- reconfigure --------------------------------------------------------

    async def async_step_reconfigure(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Point the entry at the worker's new address."""
        entry = self._get_reconfigure_entry()
        errors: dict[str, str] = {}
        if user_input is not None:
            self._host = str(user_input[CONF_HOST]).strip()
            self._port = int(user_input[CONF_PORT])
            self._transport(entry.data)
            info: WorkerInfo | None = None
            try:
                client = self._client(entry.data[CONF_TOKEN], entry.data.get(CONF_FINGERPRINT))
                info = await client.info()
            except HearthCertificateError:
                errors["base"] = "certificate_mismatch"
            except HearthAuthError:
                errors["base"] = "invalid_auth"
            except HearthAddressError:
                errors["base"] = "address_not_allowed"
            except HearthError:
                errors["base"] = "cannot_connect"
            if info is not None and info.node_id != entry.unique_id:
                return self.async_abort(
                    reason="wrong_worker",
                    description_placeholders={
                        "name": entry.title,
                        "expected_id": str(entry.unique_id),
                        "answered": info.name,
                        "answered_id": info.node_id,
                        "url": self._client().base_url,
                    },
                )
            if info is not None:
                return self.async_update_reload_and_abort(
                    entry, data_updates={CONF_HOST: self._host, CONF_PORT: self._port}
                )
        return self.async_show_form(
            step_id="reconfigure",
            data_schema=self.add_suggested_values_to_schema(
                _host_schema(),
                user_input or {CONF_HOST: entry.data[CONF_HOST], CONF_PORT: entry.data[CONF_PORT]},
            ),
            errors=errors,
        )


WORKER_FLAGS = (CONF_ONLY_WHEN_IDLE, CONF_NOT_ON_BATTERY)
# Household settings the form may leave empty: cleared when left empty.
CLEARABLE_SETTINGS = (CONF_PROMPT, CONF_CHAT_MODEL, CONF_EMBEDDING_MODEL)

# Fields of "Add a model" and "Remove a model".
CONF_MODEL = "model"
CONF_SOURCE = "source"

# How often the progress step asks the worker how its download goes, and how long the
# worker may not answer (a restart) before the flow gives up on it (seconds).
PULL_POLL_INTERVAL = 1.0
PULL_UNREACHABLE_FOR = 60.0

# A failed pull's code (the worker's, MODELS_API.md) -> the add form's error.
PULL_ERRORS = {
    "unknown_repo": "unknown_repo",
    "unknown_subfolder": "unknown_subfolder",
    "not_a_model": "not_a_model",
    "no_space": "no_space",
    "network": "network",
    "corrupt": "corrupt",
    "cancelled": "cancelled",
}
# A refused removal's code -> the remove form's error.
REMOVE_ERRORS = {"model_not_removable": "model_not_removable"}

# owner/name[:sub/folder], as the Hugging Face hub names repositories.
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_SOURCE = re.compile(rf"(?P<repo>{_REPO_PART}/{_REPO_PART})(?::(?P<sub>[^:\\]+))?")


def valid_source(source: str) -> bool:
    """Whether `source` reads as `owner/name` or `owner/name:sub/folder`."""
    match = _SOURCE.fullmatch(source)
    if match is None or ".." in match["repo"] or "--" in match["repo"]:
        return False
    sub = (match["sub"] or "").strip("/")
    if not sub:
        return match["sub"] is None
    parts = sub.split("/")
    return all(part.strip() and part not in (".", "..") for part in parts)


def filter_invalid_llm_apis(hass: HomeAssistant, selected: Iterable[str] | None) -> list[str]:
    """The chosen LLM API ids that Home Assistant still has, in their order (as core's
    ollama config flow: an API whose integration was removed is neither shown nor kept)."""
    if isinstance(selected, str):  # one id, as older settings may hold it
        selected = [selected]
    valid = {api.id for api in llm.async_get_apis(hass) if api.id != HOUSEHOLD_API_ID}
    return [api for api in selected or () if api in valid]


def _no_percentage(fraction: float) -> None:
    """Home Assistant 2025.4 shows no percentage while a step is in progress."""


def _size(size_bytes: int) -> str:
    """A size a person reads at a glance: 2.3 GB, 640 MB."""
    if size_bytes >= 10**9:
        return f"{size_bytes / 10**9:.1f} GB"
    return f"{max(1, round(size_bytes / 10**6))} MB"


def catalog_choices(catalog: list[CatalogEntry]) -> list[CatalogEntry]:
    """What may be added to this worker: fits it, not there yet; recommended first,
    then chat models before embedding models, small before large."""
    return sorted(
        (entry for entry in catalog if entry.fits and not entry.installed),
        key=lambda e: (not e.recommended, e.kind != "chat", e.disk_bytes, e.name),
    )


def catalog_label(entry: CatalogEntry) -> str:
    """`Name (2.3 GB) 🛠 ★`: size on disk; 🛠 calls tools, ★ recommended, 🔎 embeddings
    (the add step's description explains the marks in the user's language)."""
    marks = [
        mark
        for mark, shown in (
            ("🔎", entry.kind == "embedding"),
            ("🛠", entry.tool_calling),
            ("★", entry.recommended),
        )
        if shown
    ]
    return " ".join([f"{entry.name} ({_size(entry.disk_bytes)})", *marks])


class HearthOptionsFlow(OptionsFlow):
    """A menu: the household's assistant (settings every worker shares, kept by the
    household), this worker (its routing flags, the entry's options), and adding or
    removing this worker's models. Each form changes only what it says."""

    def __init__(self) -> None:
        self._catalog: list[CatalogEntry] | None = None
        self._job: PullJob | None = None
        self._pull_task: asyncio.Task[PullJob] | None = None
        # Why the last pull failed: the add form's errors and the worker's words.
        self._failed: tuple[dict[str, str], str] | None = None

    @property
    def _runtime(self) -> HearthRuntimeData:
        runtime: HearthRuntimeData = self.config_entry.runtime_data
        return runtime

    async def async_step_init(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        menu = ["household", "worker"]
        if self.config_entry.state is ConfigEntryState.LOADED:
            menu += ["add_model", "remove_model"]  # they talk to the worker
        return self.async_show_menu(
            step_id="init",
            menu_options=menu,
            description_placeholders={"name": self.config_entry.title},
        )

    # --- the household's assistant ---------------------------------------------

    async def async_step_household(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Settings of the household's one assistant, whichever worker answers."""
        household = Household.get(self.hass)
        if user_input is not None:
            settings = {**household.settings, **user_input}
            for key in CLEARABLE_SETTINGS:
                settings[key] = user_input.get(key) or None
            settings[CONF_TEMPERATURE] = user_input.get(CONF_TEMPERATURE)  # None: the model's
            settings[CONF_LLM_HASS_API] = filter_invalid_llm_apis(
                self.hass, user_input.get(CONF_LLM_HASS_API)
            )
            await household.async_update_settings(settings)
            # This worker's own options stay as they are.
            return self.async_create_entry(data=dict(self.config_entry.options))

        apis = [
            sel.SelectOptionDict(value=api.id, label=api.name)
            for api in llm.async_get_apis(self.hass)
            if api.id != HOUSEHOLD_API_ID  # Hearth's agent's own (its tools and these)
        ]
        served = [
            model
            for worker in household.workers.values()
            for model in worker.coordinator.info.models
        ]
        chat = sorted({m.id for m in served if m.kind == "chat"})
        embedding = sorted({m.id for m in served if m.kind == "embedding"})
        schema = vol.Schema(
            {
                vol.Optional(CONF_PROMPT): sel.TemplateSelector(),
                vol.Optional(CONF_LLM_HASS_API): sel.SelectSelector(
                    sel.SelectSelectorConfig(options=apis, multiple=True)
                ),
                vol.Required(CONF_MAX_TOKENS): vol.All(
                    sel.NumberSelector(
                        sel.NumberSelectorConfig(min=1, max=8192, mode=sel.NumberSelectorMode.BOX)
                    ),
                    vol.Coerce(int),
                ),
                # Left empty: the model's own default (no temperature sent).
                vol.Optional(CONF_TEMPERATURE): sel.NumberSelector(
                    sel.NumberSelectorConfig(
                        min=0, max=2, step=0.05, mode=sel.NumberSelectorMode.BOX
                    )
                ),
                vol.Optional(CONF_CHAT_MODEL): sel.SelectSelector(
                    sel.SelectSelectorConfig(options=chat, custom_value=True)
                ),
                vol.Optional(CONF_EMBEDDING_MODEL): sel.SelectSelector(
                    sel.SelectSelectorConfig(options=embedding, custom_value=True)
                ),
            }
        )
        suggested = {k: v for k, v in household.settings.items() if v is not None}
        # Not offered back: an API that is gone (its integration removed).
        suggested[CONF_LLM_HASS_API] = filter_invalid_llm_apis(
            self.hass, household.settings.get(CONF_LLM_HASS_API)
        )
        return self.async_show_form(
            step_id="household",
            data_schema=self.add_suggested_values_to_schema(schema, suggested),
        )

    # --- this worker --------------------------------------------------------------

    async def async_step_worker(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """When the router may send this worker requests (this entry's options only)."""
        if user_input is not None:
            flags = {flag: bool(user_input.get(flag, False)) for flag in WORKER_FLAGS}
            return self.async_create_entry(data={**self.config_entry.options, **flags})
        schema = vol.Schema(
            {
                vol.Optional(CONF_ONLY_WHEN_IDLE, default=False): sel.BooleanSelector(),
                vol.Optional(CONF_NOT_ON_BATTERY, default=False): sel.BooleanSelector(),
            }
        )
        suggested = {
            flag: bool(self.config_entry.options.get(flag, False)) for flag in WORKER_FLAGS
        }
        return self.async_show_form(
            step_id="worker",
            data_schema=self.add_suggested_values_to_schema(schema, suggested),
            description_placeholders={"name": self.config_entry.title},
        )

    # --- add a model -------------------------------------------------------------

    async def async_step_add_model(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """A model of the catalog that fits this worker, or any hub id; then pull it."""
        client = self._runtime.coordinator.client
        if self._catalog is None:
            try:
                self._catalog = await client.catalog()
            except HearthError as err:
                LOGGER.debug("No catalog from %s: %s", self.config_entry.title, err)
                self._catalog = []
        choices = catalog_choices(self._catalog)
        errors: dict[str, str] = {}
        details = ""
        if user_input is not None:
            source = str(user_input.get(CONF_SOURCE) or "").strip()
            if not source:
                chosen = user_input.get(CONF_MODEL)
                source = next((e.source for e in choices if e.id == chosen), "")
            if not source:
                errors["base"] = "no_model_chosen"
            elif not valid_source(source):
                errors[CONF_SOURCE] = "invalid_source"
            else:
                try:
                    self._job = await client.pull_model(source)
                except HearthAdminRequiredError:
                    errors["base"] = "admin_required"
                except HearthRequestError as err:
                    errors["base"] = "invalid_source" if err.status == 400 else "pull_refused"
                    details = str(err)
                except HearthError as err:
                    errors["base"] = "cannot_connect"
                    details = str(err)
                else:
                    return await self.async_step_pull()
        elif self._failed is not None:
            (errors, details), self._failed = self._failed, None

        fields: dict[vol.Marker, Any] = {}
        if choices:
            options = [sel.SelectOptionDict(value=e.id, label=catalog_label(e)) for e in choices]
            fields[vol.Optional(CONF_MODEL)] = sel.SelectSelector(
                sel.SelectSelectorConfig(options=options, mode=sel.SelectSelectorMode.LIST)
            )
        fields[vol.Optional(CONF_SOURCE)] = sel.TextSelector()
        return self.async_show_form(
            step_id="add_model",
            data_schema=self.add_suggested_values_to_schema(vol.Schema(fields), user_input or {}),
            errors=errors,
            description_placeholders={"name": self.config_entry.title, "details": details},
        )

    async def async_step_pull(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Wait while the worker downloads; poll its job."""
        assert self._job is not None
        if self._pull_task is None:
            self._pull_task = self.hass.async_create_background_task(
                self._async_follow(self._runtime.coordinator.client, self._job),
                f"Hearth: {self.config_entry.title} pulls {self._job.source}",
            )
        if not self._pull_task.done():
            return self.async_show_progress(
                step_id="pull",
                progress_action="pull",
                progress_task=self._pull_task,
                description_placeholders={
                    "name": self.config_entry.title,
                    "model": self._job.source,
                },
            )
        task, self._pull_task = self._pull_task, None
        try:
            job = task.result()
        except HearthError as err:
            self._job = None  # nothing left to cancel
            self._failed = ({"base": "pull_lost"}, str(err))
            return self.async_show_progress_done(next_step_id="add_model")
        if job.status == PULL_DONE:
            return self.async_show_progress_done(next_step_id="pull_done")
        code = job.error_code or job.status
        self._failed = ({"base": PULL_ERRORS.get(code, "pull_failed")}, job.error_message or "")
        return self.async_show_progress_done(next_step_id="add_model")

    async def _async_follow(self, client: HearthClient, job: PullJob) -> PullJob:
        """Poll the job until it ends; the percentage where Home Assistant shows one."""
        # Flows have async_update_progress from Home Assistant 2025.x on (not in 2025.4).
        update: Callable[[float], None] = getattr(self, "async_update_progress", _no_percentage)
        loop = asyncio.get_running_loop()
        answered = loop.time()
        while job.running:
            if (fraction := job.fraction) is not None:
                update(fraction)
            await asyncio.sleep(PULL_POLL_INTERVAL)
            try:
                job = await client.pull_job(job.id)
            except HearthConnectionError:
                if loop.time() - answered > PULL_UNREACHABLE_FOR:
                    raise
                continue
            answered = loop.time()
            self._job = job
        return job

    async def async_step_pull_done(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """The model is on the worker: show it on its device and to the router now."""
        assert self._job is not None
        model = self._job.model.id if self._job.model else self._job.source
        await self._async_models_changed()
        return self.async_abort(
            reason="model_added",
            description_placeholders={"name": self.config_entry.title, "model": model},
        )

    @callback
    def async_remove(self) -> None:
        """The flow was closed: a download it started and still runs is cancelled."""
        if self._job is None or not self._job.running:
            return
        job, self._job = self._job, None
        self.hass.async_create_background_task(
            self._async_cancel(self._runtime.coordinator.client, job),
            f"Hearth: cancel pulling {job.source}",
        )

    async def _async_cancel(self, client: HearthClient, job: PullJob) -> None:
        try:
            await client.cancel_pull(job.id)
        except HearthError as err:
            LOGGER.warning(
                "Could not cancel pulling %s on %s: %s", job.source, client.base_url, err
            )

    async def _async_models_changed(self) -> None:
        """Read the worker's models again (device, router, the household's choices)."""
        await self._runtime.coordinator.async_refresh_models()

    # --- remove a model --------------------------------------------------------

    async def async_step_remove_model(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Delete one of this worker's models (not one it was started with)."""
        runtime = self._runtime
        models = runtime.coordinator.info.models
        if not models:
            return self.async_abort(
                reason="no_models", description_placeholders={"name": self.config_entry.title}
            )
        errors: dict[str, str] = {}
        details = ""
        if user_input is not None:
            model = str(user_input[CONF_MODEL])
            try:
                await runtime.coordinator.client.remove_model(model)
            except HearthAdminRequiredError:
                errors["base"] = "admin_required"
            except HearthRequestError as err:
                if err.code != "model_not_found":  # else already gone: what was asked for
                    errors["base"] = REMOVE_ERRORS.get(err.code, "remove_refused")
                    details = str(err)
            except HearthError as err:
                errors["base"] = "cannot_connect"
                details = str(err)
            if not errors:
                await self._async_models_changed()
                return self.async_abort(
                    reason="model_removed",
                    description_placeholders={"name": self.config_entry.title, "model": model},
                )
        options = [
            sel.SelectOptionDict(value=m.id, label=f"{m.id} ({_size(m.size_bytes)})")
            if m.size_bytes
            else sel.SelectOptionDict(value=m.id, label=m.id)
            for m in models
        ]
        schema = vol.Schema(
            {
                vol.Required(CONF_MODEL): sel.SelectSelector(
                    sel.SelectSelectorConfig(options=options, mode=sel.SelectSelectorMode.LIST)
                )
            }
        )
        return self.async_show_form(
            step_id="remove_model",
            data_schema=self.add_suggested_values_to_schema(schema, user_input or {}),
            errors=errors,
            description_placeholders={"name": self.config_entry.title, "details": details},
        )
