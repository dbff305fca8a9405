"""Config flow: zeroconf, Supervisor (add-on) discovery, manual host/port; reauth, reconfigure.

Every pairing pins the worker's certificate (entry data `fingerprint`), proven by
the pairing exchange (client.py). Plain HTTP and addresses outside the home network
are explicit options of the manual step, off by default.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
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
from homeassistant.core import callback
from homeassistant.helpers import llm
from homeassistant.helpers import selector as sel
from homeassistant.helpers.aiohttp_client import async_get_clientsession
from homeassistant.helpers.service_info.hassio import HassioServiceInfo
from homeassistant.helpers.service_info.zeroconf import ZeroconfServiceInfo

from .client import (
    HearthAddressError,
    HearthAuthError,
    HearthCertificateError,
    HearthClient,
    HearthConnectionError,
    HearthError,
    HearthPairingError,
    PairResult,
    WorkerInfo,
)
from .const import (
    CLIENT_NAME,
    CONF_ALLOW_PUBLIC,
    CONF_CHAT_MODEL,
    CONF_CODE,
    CONF_FINGERPRINT,
    CONF_LLM_HASS_API,
    CONF_MAX_TOKENS,
    CONF_NODE_ID,
    CONF_NOT_ON_BATTERY,
    CONF_ONLY_WHEN_IDLE,
    CONF_PLAIN_HTTP,
    CONF_PREFER_LOCAL_INTENTS,
    CONF_PROMPT,
    CONF_TEMPERATURE,
    CONF_TOKEN_ID,
    DEFAULT_PORT,
    DOMAIN,
    LOGGER,
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
        await self.async_set_unique_id(self._hassio["node_id"])
        self._abort_if_unique_id_configured(
            updates={
                CONF_HOST: self._host,
                CONF_PORT: self._port,
                CONF_TOKEN: self._hassio["token"],
                CONF_FINGERPRINT: fingerprint,
                CONF_PLAIN_HTTP: self._plain_http,
            }
        )
        self.context["title_placeholders"] = {"name": self._name}
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
            if paired is not None:
                await self.async_set_unique_id(paired.node_id)
                self._abort_if_unique_id_mismatch(reason="wrong_worker")
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
            if info is not None:
                await self.async_set_unique_id(info.node_id)
                self._abort_if_unique_id_mismatch(reason="wrong_worker")
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


class HearthOptionsFlow(OptionsFlow):
    """The household's assistant settings (shared by every worker entry), and this
    worker's routing flags (the entry's own options)."""

    async def async_step_init(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        from . import get_cluster  # noqa: PLC0415 - avoids an import cycle

        cluster = get_cluster(self.hass)
        if user_input is not None:
            settings = dict(user_input)
            flags = {flag: bool(settings.pop(flag, False)) for flag in WORKER_FLAGS}
            settings.setdefault(CONF_PROMPT, None)
            settings.setdefault(CONF_CHAT_MODEL, None)
            settings[CONF_LLM_HASS_API] = list(settings.get(CONF_LLM_HASS_API) or [])
            await cluster.async_update_settings(settings)
            return self.async_create_entry(data={**self.config_entry.options, **flags})

        apis = [
            sel.SelectOptionDict(value=api.id, label=api.name)
            for api in llm.async_get_apis(self.hass)
        ]
        models = sorted(
            {
                name
                for worker in cluster.workers.values()
                for name in worker.coordinator.info.chat_models
            }
        )
        settings = cluster.settings
        schema = vol.Schema(
            {
                vol.Optional(CONF_PROMPT): sel.TemplateSelector(),
                vol.Optional(CONF_LLM_HASS_API): sel.SelectSelector(
                    sel.SelectSelectorConfig(options=apis, multiple=True)
                ),
                vol.Required(CONF_PREFER_LOCAL_INTENTS): sel.BooleanSelector(),
                vol.Required(CONF_MAX_TOKENS): vol.All(
                    sel.NumberSelector(
                        sel.NumberSelectorConfig(min=1, max=8192, mode=sel.NumberSelectorMode.BOX)
                    ),
                    vol.Coerce(int),
                ),
                vol.Required(CONF_TEMPERATURE): sel.NumberSelector(
                    sel.NumberSelectorConfig(min=0, max=2, step=0.05)
                ),
                vol.Optional(CONF_CHAT_MODEL): sel.SelectSelector(
                    sel.SelectSelectorConfig(options=models, custom_value=True)
                ),
                # This worker only: when the router may send it requests.
                vol.Optional(CONF_ONLY_WHEN_IDLE, default=False): sel.BooleanSelector(),
                vol.Optional(CONF_NOT_ON_BATTERY, default=False): sel.BooleanSelector(),
            }
        )
        suggested = {k: v for k, v in settings.items() if v is not None}
        suggested.update(
            {flag: bool(self.config_entry.options.get(flag, False)) for flag in WORKER_FLAGS}
        )
        return self.async_show_form(
            step_id="init",
            data_schema=self.add_suggested_values_to_schema(schema, suggested),
        )
