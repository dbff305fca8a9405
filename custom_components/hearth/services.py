"""Hearth's actions: hearth.ask, and the preference actions (list, set, delete, export, wipe)."""

from __future__ import annotations

from typing import Any, cast

import voluptuous as vol
from homeassistant.core import (
    HomeAssistant,
    ServiceCall,
    ServiceResponse,
    SupportsResponse,
    callback,
)
from homeassistant.exceptions import HomeAssistantError, ServiceValidationError, Unauthorized
from homeassistant.helpers import config_validation as cv
from homeassistant.util import dt as dt_util

from .assistant import (
    FINISH_LENGTH,
    AnswerLengthLimitError,
    answer_max_tokens,
    async_error_text,
    request_body,
    system_prompt,
)
from .const import DOMAIN, SERVICE_ASK
from .household import Household, MessageTooLongError
from .preference_store import CATEGORIES, STORAGE_VERSION
from .preferences import (
    DATA_PREFERENCES,
    MAX_VALUE_LENGTH,
    Member,
    Preferences,
    async_member_for_user,
    member_for_person,
)

SERVICE_PREFERENCES_LIST = "preferences_list"
SERVICE_PREFERENCES_SET = "preferences_set"
SERVICE_PREFERENCES_DELETE = "preferences_delete"
SERVICE_PREFERENCES_EXPORT = "preferences_export"
SERVICE_PREFERENCES_WIPE = "preferences_wipe"

ATTR_PROMPT = "prompt"
ATTR_INSTRUCTIONS = "instructions"
ATTR_MAX_TOKENS = "max_tokens"
ATTR_PERSON = "person"
ATTR_USER_ID = "user_id"
ATTR_CATEGORY = "category"
ATTR_VALUE = "value"
ATTR_ID = "id"
ATTR_EVERYONE = "everyone"

ASK_SCHEMA = vol.Schema(
    {
        vol.Required(ATTR_PROMPT): cv.string,
        vol.Optional(ATTR_INSTRUCTIONS): cv.string,
        vol.Optional(ATTR_MAX_TOKENS): vol.All(vol.Coerce(int), vol.Range(min=1, max=8192)),
        vol.Optional(ATTR_PERSON): cv.entity_domain("person"),
    }
)


@callback
def async_setup_services(hass: HomeAssistant) -> None:
    """Register hearth.ask."""

    async def async_ask(call: ServiceCall) -> ServiceResponse:
        household = Household.get(hass)
        prompt: str = call.data[ATTR_PROMPT]
        if not prompt.strip():
            raise ServiceValidationError(translation_domain=DOMAIN, translation_key="empty_prompt")
        if len(prompt) > (limit := household.prompt_char_limit()):
            raise MessageTooLongError(len(prompt), limit)
        messages: list[dict[str, Any]] = []
        preferences: str | None = None
        if person := call.data.get(ATTR_PERSON):  # that person's preferences, as in Assist
            member = member_for_person(hass, person)
            # As the preference actions: a user who is not an administrator may
            # only bring their own preferences into an answer.
            await _async_check_allowed(hass, call, member)
            preferences = await hass.data[DATA_PREFERENCES].async_prompt(member, prompt)
        if instructions := system_prompt(call.data.get(ATTR_INSTRUCTIONS), preferences):
            messages.append({"role": "system", "content": instructions})
        messages.append({"role": "user", "content": prompt})
        max_tokens: int = call.data.get(ATTR_MAX_TOKENS) or answer_max_tokens(household.settings)
        body = request_body(household.settings, messages, max_tokens=max_tokens)
        done = await household.async_complete(body, purpose="task")
        finish_reason = next(
            (d.finish_reason for d in reversed(done.deltas) if d.finish_reason), None
        )
        cut: HomeAssistantError | None = done.cut_off
        if cut is None and finish_reason == FINISH_LENGTH:
            cut = AnswerLengthLimitError(max_tokens)
        error = None if cut is None else await async_error_text(hass, hass.config.language, cut)
        # Nothing at all is an error (NoWorkerError); an answer cut off (a worker
        # that broke off, or the length limit) is partial and says why.
        return {
            "answer": done.text.strip(),
            "worker": done.worker.name,
            "partial": cut is not None,
            "finish_reason": None if done.cut_off is not None else finish_reason,
            "error": error,
        }

    hass.services.async_register(
        DOMAIN,
        SERVICE_ASK,
        async_ask,
        schema=ASK_SCHEMA,
        supports_response=SupportsResponse.ONLY,
    )
    async_setup_preference_services(hass)


TARGET_SCHEMA: dict[Any, Any] = {
    vol.Exclusive(ATTR_PERSON, "target"): cv.entity_domain("person"),
    vol.Exclusive(ATTR_USER_ID, "target"): cv.string,
}
PREFERENCES_LIST_SCHEMA = vol.Schema(TARGET_SCHEMA)
PREFERENCES_SET_SCHEMA = vol.Schema(
    {
        **TARGET_SCHEMA,
        vol.Required(ATTR_CATEGORY): vol.In(list(CATEGORIES)),
        vol.Required(ATTR_VALUE): vol.All(cv.string, vol.Length(min=1, max=MAX_VALUE_LENGTH)),
    }
)
PREFERENCES_DELETE_SCHEMA = vol.All(
    vol.Schema(
        {
            **TARGET_SCHEMA,
            vol.Optional(ATTR_ID): cv.string,
            vol.Optional(ATTR_CATEGORY): vol.In(list(CATEGORIES)),
            vol.Optional(ATTR_VALUE): cv.string,
        }
    ),
    cv.has_at_least_one_key(ATTR_ID, ATTR_CATEGORY, ATTR_VALUE),
)
PREFERENCES_ALL_SCHEMA = vol.Schema(
    {
        vol.Exclusive(ATTR_PERSON, "target"): cv.entity_domain("person"),
        vol.Exclusive(ATTR_USER_ID, "target"): cv.string,
        vol.Exclusive(ATTR_EVERYONE, "target"): cv.boolean,
    }
)


async def _async_member(hass: HomeAssistant, call: ServiceCall) -> Member:
    """The member an action is about: the person or user given, else whoever calls.

    A user who is not an administrator may only touch their own preferences.
    """
    if person := call.data.get(ATTR_PERSON):
        member = member_for_person(hass, person)
    else:
        user_id = call.data.get(ATTR_USER_ID) or call.context.user_id
        found = await async_member_for_user(hass, user_id)
        if found is None:
            raise ServiceValidationError(
                translation_domain=DOMAIN,
                translation_key="preferences_no_person"
                if user_id is None
                else "preferences_unknown_user",
                translation_placeholders={"user_id": str(user_id)},
            )
        member = found
    await _async_check_allowed(hass, call, member)
    return member


async def _async_check_allowed(
    hass: HomeAssistant, call: ServiceCall, member: Member | None
) -> None:
    """Administrators and automations may touch anyone's; users only their own."""
    if call.context.user_id is None:
        return
    caller = await hass.auth.async_get_user(call.context.user_id)
    if caller is None or caller.is_admin:
        return
    if member is None or member.user_id != caller.id:
        raise Unauthorized(context=call.context)


def _preferences(hass: HomeAssistant) -> Preferences:
    prefs: Preferences = hass.data[DATA_PREFERENCES]
    return prefs


@callback
def async_setup_preference_services(hass: HomeAssistant) -> None:
    """Register the preference actions."""

    async def async_list(call: ServiceCall) -> ServiceResponse:
        member = await _async_member(hass, call)
        items = _preferences(hass).items(member.key)
        return {"person": member.name, "preferences": cast(Any, items)}

    async def async_set(call: ServiceCall) -> ServiceResponse:
        member = await _async_member(hass, call)
        item = await _preferences(hass).async_set(
            member, call.data[ATTR_CATEGORY], call.data[ATTR_VALUE]
        )
        return {"person": member.name, "preference": item}

    async def async_delete(call: ServiceCall) -> ServiceResponse:
        member = await _async_member(hass, call)
        prefs = _preferences(hass)
        found = prefs.find(
            member.key,
            item_id=call.data.get(ATTR_ID),
            category=call.data.get(ATTR_CATEGORY),
            value=call.data.get(ATTR_VALUE),
        )
        removed = await prefs.async_delete(member.key, [item["id"] for item in found])
        return {"person": member.name, "deleted": cast(Any, removed)}

    async def async_export(call: ServiceCall) -> ServiceResponse:
        prefs = _preferences(hass)
        if call.data.get(ATTR_EVERYONE):
            await _async_check_allowed(hass, call, None)
            members = prefs.export()
        else:
            members = prefs.export((await _async_member(hass, call)).key)
        return {
            "format": "hearth.preferences",
            "version": STORAGE_VERSION,
            "exported_at": dt_util.utcnow().isoformat(),
            "store_readable": prefs.corrupt is None,
            "members": members,
        }

    async def async_wipe(call: ServiceCall) -> ServiceResponse:
        prefs = _preferences(hass)
        if call.data.get(ATTR_EVERYONE):
            await _async_check_allowed(hass, call, None)
            return {"wiped": await prefs.async_wipe(None)}
        member = await _async_member(hass, call)
        return {"person": member.name, "wiped": await prefs.async_wipe(member.key)}

    for name, handler, schema, response in (
        (SERVICE_PREFERENCES_LIST, async_list, PREFERENCES_LIST_SCHEMA, SupportsResponse.ONLY),
        (SERVICE_PREFERENCES_SET, async_set, PREFERENCES_SET_SCHEMA, SupportsResponse.OPTIONAL),
        (
            SERVICE_PREFERENCES_DELETE,
            async_delete,
            PREFERENCES_DELETE_SCHEMA,
            SupportsResponse.OPTIONAL,
        ),
        (SERVICE_PREFERENCES_EXPORT, async_export, PREFERENCES_ALL_SCHEMA, SupportsResponse.ONLY),
        (SERVICE_PREFERENCES_WIPE, async_wipe, PREFERENCES_ALL_SCHEMA, SupportsResponse.OPTIONAL),
    ):
        hass.services.async_register(
            DOMAIN, name, handler, schema=schema, supports_response=response
        )
